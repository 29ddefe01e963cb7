"""Reader: a schema's features and labels from Parquet -> ``Batch``es for one rank.

The parts, each in its own module and testable alone: ``source`` (files, row groups, the rank
split, I/O), ``convert`` (Arrow -> ids, dense values, labels; the label policy), ``batcher``
(shuffle buffer, padding), ``stats`` (typed counters). ``ParquetReader`` composes them and runs
them in a background thread ``prefetch_size`` batches ahead of the consumer.

Splitting: the row groups of all files, in a seeded per-epoch order when shuffling, are laid end
to end and rank r of W reads the global rows [r*N/W, (r+1)*N/W). Every row is read by exactly one
rank per epoch; ranks differ by at most one row. Every rank runs the same number of steps,
ceil(ceil(N/W) / B): a rank's last batch is padded with weight-0 rows (no ids, label 0) so that
collectives never wait on a rank that ran out of data. Loss and metrics ignore weight-0 rows.
With shuffling off, batches keep input order exactly (scoring relies on it).

Bad input (every error is a ``DataError`` naming the file and the column): checked at
construction on every rank (see ``source``), or while converting (see ``convert``) in the
prefetch thread, re-raised in the consumer; a failing rank ends the job through the launcher
rather than leaving the others waiting. Documented repairs are counted in ``stats``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from aitm_torchrec.data import batcher
from aitm_torchrec.data.batch import Batch, Chunk
from aitm_torchrec.data.convert import Converter
from aitm_torchrec.data.csv_input import CsvFormat
from aitm_torchrec.data.source import ParquetSource
from aitm_torchrec.data.stats import ReaderStats
from aitm_torchrec.features import DataError
from aitm_torchrec.schema import Schema

logger = logging.getLogger(__name__)


class ParquetReader:
    """Reads a schema's features (and labels) from Parquet, for one rank of ``world_size``.

    Args:
        paths: files, globs or directories.
        schema: what to read (``Schema.from_config(cfg)``, i.e. ``cfg.schema``).
        batch_size: rows per batch.
        rank, world_size: this rank's share of the rows.
        shuffle, seed: shuffle row-group order and rows within a buffer of ``buffer_rows``.
        prefetch: batches prepared ahead in a background thread (0: none).
        label_chain_policy: error | drop | keep.
        labels: read the label columns (False for inputs without labels: labels are B x 0).
        passthrough: columns carried beside each batch as an Arrow table (``Batch.passthrough``).
        needed_by: what needs a pass-through column, for the message when a file lacks it.
    """

    def __init__(self, paths: Sequence[str], schema: Schema, batch_size: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = False, seed: int = 0, buffer_rows: int = 0,
                 prefetch: int = 4, label_chain_policy: str = "error", labels: bool = True,
                 passthrough: Sequence[str] = (), csv: CsvFormat | None = None,
                 needed_by: Mapping[str, str] | None = None) -> None:
        self.converter = Converter(schema, labels, label_chain_policy, passthrough)
        self.source = ParquetSource(paths, schema, labels, passthrough, csv, needed_by)  # csv: EasyRec CSV input
        self.schema = schema
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.buffer_rows = buffer_rows
        self.prefetch = prefetch
        self.stats = ReaderStats(empty_files=list(self.source.empty_files))
        self.num_rows = self.source.num_rows
        if self.num_rows < world_size:
            raise DataError(f"input has {self.num_rows} rows, fewer than the {world_size} ranks")

    @property
    def files(self) -> list[str]:
        return self.source.files

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(self.num_rows / self.world_size) / self.batch_size)

    def rank_rows(self, rank: int | None = None) -> tuple[int, int]:
        """Global rows [lo, hi) of ``rank`` (default this one)."""
        r = self.rank if rank is None else rank
        return r * self.num_rows // self.world_size, (r + 1) * self.num_rows // self.world_size

    def _chunks(self, lo: int, hi: int, order: list[int] | None) -> Iterator[Chunk]:
        """Converted chunks of global rows [lo, hi), piece by piece (errors name the file)."""
        for table, path in self.source.read(self.source.pieces(lo, hi, order)):
            if self.converter.passthrough:  # only those: the features convert dictionaries faster
                table = self.source.decode(table, path, self.converter.passthrough)
            chunk, stats = self.converter(table, path)
            self.stats.add(stats)
            yield chunk

    def _empty(self) -> Chunk:
        return Chunk.empty(len(self.schema.sparse), self.schema.dense_dim, len(self.converter.label_fields))

    def _epoch_batches(self, epoch: int) -> Iterator[Batch]:
        order = self.source.order(self.seed if self.shuffle else None, epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank, 1]) if self.shuffle else None
        before = self.stats.label_chain_violations, self.stats.rows_dropped
        yield from batcher.batches(self._chunks(*self.rank_rows(), order), self.batch_size, self.schema.keys,
                                   self._empty(), rng, self.buffer_rows, self.steps_per_epoch)
        violations = self.stats.label_chain_violations - before[0]
        if violations:
            logger.warning("rank %d epoch %d: %d rows break the label chain %s (label_chain_policy=%s, "
                           "%d dropped)", self.rank, epoch, violations, self.converter.chain_text(),
                           self.converter.label_chain_policy, self.stats.rows_dropped - before[1])

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """This rank's ``steps_per_epoch`` batches of ``epoch``, prepared in a background thread."""
        return prefetch(self._epoch_batches(epoch), self.prefetch)

    def range_batches(self, lo: int, hi: int, pad_to_steps: int = 0) -> Iterator[Batch]:
        """Global rows [lo, hi) in input order (no shuffling), in batches, prefetched; padding
        batches up to ``pad_to_steps``. For jobs that split the input themselves (scoring)."""
        return prefetch(batcher.batches(self._chunks(lo, hi, None), self.batch_size, self.schema.keys,
                                        self._empty(), pad_to_steps=pad_to_steps), self.prefetch)

    def padding_batch(self) -> Batch:
        """A batch of weight-0 rows only (for a rank that has no rows left but must join a step)."""
        return self._empty().batch(0, 0, self.schema.keys, self.batch_size)


_END = object()


def prefetch(it: Iterator[Batch], depth: int) -> Iterator[Batch]:
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
