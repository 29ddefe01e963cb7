"""Data: Parquet -> ``Batch``es, in parts (see ``reader``): source, convert, batcher, stats."""

from aitm_torchrec.data.batch import Batch, Chunk
from aitm_torchrec.data.reader import ParquetReader, prefetch
from aitm_torchrec.data.source import ParquetSource, expand_paths
from aitm_torchrec.data.stats import ReaderStats
from aitm_torchrec.features import DataError

__all__ = ["Batch", "Chunk", "DataError", "ParquetReader", "ParquetSource", "ReaderStats", "expand_paths", "prefetch"]
