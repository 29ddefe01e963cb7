import pytest
import yaml

from aitm_torchrec.config import ConfigError, load_config


def write(tmp_path, raw) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


@pytest.fixture
def seed_raw():
    from aitm_torchrec.config import DEFAULT_CONFIG
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def test_seed_config_loads_with_easyrec_semantics():
    cfg = load_config()
    assert [t.tower_name for t in cfg.towers] == ["ctr", "cvr"]
    cvr = cfg.towers[1]
    assert cvr.relation_tower_names == ("ctr",)
    assert cvr.ait_project_dim == 128
    assert cvr.calibration_alpha == 1.0  # ORDER_CALIBRATE_LOSS entry, EasyRec's default weight
    assert cfg.towers[0].calibration_alpha == 0.0
    assert cfg.model_config.backbone.mlp.hidden_units == (512, 256)
    assert cfg.model_config.model_params.l2_regularization == pytest.approx(1e-6)
    assert cfg.model_config.embedding_regularization == pytest.approx(5e-6)
    feats = cfg.features
    assert feats["tag_brand_list"].separator == "|" and feats["tag_brand_list"].feature_type == "TagFeature"
    assert feats["price"].num_buckets == 50 and feats["adgroup_id"].hash_bucket_size == 100000
    assert cfg.model_dir == "runs/aitm_taobao"


def test_overrides_parse_yaml_values_and_indices():
    cfg = load_config(None, ["train_config.num_steps=7", "model_config.model_params.task_towers.1.dnn.hidden_units=[8, 4]",
                             "data_config.batch_size=64", "model_config.embedding_regularization=1e-7"])
    assert cfg.train_config.num_steps == 7
    assert cfg.towers[1].dnn.hidden_units == (8, 4)
    assert cfg.data_config.batch_size == 64
    assert cfg.model_config.embedding_regularization == pytest.approx(1e-7)


@pytest.mark.parametrize("override,message", [
    ("train_config.num_stepz=3", "unknown key 'num_stepz'"),
    ("train_config.num_steps=abc", "train_config.num_steps must be an integer"),
    ("model_config.model_params.task_towers.1.relation_tower_names=[nope]", "names unknown tower 'nope'"),
    ("model_config.model_params.task_towers.0.relation_tower_names=[cvr]", "form a cycle among towers: ctr, cvr"),
    ("model_config.model_params.task_towers.1.label_name=clk", "label 'clk' is already used by tower 'ctr'"),
    ("model_config.feature_groups.0.feature_names=[user_id, nope]", "unknown feature 'nope'"),
    ("feature_config.features.0.num_buckets=5", "needs exactly one of hash_bucket_size or num_buckets"),
    ("data_config.label_fields=[buy, clk]", "must match the towers' label_name in order"),
    ("train_config.sparse_optimizer.name=lamb", "allowed: rowwise_adagrad"),
    ("sharding_config.sharding_types=[row_wize]", "allowed: data_parallel"),
    ("model_config.model_params.task_towers.1.num_class=3", "must be 1"),
    ("bogus", "must look like key.path=value"),
])
def test_errors_name_the_file_and_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "aitm_taobao.yaml" in str(e.value)


def test_error_for_missing_required_key_and_bad_yaml(tmp_path, seed_raw):
    del seed_raw["model_config"]["model_params"]["task_towers"][0]["label_name"]
    with pytest.raises(ConfigError, match=r"task_towers\[0\]\.label_name is required"):
        load_config(write(tmp_path, seed_raw))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.train_config.num_steps = 3  # type: ignore[misc]
