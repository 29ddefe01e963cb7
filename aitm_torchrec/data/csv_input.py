"""EasyRec CSV input (``data_config.input_type: CSVInput``) -> Arrow tables, streamed.

The format is EasyRec's: header-less text, one row per line, columns in ``data_config.input_fields``
order, ``data_config.separator`` between them (default ","), tag lists inside a column joined by
the feature's own separator (e.g. "|"). EasyRec reads it line by line (TextLineDataset +
decode_csv), so a row is a line here too: ``count_rows`` counts newlines, and a quoted value
cannot hold a newline.

- ``schema(input_fields)``: the Arrow schema. INT32/INT64/FLOAT/DOUBLE/BOOL -> int32 / int64 /
  float32 / float64 / bool, STRING -> string (ids and tag lists alike). An empty value of a numeric
  column is null; an empty STRING is "" (the reader treats both as a missing id).
- ``count_rows(path)``: lines in the file (newline bytes, plus a last line without one), read in
  16 MiB blocks with numpy: about memory bandwidth, no parsing.
- ``write_table(table, path)``: an Arrow table written in that format (tag lists joined by "|"),
  atomically: how tests, benchmarks and the GPU check make EasyRec input from Parquet.
- ``iter_tables(path, schema, start_row, num_rows, block_rows, ...)``: rows [start_row,
  start_row + num_rows) as tables of ``block_rows`` rows (the last may be shorter), parsed by
  pyarrow's streaming CSV reader after seeking to the byte where ``start_row`` begins (found by the
  same newline scan, so a rank's share costs no parsing of the rows before it).

Bad values (text in an integer column, a row with too many or too few columns) raise
``DataError`` naming the file, the line (1-based) and the column. An empty line is a row of
empty values (pyarrow's reading), so its null labels stop the reader.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from aitm_torchrec.features import DataError
from aitm_torchrec.files import atomic_write, expand_paths

ARROW_TYPES = {"INT32": pa.int32(), "INT64": pa.int64(), "STRING": pa.string(), "FLOAT": pa.float32(),
               "DOUBLE": pa.float64(), "BOOL": pa.bool_()}
_SCAN_BYTES = 16 << 20
_NEWLINE = 10


def schema(input_fields: Sequence) -> pa.Schema:
    """``input_fields``: objects with ``input_name`` and ``input_type`` (EasyRec's type names), or
    (name, type) pairs, in column order."""
    fields = []
    for f in input_fields:
        name, kind = (f.input_name, f.input_type) if hasattr(f, "input_name") else f
        if kind not in ARROW_TYPES:
            raise ValueError(f"input field {name!r}: input_type {kind!r} is not supported; "
                             f"supported: {', '.join(ARROW_TYPES)}")
        fields.append(pa.field(name, ARROW_TYPES[kind]))
    return pa.schema(fields)


def count_rows(path: str) -> int:
    """Rows (lines) in a CSV file; a last line without a newline counts, an empty file has 0."""
    n, last = 0, _NEWLINE
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BYTES):
            n += block.count(b"\n")
            last = block[-1]
    return n + (last != _NEWLINE)


def _offset_of_row(path: str, row: int) -> int:
    """Byte offset where line ``row`` (0-based) starts; the file size when there are fewer lines."""
    if row == 0:
        return 0
    seen, pos = 0, 0
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BYTES):
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == _NEWLINE)
            if seen + len(newlines) >= row:
                return pos + int(newlines[row - seen - 1]) + 1
            seen += len(newlines)
            pos += len(block)
    return pos


def row_offsets(path: str, every: int) -> tuple[int, np.ndarray]:
    """(rows in the file, byte offsets where rows 0, every, 2*every, ... start), one scan."""
    offsets, n, pos, last = [0], 0, 0, _NEWLINE
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BYTES):
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == _NEWLINE)
            # row k*every starts after the file's newline number k*every - 1 (0-based)
            offsets += (pos + newlines[(every - 1 - n) % every::every] + 1).tolist()
            n += len(newlines)
            pos += len(block)
            last = block[-1]
    rows = n + (last != _NEWLINE)
    starts = np.asarray(offsets[: (rows + every - 1) // every] if rows else [], np.int64)
    return rows, starts


def iter_tables(path: str, schema: pa.Schema, start_row: int = 0, num_rows: int | None = None,
                block_rows: int = 65536, delimiter: str = ",", defaults: dict[str, str] | None = None,
                dictionary: Sequence[str] = (), block_bytes: int = 4 << 20,
                offset: int | None = None) -> Iterator[pa.Table]:
    """Rows [start_row, start_row + num_rows) of ``path`` (to the end when ``num_rows`` is None) as
    tables of ``block_rows`` rows with ``schema``. ``defaults``: column -> EasyRec ``default_val``,
    filled into empty values. ``dictionary``: STRING columns read dictionary-encoded (each distinct
    value converted once downstream). ``offset``: the byte where ``start_row`` begins, if known.
    Errors are ``DataError`` naming file, line and column."""
    if num_rows is not None and num_rows <= 0:
        return
    types = {f.name: (pa.dictionary(pa.int32(), f.type) if f.name in dictionary else f.type) for f in schema}
    read = pacsv.ReadOptions(column_names=schema.names, block_size=block_bytes, use_threads=False)
    parse = pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False)
    convert = pacsv.ConvertOptions(column_types=types, strings_can_be_null=False, quoted_strings_can_be_null=False)
    fill = {name: _default(schema.field(name), value, path) for name, value in (defaults or {}).items() if value != ""}
    done = 0  # rows read from start_row on
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    start = _offset_of_row(path, start_row) if offset is None else offset
    if start >= os.path.getsize(path):
        return  # no rows from start_row on
    with open(path, "rb") as raw:
        raw.seek(start)
        try:
            reader = pacsv.open_csv(raw, read_options=read, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as e:
            raise _locate(path, schema, start_row, delimiter, e) from None
        while num_rows is None or done < num_rows:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as e:
                raise _locate(path, schema, start_row + done, delimiter, e) from None
            if num_rows is not None and done + batch.num_rows > num_rows:
                batch = batch.slice(0, num_rows - done)
            done += batch.num_rows
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= block_rows:
                table = pa.Table.from_batches(pending)
                yield _fill(table.slice(0, block_rows), fill)
                rest = table.slice(block_rows)
                pending, pending_rows = rest.to_batches(), rest.num_rows
    if pending_rows:
        yield _fill(pa.Table.from_batches(pending), fill)


def _default(field: pa.Field, value: str, path: str) -> pa.Scalar:
    try:
        if pa.types.is_boolean(field.type):
            return pa.scalar(value.strip().lower() in ("true", "1"), pa.bool_())
        return pa.scalar(value, pa.string()).cast(field.type)
    except (pa.ArrowInvalid, ValueError):
        raise DataError(f"{path}: default_val {value!r} of column {field.name!r} is not a "
                        f"{field.type} value") from None


def _fill(table: pa.Table, fill: dict[str, pa.Scalar]) -> pa.Table:
    for name, value in fill.items():
        i = table.schema.get_field_index(name)
        col = table.column(i)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if pa.types.is_string(col.type):  # CSV gives "" for an empty STRING
            col = pc.if_else(pc.equal(col, ""), value, col)
        table = table.set_column(i, name, col.fill_null(value))
    return table


def _locate(path: str, schema: pa.Schema, first_row: int, delimiter: str, error: Exception) -> DataError:
    """The first bad row at or after ``first_row`` (0-based), re-read with Python's csv module (the
    error path only): a DataError naming file, line and column."""
    checks = {pa.int32(): int, pa.int64(): int, pa.float32(): float, pa.float64(): float,
              pa.bool_(): _bool}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for line, row in enumerate(csv.reader(islice(f, first_row, None), delimiter=delimiter), first_row + 1):
            if len(row) != len(schema):
                return DataError(f"{path}: line {line} has {len(row)} columns, expected {len(schema)} "
                                 f"({', '.join(schema.names)})")
            for field, value in zip(schema, row):
                check = checks.get(field.type)
                if check is None or value == "":
                    continue
                try:
                    check(value)
                except ValueError:
                    return DataError(f"{path}: line {line}, column {field.name!r}: {value!r} is not a "
                                     f"{field.type} value")
    return DataError(f"{path}: cannot be read as CSV from line {first_row + 1} on ({error})")


def _bool(value: str) -> bool:
    if value.strip().lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
    return True


def write_table(table: pa.Table, path: str | os.PathLike, tag_separator: str = "|") -> None:
    """``table`` as EasyRec CSV at ``path``: header-less, its columns in order, list columns (tag
    lists) as their values joined by ``tag_separator``; written under a temporary name, then renamed."""
    for i, f in enumerate(table.schema):
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            table = table.set_column(i, f.name, pc.binary_join(table.column(i).cast(pa.list_(pa.string())),
                                                               tag_separator))
    with atomic_write(path) as tmp:
        pacsv.write_csv(table, tmp, pacsv.WriteOptions(include_header=False))


def read_all(path: str, schema: pa.Schema, **kwargs) -> pa.Table:
    """The whole file as one table (tests, small files)."""
    tables = list(iter_tables(path, schema, **kwargs))
    return pa.concat_tables(tables) if tables else schema.empty_table()




# --------------------------------------------------------------------------------------------
# The Parquet reader's view of a CSV file (data.ParquetReader opens files through this when the
# config's input_type is CSVInput): fixed-size row groups whose start bytes are found in one
# scan, so row group i is read by seeking, as a Parquet row group would be.

ROW_GROUP_ROWS = 65536


@dataclass(frozen=True)
class CsvFormat:
    """How to read a config's CSV files: the schema, the column delimiter, EasyRec defaults."""

    schema: pa.Schema
    delimiter: str = ","
    defaults: dict[str, str] = field(default_factory=dict)


def csv_format(data_config) -> CsvFormat | None:
    """The CsvFormat of a ``config.DataConfig``; None unless its input_type is CSVInput."""
    if data_config.input_type != "CSVInput":
        return None
    return CsvFormat(schema(data_config.input_fields), data_config.separator,
                     {f.input_name: f.default_val for f in data_config.input_fields if f.default_val})


def expand(paths: Sequence[str], what: str = "input") -> list[str]:
    """CSV inputs: files, globs, or directories (every file below, any name)."""
    return expand_paths(paths, what, kind="CSV", directory_glob="*")


class _Group:
    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows


class CsvFile:
    """The subset of ``pyarrow.parquet.ParquetFile`` the reader uses (``metadata.num_rows``,
    ``num_row_groups``, ``row_group(i).num_rows``, ``schema_arrow``, ``read_row_group``), over a
    CSV file cut into row groups of ``group_rows`` lines."""

    def __init__(self, path: str, fmt: CsvFormat, read_dictionary: Sequence[str] = (),
                 group_rows: int = ROW_GROUP_ROWS) -> None:
        self.path, self.fmt, self.group_rows = path, fmt, group_rows
        self.dictionary = tuple(read_dictionary)
        self.num_rows, self.offsets = row_offsets(path, group_rows)
        self.num_row_groups = len(self.offsets)
        self.schema_arrow = fmt.schema

    @property
    def metadata(self) -> CsvFile:
        return self

    def row_group(self, i: int) -> _Group:
        return _Group(min(self.group_rows, self.num_rows - i * self.group_rows))

    def read_row_group(self, i: int, columns: Sequence[str] | None = None, use_threads: bool = False) -> pa.Table:
        rows = self.row_group(i).num_rows
        tables = list(iter_tables(self.path, self.fmt.schema, i * self.group_rows, rows, block_rows=rows,
                                  delimiter=self.fmt.delimiter, defaults=self.fmt.defaults,
                                  dictionary=self.dictionary, offset=int(self.offsets[i])))
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if table.num_rows != rows:
            raise DataError(f"{self.path}: changed while reading (row group {i}: {table.num_rows} of {rows} rows)")
        return table.select(list(columns)) if columns is not None else table
