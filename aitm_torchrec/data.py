"""Data: Parquet files -> ``Batch`` (KeyedJaggedTensor + dense + labels), split across ranks.

Splitting: the row groups of all files, in a seeded per-epoch order when shuffling, are laid end
to end and rank r of W reads the global rows [r*N/W, (r+1)*N/W). Every row is read by exactly one
rank per epoch; ranks differ by at most one row. Every rank runs the same number of steps,
ceil(ceil(N/W) / B): a rank's last batch is padded with weight-0 rows (no ids, label 0) so that
collectives never wait on a rank that ran out of data. Loss and metrics ignore weight-0 rows.

Conversion is vectorised over a whole shuffle buffer (numpy / pyarrow, no per-row Python) and runs
in a background thread ``prefetch_size`` batches ahead of the trainer. The reader knows nothing
of models or training, so batch scoring uses it as it is (``shuffle=False``, one epoch).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from aitm_torchrec.config import Feature
from aitm_torchrec.features import DataError, Source, bag_column, raw_column

logger = logging.getLogger(__name__)


@dataclass
class Batch(Pipelineable):
    """One rank's batch. B rows, T tasks.

    dense: B x D float32 (D = total RawFeature width, may be 0); sparse: KJT with one key per
    sparse feature; labels: B x T float32 in {0, 1}; weights: B float32, 1 for real rows and 0 for
    padding.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    weights: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.weights.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)
        self.weights.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(self.dense.pin_memory(), self.sparse.pin_memory(),
                     self.labels.pin_memory(), self.weights.pin_memory())


def expand_paths(paths: Sequence[str], what: str = "input") -> list[str]:
    """Files, globs and directories (all ``*.parquet`` below) -> sorted file list."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "**", "*.parquet"), recursive=True))
        elif any(c in p for c in "*?["):
            found = sorted(glob.glob(p, recursive=True))
        else:
            found = [p] if os.path.exists(p) else []
        if not found:
            raise DataError(f"{what} path {p!r} matches no Parquet file")
        files += found
    return files


@dataclass(frozen=True)
class _Group:
    path: str
    index: int
    rows: int


@dataclass
class _Chunk:
    """Converted columns of M rows: dense M x D, labels M x T, per feature (lengths M, offsets M+1, rows)."""

    dense: np.ndarray
    labels: np.ndarray
    lengths: list[np.ndarray]
    offsets: list[np.ndarray]
    values: list[np.ndarray]

    @staticmethod
    def concat(chunks: list["_Chunk"]) -> "_Chunk":
        if len(chunks) == 1:
            return chunks[0]
        lengths = [np.concatenate(ls) for ls in zip(*(c.lengths for c in chunks))]
        return _Chunk(
            np.concatenate([c.dense for c in chunks]),
            np.concatenate([c.labels for c in chunks]),
            lengths,
            [_offsets(ln) for ln in lengths],
            [np.concatenate(vs) for vs in zip(*(c.values for c in chunks))],
        )

    def take(self, idx: np.ndarray) -> "_Chunk":
        """Rows ``idx`` (any order) as a new chunk; jagged values gathered without a row loop."""
        lengths, offsets, values = [], [], []
        for ln, off, val in zip(self.lengths, self.offsets, self.values):
            new_ln = ln[idx]
            new_off = _offsets(new_ln)
            gather = np.repeat(off[idx] - new_off[:-1], new_ln) + np.arange(new_off[-1])
            lengths.append(new_ln), offsets.append(new_off), values.append(val[gather])
        return _Chunk(self.dense[idx], self.labels[idx], lengths, offsets, values)

    def batch(self, start: int, stop: int, keys: list[str], pad_to: int) -> Batch:
        m = stop - start
        pad = pad_to - m
        lengths, values = [], []
        for ln, off, val in zip(self.lengths, self.offsets, self.values):
            lengths.append(ln[start:stop])
            if pad:
                lengths.append(np.zeros(pad, np.int64))
            values.append(val[off[start]:off[stop]])
        dense, labels = self.dense[start:stop], self.labels[start:stop]
        weights = np.ones(m, np.float32)
        if pad:
            dense = np.concatenate([dense, np.zeros((pad, dense.shape[1]), np.float32)])
            labels = np.concatenate([labels, np.zeros((pad, labels.shape[1]), np.float32)])
            weights = np.concatenate([weights, np.zeros(pad, np.float32)])
        kjt = KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int64)),
            stride=pad_to,
        )
        return Batch(torch.from_numpy(np.ascontiguousarray(dense)), kjt,
                     torch.from_numpy(np.ascontiguousarray(labels)), torch.from_numpy(weights))


class ParquetReader:
    """Reads the features and labels of a config from Parquet, for one rank of ``world_size``."""

    def __init__(
        self,
        paths: Sequence[str],
        features: Sequence[Feature],
        label_fields: Sequence[str],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        buffer_rows: int = 0,
        prefetch: int = 4,
    ) -> None:
        self.files = expand_paths(paths)
        self.sparse = [f for f in features if f.feature_type != "RawFeature"]
        self.raw = [f for f in features if f.feature_type == "RawFeature"]
        self.keys = [f.name for f in self.sparse]
        self.label_fields = list(label_fields)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.buffer_rows = max(buffer_rows or 8 * batch_size, batch_size)
        self.prefetch = prefetch
        self.columns = list(dict.fromkeys([f.column for f in features] + self.label_fields))
        self.groups = self._scan()
        self.num_rows = sum(g.rows for g in self.groups)
        if self.num_rows == 0:
            raise DataError(f"input {', '.join(self.files)} holds no rows")
        if self.num_rows < world_size:
            raise DataError(f"input has {self.num_rows} rows, fewer than the {world_size} ranks")

    def _scan(self) -> list[_Group]:
        groups = []
        for path in self.files:
            try:
                pf = pq.ParquetFile(path)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: not a readable Parquet file ({e})") from None
            meta = pf.metadata
            names = set(pf.schema_arrow.names)
            for col in self.columns:
                if col not in names:
                    users = [f.name for f in self.sparse + self.raw if f.column == col] or ["labels"]
                    raise DataError(f"{path}: missing column {col!r} (needed by {', '.join(users)})")
            groups += [_Group(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
        return groups

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(self.num_rows / self.world_size) / self.batch_size)

    def _my_pieces(self, epoch: int) -> list[tuple[_Group, int, int]]:
        """(row group, first row, row count) slices this rank reads in ``epoch``."""
        order = list(range(len(self.groups)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(order)).tolist()
        lo = self.rank * self.num_rows // self.world_size
        hi = (self.rank + 1) * self.num_rows // self.world_size
        pieces, pos = [], 0
        for i in order:
            g = self.groups[i]
            a, b = max(lo, pos), min(hi, pos + g.rows)
            if a < b:
                pieces.append((g, a - pos, b - a))
            pos += g.rows
        return pieces

    def _tables(self, epoch: int) -> Iterator[tuple[pa.Table, str]]:
        for g, first, count in self._my_pieces(epoch):
            try:
                table = pq.ParquetFile(g.path).read_row_group(g.index, columns=self.columns)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{g.path}: row group {g.index} cannot be read ({e})") from None
            yield table.slice(first, count), g.path

    def _convert(self, table: pa.Table, path: str) -> _Chunk:
        src = Source(path)
        lengths, offsets, values = [], [], []
        for f in self.sparse:
            ln, rows = bag_column(f, table.column(f.column), src)
            lengths.append(ln), offsets.append(_offsets(ln)), values.append(rows)
        m = table.num_rows
        dense = (np.concatenate([raw_column(f, table.column(f.column), src) for f in self.raw], axis=1)
                 if self.raw else np.zeros((m, 0), np.float32))
        labels = np.stack([self._label(table, c, src) for c in self.label_fields], axis=1) \
            if self.label_fields else np.zeros((m, 0), np.float32)
        return _Chunk(dense, labels, lengths, offsets, values)

    @staticmethod
    def _label(table: pa.Table, col: str, src: Source) -> np.ndarray:
        arr = table.column(col)
        if arr.null_count:
            raise DataError(f"{src.path}: label column {col!r} has {arr.null_count} null values")
        if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)):
            raise DataError(f"{src.path}: label column {col!r} has type {arr.type}; labels must be 0/1 numbers")
        y = arr.to_numpy().astype(np.float32)
        bad = (y != 0) & (y != 1)
        if bad.any():
            raise DataError(f"{src.path}: label column {col!r} has {int(bad.sum())} values other "
                            f"than 0 and 1, e.g. {y[bad][0]}")
        return y

    def _batches(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
        b = self.batch_size
        buffered: list[_Chunk] = []
        rows = emitted = 0
        pieces = self._tables(epoch)
        while True:
            item = next(pieces, None)
            if item is not None:
                # Convert piece by piece, so an error names the file it came from.
                buffered.append(self._convert(*item))
                rows += item[0].num_rows
                if rows < self.buffer_rows:
                    continue
            if not buffered:
                break
            chunk = _Chunk.concat(buffered)
            if self.shuffle:
                chunk = chunk.take(rng.permutation(rows))
            full = rows if item is None else rows // b * b
            for start in range(0, full, b):
                yield chunk.batch(start, min(start + b, full), self.keys, b)
                emitted += 1
            buffered = [chunk.take(np.arange(full, rows))] if full < rows else []
            rows -= full
            if item is None:
                break
        empty = self._empty_chunk()
        while emitted < self.steps_per_epoch:  # this rank has fewer rows: pad so collectives match
            yield empty.batch(0, 0, self.keys, b)
            emitted += 1

    def _empty_chunk(self) -> _Chunk:
        n = len(self.sparse)
        zero = np.zeros(1, np.int64)
        return _Chunk(np.zeros((0, sum(f.raw_input_dim for f in self.raw)), np.float32),
                      np.zeros((0, len(self.label_fields)), np.float32),
                      [np.zeros(0, np.int64)] * n, [zero] * n, [np.zeros(0, np.int64)] * n)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """This rank's ``steps_per_epoch`` batches of ``epoch``, prepared in a background thread."""
        return _prefetch(self._batches(epoch), self.prefetch)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


_END = object()


def _prefetch(it: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Runs ``it`` in a daemon thread, ``depth`` items ahead; re-raises its errors here."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            q.put(e)

    t = threading.Thread(target=work, name="aitm-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # consumer done or closed early: stop the worker before returning
        stop.set()
        t.join()
