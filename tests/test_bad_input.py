"""Bad input: each case is a DataError naming the file and column, or a documented, counted repair.

The last test runs 2 real processes where only rank 1's share of the data is bad: the job must
fail promptly with rank 1's DataError instead of leaving rank 0 waiting in a collective.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from aitm_torchrec.config import Feature
from aitm_torchrec.data import ParquetReader
from aitm_torchrec.features import DataError
from aitm_torchrec.schema import Schema
from tests.conftest import tiny_config_dict
from tests.multiprocess import run_ranks

USER = Feature(("user",), "IdFeature", hash_bucket_size=100)
PRICE = Feature(("price",), "IdFeature", num_buckets=50)
TAGS = Feature(("tags",), "TagFeature", hash_bucket_size=100)
X = Feature(("x",), "RawFeature")
FEATURES = (USER, PRICE, TAGS, X)


def _good(n: int = 20) -> dict:
    return {
        "user": pa.array([f"u{i % 5}" for i in range(n)]),
        "price": pa.array(np.arange(n) % 50, pa.int64()),
        "tags": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int64())),
        "x": pa.array(np.linspace(0, 1, n)),
        "clk": pa.array(np.arange(n) % 2, pa.int8()),
        "buy": pa.array(np.zeros(n), pa.int8()),
    }


def _write(tmp_path: Path, name: str = "part-0.parquet", **changes) -> Path:
    cols = _good()
    for k, v in changes.items():
        if v is None:
            del cols[k]
        else:
            cols[k] = v
    path = tmp_path / name
    pq.write_table(pa.table(cols), path)
    return path


def _read_all(paths, features=FEATURES, prefetch: int = 2, **kw) -> ParquetReader:
    reader = ParquetReader([str(p) for p in paths], Schema.from_features(features, ["clk", "buy"]), batch_size=8, prefetch=prefetch, **kw)
    for _ in reader.epoch(0):
        pass
    return reader


def test_missing_column(tmp_path):
    path = _write(tmp_path, price=None)
    with pytest.raises(DataError, match=r"part-0.parquet: missing column 'price' \(needed by price\)"):
        ParquetReader([str(path)], Schema.from_features(FEATURES, ["clk", "buy"]), 8)
    path = _write(tmp_path, "p1.parquet", buy=None)
    with pytest.raises(DataError, match=r"p1.parquet: missing column 'buy' \(needed by labels\)"):
        ParquetReader([str(path)], Schema.from_features(FEATURES, ["clk", "buy"]), 8)


@pytest.mark.parametrize("column,value,message", [
    ("user", pa.array(np.linspace(0, 1, 20)), "column 'user' has type double; IdFeature 'user' needs"),
    ("user", pa.array([[1]] * 20), "column 'user' has type list<element: int64>; IdFeature 'user' needs"),
    ("tags", pa.array(np.ones(20)), "column 'tags' has type double; TagFeature 'tags' needs"),
    ("x", pa.array(["1.0"] * 20), "column 'x' has type string; RawFeature 'x' needs numbers"),
    ("clk", pa.array(["1"] * 20), "label column 'clk' has type string"),
])
def test_wrong_column_type_is_found_at_construction(tmp_path, column, value, message):
    path = _write(tmp_path, **{column: value})
    with pytest.raises(DataError, match=re.escape(f"part-0.parquet: {message}")):
        ParquetReader([str(path)], Schema.from_features(FEATURES, ["clk", "buy"]), 8)


@pytest.mark.parametrize("value,message", [
    (pa.array([0, None] * 10, pa.int8()), "label column 'clk' has 10 null values"),
    (pa.array([0, 2] * 10, pa.int8()), "label column 'clk' has 10 values other than 0 and 1, e.g. 2"),
    (pa.array([0.0, 0.5] * 10), "label column 'clk' has 10 values other than 0 and 1"),
])
def test_bad_labels_are_raised_from_the_prefetch_thread(tmp_path, value, message):
    path = _write(tmp_path, clk=value)
    with pytest.raises(DataError, match=f"part-0.parquet: {message}"):
        _read_all([path], prefetch=2)


def test_label_chain_violation_is_an_error_by_default(tmp_path):
    path = _write(tmp_path, clk=pa.array([1, 0] * 10, pa.int8()), buy=pa.array([0, 1, 0, 0] * 5, pa.int8()))
    with pytest.raises(DataError, match="part-0.parquet: label column 'buy' is 1 while the earlier step 'clk' "
                                        "is 0 in 5 rows.*label_chain_policy"):
        _read_all([path])
    assert _read_all([path], label_chain_policy="drop").stats.rows_dropped == 5


def test_empty_files_are_skipped_but_no_rows_at_all_is_an_error(tmp_path, caplog):
    good = _write(tmp_path)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table(_good()).slice(0, 0), empty)
    with caplog.at_level("WARNING"):
        reader = _read_all([good, empty])
    assert reader.num_rows == 20 and reader.stats.empty_files == [str(empty)]
    assert "empty.parquet: no rows, skipped" in caplog.text
    with pytest.raises(DataError, match="holds no rows"):
        ParquetReader([str(empty)], Schema.from_features(FEATURES, ["clk", "buy"]), 8)


def test_paths_matching_nothing(tmp_path):
    with pytest.raises(DataError, match="matches no Parquet file"):
        ParquetReader([str(tmp_path / "nope*.parquet")], Schema.from_features(FEATURES, ["clk", "buy"]), 8)


def test_truncated_parquet(tmp_path):
    path = _write(tmp_path)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError, match="part-0.parquet: not a readable Parquet file"):
        ParquetReader([str(path)], Schema.from_features(FEATURES, ["clk", "buy"]), 8)


def test_corrupt_row_group_names_file_row_group_and_column(tmp_path):
    n = 5000
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"user": pa.array(np.arange(n)), "clk": pa.array(np.zeros(n, np.int8)),
                             "buy": pa.array(np.zeros(n, np.int8))}), path, row_group_size=1000)
    data = bytearray(path.read_bytes())
    # Scramble the middle of the file: row-group pages, footer intact (construction succeeds).
    for i in range(len(data) // 4, len(data) // 2):
        data[i] = (data[i] * 7 + 13) % 256
    path.write_bytes(bytes(data))
    reader = ParquetReader([str(path)], Schema.from_features((USER,), ["clk", "buy"]), 100, prefetch=2)
    with pytest.raises(DataError, match=r"part-0.parquet: row group \d+, column '\w+', cannot be read"):
        for _ in reader.epoch(0):
            pass


def test_negative_or_too_large_ids_under_num_buckets(tmp_path):
    path = _write(tmp_path, price=pa.array([-3] + [1] * 19, pa.int64()))
    with pytest.raises(DataError, match=r"part-0.parquet: column 'price' has 1 ids outside \[0, num_buckets=50\), e.g. -3"):
        _read_all([path])
    path = _write(tmp_path, "p1.parquet", price=pa.array(["7"] * 19 + ["x"]))
    with pytest.raises(DataError, match="p1.parquet: column 'price' holds strings that are not integers"):
        _read_all([path])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_raw_values(tmp_path, bad):
    path = _write(tmp_path, x=pa.array([0.5] * 19 + [bad]))
    with pytest.raises(DataError, match="part-0.parquet: column 'x' has 1 NaN or infinite values"):
        _read_all([path])


def test_empty_and_null_tag_lists_are_empty_bags_and_counted(tmp_path):
    tags = pa.array([[], None, [1, None]] + [[1]] * 17, pa.list_(pa.int64()))
    path = _write(tmp_path, tags=tags, user=pa.array([None, ""] + ["u"] * 18), x=pa.array([None] + [1.0] * 19))
    reader = ParquetReader([str(path)], Schema.from_features(FEATURES, ["clk", "buy"]), batch_size=20, prefetch=0)
    (batch,) = list(reader.epoch(0))
    d = batch.sparse.to_dict()
    assert d["tags"].lengths().tolist()[:4] == [0, 0, 1, 1]
    assert d["user"].lengths().tolist()[:3] == [0, 0, 1]
    assert batch.dense[0, 0] == 0.0
    assert reader.stats.empty_bags == {"tags": 2, "user": 2, "price": 0}
    assert reader.stats.null_raw == {"x": 1}


# --------------------------------------------------------------------------------------------
# Only rank 1's share is bad: the job fails promptly with rank 1's message.


def _train(config_path: str) -> dict:
    from launch.train import main

    return main(["--config", config_path, "--no-resume"])


@pytest.mark.slow
def test_bad_data_on_one_rank_fails_the_job_promptly(tiny_data, tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    files = sorted((tiny_data / "train").glob("*.parquet"))
    assert len(files) == 2  # 6000 rows each: with shuffle off, rank 0 reads the first, rank 1 the second
    shutil.copy(files[0], train / files[0].name)
    table = pq.read_table(files[1])
    price = table.column("price").to_numpy().copy()
    price[10] = -1
    table = table.set_column(table.schema.get_field_index("price"), "price", pa.array(price))
    pq.write_table(table, train / files[1].name, row_group_size=1000)
    raw = tiny_config_dict(tiny_data, tmp_path / "run")
    raw["train_input_path"] = str(train)
    raw["data_config"]["shuffle"] = False
    raw["train_config"]["num_steps"] = 20
    del raw["eval_input_path"]
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    t0 = time.monotonic()
    with pytest.raises(ChildFailedError) as info:
        run_ranks(_train, str(config))
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert f"{files[1].name}: column 'price' has 1 ids outside [0, num_buckets=50), e.g. -1" in message
    assert "DataError" in message
    assert elapsed < 120, f"the job took {elapsed:.0f}s to fail"
