"""Table export: a training checkpoint's embedding tables -> Parquet (or npy), streamed, any world size.

``python launch/export.py embeddings --output DIR [--config FILE] [--checkpoint DIR] [--tables T,...]
[--ids-from TABLE=PATH:COLUMN ...] [--format parquet|npy] [--dtype float32|float16] [key.path=value ...]``

How it reads: straight from the DCP checkpoint's stored chunks, never through a model. The
checkpoint metadata lists, per table, the chunks each training rank saved (table-wise: one chunk;
column-wise / table-column-wise: column slices; row-wise / table-row-wise: row slices;
data-parallel: one copy) with their ``offsets`` and ``sizes`` and where their bytes lie. Each
table is cut into row windows of ``--chunk-rows`` rows; window ``g`` (counted over all tables) is
exported by rank ``g mod world_size``. A window is filled from every stored chunk that overlaps it
(row offsets and column offsets alike, so column slices are stitched back per row window), by
reading just those rows' bytes, then written as one part file. So a rank holds one window
(``chunk_rows x dim``) plus Parquet's buffers, whatever the table size or the training plan, and
nothing is gathered anywhere. The export job needs no sharding plan of its own.

Layout (``DIR``):
- ``<table>/part-<rank>-<k>.parquet``: window ``k`` of the table (rows [k*chunk_rows, ...)),
  written by ``rank``; columns ``row`` int64 and ``embedding`` fixed_size_list<float32|float16>[dim].
  Tables given ``--ids-from``: the same windows, but one output row per distinct raw id whose row
  falls in the window, with columns ``id`` (int64 or string), ``row``, ``embedding``, sorted by row.
  ``--format npy``: ``part-<rank>-<k>.npy``, the window's rows x dim matrix (row = row_start + i).
  zch tables (stored under ``ZCH_TABLE_KEY``; parquet only): a ``key`` column after ``row``, the
  zch key each row holds (null: none), from the module's key -> row map (``read_zch_map``, read
  whole by every rank). With ``--ids-from``: ``id``, ``row``, ``key`` (the id's zch key),
  ``default_row`` (the id is not held: it reads the default row it read in training,
  ``zch.default_rows`` for the checkpoint's world size), ``embedding``.
- ``<table>/_part-<rank>-<k>.json``: the part's sidecar (rows, bytes, sha256), written after the
  part was renamed into place: a part with its sidecar is complete.
- ``_export.json``: what this export is (checkpoint, step, schema hash, tables, format, dtype,
  windows, id sources); a re-run with anything different stops unless ``--overwrite``.
- ``schema.json``, ``manifest.json`` and, last, ``_SUCCESS`` (rank 0, after every rank finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from tqdm import tqdm

from aitm_torchrec import dist as aitm_dist
from aitm_torchrec.config import load_config
from aitm_torchrec.data.source import check_feature_type, expand_paths
from aitm_torchrec.features import DataError, Source, ids_to_rows, is_string
from aitm_torchrec.files import sha256_file, write_json_atomic
from aitm_torchrec.inference import checkpoint_meta, resolve_checkpoint
from aitm_torchrec.schema import ID_HASH, SparseFeature
from aitm_torchrec.zch import EMPTY_KEY, default_rows, lookup_rows, sorted_map

logger = logging.getLogger(__name__)

# The train wrapper's state is saved under "model"; its MultiTaskModel is its ``model``.
TABLE_KEY = "model.model.ebc.embedding_bags.{}.weight"
# zch tables: the managed-collision EBC's table, and its module's key -> row map (zch.py).
ZCH_TABLE_KEY = "model.model.mc_ebc._embedding_module.embedding_bags.{}.weight"
ZCH_MAP_KEY = "model.model.mc_ebc._managed_collision_collection._managed_collision_modules.{}.{}"
DIE_AFTER_PARTS = "AITM_TEST_EXPORT_DIE_AFTER_PARTS"  # test hook: os._exit after writing N parts
PARQUET_BATCH_ROWS = 65536  # rows per Parquet write (and row group): bounds the writer's buffers


class ExportError(ValueError):
    """Bad export arguments or a mismatched output directory, with the table/file/column named."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--config", help="YAML config (default: configs/aitm_taobao.yaml)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: newest under model_dir/checkpoints)")
    p.add_argument("--tables", help="comma-separated tables (default: all)")
    p.add_argument("--ids-from", action="append", default=[], metavar="TABLE=PATH:COLUMN",
                   help="raw ids for TABLE from a Parquet file/glob/dir's COLUMN: export one row per distinct id")
    p.add_argument("--format", choices=("parquet", "npy"), default="parquet")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows per part file (the memory bound)")
    p.add_argument("--overwrite", action="store_true", help="replace an export of another checkpoint/config")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")


# ---- the plan: every rank computes the same one ----------------------------------------------


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
class Ids:
    """Distinct raw ids of one table, sorted by row, with the row the training rule gives each
    (zch tables: also each id's key and whether it reads a default row)."""

    source: str
    ids: pa.Array
    rows: np.ndarray  # int64, ascending
    keys: np.ndarray | None = None  # zch: int64 zch keys
    default: np.ndarray | None = None  # zch: bool, the id is not held (a default row)

    def summary(self) -> dict[str, Any]:
        uniq, counts = np.unique(self.rows, return_counts=True)
        out = {"source": self.source, "id_type": str(self.ids.type), "distinct_ids": len(self.rows),
               "rows_hit": len(uniq), "collisions": len(self.rows) - len(uniq),
               "rows_with_collisions": int((counts > 1).sum())}
        if self.default is not None:
            out["default_row_ids"] = int(self.default.sum())
        return out


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


@dataclass
class Table:
    feature: SparseFeature
    dtype: np.dtype  # as stored
    chunks: list[Chunk]
    ids: Ids | None = None
    zch: ZchMap | None = None

    @property
    def name(self) -> str:
        return self.feature.name

    @property
    def rows(self) -> int:
        return self.feature.num_embeddings

    @property
    def dim(self) -> int:
        return self.feature.embedding_dim


@dataclass(frozen=True)
class Window:
    index: int  # over all tables: its writer is index mod world_size
    table: str
    k: int  # within the table
    start: int
    stop: int


def parse_ids_from(specs: list[str], tables: dict[str, SparseFeature]) -> dict[str, tuple[str, str]]:
    """``TABLE=PATH:COLUMN`` items -> {table: (path, column)}."""
    out = {}
    for spec in specs:
        table, eq, rest = spec.partition("=")
        path, colon, column = rest.rpartition(":")
        if not (eq and colon and table and path and column):
            raise ExportError(f"--ids-from {spec!r}: expected TABLE=PATH:COLUMN")
        if table not in tables:
            raise ExportError(f"--ids-from {spec!r}: unknown table {table!r}; tables: {', '.join(tables)}")
        if table in out:
            raise ExportError(f"--ids-from: table {table!r} given twice")
        out[table] = (path, column)
    return out


def read_ids(feature: SparseFeature, path: str, column: str, zch: ZchMap | None = None) -> Ids:
    """Distinct raw ids of ``column`` in the Parquet file(s) at ``path`` (tags split into their
    individual ids, nulls and empty strings dropped, as the reader does) and their rows under
    the feature's id rule (``features.ids_to_rows``, the function training uses). zch tables:
    ``ids_to_rows`` gives the ids' zch keys, ``zch`` (the trained map) their rows."""
    feature = dataclasses.replace(feature, column=column)  # errors name the id column
    try:
        files = expand_paths([path], f"--ids-from for table {feature.name!r}:")
    except DataError as e:
        raise ExportError(str(e)) from None
    for f in files:
        names = pq.read_schema(f).names
        if column not in names:
            raise ExportError(f"--ids-from for table {feature.name!r}: {f} has no column {column!r}")
        try:
            check_feature_type(feature, pq.read_schema(f).field(column).type, f)
        except DataError as e:
            raise ExportError(f"--ids-from for table {feature.name!r}: {e}") from None
    distinct: list[pa.Array] = []
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            distinct.append(_distinct_ids(feature, pf.read_row_group(g, columns=[column]).column(0)))
    types = {str(a.type) for a in distinct}
    if len(types) > 1:
        raise ExportError(f"--ids-from for table {feature.name!r}: {path} mixes id types {sorted(types)}")
    ids = pc.unique(pa.concat_arrays(distinct)) if distinct else pa.array([], pa.int64())
    rows = ids_to_rows(feature, ids, Source(path)) if len(ids) else np.zeros(0, np.int64)
    keys = default = None
    if zch is not None:
        keys = rows
        rows, default = zch.lookup(keys)
    order = np.lexsort((np.arange(len(rows)), rows))  # by row, then first appearance
    return Ids(f"{path}:{column}", ids.take(pa.array(order)), rows[order],
               *((keys[order], default[order]) if zch is not None else ()))


def _distinct_ids(feature: SparseFeature, column: pa.ChunkedArray) -> pa.Array:
    """The individual non-missing ids of one column chunk, distinct, int64 or large_string."""
    arr = column.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if feature.separator and is_string(arr.type):
        arr = pc.split_pattern(arr, feature.separator)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        arr = arr.flatten()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
    arr = arr.drop_null()
    if is_string(arr.type):
        arr = arr.filter(pc.not_equal(pc.utf8_length(arr), 0)).cast(pa.large_string())
    else:
        arr = arr.cast(pa.int64())
    return pc.unique(arr)


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


def table_chunks(path: Path, feature: SparseFeature) -> tuple[np.dtype, list[Chunk]]:
    """Where the checkpoint at ``path`` stores ``feature``'s table: dtype and stored chunks.

    Each chunk's header is read with ``torch.load(map_location="meta")`` (no tensor data), which
    gives the byte offset of its storage; DCP saves every chunk as its own contiguous tensor."""
    reader = FileSystemReader(str(path))
    md = reader.read_metadata()
    key = (ZCH_TABLE_KEY if feature.is_zch else TABLE_KEY).format(feature.name)
    tm = md.state_dict_metadata.get(key)
    if tm is None or not hasattr(tm, "chunks"):
        raise ExportError(f"{path}: the checkpoint holds no table {feature.name!r} (key {key})")
    if tuple(tm.size) != (feature.num_embeddings, feature.embedding_dim):
        raise ExportError(f"{path}: table {feature.name!r} is {tuple(tm.size)} in the checkpoint but "
                          f"{feature.num_embeddings} x {feature.embedding_dim} in the config")
    try:
        dtype = torch.empty(0, dtype=tm.properties.dtype).numpy().dtype
    except TypeError:
        raise ExportError(f"{path}: table {feature.name!r} is stored as {tm.properties.dtype}, which "
                          "numpy cannot hold") from None
    chunks = []
    for index, info in md.storage_data.items():
        if index.fqn != key:
            continue
        if info.transform_descriptors:
            raise ExportError(f"{path}: table {feature.name!r} is stored with transforms "
                              f"{info.transform_descriptors}; the export reads plain DCP files only")
        file = str(Path(path) / info.relative_path)
        with open(file, "rb") as f:
            t = torch.load(_FileSlice(f, info.offset, info.length), map_location="meta", weights_only=True)
        if not t.is_contiguous() or t.dim() != 2:
            raise ExportError(f"{path}: a chunk of table {feature.name!r} is not a contiguous matrix")
        start = info.offset + t.untyped_storage()._checkpoint_offset + t.storage_offset() * dtype.itemsize
        chunks.append(Chunk(index.offset[0], index.offset[1], t.shape[0], t.shape[1], file, start))
    covered = sum(c.rows * c.cols for c in chunks)
    if covered != feature.num_embeddings * feature.embedding_dim:
        raise ExportError(f"{path}: the stored chunks of table {feature.name!r} cover {covered} of "
                          f"{feature.num_embeddings * feature.embedding_dim} values")
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


def windows(tables: list[Table], chunk_rows: int) -> list[Window]:
    out = []
    for t in tables:
        for k, start in enumerate(range(0, t.rows, chunk_rows)):
            out.append(Window(len(out), t.name, k, start, min(start + chunk_rows, t.rows)))
    return out


# ---- one window: read, write, record ---------------------------------------------------------


def read_window(table: Table, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the table, (stop - start) x dim, stitched from every overlapping
    stored chunk (row and column offsets), reading only those rows' bytes."""
    out = np.empty((stop - start, table.dim), table.dtype)
    for c in table.chunks:
        lo, hi = max(start, c.row0), min(stop, c.row0 + c.rows)
        if lo >= hi:
            continue
        row_bytes = c.cols * table.dtype.itemsize
        with open(c.file, "rb", buffering=0) as f:
            f.seek(c.offset + (lo - c.row0) * row_bytes)
            if c.col0 == 0 and c.cols == table.dim:
                dest = out[lo - start:hi - start]
                _read_exact(f, dest, c.file)
            else:
                part = np.empty((hi - lo, c.cols), table.dtype)
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


def _embedding_array(values: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def write_part(path: Path, table: Table, w: Window, values: np.ndarray, fmt: str) -> int:
    """Writes one part atomically (temporary name, then rename); returns its output rows."""
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "npy":
        with open(tmp, "wb") as f:
            np.save(f, values)
        os.replace(tmp, path)
        return len(values)
    ids = table.ids
    extra: dict[str, pa.Array] = {}  # columns between row and embedding
    if ids is not None:
        lo, hi = np.searchsorted(ids.rows, [w.start, w.stop])
        rows = ids.rows[lo:hi]
        first = {"id": ids.ids[lo:hi]}
        values = values[rows - w.start]
        if ids.keys is not None:
            extra = {"key": pa.array(ids.keys[lo:hi]), "default_row": pa.array(ids.default[lo:hi])}
    else:
        rows = np.arange(w.start, w.stop, dtype=np.int64)
        first = {}
        if table.zch is not None:
            extra = {"key": table.zch.row_keys(w.start, w.stop)}
    columns = {**first, "row": pa.array(rows), **extra}
    schema = pa.schema([(name, a.type) for name, a in columns.items()]).append(
        pa.field("embedding", pa.list_(pa.from_numpy_dtype(values.dtype), values.shape[1])))
    with pq.ParquetWriter(tmp, schema, compression="none", use_dictionary=False) as writer:
        for a in range(0, max(len(rows), 1), PARQUET_BATCH_ROWS):
            b = a + PARQUET_BATCH_ROWS
            arrays = [c[a:b] for c in columns.values()] + [_embedding_array(values[a:b])]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
    os.replace(tmp, path)
    return len(rows)


def done_part(table_dir: Path, k: int) -> dict | None:
    """The sidecar of window ``k``'s complete part (any writer rank), or None."""
    for side in sorted(table_dir.glob(f"_part-*-{k:05d}.json")):
        info = json.loads(side.read_text())
        part = table_dir / info["file"]
        if part.exists() and part.stat().st_size == info["bytes"]:
            return info
    return None


# ---- the job -------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, cfg: Any) -> tuple[list[Table], dict[str, Any]]:
    """Checks every argument and reads the id sources; returns the tables and the export's
    identity (what ``_export.json`` records). Raises ExportError before any output is written."""
    if args.chunk_rows <= 0:
        raise ExportError(f"--chunk-rows must be positive, got {args.chunk_rows}")
    features = {f.name: f for f in cfg.schema.sparse}
    names = list(features)
    if args.tables:
        names = [t.strip() for t in args.tables.split(",") if t.strip()]
        unknown = [t for t in names if t not in features]
        if unknown:
            raise ExportError(f"--tables: unknown table(s) {', '.join(unknown)}; tables: {', '.join(features)}")
    ids_from = parse_ids_from(args.ids_from, features)
    not_exported = [t for t in ids_from if t not in names]
    if not_exported:
        raise ExportError(f"--ids-from names table(s) {', '.join(not_exported)} that --tables leaves out")
    if ids_from and args.format != "parquet":
        raise ExportError("--ids-from writes (id, row, embedding) rows: it needs --format parquet")
    zch_npy = [t for t in names if features[t].is_zch]
    if zch_npy and args.format != "parquet":
        raise ExportError(f"zch table(s) {', '.join(zch_npy)} need --format parquet (their rows carry a key "
                          "column); leave them out with --tables for npy")
    path = resolve_checkpoint(cfg, args.checkpoint).resolve()
    meta = checkpoint_meta(path)
    step = meta.get("step")
    tables = []
    for name in names:
        dtype, chunks = table_chunks(path, features[name])
        tables.append(Table(features[name], dtype, chunks))
        if features[name].is_zch:
            tables[-1].zch = read_zch_map(path, features[name], int(meta.get("world_size") or 1))
    for t in tables:
        if t.name in ids_from:
            t.ids = read_ids(t.feature, *ids_from[t.name], zch=t.zch)
    identity = {
        "checkpoint": str(path), "step": step,
        "schema_sha256": hashlib.sha256(cfg.schema.to_json().encode()).hexdigest(),
        "tables": names, "format": args.format, "dtype": args.dtype, "chunk_rows": args.chunk_rows,
        "ids_from": {t: f"{p}:{c}" for t, (p, c) in sorted(ids_from.items())},
    }
    return tables, identity


def _all_ok(error: str | None, world_size: int) -> None:
    """Every rank raises the first rank's error (so none waits for a rank that gave up)."""
    errors: list[str | None] = [None] * world_size
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise ExportError(first)


def check_output(out: Path, identity: dict, overwrite: bool) -> dict | None:
    """The identity recorded in ``out``, if any; ExportError if it differs (without --overwrite)."""
    recorded = out / "_export.json"
    if not recorded.exists():
        return None
    old = json.loads(recorded.read_text())
    if old != identity and not overwrite:
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise ExportError(f"{out} holds an export of another checkpoint/config (differs in {', '.join(diff)}: "
                          f"recorded {[old.get(k) for k in diff]}); pass --overwrite to replace it, "
                          "or choose another --output")
    return old


def export(args: argparse.Namespace, cfg: Any, env: aitm_dist.DistEnv) -> dict:
    out = Path(args.output)
    error, tables, identity, old = None, [], {}, None
    try:
        tables, identity = prepare(args, cfg)
        old = check_output(out, identity, args.overwrite)
    except (ExportError, DataError, FileNotFoundError) as e:
        error = str(e)
    _all_ok(error, env.world_size)
    if env.is_main:
        (out / "_SUCCESS").unlink(missing_ok=True)
        if old is not None and old != identity:  # --overwrite: drop the other export
            for t in set(old["tables"]) | set(identity["tables"]):
                shutil.rmtree(out / t, ignore_errors=True)
            (out / "manifest.json").unlink(missing_ok=True)
        cfg.schema.save(out / "schema.json")
        write_json_atomic(out / "_export.json", identity)
        for t in tables:
            (out / t.name).mkdir(parents=True, exist_ok=True)
    dist.barrier()

    by_name = {t.name: t for t in tables}
    mine = [w for w in windows(tables, args.chunk_rows) if w.index % env.world_size == env.rank]
    die_after = int(os.environ.get(DIE_AFTER_PARTS, "0"))
    written = skipped = rows_out = 0
    t0 = time.perf_counter()
    bar = tqdm(total=sum(w.stop - w.start for w in mine), unit="row", unit_scale=True,
               desc=f"export (rank 0 of {env.world_size})", disable=not env.is_main)
    for w in mine:
        table, table_dir = by_name[w.table], out / w.table
        if done_part(table_dir, w.k) is None:
            values = read_window(table, w.start, w.stop).astype(args.dtype, copy=False)
            name = f"part-{env.rank:05d}-{w.k:05d}.{'npy' if args.format == 'npy' else 'parquet'}"
            n = write_part(table_dir / name, table, w, values, args.format)
            del values
            write_json_atomic(table_dir / f"_part-{env.rank:05d}-{w.k:05d}.json", {
                "file": name, "rows": n, "row_start": w.start, "row_stop": w.stop,
                "bytes": (table_dir / name).stat().st_size, "sha256": sha256_file(table_dir / name)})
            written += 1
            rows_out += w.stop - w.start
            if die_after and written >= die_after:
                os._exit(17)
        else:
            skipped += 1
        bar.update(w.stop - w.start)
    bar.close()
    seconds = time.perf_counter() - t0
    dist.barrier()
    if env.is_main:
        write_json_atomic(out / "manifest.json", manifest(out, tables, identity, args, env.world_size))
        (out / "_SUCCESS").write_text("")
    dist.barrier()
    return {"output": str(out), "rank": env.rank, "world_size": env.world_size, "parts_written": written,
            "parts_skipped": skipped, "rows_read": rows_out, "seconds": seconds,
            "rows_per_s": rows_out / seconds if seconds > 0 else 0.0,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def manifest(out: Path, tables: list[Table], identity: dict, args: argparse.Namespace, world_size: int) -> dict:
    entries = {}
    for w_table in tables:
        d = out / w_table.name
        files = []
        for k in range((w_table.rows + args.chunk_rows - 1) // args.chunk_rows):
            info = done_part(d, k)
            if info is None:
                raise ExportError(f"{d}: part {k} is missing after every rank finished")
            files.append({"path": f"{w_table.name}/{info['file']}", **{x: info[x] for x in (
                "rows", "row_start", "row_stop", "bytes", "sha256")}})
        f = w_table.feature
        entries[w_table.name] = {
            "features": [f.name], "column": f.column, "feature_type": f.feature_type, "separator": f.separator,
            "rows": w_table.rows, "dim": w_table.dim, "dtype": args.dtype, "stored_dtype": str(w_table.dtype),
            "id_rule": f.id_rule, "ids": w_table.ids.summary() if w_table.ids is not None else None,
            "columns": _columns(w_table) if args.format == "parquet" else None,
            "zch": None if w_table.zch is None else {
                "held_rows": int((w_table.zch.sorted_keys != EMPTY_KEY).sum()),
                "trained_world_size": w_table.zch.world_size,
                "default_rows": default_rows(w_table.zch.zch_size, w_table.zch.world_size)},
            "rows_written": sum(x["rows"] for x in files), "files": files,
        }
    return {"version": 1, "format": args.format, "dtype": args.dtype, "chunk_rows": args.chunk_rows,
            "checkpoint": {"path": identity["checkpoint"], "step": identity["step"]},
            "schema": "schema.json", "schema_sha256": identity["schema_sha256"], "id_hash": dict(ID_HASH),
            "world_size": world_size, "tables": entries}


def _columns(t: Table) -> list[str]:
    if t.ids is not None:
        return ["id", "row"] + (["key", "default_row"] if t.zch is not None else []) + ["embedding"]
    return ["row"] + (["key"] if t.zch is not None else []) + ["embedding"]


def main(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    with aitm_dist.job() as env:
        result = export(args, cfg, env)
    if env.is_main:
        print(json.dumps({k: result[k] for k in ("output", "parts_written", "parts_skipped", "rows_per_s")}))
    return result
