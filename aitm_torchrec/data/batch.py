"""Batch (what the model and the train pipeline see) and Chunk (converted rows before batching).

A ``Chunk`` holds M converted rows as numpy arrays: dense M x D, labels M x T, and per sparse
feature the bag lengths (M), offsets (M + 1) and table rows; plus, optionally, pass-through
columns as an Arrow table of the same M rows (scoring writes them beside the scores). Chunks
are concatenated, shuffled (``take``) and cut (``slice``) without per-row Python, then turned
into fixed-size ``Batch``es, padded at the end with weight-0 rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One rank's batch. B rows, T tasks.

    dense: B x D float32 (D = total RawFeature width, may be 0); sparse: KJT with one key per
    sparse feature; labels: B x T float32 in {0, 1} (B x 0 when read without labels); weights: B
    float32, 1 for real rows and 0 for padding. Padding rows are always the last rows of a batch,
    so the real rows are ``[:num_real]``. ``passthrough``: the real rows' pass-through columns
    (an Arrow table of ``num_real`` rows) when the reader was asked for any, else None.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    weights: torch.Tensor
    passthrough: pa.Table | None = None

    @property
    def num_real(self) -> int:
        return int(torch.count_nonzero(self.weights))

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.weights.to(device, non_blocking=non_blocking),
            self.passthrough,
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)
        self.weights.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(self.dense.pin_memory(), self.sparse.pin_memory(),
                     self.labels.pin_memory(), self.weights.pin_memory(), self.passthrough)


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """Bag lengths (M) -> offsets (M + 1)."""
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


@dataclass
class Chunk:
    """Converted columns of M rows: dense M x D, labels M x T, per feature (lengths M,
    offsets M+1, rows), and the pass-through columns (M rows) or None."""

    dense: np.ndarray
    labels: np.ndarray
    lengths: list[np.ndarray]
    offsets: list[np.ndarray]
    values: list[np.ndarray]
    passthrough: pa.Table | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def empty(num_features: int, dense_dim: int, num_labels: int) -> Chunk:
        zero = np.zeros(1, np.int64)
        return Chunk(np.zeros((0, dense_dim), np.float32), np.zeros((0, num_labels), np.float32),
                     [np.zeros(0, np.int64)] * num_features, [zero] * num_features,
                     [np.zeros(0, np.int64)] * num_features)

    @staticmethod
    def concat(chunks: list[Chunk]) -> Chunk:
        if len(chunks) == 1:
            return chunks[0]
        lengths = [np.concatenate(ls) for ls in zip(*(c.lengths for c in chunks))]
        passthrough = None
        if chunks[0].passthrough is not None:
            passthrough = pa.concat_tables([c.passthrough for c in chunks])
        return Chunk(
            np.concatenate([c.dense for c in chunks]),
            np.concatenate([c.labels for c in chunks]),
            lengths,
            [offsets_of(ln) for ln in lengths],
            [np.concatenate(vs) for vs in zip(*(c.values for c in chunks))],
            passthrough,
        )

    def take(self, idx: np.ndarray) -> Chunk:
        """Rows ``idx`` (any order) as a new chunk; jagged values gathered without a row loop."""
        lengths, offsets, values = [], [], []
        for ln, off, val in zip(self.lengths, self.offsets, self.values):
            if val.size == ln.size and (ln.size == 0 or ln.min() == 1):  # one id per row: a plain gather
                lengths.append(ln[: idx.size]), offsets.append(off[: idx.size + 1]), values.append(val[idx])
                continue
            new_ln = ln[idx]
            new_off = offsets_of(new_ln)
            gather = np.repeat(off[idx] - new_off[:-1], new_ln) + np.arange(new_off[-1])
            lengths.append(new_ln), offsets.append(new_off), values.append(val[gather])
        passthrough = self.passthrough.take(idx) if self.passthrough is not None else None
        return Chunk(self.dense[idx], self.labels[idx], lengths, offsets, values, passthrough)

    def slice(self, start: int, stop: int) -> Chunk:
        """Rows [start, stop) as a new chunk (views where possible)."""
        passthrough = self.passthrough.slice(start, stop - start) if self.passthrough is not None else None
        return Chunk(self.dense[start:stop], self.labels[start:stop],
                     [ln[start:stop] for ln in self.lengths],
                     [off[start:stop + 1] - off[start] for off in self.offsets],
                     [val[off[start]:off[stop]] for off, val in zip(self.offsets, self.values)],
                     passthrough)

    def batch(self, start: int, stop: int, keys: list[str], pad_to: int) -> Batch:
        """Rows [start, stop) as a Batch of ``pad_to`` rows, padded at the end with weight 0."""
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
        passthrough = self.passthrough.slice(start, m) if self.passthrough is not None else None
        return Batch(torch.from_numpy(np.ascontiguousarray(dense)), kjt,
                     torch.from_numpy(np.ascontiguousarray(labels)), torch.from_numpy(weights), passthrough)
