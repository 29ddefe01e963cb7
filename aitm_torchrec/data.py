"""Data: Parquet files -> ``Batch`` (KeyedJaggedTensor + dense + labels), split across ranks.

Splitting: the row groups of all files, in a seeded per-epoch order when shuffling, are laid end
to end and rank r of W reads the global rows [r*N/W, (r+1)*N/W). Every row is read by exactly one
rank per epoch; ranks differ by at most one row. Every rank runs the same number of steps,
ceil(ceil(N/W) / B): a rank's last batch is padded with weight-0 rows (no ids, label 0) so that
collectives never wait on a rank that ran out of data. Loss and metrics ignore weight-0 rows.

Conversion is vectorised per row-group piece (numpy / pyarrow, no per-row Python) and runs in a
background thread ``prefetch_size`` batches ahead of the trainer. String id columns hashed into
buckets are read from Parquet dictionary-encoded, so each distinct string is hashed once per row
group. The reader knows nothing of models or training, so batch scoring uses it as it is
(``shuffle=False``, one epoch).

Bad input (every error is a ``DataError`` naming the file and the column):
- Checked at construction, identically on every rank, so no rank starts while another fails:
  paths that match nothing, unreadable / truncated Parquet, missing columns, column types a
  feature or label cannot use. Files with 0 rows are skipped with a warning; an input with no
  rows at all is an error.
- Checked while converting (in the prefetch thread; the error is re-raised in the trainer, and a
  failing rank ends the job through the launcher rather than leaving the others waiting): null
  or non-0/1 labels, ids outside [0, num_buckets), NaN/inf raw values, corrupt row groups.
- The label chain: a row where a later step is 1 while an earlier one is 0 (by default steps
  follow ``label_fields`` order; ``label_relations`` gives any DAG of steps) follows
  ``label_chain_policy``: ``error`` (default), ``drop`` (the row is skipped) or ``keep``.
  Violations are counted in ``stats`` and logged per epoch.
- Documented repairs, counted in ``stats``: missing ids / empty tag lists -> empty bags
  (``empty_bags``), null raw values -> 0.0 (``null_raw``).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import queue
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from aitm_torchrec.config import Feature
from aitm_torchrec.features import DataError, Source, bag_column, is_string, raw_column

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

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
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

    def pin_memory(self) -> Batch:
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
    def concat(chunks: list[_Chunk]) -> _Chunk:
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

    def take(self, idx: np.ndarray) -> _Chunk:
        """Rows ``idx`` (any order) as a new chunk; jagged values gathered without a row loop."""
        lengths, offsets, values = [], [], []
        for ln, off, val in zip(self.lengths, self.offsets, self.values):
            if val.size == ln.size and (ln.size == 0 or ln.min() == 1):  # one id per row: a plain gather
                lengths.append(ln[: idx.size]), offsets.append(off[: idx.size + 1]), values.append(val[idx])
                continue
            new_ln = ln[idx]
            new_off = _offsets(new_ln)
            gather = np.repeat(off[idx] - new_off[:-1], new_ln) + np.arange(new_off[-1])
            lengths.append(new_ln), offsets.append(new_off), values.append(val[gather])
        return _Chunk(self.dense[idx], self.labels[idx], lengths, offsets, values)

    def slice(self, start: int, stop: int) -> _Chunk:
        """Rows [start, stop) as a new chunk (views where possible)."""
        return _Chunk(self.dense[start:stop], self.labels[start:stop],
                      [ln[start:stop] for ln in self.lengths],
                      [off[start:stop + 1] - off[start] for off in self.offsets],
                      [val[off[start]:off[stop]] for off, val in zip(self.offsets, self.values)])

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
        label_chain_policy: str = "error",
        label_relations: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """``label_relations[t]``: indices of the labels that must be 1 wherever label t is 1 (e.g.
        the labels of tower t's relation towers); default: the chain, label t-1 for t >= 1. Rows
        breaking it follow ``label_chain_policy`` (error | drop | keep)."""
        if label_chain_policy not in ("error", "drop", "keep"):
            raise ValueError(f"label_chain_policy is {label_chain_policy!r}; allowed: error, drop, keep")
        self.label_chain_policy = label_chain_policy
        n_labels = len(label_fields)
        if label_relations is None:
            label_relations = [[t - 1] if t else [] for t in range(n_labels)]
        if len(label_relations) != n_labels or any(not 0 <= r < n_labels or r == t
                                                   for t, rs in enumerate(label_relations) for r in rs):
            raise ValueError(f"label_relations {label_relations!r} must give, for each of the {n_labels} "
                             "labels, indices of other labels")
        # (later, earlier) label index pairs: later = 1 requires earlier = 1
        self._chain = [(t, r) for t, rs in enumerate(label_relations) for r in rs]
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
        # Counters over the reader's life (all epochs), updated by the prefetch thread:
        # rows converted, label-chain violations, rows dropped by the policy, empty bags and null
        # raw values per feature, files skipped for having no rows.
        self.stats: dict = {"rows": 0, "label_chain_violations": 0, "rows_dropped": 0,
                            "empty_bags": Counter(), "null_raw": Counter(), "empty_files": []}
        self._dictionary_columns: dict[str, list[str]] = {}
        self.groups = self._scan()
        self.num_rows = sum(g.rows for g in self.groups)
        if self.num_rows == 0:
            raise DataError(f"input {', '.join(self.files)} holds no rows (every file is empty)")
        if self.num_rows < world_size:
            raise DataError(f"input has {self.num_rows} rows, fewer than the {world_size} ranks")

    def _scan(self) -> list[_Group]:
        """Row groups of every non-empty file; checks each file's columns and their types."""
        groups = []
        hashed_strings = {f.column for f in self.sparse if f.hash_bucket_size}
        for path in self.files:
            try:
                pf = pq.ParquetFile(path)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: not a readable Parquet file ({e})") from None
            meta = pf.metadata
            if meta.num_rows == 0:
                logger.warning("%s: no rows, skipped", path)
                self.stats["empty_files"].append(path)
                continue
            schema = pf.schema_arrow
            for col in self.columns:
                if col not in schema.names:
                    users = [f.name for f in self.sparse + self.raw if f.column == col] or ["labels"]
                    raise DataError(f"{path}: missing column {col!r} (needed by {', '.join(users)})")
            for f in self.sparse + self.raw:
                _check_feature_type(f, schema.field(f.column).type, path)
            for col in self.label_fields:
                t = _value_type(schema.field(col).type)
                if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
                    raise DataError(f"{path}: label column {col!r} has type {t}; labels must be 0/1 numbers")
            self._dictionary_columns[path] = sorted(c for c in hashed_strings if is_string(schema.field(c).type))
            groups += [_Group(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
                       if meta.row_group(i).num_rows]
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
        path, pf = None, None
        for g, first, count in self._my_pieces(epoch):
            try:
                if g.path != path:  # consecutive pieces often share a file: open it once
                    path, pf = g.path, None
                    pf = pq.ParquetFile(path, read_dictionary=self._dictionary_columns[path])
                table = pf.read_row_group(g.index, columns=self.columns, use_threads=False)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{g.path}: row group {g.index}{_bad_column(pf, g.index, self.columns)} "
                                f"cannot be read ({e})") from None
            yield table.slice(first, count), g.path

    def _convert(self, table: pa.Table, path: str, counts: Counter) -> _Chunk:
        src = Source(path)
        m = table.num_rows
        labels = np.stack([self._label(table, c, src) for c in self.label_fields], axis=1) \
            if self.label_fields else np.zeros((m, 0), np.float32)
        if self._chain:
            later = [t for t, _ in self._chain]
            earlier = [r for _, r in self._chain]
            broken = labels[:, later] > labels[:, earlier]  # M x pairs
            bad = broken.any(axis=1)
            n_bad = int(bad.sum())
            if n_bad:
                counts["label_chain_violations"] += n_bad
                if self.label_chain_policy == "error":
                    t, r = self._chain[int(np.argmax(broken.any(axis=0)))]
                    raise DataError(
                        f"{path}: label column {self.label_fields[t]!r} is 1 while the earlier step "
                        f"{self.label_fields[r]!r} is 0 in {n_bad} rows; a conversion step requires "
                        "the steps before it (check the order of label_fields / relation_tower_names, "
                        "or set data_config.label_chain_policy: drop or keep)")
                if self.label_chain_policy == "drop":
                    keep = ~bad
                    table, labels = table.filter(pa.array(keep)), labels[keep]
                    counts["rows_dropped"] += n_bad
                    m = table.num_rows
        counts["rows"] += m
        lengths, offsets, values = [], [], []
        for f in self.sparse:
            ln, rows = bag_column(f, table.column(f.column), src)
            lengths.append(ln), offsets.append(_offsets(ln)), values.append(rows)
            counts[("empty_bags", f.name)] += m - int(np.count_nonzero(ln))
        dense_parts = []
        for f in self.raw:
            column = table.column(f.column)
            dense_parts.append(raw_column(f, column, src))
            counts[("null_raw", f.name)] += column.null_count
        dense = np.concatenate(dense_parts, axis=1) if dense_parts else np.zeros((m, 0), np.float32)
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

    def _chain_text(self) -> str:
        return ", ".join(f"{self.label_fields[t]} needs {self.label_fields[r]}" for t, r in self._chain)

    def _add_stats(self, counts: Counter) -> None:
        for key, n in counts.items():
            if isinstance(key, tuple):
                self.stats[key[0]][key[1]] += n
            else:
                self.stats[key] += n

    def _batches(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
        b = self.batch_size
        buffered: list[_Chunk] = []
        rows = emitted = 0
        pieces = self._tables(epoch)
        counts: Counter = Counter()
        while True:
            item = next(pieces, None)
            if item is not None:
                # Convert piece by piece, so an error names the file it came from.
                piece_counts: Counter = Counter()
                try:
                    buffered.append(self._convert(*item, piece_counts))
                finally:
                    self._add_stats(piece_counts)
                    counts.update(piece_counts)
                rows += len(buffered[-1].labels)
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
            buffered = [chunk.slice(full, rows)] if full < rows else []
            rows -= full
            if item is None:
                break
        if counts["label_chain_violations"]:
            logger.warning("rank %d epoch %d: %d rows break the label chain %s (label_chain_policy=%s, "
                           "%d dropped)", self.rank, epoch, counts["label_chain_violations"],
                           self._chain_text(), self.label_chain_policy, counts["rows_dropped"])
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


def _bad_column(pf: pq.ParquetFile | None, index: int, columns: list[str]) -> str:
    """On a read error, the first column that fails on its own (for the message), if any."""
    if pf is None:
        return ""
    for col in columns:
        try:
            pf.read_row_group(index, columns=[col], use_threads=False)
        except (pa.ArrowException, OSError):
            return f", column {col!r},"
    return ""


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _check_feature_type(f: Feature, t: pa.DataType, path: str) -> None:
    """Raises DataError when a column's Arrow type cannot feed feature ``f``."""
    t = _value_type(t)
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    inner = _value_type(t.value_type) if is_list else t
    ids = pa.types.is_integer(inner) or is_string(inner)
    numbers = pa.types.is_integer(inner) or pa.types.is_floating(inner)
    if f.feature_type == "IdFeature":
        ok, need = ids and not is_list, "int64 or string ids (a list column needs TagFeature)"
    elif f.feature_type == "TagFeature":
        ok = ids and not pa.types.is_fixed_size_list(t)
        need = "a list<int64> / list<string> column, or a string with `separator`"
    else:
        ok, need = numbers, "numbers, or fixed-length lists of numbers"
    if not ok:
        raise DataError(f"{path}: column {f.column!r} has type {t}; {f.feature_type} {f.name!r} needs {need}")


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
        while t.is_alive():  # drain, so a worker blocked putting its end or error can finish
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(0.05)
