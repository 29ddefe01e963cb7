"""Converter: an Arrow table of input rows -> a ``Chunk`` (table rows, dense values, labels).

Vectorised per table (numpy / pyarrow, no per-row Python); the id rules and missing-value
repairs are those of ``features.py``. Labels must be 0/1 and not null. The label chain: a row
where a step is 1 while one of the steps it requires (``schema.label_relations``: a tower's
relation towers) is 0 follows ``label_chain_policy``: ``error`` (a ``DataError`` naming the file
and columns), ``drop`` (the row is skipped) or ``keep``. Violations and repairs are counted in
the ``ReaderStats`` returned with each chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from aitm_torchrec.data.batch import Chunk, offsets_of
from aitm_torchrec.data.stats import ReaderStats
from aitm_torchrec.features import DataError, Source, bag_column, raw_column
from aitm_torchrec.schema import Schema

LABEL_CHAIN_POLICIES = ("error", "drop", "keep")


class Converter:
    """Arrow rows -> Chunk for one schema.

    Args:
        schema: features, labels and label relations.
        labels: convert the label columns (False: chunks carry M x 0 labels).
        label_chain_policy: error | drop | keep (see the module docstring).
        passthrough: columns carried beside the chunk as they are.
    """

    def __init__(self, schema: Schema, labels: bool = True, label_chain_policy: str = "error",
                 passthrough: Sequence[str] = ()) -> None:
        if label_chain_policy not in LABEL_CHAIN_POLICIES:
            raise ValueError(f"label_chain_policy is {label_chain_policy!r}; allowed: {', '.join(LABEL_CHAIN_POLICIES)}")
        self.schema = schema
        self.label_fields = schema.label_names if labels else []
        self.label_chain_policy = label_chain_policy
        self.passthrough = list(passthrough)
        # (later, earlier) label index pairs: later = 1 requires earlier = 1
        self.chain = [(t, r) for t, rs in enumerate(schema.label_relations) for r in rs] if labels else []

    def chain_text(self) -> str:
        return ", ".join(f"{self.label_fields[t]} needs {self.label_fields[r]}" for t, r in self.chain)

    def __call__(self, table: pa.Table, path: str) -> tuple[Chunk, ReaderStats]:
        src = Source(path)
        stats = ReaderStats()
        m = table.num_rows
        labels = np.stack([label_values(table, c, src) for c in self.label_fields], axis=1) \
            if self.label_fields else np.zeros((m, 0), np.float32)
        if self.chain:
            table, labels = self._apply_chain(table, labels, path, stats)
            m = table.num_rows
        stats.rows += m
        lengths, offsets, values = [], [], []
        for f in self.schema.sparse:
            ln, rows = bag_column(f, table.column(f.column), src)
            lengths.append(ln), offsets.append(offsets_of(ln)), values.append(rows)
            stats.empty_bags[f.name] += m - int(np.count_nonzero(ln))
        dense_parts = []
        for f in self.schema.dense:
            column = table.column(f.column)
            dense_parts.append(raw_column(f, column, src))
            stats.null_raw[f.name] += column.null_count
        dense = np.concatenate(dense_parts, axis=1) if dense_parts else np.zeros((m, 0), np.float32)
        passthrough = table.select(self.passthrough) if self.passthrough else None
        return Chunk(dense, labels, lengths, offsets, values, passthrough), stats

    def _apply_chain(self, table: pa.Table, labels: np.ndarray, path: str,
                     stats: ReaderStats) -> tuple[pa.Table, np.ndarray]:
        later = [t for t, _ in self.chain]
        earlier = [r for _, r in self.chain]
        broken = labels[:, later] > labels[:, earlier]  # M x pairs
        bad = broken.any(axis=1)
        n_bad = int(bad.sum())
        if not n_bad:
            return table, labels
        stats.label_chain_violations += n_bad
        if self.label_chain_policy == "error":
            t, r = self.chain[int(np.argmax(broken.any(axis=0)))]
            raise DataError(
                f"{path}: label column {self.label_fields[t]!r} is 1 while the earlier step "
                f"{self.label_fields[r]!r} is 0 in {n_bad} rows; a conversion step requires "
                "the steps before it (check the order of label_fields / relation_tower_names, "
                "or set data_config.label_chain_policy: drop or keep)")
        if self.label_chain_policy == "drop":
            keep = ~bad
            stats.rows_dropped += n_bad
            return table.filter(pa.array(keep)), labels[keep]
        return table, labels


def label_values(table: pa.Table, col: str, src: Source) -> np.ndarray:
    """A 0/1 label column -> M float32; DataError on nulls or other values."""
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
