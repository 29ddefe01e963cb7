import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

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
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train_config.num_steps = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Model configs: the shipped variants, DAG checks, baseline options.

MODEL_CONFIGS = {
    "aitm_3step.yaml": ("AITM", ["clk", "cart", "buy"]),
    "aitm_dag.yaml": ("AITM", ["clk", "cart", "buy"]),
    "esmm_taobao.yaml": ("ESMM", ["clk", "buy"]),
    "mmoe_taobao.yaml": ("MMoE", ["clk", "buy"]),
    "shared_bottom_taobao.yaml": ("SharedBottom", ["clk", "buy"]),
    "dbmtl_taobao.yaml": ("DBMTL", ["clk", "buy"]),
    "ple_taobao.yaml": ("PLE", ["clk", "buy"]),
    "aitm_taobao_best.yaml": ("AITM", ["clk", "buy"]),
    "aitm_3step_best.yaml": ("AITM", ["clk", "cart", "buy"]),
}

# The best configs: the seed config they name, and the options the family study kept
# (docs/benchmarks.md, "The best configs"); nothing else differs.
BEST_CONFIGS = {"aitm_taobao_best.yaml": "aitm_taobao.yaml", "aitm_3step_best.yaml": "aitm_3step.yaml"}
BEST_DOT_FEATURES = ["user_id", "adgroup_id", "cate_id", "campaign_id", "customer", "brand", "tag_category_list",
                     "tag_brand_list"]
KEPT_OPTIONS = {"cross": {"num_layers": 1}, "dot_interaction": {"features": BEST_DOT_FEATURES}}
# The kept values under each section of the config: key -> (best configs' value, seed configs'
# value; None where the seed configs leave the key unset)
KEPT_KEYS = {
    ("model_config",): {"embedding_regularization": (1.0e-6, 5.0e-6)},
    ("train_config",): {"gradient_clipping_by_norm": (0.1, None)},  # unset: no clipping
    # eps unset: Adam's default 1e-8; half the seed's rate beside the clipping
    ("train_config", "dense_optimizer"): {"eps": (1.0e-6, None), "learning_rate": (0.0015, 0.003)},
    ("train_config", "sparse_optimizer"): {"learning_rate": (0.03, 0.01), "eps": (3.0e-5, 1.0e-5)},  # 3x the seed's
}
# hash_bucket_size per feature where the best configs' tables differ from the seed's: 10x
BEST_TABLE_ROWS = {**{f: 1_000_000 for f in ("adgroup_id", "campaign_id", "customer", "brand", "user_id",
                                              "tag_category_list", "tag_brand_list")}, "cate_id": 100_000}


@pytest.mark.parametrize("best", sorted(BEST_CONFIGS))
def test_best_configs_are_their_seed_config_plus_the_kept_options(best):
    raw = {name: yaml.safe_load(config_path(name).read_text()) for name in (best, BEST_CONFIGS[best])}
    mine, seed = raw[best], raw[BEST_CONFIGS[best]]
    assert {k: mine["model_config"]["backbone"].pop(k) for k in KEPT_OPTIONS} == KEPT_OPTIONS
    for path, keys in KEPT_KEYS.items():
        mine_section, seed_section = (functools.reduce(dict.__getitem__, path, r) for r in (mine, seed))
        for k, (kept, seed_value) in keys.items():
            assert (mine_section.pop(k), seed_section.pop(k, None)) == (kept, seed_value), (path, k)
    grown = {}
    for f, s in zip(mine["feature_config"]["features"], seed["feature_config"]["features"]):
        if f != s:
            grown[f["input_names"][0]] = f.pop("hash_bucket_size")
            assert grown[f["input_names"][0]] == 10 * s.pop("hash_bucket_size")
    assert grown == BEST_TABLE_ROWS
    for r in (mine, seed):
        r.pop("model_dir")
        r["model_config"].pop("model_name")
    assert mine == seed
    cfg = load_config(config_path(best))
    assert cfg.model_config.backbone.cross.num_layers == 1
    assert list(cfg.model_config.backbone.dot_interaction.features) == BEST_DOT_FEATURES
    for path, keys in KEPT_KEYS.items():
        section = functools.reduce(getattr, path, cfg)
        assert {k: getattr(section, k) for k in keys} == {k: kept for k, (kept, _) in keys.items()}, path
    assert {n: f.hash_bucket_size for n, f in cfg.features.items() if n in BEST_TABLE_ROWS} == BEST_TABLE_ROWS


def config_path(name: str):
    from aitm_torchrec.config import DEFAULT_CONFIG
    return DEFAULT_CONFIG.parent / name


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_model_configs_load(name):
    cfg = load_config(config_path(name))
    model_class, labels = MODEL_CONFIGS[name]
    assert cfg.model_config.model_class == model_class
    assert [t.label_name for t in cfg.towers] == labels
    assert cfg.model_dir == f"runs/{name[:-5]}"
    seed = load_config().features  # same features and tables as the seed (the best configs' larger)
    grown = BEST_TABLE_ROWS if name in BEST_CONFIGS else {}
    assert {n: dataclasses.replace(f, hash_bucket_size=grown.get(n, f.hash_bucket_size)) for n, f in seed.items()} == cfg.features


# The task weights the studies in benchmarks/studies/ chose (docs/benchmarks.md; click : buy, or
# click : cart : buy), in every shipped Taobao config, so the quality grid compares like with like.
SHIPPED_TASK_WEIGHTS = {2: (1.0, 2.0), 3: (1.0, 1.5, 2.0)}


@pytest.mark.parametrize("name", ["aitm_taobao.yaml", *sorted(MODEL_CONFIGS)])
def test_shipped_configs_weigh_the_later_steps_as_the_study_chose(name):
    towers = load_config(config_path(name)).towers
    assert tuple(t.classification_weight for t in towers) == SHIPPED_TASK_WEIGHTS[len(towers)]
    assert all(t.weight == 1.0 for t in load_config(config_path(name), [
        f"{TOWERS}.{i}.weight=1.0" for i in range(len(towers))]).towers)  # the key still overrides


def test_new_model_keys_have_documented_defaults():
    cfg = load_config()
    mp = cfg.model_config.model_params
    assert (mp.ait_attention, mp.stop_gradient, mp.transfer_mlp.hidden_units) == ("self", False, ())
    assert (mp.num_expert, mp.expert_dnn.hidden_units) == (3, ())
    assert mp.extraction_networks == ()
    layer2 = load_config(config_path("ple_taobao.yaml"), [f"{PLE}.1={{network_name: last, expert_num_per_task: 2, "
                                                          "task_expert_net: {hidden_units: [8]}}"]).model_config
    net = layer2.model_params.extraction_networks[1]
    assert (net.share_num, net.share_expert_net.hidden_units, net.task_expert_net.use_bn) == (0, (), False)
    dnn = cfg.towers[0].dnn
    assert (dnn.dropout_ratio, dnn.use_bn) == (0.0, False)
    assert cfg.towers[1].relation_dnn.hidden_units == ()
    dag = load_config(config_path("aitm_dag.yaml")).towers
    assert dag[2].relation_tower_names == ("ctr", "cart") and dag[2].calibration_alpha == 1.0


def test_classification_weight_is_tower_weight_times_loss_weight():
    cfg = load_config(None, ["model_config.model_params.task_towers.1.weight=2",
                             "model_config.model_params.task_towers.1.losses.0.weight=0.5",
                             "model_config.model_params.task_towers.1.losses.1.weight=0.3"])
    assert cfg.towers[1].classification_weight == 1.0
    assert cfg.towers[1].calibration_alpha == 0.3  # alpha is the calibrator's own weight
    assert cfg.towers[0].classification_weight == 1.0


TOWERS = "model_config.model_params.task_towers"
PLE = "model_config.model_params.extraction_networks"


@pytest.mark.parametrize("name,overrides,message", [
    ("aitm_dag.yaml", [f"{TOWERS}.0.relation_tower_names=[buy]"], "form a cycle among towers: ctr, buy"),
    ("aitm_3step.yaml", [f"{TOWERS}.0.relation_tower_names=[buy]"], "form a cycle among towers: ctr, cart, buy"),
    ("aitm_dag.yaml", [f"{TOWERS}.2.relation_tower_names=[ctr, ctr]"], "(buy) names tower 'ctr' twice"),
    ("aitm_dag.yaml", [f"{TOWERS}.2.relation_tower_names=[ctr, click]"], "(buy) names unknown tower 'click'"),
    ("aitm_dag.yaml", [f"{TOWERS}.2.relation_tower_names=[buy]"], "(buy) names itself"),
    ("aitm_3step.yaml", [f"{TOWERS}.2.label_name=cart"],
     "(buy) label 'cart' is already used by tower 'cart'"),
    ("aitm_3step.yaml", [f"{TOWERS}.1.tower_name=buy"], "'buy' is used by more than one tower"),
    ("aitm_3step.yaml", ["model_config.model_params.ait_attention=dot"],
     "ait_attention is 'dot'; allowed: self, cross"),
    ("aitm_3step.yaml", [f"{TOWERS}.1.dnn.dropout_ratio=1.5"],
     "task_towers[1].dnn.dropout_ratio (cart) must be in [0, 1)"),
    ("aitm_3step.yaml", ["model_config.backbone.mlp.use_bn=1"], "use_bn must be true or false"),
    ("aitm_3step.yaml", ["model_config.model_params.transfer_mlp.hidden_units=[0]"],
     "transfer_mlp.hidden_units must list positive sizes"),
    ("aitm_3step.yaml", [f"{TOWERS}.2.weight=-1"], "(buy) weight and losses[].weight must be >= 0"),
    ("aitm_3step.yaml", ["train_config.gradient_clipping_by_norm=-1"],
     "train_config.gradient_clipping_by_norm is -1.0; must be a number >= 0"),
    ("aitm_3step.yaml", ["train_config.gradient_clipping_by_norm=.inf"],
     "train_config.gradient_clipping_by_norm must be finite, got inf"),
    ("aitm_3step.yaml", ["model_config.model_class=CGC"],
     "model_class is 'CGC'; allowed: AITM, DBMTL, ESMM, MMoE, PLE, SharedBottom"),
    ("esmm_taobao.yaml", [f"{TOWERS}.0.relation_tower_names=[cvr]"], "form a cycle among towers: ctr, cvr"),
    ("aitm_dag.yaml", ["model_config.model_class=ESMM"], "(buy) ESMM multiplies along a chain"),
    ("mmoe_taobao.yaml", ["model_config.model_params.expert_dnn.hidden_units=[]"],
     "expert_dnn.hidden_units must list at least one size"),
    ("mmoe_taobao.yaml", ["model_config.model_params.num_expert=0"], "num_expert must be >= 1"),
    ("dbmtl_taobao.yaml", [f"{TOWERS}.1.relation_dnn.hidden_units=[-4]"],
     "relation_dnn.hidden_units (cvr) must list positive sizes"),
    ("ple_taobao.yaml", [f"{PLE}=[]"], "extraction_networks must list at least one extraction layer for PLE"),
    ("ple_taobao.yaml", [f"{PLE}.1.expert_num_per_task=0"],
     "extraction_networks[1].expert_num_per_task (layer2) must be >= 1, got 0"),
    ("ple_taobao.yaml", [f"{PLE}.0.share_num=-1"], "extraction_networks[0].share_num (layer1) must be >= 0"),
    ("ple_taobao.yaml", [f"{PLE}.1.network_name=layer1"], "extraction_networks[1].network_name 'layer1' names two"),
    ("ple_taobao.yaml", [f"{PLE}.0.task_expert_net.hidden_units=[]"],
     "extraction_networks[0].task_expert_net.hidden_units (layer1) must list at least one size"),
    ("ple_taobao.yaml", [f"{PLE}.0.share_expert_net.hidden_units=[]"],
     "extraction_networks[0].share_expert_net.hidden_units (layer1) must list at least one size"),
    ("ple_taobao.yaml", [f"{PLE}.1.share_expert_net.hidden_units=[64, 128]"],
     "extraction_networks[1].share_expert_net.hidden_units (layer2) must end in task_expert_net's last size 256, "
     "got [64, 128]"),
    ("ple_taobao.yaml", [f"{PLE}.0={{network_name: a, expert_num_per_task: 1}}"],
     "extraction_networks[0].task_expert_net is required"),
    ("ple_taobao.yaml", ["model_config.model_class=MMoE", "model_config.model_params.expert_dnn.hidden_units=[8]"],
     "extraction_networks is read by PLE only (model_class is 'MMoE')"),
])
def test_model_errors_name_the_file_the_key_and_the_tower(name, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(config_path(name), overrides)
    assert message in str(e.value)
    assert name in str(e.value)


# --------------------------------------------------------------------------------------------
# The config package imports no torch: reading and checking configs stays cheap and works where
# torch is absent (launchers, converters). Checked in a fresh interpreter, since this one has
# long since imported torch through other tests.

REPO = Path(__file__).resolve().parent.parent

LOAD_ALL_AND_REPORT = """
import glob, json, sys
import aitm_torchrec.config as config
paths = sorted(glob.glob("configs/*.yaml")) + sorted(glob.glob(sys.argv[1]))
for path in paths:
    config.load_config(path)
print(json.dumps({"package": config.__file__, "loaded": paths,
                  "heavy": sorted(m for m in ("torch", "torchrec") if m in sys.modules)}))
"""


@pytest.mark.parametrize("also", ["", "tests/fixtures/easyrec/*.config"], ids=["yaml", "yaml+easyrec"])
def test_loading_every_shipped_config_imports_no_torch(also):
    out = subprocess.run([sys.executable, "-c", LOAD_ALL_AND_REPORT, also], cwd=REPO, capture_output=True,
                         text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).resolve().is_relative_to(REPO / "aitm_torchrec")  # this checkout's
    shipped = [sorted(str(p.relative_to(REPO)) for p in REPO.glob(pattern)) for pattern in ("configs/*.yaml", also)
               if pattern]
    assert all(shipped) and report["loaded"] == sum(shipped, [])
    assert report["heavy"] == []


def test_registry_models_are_the_config_model_classes():
    from aitm_torchrec.config import MODEL_CLASSES
    from aitm_torchrec.registry import MODELS  # itself raises at import if they differ

    assert tuple(MODELS) == MODEL_CLASSES


# --------------------------------------------------------------------------------------------
# WIDE feature groups and the wide tables' optimizer

WIDE = "{group_name: wide, feature_names: [user_id, brand], wide_deep: WIDE}"
DEEP = "{group_name: all, feature_names: [user_id, brand, pid, price]}"


def wide_config(*overrides: str, wide: str = WIDE):
    return load_config(None, [f"model_config.feature_groups=[{DEEP}, {wide}]", *overrides])


def test_wide_groups_give_wide_tables_and_stay_out_of_the_model_input():
    cfg = wide_config()
    s = cfg.schema
    assert s.groups == (("user_id", "brand", "pid", "price"),) and s.input_dim == 4 * 16
    assert s.wide == ("user_id", "brand") and s.wide_dim == 4  # 2 towers, rounded up to 4 columns
    assert {name: f.name for name, f in s.wide_tables.items()} == {"wide_user_id": "user_id", "wide_brand": "brand"}
    assert load_config().schema.wide == ()
    # default: the sparse optimizer at 0.05; given: as written; scaled with the other rates
    tc = cfg.train_config
    assert tc.wide_optimizer is None
    assert tc.wide_tables_optimizer == dataclasses.replace(tc.sparse_optimizer, learning_rate=0.05)
    given = wide_config("train_config.wide_optimizer={name: sgd, learning_rate: 0.5}").train_config
    assert (given.wide_tables_optimizer.name, given.wide_tables_optimizer.learning_rate) == ("sgd", 0.5)
    from aitm_torchrec.config import scaled_learning_rates

    scaled = scaled_learning_rates(wide_config("train_config.learning_rate_scaling={rule: linear, reference_batch_size: 8192}"), 4).train_config
    assert scaled.wide_tables_optimizer.learning_rate == pytest.approx(0.05 * 4096 * 4 / 8192)
    assert scaled.sparse_optimizer.learning_rate == pytest.approx(0.01 * 2)
    # the wide tables may be constrained by name
    wide_config("sharding_config.tables={wide_user_id: {sharding_types: [table_wise]}}")


@pytest.mark.parametrize("overrides,wide,message", [
    ([], "{group_name: w, feature_names: [user_id, user_id], wide_deep: WIDE}",
     "feature_groups[1].feature_names (w, WIDE) names feature 'user_id', which WIDE group 'w' already lists"),
    (["feature_config.features.6.zch={zch_size: 64}", "feature_config.features.6.hash_bucket_size=0"], WIDE,
     "feature_groups[1].feature_names (wide, WIDE) names zch feature 'user_id'"),
    (["feature_config.features.9={input_names: [final_gender_code], feature_type: RawFeature}"],
     "{group_name: wide, feature_names: [final_gender_code], wide_deep: WIDE}", "names RawFeature 'final_gender_code'"),
    (["feature_config.features.9.feature_name=wide_brand"], WIDE, "would get the wide table 'wide_brand'"),
    (["model_config.feature_groups.0.wide_deep=WIDE"], WIDE, "needs at least one DEEP group"),
    (["model_config.feature_groups.1.wide_deep=BOTH"], WIDE, "wide_deep is 'BOTH'; allowed: DEEP, WIDE"),
    (["train_config.wide_optimizer={name: lamb, learning_rate: 0.1}"], WIDE, "train_config.wide_optimizer.name is 'lamb'"),
    (["train_config.wide_optimizer={name: sgd, learning_rate: 0}"], WIDE, "train_config.wide_optimizer.learning_rate must be > 0"),
    (["sharding_config.tables={wide_pid: {sharding_types: [table_wise]}}"], WIDE, "sharding_config.tables.wide_pid names no feature"),
])
def test_wide_errors_name_the_file_the_key_and_the_feature(overrides, wide, message):
    with pytest.raises(ConfigError) as e:
        wide_config(*overrides, wide=wide)
    assert message in str(e.value) and "aitm_taobao.yaml" in str(e.value)


# --------------------------------------------------------------------------------------------
# model_config.task_embeddings (STEM): a table per tower of each listed feature


def task_config(task: str, *overrides: str):
    return load_config(None, [f"model_config.feature_groups=[{DEEP}]", f"model_config.task_embeddings={task}",
                              *overrides])


def test_task_embeddings_give_a_table_per_tower_and_feature_with_the_features_rows():
    cfg = task_config("{features: [user_id, price]}")
    te, s = cfg.model_config.task_embeddings, cfg.schema
    assert (te.embedding_dim, te.gate) == (16, "none")  # the defaults
    assert s.task_features == ("user_id", "price") and s.task_width == 2 * 16
    assert {n: (t, f.name, f.id_rule) for n, (t, f) in s.task_tables.items()} == {
        f"task_{t}_{n}": (t, n, s.sparse[[g.name for g in s.sparse].index(n)].id_rule)
        for t in ("ctr", "cvr") for n in ("user_id", "price")}
    assert s.input_dim == 4 * 16  # not model input
    assert load_config().model_config.task_embeddings is None and load_config().schema.task_tables == {}
    # the task tables may be constrained by name
    task_config("{features: [user_id], gate: stem, embedding_dim: 8}",
                "sharding_config.tables={task_cvr_user_id: {sharding_types: [table_wise]}}")


@pytest.mark.parametrize("task,overrides,message", [
    ("{features: []}", [], "model_config.task_embeddings.features must list at least one sparse feature"),
    ("{embedding_dim: 8}", [], "model_config.task_embeddings.features is required"),
    ("{features: [nope]}", [], "model_config.task_embeddings.features[0] names unknown feature 'nope'"),
    ("{features: [final_gender_code]}",
     ["feature_config.features.9={input_names: [final_gender_code], feature_type: RawFeature}"],
     "model_config.task_embeddings.features[0] names RawFeature 'final_gender_code'"),
    ("{features: [brand, user_id]}",
     ["feature_config.features.6.zch={zch_size: 64}", "feature_config.features.6.hash_bucket_size=0"],
     "model_config.task_embeddings.features[1] names zch feature 'user_id'"),
    ("{features: [user_id, brand, user_id]}", [], "model_config.task_embeddings.features[2] names feature 'user_id' twice"),
    ("{features: [cate_id]}", [], "model_config.task_embeddings.features[0] names feature 'cate_id', which no DEEP group lists"),
    ("{features: [user_id], embedding_dim: 10}", [], "model_config.task_embeddings.embedding_dim must be a positive multiple of 4"),
    ("{features: [user_id], gate: mmoe}", [], "model_config.task_embeddings.gate is 'mmoe'; allowed: none, stem"),
    ("{features: [user_id]}", ["feature_config.features.9.feature_name=task_ctr_user_id"],
     "feature 'user_id' would get the task table 'task_ctr_user_id' (tower 'ctr')"),
    ("{features: [b_c, c]}", ["feature_config.features.9.feature_name=b_c", "feature_config.features.10.feature_name=c",
                              "model_config.feature_groups=[{group_name: all, feature_names: [b_c, c, user_id]}]",
                              "model_config.model_params.task_towers.0.tower_name=a",
                              "model_config.model_params.task_towers.1.tower_name=a_b",
                              "model_config.model_params.task_towers.1.relation_tower_names=[a]"],
     "task tables of tower 'a_b' and feature 'c' and of tower 'a' and feature 'b_c' would both be named 'task_a_b_c'"),
    ("{features: [user_id]}", ["sharding_config.tables={task_ctr_brand: {sharding_types: [table_wise]}}"],
     "sharding_config.tables.task_ctr_brand names no feature"),
])
def test_task_embedding_errors_name_the_file_the_key_and_the_feature(task, overrides, message):
    with pytest.raises(ConfigError) as e:
        task_config(task, *overrides)
    assert message in str(e.value) and "aitm_taobao.yaml" in str(e.value)
