"""Batcher: a stream of converted chunks -> fixed-size batches (shuffle buffer, padding).

Chunks are gathered until ``buffer_rows`` rows are buffered, shuffled together when an ``rng``
is given (otherwise input order is kept exactly), and cut into batches of ``batch_size`` rows;
what is left over waits for the next chunks. The last batch of the stream may be short: it is
padded with weight-0 rows (no ids, label 0), and ``pad_to_steps`` adds whole padding batches so
that every rank runs the same number of steps (collectives never wait on a rank that ran out).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from aitm_torchrec.data.batch import Batch, Chunk


def batches(chunks: Iterable[Chunk], batch_size: int, keys: list[str], empty: Chunk,
            rng: np.random.Generator | None = None, buffer_rows: int = 0,
            pad_to_steps: int = 0) -> Iterator[Batch]:
    """Batches of ``batch_size`` rows from ``chunks``; ``empty`` is a 0-row chunk of the same
    layout (for padding batches). ``buffer_rows`` (shuffling only) defaults to 8 batches."""
    b = batch_size
    buffer_rows = max(buffer_rows or 8 * b, b) if rng is not None else b
    buffered: list[Chunk] = []
    rows = emitted = 0
    it = iter(chunks)
    while True:
        chunk = next(it, None)
        if chunk is not None:
            buffered.append(chunk)
            rows += len(chunk)
            if rows < buffer_rows:
                continue
        if not buffered:
            break
        whole = Chunk.concat(buffered)
        if rng is not None:
            whole = whole.take(rng.permutation(rows))
        full = rows if chunk is None else rows // b * b
        for start in range(0, full, b):
            yield whole.batch(start, min(start + b, full), keys, b)
            emitted += 1
        buffered = [whole.slice(full, rows)] if full < rows else []
        rows -= full
        if chunk is None:
            break
    while emitted < pad_to_steps:
        yield empty.batch(0, 0, keys, b)
        emitted += 1
