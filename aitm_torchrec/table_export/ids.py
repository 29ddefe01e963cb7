"""Raw ids of a table's feature -> the rows training gave them, for ``--ids-from TABLE=PATH:COLUMN``.

Ids are read from Parquet (tags split into their individual ids, nulls and empty strings dropped,
as the reader does) and mapped by ``features.ids_to_rows``, the function training uses; zch
tables map the resulting keys through the trained key -> row map (``storage.ZchMap``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aitm_torchrec.data.source import check_feature_type, expand_paths
from aitm_torchrec.features import DataError, Source, ids_to_rows, is_string
from aitm_torchrec.schema import SparseFeature
from aitm_torchrec.table_export.storage import ExportError, ZchMap


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


