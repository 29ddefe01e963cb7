"""The resolved schema: derived once from the config, checked against it, round-tripped through JSON."""

from __future__ import annotations

import json

import pytest
import yaml

from aitm_torchrec.config import load_config
from aitm_torchrec.schema import ID_HASH, Schema, SchemaError
from tests.conftest import REPO


def test_schema_matches_the_config_it_came_from(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "aitm_dag.yaml").read_text())
    raw["feature_config"]["features"].insert(3, {"input_names": ["ctr_hist"], "feature_type": "RawFeature",
                                                 "raw_input_dim": 2, "normalizer": {"log1p": True}})
    raw["model_config"]["feature_groups"][0]["feature_names"].append("ctr_hist")
    (tmp_path / "dag.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "dag.yaml")
    s = cfg.schema
    assert s is cfg.schema  # built once
    features = cfg.feature_config.features
    assert [f.name for f in s.sparse] == [f.name for f in features if f.feature_type != "RawFeature"]
    assert [(f.name, f.column, f.offset, f.dim) for f in s.dense] == [("ctr_hist", "ctr_hist", 0, 2)]
    assert s.dense[0].normalizer.log1p and s.dense_dim == 2
    price = next(f for f in s.sparse if f.name == "price")
    assert price.id_rule == {"kind": "identity", "num_buckets": 50}
    user = next(f for f in s.sparse if f.name == "user_id")
    assert user.id_rule["kind"] == "hash" and user.id_rule["hash_bucket_size"] == 100000
    assert s.tower_names == [t.tower_name for t in cfg.towers]
    assert s.label_names == [t.label_name for t in cfg.towers]
    # aitm_dag: buy reads ctr and cart
    assert s.label_relations == [[], [], [0, 1]] and s.order == [0, 1, 2]
    assert s.calibration_pairs == [(2, 0, 1.0), (2, 1, 1.0)]
    assert s.input_dim == 17 * 16 + 2
    assert [c.name for c in s.embedding_bag_configs()] == s.keys


def test_schema_round_trips_through_json(tmp_path):
    cfg = load_config(REPO / "configs" / "aitm_3step.yaml")
    path = tmp_path / "schema.json"
    cfg.schema.save(path)
    assert Schema.load(path) == cfg.schema
    data = json.loads(path.read_text())
    assert data["id_hash"]["name"] == ID_HASH["name"] and data["id_hash"]["version"] == ID_HASH["version"]
    assert data["sparse"][0]["id_rule"]["hash"] == ID_HASH["name"]
    assert not list(tmp_path.glob(".*tmp"))


def test_schema_from_another_hash_version_or_a_bad_file_is_refused(tmp_path):
    cfg = load_config()
    data = cfg.schema.to_dict()
    data["id_hash"]["version"] = ID_HASH["version"] + 1
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(SchemaError, match=r"s.json: ids were hashed with aitm-splitmix64 v2"):
        Schema.load(tmp_path / "s.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SchemaError, match="bad.json: not valid JSON"):
        Schema.load(tmp_path / "bad.json")
    del data["tasks"]
    data["id_hash"]["version"] = ID_HASH["version"]
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.raises(SchemaError, match="t.json: not a valid schema"):
        Schema.load(tmp_path / "t.json")
