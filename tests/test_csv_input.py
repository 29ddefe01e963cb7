"""EasyRec CSV input: schema, row counts, streamed slices, errors naming file, line and column, and
the reader giving the same batches from CSV as from Parquet of the same rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from aitm_torchrec.config import build_checked
from aitm_torchrec.data import ParquetReader, csv_input
from aitm_torchrec.features import DataError

SCHEMA = csv_input.schema([("clk", "INT32"), ("buy", "INT64"), ("id", "STRING"), ("tags", "STRING"),
                           ("x", "FLOAT"), ("d", "DOUBLE"), ("b", "BOOL")])


def write(tmp_path, text: str, name: str = "in.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_schema_maps_easyrec_types():
    assert SCHEMA.types == [pa.int32(), pa.int64(), pa.string(), pa.string(), pa.float32(), pa.float64(), pa.bool_()]
    with pytest.raises(ValueError, match="input field 'y': input_type 'INT8' is not supported"):
        csv_input.schema([("y", "INT8")])


@pytest.mark.parametrize("text, rows", [("", 0), ("a\n", 1), ("a", 1), ("a\nb", 2), ("a\nb\n", 2), ("\n\n", 2)])
def test_count_rows_counts_lines(tmp_path, text, rows):
    assert csv_input.count_rows(write(tmp_path, text)) == rows


def test_iter_tables_reads_a_slice_in_blocks_with_defaults(tmp_path):
    lines = [f"{i % 2},{i % 3},id{i},{i}|{i + 1},{i / 2},{i},{'true' if i % 2 else 'false'}" for i in range(10)]
    lines[5] = "1,0,,,,,"  # empty values: "" for strings, null for numbers
    path = write(tmp_path, "\n".join(lines) + "\n")
    tables = list(csv_input.iter_tables(path, SCHEMA, start_row=3, num_rows=5, block_rows=2))
    assert [t.num_rows for t in tables] == [2, 2, 1]
    t = pa.concat_tables(tables)
    assert t.column("id").to_pylist() == ["id3", "id4", "", "id6", "id7"]
    assert t.column("x").to_pylist() == [1.5, 2.0, None, 3.0, 3.5]
    assert t.column("b").to_pylist() == [True, False, None, False, True]
    filled = csv_input.read_all(path, SCHEMA, start_row=5, num_rows=1, defaults={"id": "none", "x": "-1", "tags": ""})
    assert filled.column("id").to_pylist() == ["none"] and filled.column("x").to_pylist() == [-1.0]
    assert filled.column("tags").to_pylist() == [""]
    dic = csv_input.read_all(path, SCHEMA, dictionary=["id"])
    assert pa.types.is_dictionary(dic.column("id").type) and dic.num_rows == 10


def test_an_empty_line_is_a_row_of_empty_values(tmp_path):
    """pyarrow's reading; the reader then stops on its null label, naming file and column."""
    t = csv_input.read_all(write(tmp_path, "1,0,a,b,1,1,1\n\n"), SCHEMA)
    assert t.slice(1).to_pylist() == [{"clk": None, "buy": None, "id": "", "tags": "", "x": None, "d": None, "b": None}]


def test_iter_tables_past_the_end_and_other_separators(tmp_path):
    path = write(tmp_path, "1;2;a;b;0.5;1;1\n0;0;c;d;1;2;0")
    assert csv_input.read_all(path, SCHEMA, start_row=2).num_rows == 0
    t = csv_input.read_all(path, SCHEMA, delimiter=";")
    assert t.column("tags").to_pylist() == ["b", "d"] and t.column("b").to_pylist() == [True, False]


@pytest.mark.parametrize("line, message", [
    ("1,x,a,b,1,1,1", r"in.csv: line 3, column 'buy': 'x' is not a int64 value"),
    ("1,0,a,b,1.5e,1,1", r"in.csv: line 3, column 'x': '1.5e' is not a float value"),
    ("1,0,a,b,1,1,maybe", r"in.csv: line 3, column 'b': 'maybe' is not a bool value"),
    ("1,0,a,b,1", r"in.csv: line 3 has 5 columns, expected 7"),
])
def test_bad_values_name_file_line_and_column(tmp_path, line, message):
    path = write(tmp_path, "\n".join(["1,0,a,b,1,1,1", "0,0,c,d,2,2,0", line, "1,1,e,f,3,3,1"]) + "\n")
    with pytest.raises(DataError, match=message):
        csv_input.read_all(path, SCHEMA)
    with pytest.raises(DataError, match=message):  # also when the slice starts after the first line
        csv_input.read_all(path, SCHEMA, start_row=1)


def test_bad_default_names_the_column(tmp_path):
    path = write(tmp_path, "1,0,a,b,,1,1\n")
    with pytest.raises(DataError, match="default_val 'abc' of column 'x' is not a float value"):
        csv_input.read_all(path, SCHEMA, defaults={"x": "abc"})


def test_csv_file_row_groups_cover_every_row_once(tmp_path):
    path = write(tmp_path, "".join(f"{i % 2},{i},id{i},t,0,0,1\n" for i in range(23)))
    f = csv_input.CsvFile(path, csv_input.CsvFormat(SCHEMA), group_rows=5)
    assert (f.metadata.num_rows, f.metadata.num_row_groups) == (23, 5)
    assert [f.metadata.row_group(i).num_rows for i in range(5)] == [5, 5, 5, 5, 3]
    got = [f.read_row_group(i, columns=["buy"]).column("buy").to_pylist() for i in (4, 0, 2, 1, 3)]
    assert sorted(sum(got, [])) == list(range(23))


def test_reader_gives_the_same_batches_from_csv_as_from_parquet(tmp_path):
    rng = np.random.default_rng(0)
    n = 1000
    clk = rng.integers(0, 2, n)
    table = pa.table({
        "clk": pa.array(clk, pa.int32()), "buy": pa.array(clk * rng.integers(0, 2, n), pa.int64()),
        "id": pa.array([f"u{v}" for v in rng.integers(0, 50, n)]),
        "tags": pa.array(["|".join(map(str, rng.integers(0, 9, rng.integers(0, 4)))) for _ in range(n)]),
        "x": pa.array(rng.normal(size=n), pa.float32()), "d": pa.array(rng.normal(size=n)),
        "b": pa.array(rng.integers(0, 2, n).astype(bool)),
    })
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=300)
    pacsv.write_csv(table, tmp_path / "in.csv", pacsv.WriteOptions(include_header=False))
    features = [{"input_names": ["id"], "hash_bucket_size": 97},
                {"input_names": ["tags"], "feature_type": "TagFeature", "hash_bucket_size": 13, "separator": "|"},
                {"input_names": ["x"], "feature_type": "RawFeature"},
                {"input_names": ["buy"], "feature_name": "buy_id", "num_buckets": 2}]
    cfg = build_checked({"feature_config": {"features": features}, "model_config": {
        "feature_groups": [{"group_name": "all", "feature_names": ["id", "tags", "x", "buy_id"]}],
        "model_params": {"task_towers": [{"tower_name": "ctr", "label_name": "clk", "dnn": {"hidden_units": [4]}}]}}},
        "test")
    kwargs = dict(schema=cfg.schema, batch_size=64, rank=1, world_size=2, prefetch=0)
    from_parquet = list(ParquetReader([str(tmp_path / "in.parquet")], **kwargs).epoch(0))
    reader = ParquetReader([str(tmp_path / "in.csv")], csv=csv_input.CsvFormat(SCHEMA), **kwargs)
    from_csv = list(reader.epoch(0))
    assert reader.num_rows == n and len(from_csv) == len(from_parquet) == 8
    for a, b in zip(from_parquet, from_csv):
        assert a.sparse.keys() == b.sparse.keys()
        np.testing.assert_array_equal(a.sparse.values(), b.sparse.values())
        np.testing.assert_array_equal(a.sparse.lengths(), b.sparse.lengths())
        np.testing.assert_allclose(a.dense, b.dense, rtol=1e-6)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.weights, b.weights)


def test_reader_finds_csv_files_in_directories_and_names_bad_paths(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part-0").write_text("1,0,a,b,1,1,1\n")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    assert csv_input.expand([str(tmp_path / "d")]) == [str(tmp_path / "d" / "part-0")]
    with pytest.raises(DataError, match="input path '.*nothing' matches no CSV file"):
        csv_input.expand([str(tmp_path / "nothing")])


def test_write_table_joins_tag_lists_and_reads_back(tmp_path):
    """Arrow rows -> EasyRec CSV: header-less, list columns joined by '|', nothing left under a
    temporary name; read back with the columns' EasyRec types."""
    table = pa.table({"clk": pa.array([1, 0, 1], pa.int32()), "id": pa.array([7, 8, 9], pa.int64()),
                      "tags": pa.array([[1, 2], [], [3]], pa.list_(pa.int64()))})
    path = tmp_path / "sub" / "part.csv"
    csv_input.write_table(table, path)
    assert path.read_text().splitlines() == ['1,7,"1|2"', '0,8,""', '1,9,"3"']
    assert [p.name for p in path.parent.iterdir()] == ["part.csv"]
    back = csv_input.read_all(str(path), csv_input.schema([("clk", "INT32"), ("id", "INT64"), ("tags", "STRING")]))
    assert back.column("tags").to_pylist() == ["1|2", "", "3"] and back.column("id").to_pylist() == [7, 8, 9]
