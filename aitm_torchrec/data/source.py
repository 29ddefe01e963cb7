"""Source: Parquet files -> row-group pieces of global row ranges, read as Arrow tables.

The row groups of all files, in file order (or a seeded per-epoch order), are laid end to end as
global rows [0, N). A consumer asks for a row range (a rank's share of an epoch, a scoring part)
and gets the Arrow tables of exactly those rows, with the columns it named. String id columns
that are hashed are read dictionary-encoded (each distinct string is then hashed once per row
group); ``decode`` turns such columns back into plain strings for pass-through.

Checked at construction, identically on every rank (a ``DataError`` naming the file and column):
paths that match nothing, unreadable or truncated Parquet, missing columns, column types a
feature or label cannot use. Files with 0 rows are skipped with a warning (recorded in
``empty_files``); an input with no rows at all is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aitm_torchrec.data import csv_input
from aitm_torchrec.features import DataError, is_string
from aitm_torchrec.files import expand_paths
from aitm_torchrec.schema import DenseFeature, Schema, SparseFeature

logger = logging.getLogger(__name__)


def input_columns(paths: Sequence[str], csv: csv_input.CsvFormat | None = None) -> list[str]:
    """The column names of an input (its first file's), e.g. to pass every column through."""
    if csv is not None:
        return list(csv.schema.names)
    first = expand_paths(paths)[0]
    try:
        return pq.read_schema(first).names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{first}: not a readable Parquet file ({e})") from None


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int
    rows: int


@dataclass(frozen=True)
class Piece:
    """Rows [first, first + count) of one row group."""

    group: RowGroup
    first: int
    count: int


class ParquetSource:
    """The files of an input, checked against a schema, read by global row ranges.

    Args:
        paths: files, globs or directories.
        schema: the features and labels to read.
        labels: read and check the label columns (False for scoring inputs without labels).
        passthrough: more columns to read as they are (any type), e.g. ids to join scores back on.
        csv: read EasyRec CSV files in this format instead of Parquet (``csv_input.CsvFile``: the
            file cut into row groups of 64k lines, read by seeking).
        needed_by: what needs a pass-through column (e.g. "gauc of ctr"), named with the file's
            columns when it is missing.
    """

    def __init__(self, paths: Sequence[str], schema: Schema, labels: bool = True,
                 passthrough: Sequence[str] = (), csv: csv_input.CsvFormat | None = None,
                 needed_by: Mapping[str, str] | None = None) -> None:
        self.csv = csv
        self.needed_by = dict(needed_by or {})
        self.files = expand_paths(paths) if csv is None else csv_input.expand(paths)
        self.schema = schema
        self.label_columns = schema.label_names if labels else []
        self.passthrough = list(passthrough)
        self.columns = list(dict.fromkeys(schema.feature_columns + self.label_columns + self.passthrough))
        self.empty_files: list[str] = []
        self._dictionary_columns: dict[str, list[str]] = {}
        self.groups = self._scan()
        self.num_rows = sum(g.rows for g in self.groups)
        if self.num_rows == 0:
            raise DataError(f"input {', '.join(self.files)} holds no rows (every file is empty)")

    def _scan(self) -> list[RowGroup]:
        """Row groups of every non-empty file; checks each file's columns and their types."""
        groups = []
        hashed_strings = {f.column for f in self.schema.sparse if f.hash_bucket_size}
        features = list(self.schema.sparse) + list(self.schema.dense)
        for path in self.files:
            try:
                pf = self._open(path)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: not a readable Parquet file ({e})") from None
            meta = pf.metadata
            if meta.num_rows == 0:
                logger.warning("%s: no rows, skipped", path)
                self.empty_files.append(path)
                continue
            schema = pf.schema_arrow
            for col in self.columns:
                if col not in schema.names:
                    users = [f.name for f in features if f.column == col]
                    if not users:
                        users = ["labels"] if col in self.label_columns else [self.needed_by.get(col, "pass-through")]
                    columns = f"; columns: {', '.join(schema.names)}" if col in self.needed_by else ""
                    raise DataError(f"{path}: missing column {col!r} (needed by {', '.join(users)}){columns}")
            for f in features:
                check_feature_type(f, schema.field(f.column).type, path)
            for col in self.label_columns:
                t = value_type(schema.field(col).type)
                if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
                    raise DataError(f"{path}: label column {col!r} has type {t}; labels must be 0/1 numbers")
            self._dictionary_columns[path] = sorted(c for c in hashed_strings if is_string(schema.field(c).type))
            groups += [RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
                       if meta.row_group(i).num_rows]
        return groups

    def _open(self, path: str, **kwargs) -> pq.ParquetFile | csv_input.CsvFile:
        return pq.ParquetFile(path, **kwargs) if self.csv is None else csv_input.CsvFile(path, self.csv, **kwargs)

    def file_rows(self) -> dict[str, int]:
        """Rows per input file (empty files included), in file order."""
        rows = dict.fromkeys(self.files, 0)
        for g in self.groups:
            rows[g.path] += g.rows
        return rows

    def order(self, shuffle_seed: int | None = None, epoch: int = 0) -> list[int]:
        """Row-group order: file order, or a seeded permutation per epoch."""
        if shuffle_seed is None:
            return list(range(len(self.groups)))
        return np.random.default_rng([shuffle_seed, epoch]).permutation(len(self.groups)).tolist()

    def pieces(self, lo: int, hi: int, order: list[int] | None = None) -> list[Piece]:
        """Pieces covering global rows [lo, hi) of the groups laid end to end in ``order``."""
        pieces, pos = [], 0
        for i in order if order is not None else range(len(self.groups)):
            g = self.groups[i]
            a, b = max(lo, pos), min(hi, pos + g.rows)
            if a < b:
                pieces.append(Piece(g, a - pos, b - a))
            pos += g.rows
        return pieces

    def read(self, pieces: Sequence[Piece]) -> Iterator[tuple[pa.Table, str]]:
        """(table of the piece's rows with ``columns``, file path) per piece, in order."""
        path, pf = None, None
        for p in pieces:
            g = p.group
            try:
                if g.path != path:  # consecutive pieces often share a file: open it once
                    path, pf = g.path, None
                    pf = self._open(path, read_dictionary=self._dictionary_columns[path])
                table = pf.read_row_group(g.index, columns=self.columns, use_threads=False)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{g.path}: row group {g.index}{_bad_column(pf, g.index, self.columns)} "
                                f"cannot be read ({e})") from None
            yield table.slice(p.first, p.count), g.path

    def decode(self, table: pa.Table, path: str, columns: Sequence[str] | None = None) -> pa.Table:
        """``table`` with the columns read dictionary-encoded (of ``columns``, default all) turned
        back into plain strings."""
        for col in self._dictionary_columns.get(path, []):
            if col in table.column_names and (columns is None or col in columns):
                i = table.column_names.index(col)
                table = table.set_column(i, col, table.column(col).cast(table.column(col).type.value_type))
        return table


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


def value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def check_feature_type(f: SparseFeature | DenseFeature, t: pa.DataType, path: str) -> None:
    """Raises DataError when a column's Arrow type cannot feed feature ``f``."""
    t = value_type(t)
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    inner = value_type(t.value_type) if is_list else t
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
