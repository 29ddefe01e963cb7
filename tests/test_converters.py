"""Converters on tiny raw files written here in the exact raw formats, then read back by ParquetReader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aitm_torchrec.config import DEFAULT_CONFIG, load_config
from aitm_torchrec.data import ParquetReader
from aitm_torchrec.features import Source, bag_column
from datasets import aliccp, taobao_csv
from tests.conftest import sparse_of

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Ali-CCP


def _features(*entries: tuple[str, int]) -> str:
    """Ali-CCP feature_list: field \\x02 id \\x03 value, joined by \\x01."""
    return "\x01".join(f"{f}\x02{i}\x03{1.0}" for f, i in entries)


def _skeleton(rows: list[tuple[int, int, int, str, list]]) -> str:
    return "".join(f"{sid},{click},{buy},{md5},{len(fs)},{_features(*fs)}\n" for sid, click, buy, md5, fs in rows)


def _common(rows: list[tuple[str, list]]) -> str:
    return "".join(f"{md5},{len(fs)},{_features(*fs)}\n" for md5, fs in rows)


A, B, C, D, E = (ch * 32 for ch in "abcde")


@pytest.fixture
def aliccp_raw(tmp_path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "common_features_train.csv").write_text(_common([
        (A, [("101", 1001), ("121", 5), ("109_14", 777), ("109_14", 778)]),  # 109_14: not kept
        (B, [("101", 1002), ("121", 5)]),
        (C, [("101", 1003), ("121", 6)]),
    ]))
    (raw / "sample_skeleton_train.csv").write_text(_skeleton([
        (1, 1, 0, A, [("205", 2001), ("206", 3001), ("508", 9001), ("508", 9002), ("210", 55)]),
        (2, 0, 0, A, [("205", 2001), ("206", 3001), ("508", 9001)]),
        (3, 0, 1, B, [("205", 2002)]),  # click 0, buy 1: dropped, and not counted
        (4, 1, 1, B, [("205", 2001), ("301", 1)]),
        (5, 0, 0, C, [("205", 2003), ("301", 1)]),
        (6, 0, 0, D, [("205", 2001)]),  # no common features row
    ]))
    (raw / "common_features_test.csv").write_text(_common([(E, [("101", 1001)])]))
    (raw / "sample_skeleton_test.csv").write_text(_skeleton([
        (7, 0, 0, E, [("205", 2009), ("206", 3001), ("206", 3001), ("508", 9001)]),
    ]))
    return raw


def test_aliccp_converter_joins_filters_and_drops(aliccp_raw, tmp_path):
    out = tmp_path / "aliccp"
    stats = aliccp.main(["--raw", str(aliccp_raw), "--out", str(out), "--min-count", "1"])
    assert json.loads((out / "_SUCCESS").read_text()) == json.loads(json.dumps(stats))
    assert not list(out.rglob(".*tmp"))
    assert stats["train"]["rows_in"] == 6 and stats["train"]["dropped_click0_buy1"] == 1
    assert stats["train"]["rows_out"] == 5 and stats["train"]["rows_without_common_features"] == 1
    assert stats["multi_fields"] == ["f508"]
    train = pq.read_table(out / "train" / "part-00000.parquet")
    assert train.column_names == ["sample_id", "click", "purchase"] + [f"f{f}" for f in aliccp.FIELDS]
    assert train.schema.field("f508").type == pa.list_(pa.int64())
    assert train.schema.field("f205").type == pa.int64()
    t = train.to_pydict()
    assert t["sample_id"] == [1, 2, 4, 5, 6]
    assert t["click"] == [1, 0, 1, 0, 0] and t["purchase"] == [0, 0, 1, 0, 0]
    # ids seen more than once among kept rows stay; the rest become -1; absent -> null / []
    assert t["f205"] == [2001, 2001, 2001, -1, 2001]
    assert t["f101"] == [1001, 1001, -1, -1, None]  # 1002 is used by row 4 only (row 3 dropped)
    assert t["f121"] == [5, 5, 5, -1, None]
    assert t["f508"] == [[9001, -1], [9001], [], [], []]
    assert t["f301"] == [None, None, 1, 1, None]
    assert t["f206"] == [3001, 3001, None, None, None]
    test = pq.read_table(out / "test" / "part-00000.parquet").to_pydict()
    assert test["f205"] == [-1] and test["f101"] == [1001] and test["f508"] == [[9001]]
    assert test["f206"] == [3001] and stats["test"]["extra_ids_dropped"] == {"f206": 1}


def test_aliccp_output_loads_with_its_config(aliccp_raw, tmp_path):
    out = tmp_path / "aliccp"
    aliccp.main(["--raw", str(aliccp_raw), "--out", str(out), "--min-count", "1"])
    cfg = load_config(REPO / "configs" / "aitm_aliccp.yaml",
                      [f"train_input_path={out / 'train'}", f"eval_input_path={out / 'test'}"])
    reader = ParquetReader(cfg.train_input_path, cfg.schema,
                           batch_size=8, prefetch=0)
    (batch,) = list(reader.epoch(0))
    d = batch.sparse.to_dict()
    assert d["f508"].lengths().tolist() == [2, 1, 0, 0, 0, 0, 0, 0]
    assert d["f101"].lengths().tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert batch.labels[:5].tolist() == [[1, 0], [0, 0], [1, 1], [0, 0], [0, 0]]
    assert batch.weights.tolist() == [1] * 5 + [0] * 3


def test_aliccp_default_min_count_and_bad_feature_list(aliccp_raw, tmp_path):
    stats = aliccp.main(["--raw", str(aliccp_raw), "--out", str(tmp_path / "o")])
    assert stats["min_count"] == 10 and all(v == 0 for v in stats["vocabulary"].values())
    (aliccp_raw / "sample_skeleton_train.csv").write_text(f"1,0,0,{A},1,205-2001\n")
    with pytest.raises(ValueError, match=r"sample_skeleton_train.csv: feature_list has an entry without"):
        aliccp.main(["--raw", str(aliccp_raw), "--out", str(tmp_path / "o2")])
    assert not (tmp_path / "o2" / "_SUCCESS").exists()


# --------------------------------------------------------------------------------------------
# Taobao CSV (EasyRec's aitm_on_taobao sample)


def _taobao_line(clk, buy, ids, cats, brands, price) -> str:
    return ",".join([str(clk), str(buy), *ids, cats, brands, str(price)]) + "\n"


IDS = ["430548_1007", "123", "6261", "79", "5", "247789", "581738", "0", "1", "2", "3", "4", "5", "6", "7"]


def test_taobao_csv_converter_and_round_trip(tmp_path):
    src = tmp_path / "taobao_train_data"
    empty_ids = list(IDS)
    empty_ids[6] = ""  # user_id missing
    src.write_text(_taobao_line(1, 0, IDS, "4|5", "6|7|8", 12)
                   + _taobao_line(0, 0, empty_ids, "", "9", 0)
                   + _taobao_line(1, 1, IDS, "4", "", 49))
    out = tmp_path / "taobao"
    stats = taobao_csv.main([str(src), "--out", str(out / "train"), "--block-mb", "1"])
    path = out / "train" / "taobao_train_data.parquet"
    assert stats == {str(path): 3} and not list(out.rglob(".*tmp"))
    table = pq.read_table(path)
    cfg = load_config(DEFAULT_CONFIG, [f"train_input_path={out / 'train'}"])
    assert table.column_names == [c.name for c in taobao_csv.SCHEMA]
    assert set(f.column for f in cfg.feature_config.features) | {"clk", "buy"} == set(table.column_names)
    t = table.to_pydict()
    assert t["clk"] == [1, 0, 1] and t["buy"] == [0, 0, 1] and t["price"] == [12, 0, 49]
    assert t["user_id"] == ["581738", None, "581738"] and t["tag_category_list"] == ["4|5", None, "4"]
    reader = ParquetReader(cfg.train_input_path, cfg.schema, batch_size=4, prefetch=0)
    (batch,) = list(reader.epoch(0))
    d = batch.sparse.to_dict()
    assert d["tag_category_list"].lengths().tolist() == [2, 0, 1, 0]
    assert d["tag_brand_list"].lengths().tolist() == [3, 1, 0, 0]
    assert d["user_id"].lengths().tolist() == [1, 0, 1, 0]
    assert d["price"].values().tolist() == [12, 0, 49]
    features = {f.name: f for f in cfg.feature_config.features}
    expected = bag_column(sparse_of(features["adgroup_id"]), pa.array(["123"] * 3), Source("x"))[1]
    np.testing.assert_array_equal(d["adgroup_id"].values().numpy(), expected)


def test_taobao_csv_bad_label_and_wrong_width(tmp_path):
    src = tmp_path / "bad"
    src.write_text(_taobao_line(2, 0, IDS, "1", "2", 3))
    with pytest.raises(ValueError, match=r"bad: label column 'clk' has 1 values other than 0 and 1"):
        taobao_csv.main([str(src), "--out", str(tmp_path / "o")])
    assert not list((tmp_path / "o").glob("*"))
    src.write_text("1,0,3\n")
    with pytest.raises(ValueError, match=r"bad: not a Taobao CSV with the 20 columns"):
        taobao_csv.main([str(src), "--out", str(tmp_path / "o")])
