"""Where a DCP checkpoint stores each embedding table, and reading rows of it without a model.

The checkpoint metadata lists, per table, the chunks each training rank saved (table-wise: one
chunk; column-wise / table-column-wise: column slices; row-wise / table-row-wise: row slices;
data-parallel: one copy) with their ``offsets`` and ``sizes`` and where their bytes lie.
``read_window`` fills rows [start, stop) of a table from every chunk that overlaps them (row and
column offsets alike), reading just those rows' bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from aitm_torchrec.schema import SparseFeature, wide_table_name
from aitm_torchrec.zch import EMPTY_KEY, lookup_rows, sorted_map

# The train wrapper's state is saved under "model"; its MultiTaskModel is its ``model``.
TABLE_KEY = "model.model.ebc.embedding_bags.{}.weight"
# zch tables: the managed-collision EBC's table, and its module's key -> row map (zch.py).
ZCH_TABLE_KEY = "model.model.mc_ebc._embedding_module.embedding_bags.{}.weight"
ZCH_MAP_KEY = "model.model.mc_ebc._managed_collision_collection._managed_collision_modules.{}.{}"
# The wide tables of WIDE feature groups (``wide_<feature>``): their own collection.
WIDE_TABLE_KEY = "model.model.wide_ebc.embedding_bags.{}.weight"
# The task tables of task_embeddings (``task_<tower>_<feature>``): theirs.
TASK_TABLE_KEY = "model.model.task_ebc.embedding_bags.{}.weight"


class ExportError(ValueError):
    """Bad export arguments or a mismatched output directory, with the table/file/column named."""


@dataclass(frozen=True)
class Chunk:
    """A stored piece of a table: rows [row0, row0+rows) x cols [col0, col0+cols), row-major at
    byte ``offset`` of ``file``."""

    row0: int
    col0: int
    rows: int
    cols: int
    file: str
    offset: int


@dataclass
class ZchMap:
    """A zch table's trained key -> row map, read from the checkpoint."""

    sorted_keys: torch.Tensor  # int64 ascending, EMPTY_KEY (empty slots) last
    rows: torch.Tensor  # the row of each sorted key
    zch_size: int
    world_size: int  # of the training run that saved it: where its default rows are

    def row_keys(self, start: int, stop: int) -> pa.Array:
        """The key held by each row in [start, stop): int64, null where no key is held."""
        keys = np.full(stop - start, EMPTY_KEY, np.int64)
        in_window = (self.rows >= start) & (self.rows < stop) & (self.sorted_keys != EMPTY_KEY)
        keys[(self.rows[in_window] - start).numpy()] = self.sorted_keys[in_window].numpy()
        return pa.array(keys, mask=keys == EMPTY_KEY)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """zch keys -> (rows, default): the held row, else the key's trained default row."""
        rows, default = lookup_rows(torch.from_numpy(keys), self.sorted_keys, self.rows, self.zch_size,
                                    self.world_size)
        return rows.numpy(), default.numpy()


class _FileSlice(io.RawIOBase):
    """Bytes [offset, offset+length) of an open file, as a seekable file of their own."""

    def __init__(self, f: io.BufferedReader, offset: int, length: int) -> None:
        self.f, self.base, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = [pos, self.pos + pos, self.length + pos][whence]
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.base + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def table_chunks(path: Path, feature: SparseFeature, wide_dim: int = 0, task_table: str = "",
                 task_dim: int = 0) -> tuple[np.dtype, list[Chunk]]:
    """Where the checkpoint at ``path`` stores ``feature``'s table (``wide_dim`` > 0: the
    feature's wide table, ``wide_dim`` columns; ``task_table``: that task table of the feature,
    ``task_dim`` columns): dtype and stored chunks.

    Each chunk's header is read with ``torch.load(map_location="meta")`` (no tensor data), which
    gives the byte offset of its storage; DCP saves every chunk as its own contiguous tensor."""
    reader = FileSystemReader(str(path))
    md = reader.read_metadata()
    if task_table:
        name, key, dim = task_table, TASK_TABLE_KEY.format(task_table), task_dim
    elif wide_dim:
        name, key, dim = wide_table_name(feature.name), WIDE_TABLE_KEY.format(wide_table_name(feature.name)), wide_dim
    else:
        name, key, dim = feature.name, (ZCH_TABLE_KEY if feature.is_zch else TABLE_KEY).format(feature.name), \
            feature.embedding_dim
    tm = md.state_dict_metadata.get(key)
    if tm is None or not hasattr(tm, "chunks"):
        raise ExportError(f"{path}: the checkpoint holds no table {name!r} (key {key})")
    if tuple(tm.size) != (feature.num_embeddings, dim):
        raise ExportError(f"{path}: table {name!r} is {tuple(tm.size)} in the checkpoint but "
                          f"{feature.num_embeddings} x {dim} in the config")
    try:
        dtype = torch.empty(0, dtype=tm.properties.dtype).numpy().dtype
    except TypeError:
        raise ExportError(f"{path}: table {name!r} is stored as {tm.properties.dtype}, which "
                          "numpy cannot hold") from None
    chunks = []
    for index, info in md.storage_data.items():
        if index.fqn != key:
            continue
        if info.transform_descriptors:
            raise ExportError(f"{path}: table {name!r} is stored with transforms "
                              f"{info.transform_descriptors}; the export reads plain DCP files only")
        file = str(Path(path) / info.relative_path)
        with open(file, "rb") as f:
            t = torch.load(_FileSlice(f, info.offset, info.length), map_location="meta", weights_only=True)
        if not t.is_contiguous() or t.dim() != 2:
            raise ExportError(f"{path}: a chunk of table {name!r} is not a contiguous matrix")
        start = info.offset + t.untyped_storage()._checkpoint_offset + t.storage_offset() * dtype.itemsize
        chunks.append(Chunk(index.offset[0], index.offset[1], t.shape[0], t.shape[1], file, start))
    covered = sum(c.rows * c.cols for c in chunks)
    if covered != feature.num_embeddings * dim:
        raise ExportError(f"{path}: the stored chunks of table {name!r} cover {covered} of "
                          f"{feature.num_embeddings * dim} values")
    return dtype, sorted(chunks, key=lambda c: (c.row0, c.col0))


def read_zch_map(path: Path, feature: SparseFeature, world_size: int) -> ZchMap:
    """zch table ``feature``'s key -> row map from the checkpoint at ``path`` (saved by
    ``world_size`` ranks): the module's two buffers, read whole by DCP in this process alone."""
    names = ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping")
    state = {ZCH_MAP_KEY.format(feature.name, n): torch.zeros(feature.zch_size, dtype=torch.int64) for n in names}
    md = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in state if k not in md]
    if missing:
        raise ExportError(f"{path}: the checkpoint holds no key -> row map of zch table {feature.name!r} "
                          f"(keys {', '.join(missing)})")
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    keys, rows = sorted_map(*state.values())
    return ZchMap(keys, rows, feature.zch_size, world_size)


def read_window(chunks: list[Chunk], dtype: np.dtype, dim: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a table stored as ``chunks``, (stop - start) x dim, stitched from
    every overlapping stored chunk (row and column offsets), reading only those rows' bytes."""
    out = np.empty((stop - start, dim), dtype)
    for c in chunks:
        lo, hi = max(start, c.row0), min(stop, c.row0 + c.rows)
        if lo >= hi:
            continue
        row_bytes = c.cols * dtype.itemsize
        with open(c.file, "rb", buffering=0) as f:
            f.seek(c.offset + (lo - c.row0) * row_bytes)
            if c.col0 == 0 and c.cols == dim:
                dest = out[lo - start:hi - start]
                _read_exact(f, dest, c.file)
            else:
                part = np.empty((hi - lo, c.cols), dtype)
                _read_exact(f, part, c.file)
                out[lo - start:hi - start, c.col0:c.col0 + c.cols] = part
    return out


def _read_exact(f: Any, dest: np.ndarray, name: str) -> None:
    view = memoryview(dest.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ExportError(f"{name}: the checkpoint file ends early")
        done += n


