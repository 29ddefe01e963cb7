"""EasyRec pipeline configs: every mapped field, the one message listing every unsupported field
with its line, the YAML converter, and both fixture configs training on 2 ranks from CSV.

The fixtures (tests/fixtures/easyrec/) are EasyRec configs of the seed's example: the seed's form
(task towers with use_ait_module) and EasyRec's newer backbone form (an AITMTower block). An
EasyRec PLE config is written here (``PLE_CONFIG``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from aitm_torchrec import easyrec
from aitm_torchrec.config import ConfigError, load_config
from aitm_torchrec.data import csv_input
from aitm_torchrec.registry import build_model
from datasets import synthetic
from tests.multiprocess import run_ranks

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "easyrec"
FORMS = ("aitm_seed_taobao.config", "aitm_backbone_taobao.config")

# A small valid config; the cases below add or replace fields in it.
BASE = """\
train_input_path: "train.csv"
model_dir: "runs/x"
data_config {{
  batch_size: 32
  label_fields: "clk"
  label_fields: "buy"
  input_type: CSVInput
  input_fields {{ input_name: "clk" input_type: INT32 }}
  input_fields {{ input_name: "buy" input_type: INT32 }}
  input_fields {{ input_name: "uid" input_type: STRING }}
  input_fields {{ input_name: "tags" input_type: STRING }}
  input_fields {{ input_name: "price" input_type: DOUBLE }}
  {data}
}}
feature_config {{
  features {{ input_names: "uid" feature_type: IdFeature embedding_dim: 8 hash_bucket_size: 100 }}
  features {{ input_names: "tags" feature_type: TagFeature embedding_dim: 8 {tag} }}
}}
{top}
model_config {{
  model_class: "MultiTaskModel"
  feature_groups {{ group_name: "all" {groups} wide_deep: DEEP }}
  {backbone}
  model_params {{
    task_towers {{ tower_name: "ctr" label_name: "clk" {ctr_dnn} {ctr} }}
    task_towers {{ tower_name: "cvr" label_name: "buy" dnn {{ hidden_units: [16, 8] }} {cvr} }}
    {params}
  }}
  {model}
}}
train_config {{
  {train}
}}
"""
SLOTS = ("data", "tag", "top", "groups", "backbone", "ctr_dnn", "ctr", "cvr", "params", "model", "train")
TAG = "hash_bucket_size: 50"
CVR_AIT = 'relation_tower_names: "ctr" use_ait_module: true'


def easyrec_text(**slots: str) -> str:
    values = {s: "" for s in SLOTS}
    values.update(tag=TAG, groups='feature_names: "uid" feature_names: "tags"', ctr_dnn="dnn { hidden_units: [16, 8] }")
    values.update(slots)
    return BASE.format(**values)


def write_config(tmp_path: Path, name: str = "x.config", **slots: str) -> Path:
    path = tmp_path / name
    path.write_text(easyrec_text(**slots))
    return path


def tower(cfg, i: int):
    return cfg.model_config.model_params.task_towers[i]


ADAM = "optimizer_config {{ {name}_optimizer {{ learning_rate {{ constant_learning_rate {{ learning_rate: {lr} }} }} }} {extra} }}"
BLOCKS = """backbone {
  blocks { name: "bottom" inputs { feature_group_name: "all" } keras_layer { class_name: "MLP" mlp { hidden_units: [32, 16] use_bn: false use_final_bn: false dropout_ratio: 0.1 } } }
  blocks { name: "ctr_tower" inputs { block_name: "bottom" } keras_layer { class_name: "MLP" mlp { hidden_units: 12 } } }
  blocks { name: "cvr_tower" inputs { block_name: "bottom" } keras_layer { class_name: "MLP" mlp { hidden_units: 12 } } }
  blocks { name: "cvr_aitm" inputs { block_name: "cvr_tower" } inputs { block_name: "ctr_tower" }
           merge_inputs_into_list: true
           keras_layer { class_name: "AITMTower" aitm { transfer_mlp { hidden_units: [20, 12] } %s } } }
  output_blocks: ["ctr_tower", "cvr_aitm"]
}"""

# (id, slots, value of our config, expected). One case per mapped EasyRec field.
MAPPINGS = [
    ("train_input_path", dict(top=""), lambda c: c.train_input_path, ("train.csv",)),
    ("train_input_path_commas", dict(top='eval_input_path: "a.csv, b.csv"'), lambda c: c.eval_input_path, ("a.csv", "b.csv")),
    ("model_dir", {}, lambda c: c.model_dir, "runs/x"),
    ("data_config.batch_size", {}, lambda c: c.data_config.batch_size, 32),
    ("data_config.eval_batch_size", dict(data="eval_batch_size: 64"), lambda c: c.data_config.eval_batch_size, 64),
    ("data_config.label_fields", {}, lambda c: c.data_config.label_fields, ("clk", "buy")),
    ("data_config.input_type", {}, lambda c: c.data_config.input_type, "CSVInput"),
    ("data_config.separator", dict(data='separator: ";"'), lambda c: c.data_config.separator, ";"),
    ("data_config.input_fields", {}, lambda c: [(f.input_name, f.input_type) for f in c.data_config.input_fields],
     [("clk", "INT32"), ("buy", "INT32"), ("uid", "STRING"), ("tags", "STRING"), ("price", "DOUBLE")]),
    ("data_config.input_fields.default_val", dict(data='input_fields { input_name: "extra" input_type: INT64 default_val: "7" }'),
     lambda c: c.data_config.input_fields[-1].default_val, "7"),
    ("data_config.shuffle", dict(data="shuffle: false"), lambda c: c.data_config.shuffle, False),
    ("data_config.shuffle_buffer_size", dict(data="shuffle_buffer_size: 512"), lambda c: c.data_config.shuffle_buffer_size, 512),
    ("data_config.prefetch_size", dict(data="prefetch_size: 3"), lambda c: c.data_config.prefetch_size, 3),
    ("features.hash_bucket_size", {}, lambda c: c.features["uid"].hash_bucket_size, 100),
    ("features.num_buckets", dict(tag="num_buckets: 9"), lambda c: c.features["tags"].num_buckets, 9),
    ("features.embedding_dim", {}, lambda c: c.features["uid"].embedding_dim, 8),
    ("features.feature_type", {}, lambda c: c.features["tags"].feature_type, "TagFeature"),
    ("features.separator_default", {}, lambda c: c.features["tags"].separator, "|"),
    ("features.separator", dict(tag=TAG + ' separator: "#"'), lambda c: c.features["tags"].separator, "#"),
    ("features.combiner", dict(tag=TAG + ' combiner: "sum"'), lambda c: c.features["tags"].combiner, "sum"),
    ("features.combiner_default", {}, lambda c: c.features["tags"].combiner, "mean"),  # feature_config.proto
    ("features.feature_name", dict(tag=TAG + ' feature_name: "t"', groups='feature_names: "uid" feature_names: "t"'), lambda c: c.features["t"].column, "tags"),
    ("feature_configs", dict(top='feature_configs { input_names: "price" feature_type: RawFeature raw_input_dim: 1 }'),
     lambda c: c.features["price"].feature_type, "RawFeature"),
    ("model_name", dict(model='model_name: "mine"'), lambda c: c.model_config.model_name, "mine"),
    ("model_class", {}, lambda c: c.model_config.model_class, "AITM"),
    ("feature_groups", {}, lambda c: c.model_config.feature_groups[0].feature_names, ("uid", "tags")),
    ("task_towers.dnn", {}, lambda c: tower(c, 0).dnn.hidden_units, (16, 8)),
    ("task_towers.dnn.use_bn_default", {}, lambda c: tower(c, 0).dnn.use_bn, True),
    ("task_towers.dnn.use_bn", dict(ctr_dnn="dnn { hidden_units: 4 use_bn: false }"), lambda c: tower(c, 0).dnn.use_bn, False),
    ("task_towers.dnn.dropout_ratio", dict(ctr_dnn="dnn { hidden_units: [4, 2] dropout_ratio: [0.2, 0.2] }"),
     lambda c: tower(c, 0).dnn.dropout_ratio, 0.2),
    ("task_towers.loss_type", dict(ctr="loss_type: CLASSIFICATION"), lambda c: tower(c, 0).loss_type, "CLASSIFICATION"),
    ("task_towers.losses", dict(cvr=CVR_AIT + " losses { loss_type: CLASSIFICATION weight: 2.0 } losses { loss_type: ORDER_CALIBRATE_LOSS weight: 0.6 }"),
     lambda c: (tower(c, 1).classification_weight, tower(c, 1).calibration_alpha), (2.0, 0.6)),
    ("task_towers.weight", dict(ctr="weight: 0.5"), lambda c: tower(c, 0).weight, 0.5),
    ("task_towers.metrics_set", dict(ctr="metrics_set: { auc {} }"), lambda c: len(tower(c, 0).metrics_set), 1),
    # EasyRec's default reduction (eval.proto: mean) is written out: ours is mean_by_sample_num
    ("task_towers.metrics_set.gauc", dict(ctr='metrics_set: { auc {} } metrics_set: { gauc { uid_field: "uid" } }'),
     lambda c: [(m.auc, m.gauc and (m.gauc.uid_field, m.gauc.reduction)) for m in tower(c, 0).metrics_set],
     [({}, None), (None, ("uid", "mean"))]),
    ("task_towers.metrics_set.gauc.reduction",
     dict(cvr='metrics_set: { gauc { uid_field: "uid" reduction: "mean_by_sample_num" } }'),
     lambda c: (tower(c, 1).metrics_set[0].gauc.reduction, tower(c, 0).metrics_set), ("mean_by_sample_num", ())),
    ("task_towers.num_class", dict(ctr="num_class: 1"), lambda c: tower(c, 0).num_class, 1),
    ("task_towers.relation_tower_names", dict(cvr=CVR_AIT), lambda c: tower(c, 1).relation_tower_names, ("ctr",)),
    ("task_towers.use_ait_module", dict(cvr=CVR_AIT), lambda c: tower(c, 1).use_ait_module, True),
    ("task_towers.use_ait_module->cross", dict(cvr=CVR_AIT),
     lambda c: (c.model_config.model_params.ait_attention, c.model_config.model_params.stop_gradient), ("cross", False)),
    ("task_towers.ait_project_dim", dict(cvr=CVR_AIT + " ait_project_dim: 6"), lambda c: tower(c, 1).ait_project_dim, 6),
    ("task_towers.relation_dnn", dict(cvr='relation_tower_names: "ctr" relation_dnn { hidden_units: 5 }'),
     lambda c: (tower(c, 1).use_ait_module, tower(c, 1).relation_dnn.hidden_units), (False, (5,))),
    ("l2_regularization", dict(params="l2_regularization: 1e-6"), lambda c: c.model_config.model_params.l2_regularization, 1e-6),
    ("embedding_regularization", dict(model="embedding_regularization: 5e-6"), lambda c: c.model_config.embedding_regularization, 5e-6),
    ("train_config.num_steps", dict(train="num_steps: 7"), lambda c: c.train_config.num_steps, 7),
    ("train_config.save_checkpoints_steps", dict(train="save_checkpoints_steps: 3"), lambda c: c.train_config.save_checkpoints_steps, 3),
    ("train_config.keep_checkpoint_max", dict(train="keep_checkpoint_max: 2"), lambda c: c.train_config.keep_checkpoint_max, 2),
    ("train_config.log_step_count_steps", dict(train="log_step_count_steps: 4"), lambda c: c.train_config.log_step_count_steps, 4),
    ("train_config.gradient_clipping_by_norm", dict(train="gradient_clipping_by_norm: 5.0"),
     lambda c: c.train_config.gradient_clipping_by_norm, 5.0),
    ("optimizer_config.one", dict(train=ADAM.format(name="adam", lr=1e-4, extra="use_moving_average: false")),
     lambda c: (c.train_config.sparse_optimizer.name, c.train_config.sparse_optimizer.learning_rate,
                c.train_config.dense_optimizer.name, c.train_config.dense_optimizer.learning_rate), ("adam", 1e-4, "adam", 1e-4)),
    ("optimizer_config.adam_betas",
     dict(train="optimizer_config { adam_optimizer { learning_rate { constant_learning_rate { learning_rate: 0.001 } } "
                "beta1: 0.8 beta2: 0.99 } }"),
     lambda c: tuple((o.name, o.beta1, o.beta2) for o in (c.train_config.sparse_optimizer, c.train_config.dense_optimizer)),
     (("adam", 0.8, 0.99), ("adam", 0.8, 0.99))),
    ("optimizer_config.two", dict(train=ADAM.format(name="adagrad", lr=0.05, extra="") + ADAM.format(name="sgd", lr=0.01, extra="")),
     lambda c: (c.train_config.sparse_optimizer.name, c.train_config.dense_optimizer.name), ("adagrad", "sgd")),
    ("optimizer_config.embedding_learning_rate_multiplier",
     dict(train=ADAM.format(name="adagrad", lr=0.01, extra="embedding_learning_rate_multiplier: 10.0")),
     lambda c: (c.train_config.sparse_optimizer.learning_rate, c.train_config.dense_optimizer.learning_rate), (0.1, 0.01)),
    ("backbone.mlp", dict(backbone='backbone { blocks { name: "b" inputs { feature_group_name: "all" } keras_layer { class_name: "MLP" mlp { hidden_units: [32, 16] } } } }'),
     lambda c: (c.model_config.backbone.mlp.hidden_units, c.model_config.backbone.mlp.use_bn), ((32, 16), True)),
    ("backbone.blocks.mlp.dropout_ratio", dict(backbone=BLOCKS % ""), lambda c: c.model_config.backbone.mlp.dropout_ratio, 0.1),
    ("backbone.tower_block->dnn", dict(backbone=BLOCKS % ""), lambda c: (tower(c, 0).dnn.hidden_units, tower(c, 1).dnn.hidden_units), ((12,), (12,))),
    ("backbone.task_dnn->output_dnn", dict(backbone=BLOCKS % ""), lambda c: tower(c, 1).output_dnn.hidden_units, (16, 8)),
    ("backbone.AITMTower->relations", dict(backbone=BLOCKS % ""),
     lambda c: (tower(c, 0).relation_tower_names, tower(c, 1).relation_tower_names, tower(c, 1).use_ait_module), ((), ("ctr",), True)),
    ("backbone.AITMTower->cross", dict(backbone=BLOCKS % ""), lambda c: c.model_config.model_params.ait_attention, "cross"),
    ("backbone.AITMTower.stop_gradient_default", dict(backbone=BLOCKS % ""), lambda c: c.model_config.model_params.stop_gradient, True),
    ("backbone.AITMTower.stop_gradient", dict(backbone=BLOCKS % "stop_gradient: false"), lambda c: c.model_config.model_params.stop_gradient, False),
    ("backbone.AITMTower.project_dim", dict(backbone=BLOCKS % "project_dim: 6"), lambda c: tower(c, 1).ait_project_dim, 6),
    ("backbone.AITMTower.transfer_mlp", dict(backbone=BLOCKS % ""), lambda c: c.model_config.model_params.transfer_mlp.hidden_units, (20,)),
]


@pytest.mark.parametrize("slots, get, expected", [m[1:] for m in MAPPINGS], ids=[m[0] for m in MAPPINGS])
def test_each_mapped_field(tmp_path, slots, get, expected):
    cfg = load_config(write_config(tmp_path, **slots))
    assert get(cfg) == expected


def test_unsupported_fields_are_all_listed_in_one_message_with_lines(tmp_path):
    text = easyrec_text(
        data="selected_cols: \"a,b\"",  # line 13
        tag=TAG + " embedding_name: \"shared\"",  # line 17
        ctr_dnn="dnn { hidden_units: 4 activation: \"tf.nn.sigmoid\" }",
        params="loss_weight_strategy: Uncertainty",
        train="fine_tune_checkpoint: \"x\"")
    text = text.replace("input_type: CSVInput", "input_type: OdpsInput")
    path = tmp_path / "bad.config"
    path.write_text(text)
    lines = text.splitlines()

    def line_of(needle: str) -> int:
        return next(i for i, line in enumerate(lines, 1) if needle in line)

    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert "6 EasyRec field(s) not supported here" in message
    for needle, where in [
        ("selected_cols", "data_config.selected_cols: unsupported field"),
        ("embedding_name", "feature_config.features[1].embedding_name: unsupported field"),
        ("tf.nn.sigmoid", "model_config.model_params.task_towers[0].dnn.activation: unsupported value 'tf.nn.sigmoid'"),
        ("loss_weight_strategy", "model_config.model_params.loss_weight_strategy: unsupported field"),
        ("fine_tune_checkpoint", "train_config.fine_tune_checkpoint: unsupported field"),
        ("OdpsInput", "data_config.input_type: unsupported value OdpsInput; supported: CSVInput, ParquetInput"),
    ]:
        assert f"{path}:{line_of(needle)}: {where}" in message, message


def test_ignored_fields_are_logged_with_the_reason(tmp_path, caplog):
    path = write_config(tmp_path, train="sync_replicas: true num_gpus_per_worker: 2 save_summary_steps: 10 num_steps: 5")
    with caplog.at_level(logging.WARNING, logger="aitm_torchrec.easyrec"):
        cfg = load_config(path)
    assert cfg.train_config.num_steps == 5
    text = caplog.text
    for field in ("sync_replicas", "num_gpus_per_worker", "save_summary_steps"):
        assert f"train_config.{field} (" in text
    assert "processes per host come from torchrun" in text
    assert [line.split(":")[0] for line in easyrec.ignored_fields(path)] == [str(easyrec_text(train="").count("\n") - 1)] * 3


@pytest.mark.parametrize("slots, message", [
    (dict(backbone=BLOCKS % "").__or__({"cvr": CVR_AIT}), "AIT is configured twice"),
    (dict(backbone=(BLOCKS % "").replace("[20, 12]", "[20, 10]")),
     r"transfer_mlp\.hidden_units: the last size \(10\) must equal the receiving tower's size \(12, 'cvr'\)"),
    (dict(backbone=(BLOCKS % "").replace("use_final_bn: false", "use_final_bn: true")), "must equal use_bn"),
    (dict(ctr_dnn="dnn { hidden_units: [4, 2] dropout_ratio: [0.1, 0.2] }"), "one ratio for every layer"),
    (dict(cvr='relation_tower_names: "ctr"'), "needs use_ait_module: true or a relation_dnn"),
    (dict(tag="hash_bucket_size: 9 num_buckets: 9"), r"needs exactly one of hash_bucket_size or num_buckets"),
    (dict(ctr='metrics_set: { gauc { reduction: "mean" } }'), r"task_towers\[0\]\.metrics_set\[0\]\.gauc\.uid_field: is required"),
    (dict(ctr='metrics_set: { gauc { uid_field: "user" } }'),
     r"metrics_set\[0\]\.gauc\.uid_field \(ctr\) names unknown column 'user' \(CSVInput reads only input_fields\); "
     r"columns: clk, buy, uid, tags, price"),
])
def test_what_cannot_be_mapped_is_an_error_naming_file_line_and_field(tmp_path, slots, message):
    path = write_config(tmp_path, **slots)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_syntax_errors_name_the_line(tmp_path):
    path = tmp_path / "x.config"
    path.write_text('model_dir: "a"\ndata_config {\n  batch_size: 3\n')
    with pytest.raises(ConfigError, match=r"x.config:3: not valid protobuf text format"):
        load_config(path)


def test_recognised_by_content_and_overrides_apply_to_converted_keys(tmp_path):
    path = tmp_path / "pipeline.txt"
    path.write_text(easyrec_text())
    cfg = load_config(path, ["data_config.batch_size=8", "model_config.model_params.task_towers.0.dnn.hidden_units=[3]"])
    assert cfg.data_config.batch_size == 8 and tower(cfg, 0).dnn.hidden_units == (3,)


WIDE_GROUP = 'feature_groups { group_name: "wide" feature_names: "uid" feature_names: "tags" wide_deep: WIDE }'


def test_wide_groups_map_to_wide_tables_trained_by_the_embedding_optimizer(tmp_path):
    path = write_config(tmp_path, model=WIDE_GROUP,
                        train=ADAM.format(name="adagrad", lr=0.02, extra="") + ADAM.format(name="adam", lr=0.001, extra=""))
    cfg = load_config(path)
    groups = cfg.model_config.feature_groups
    assert [(g.group_name, g.wide_deep) for g in groups] == [("all", "DEEP"), ("wide", "WIDE")]
    assert cfg.schema.groups == (("uid", "tags"),) and cfg.schema.wide == ("uid", "tags")
    # EasyRec trains wide embeddings with the embedding optimizer (the first of two): so do we here
    tc = cfg.train_config
    assert tc.wide_tables_optimizer == tc.sparse_optimizer and (tc.sparse_optimizer.name, tc.sparse_optimizer.learning_rate) == ("adagrad", 0.02)
    model = build_model(cfg)
    assert [c.name for c in model.wide_ebc.embedding_bag_configs()] == ["wide_uid", "wide_tags"]
    out = tmp_path / "wide.yaml"
    assert easyrec.main([str(path), "--to-yaml", str(out)]) == 0
    assert load_config(out) == cfg
    # without an optimizer_config in the file, our default (the sparse optimizer at 0.05) applies
    assert load_config(write_config(tmp_path, "plain.config", model=WIDE_GROUP)).train_config.wide_optimizer is None
    # a backbone block reading the WIDE group would use it as input: not what a WIDE group is here
    blocks = (BLOCKS % "").replace('inputs { feature_group_name: "all" }',
                                   'inputs { feature_group_name: "all" } inputs { feature_group_name: "wide" }')
    path = write_config(tmp_path, "block.config", model=WIDE_GROUP, backbone=blocks)
    with pytest.raises(ConfigError, match=r"block.config:\d+: model_config.backbone.blocks\[0\].inputs\[1\]"
                                          r".feature_group_name: reads WIDE group 'wide'"):
        load_config(path)


def _shapes(cfg) -> dict:
    return {name: tuple(p.shape) for name, p in build_model(cfg).named_parameters()}


@pytest.mark.parametrize("name", FORMS)
def test_to_yaml_gives_the_same_config_and_model(tmp_path, name, capsys):
    out = tmp_path / "out.yaml"
    assert easyrec.main([str(FIXTURES / name), "--to-yaml", str(out)]) == 0
    assert "# EasyRec fields ignored" in out.read_text() and "sync_replicas" in out.read_text()
    from_config, from_yaml = load_config(FIXTURES / name), load_config(out)
    assert from_yaml == from_config
    assert _shapes(from_yaml) == _shapes(from_config)


def test_the_two_forms_map_to_the_models_they_describe():
    seed, backbone = (load_config(FIXTURES / name) for name in FORMS)
    mp = seed.model_config.model_params
    assert (mp.ait_attention, mp.stop_gradient, mp.transfer_mlp.hidden_units) == ("cross", False, ())
    assert [t.dnn.hidden_units for t in mp.task_towers] == [(256, 128)] * 2
    assert mp.task_towers[1].ait_project_dim == 128 and mp.task_towers[1].relation_tower_names == ("ctr",)
    mp = backbone.model_config.model_params
    assert (mp.ait_attention, mp.stop_gradient, mp.transfer_mlp.hidden_units) == ("cross", True, ())
    assert [(t.dnn.hidden_units, t.output_dnn.hidden_units) for t in mp.task_towers] == [((128,), (64,))] * 2
    assert backbone.model_config.backbone.mlp.hidden_units == (512, 256)
    shapes = _shapes(backbone)
    assert shapes["head.transfers.0_1.1.weight"] == (128, 128)  # EasyRec's transfer_mlp [128] output layer
    assert shapes["head.output_dnns.1.0.weight"] == (64, 128) and shapes["head.outputs.1.weight"] == (1, 64)
    for cfg in (seed, backbone):
        assert cfg.data_config.input_type == "CSVInput" and len(cfg.data_config.input_fields) == 20
        assert cfg.train_config.sparse_optimizer.name == "adam" and cfg.train_config.dense_optimizer.learning_rate == 1e-4


# --------------------------------------------------------------------------------------------
# Backbone interaction blocks: Cross (DCN-v2) and DotInteraction (DLRM) beside the MLP block.

MLP_BLOCK = ('blocks { name: "deep" inputs { feature_group_name: "all" } keras_layer { class_name: "MLP" '
             'mlp { hidden_units: [16] use_bn: false use_final_bn: false } } }')
CROSS_BLOCK = """blocks { name: "dcn" inputs { feature_group_name: "all" input_fn: 'lambda x: [x, x]' }
           recurrent { num_steps: 3 fixed_input_index: 0 keras_layer { class_name: "Cross"
             st_params { fields { key: "projection_dim" value { number_value: 4 } } } } } }"""
DOT_BLOCKS = """blocks { name: "sparse" inputs { feature_group_name: "all" } input_layer { only_output_feature_list: true } }
  blocks { name: "dot" inputs { block_name: "sparse" } keras_layer { class_name: "DotInteraction"
           st_params { fields { key: "self_interaction" value { bool_value: true } } } } }"""
INTERACT = f"""backbone {{
  {MLP_BLOCK}
  {CROSS_BLOCK}
  {DOT_BLOCKS}
  concat_blocks: ["deep", "dcn", "dot"]
  top_mlp {{ hidden_units: [8] }}
}}"""


def test_cross_and_dot_interaction_blocks_map_to_our_backbone(tmp_path):
    from aitm_torchrec.config import DNN, Backbone, Cross, DotInteraction

    path = write_config(tmp_path, backbone=INTERACT, cvr=CVR_AIT)
    cfg = load_config(path)
    assert cfg.model_config.backbone == Backbone(mlp=DNN((16,)), cross=Cross(num_layers=3, low_rank=4),
                                                 dot_interaction=DotInteraction(self_interaction=True),
                                                 top_mlp=DNN((8,), use_bn=True))  # EasyRec's MLP default
    assert tower(cfg, 1).relation_tower_names == ("ctr",)  # the seed's towers read the backbone's output
    model = build_model(cfg)
    assert model.backbone.top_mlp[0].in_features == 16 + 16 + 1 + 2  # mlp, cross(v), <uid, tags>, the squares
    out = tmp_path / "interact.yaml"
    assert easyrec.main([str(path), "--to-yaml", str(out)]) == 0
    assert load_config(out) == cfg
    # one Cross layer as a plain keras_layer; the feature list as slice [1] of the 2D tensor and
    # list; concat_blocks left out: the DAG's leaves, as EasyRec takes them
    one = INTERACT.replace(CROSS_BLOCK, 'blocks { name: "dcn" inputs { feature_group_name: "all" } '
                                        'keras_layer { class_name: "Cross" } }')
    one = one.replace("only_output_feature_list: true", "output_2d_tensor_and_feature_list: true")
    one = one.replace('inputs { block_name: "sparse" }', "inputs { block_name: \"sparse\" input_slice: '[1]' }")
    one = one.replace('concat_blocks: ["deep", "dcn", "dot"]', "").replace("top_mlp { hidden_units: [8] }", "")
    bb = load_config(write_config(tmp_path, "one.config", backbone=one)).model_config.backbone
    assert (bb.cross, bb.dot_interaction, bb.top_mlp) == (Cross(1, 0), DotInteraction(True), DNN())


TWO_GROUPS = 'feature_groups { group_name: "user" feature_names: "uid" wide_deep: DEEP }'


@pytest.mark.parametrize("change, field, message", [
    (("fixed_input_index: 0", "fixed_input_index: 1"), r"blocks\[1\]\.recurrent\.fixed_input_index", "must be 0"),
    (("input_fn: 'lambda x: [x, x]'", ""), r"blocks\[1\]\.inputs", "a recurrent Cross block takes \\[x0, x\\]"),
    (('"deep", "dcn", "dot"', '"dcn", "dot"'), "concat_blocks",
     "concat_blocks must name deep, dcn, dot, each once; got dcn, dot"),
    (('key: "projection_dim" value { number_value: 4 }', 'key: "preactivation" value { string_value: "relu" }'),
     r"blocks\[1\]\.recurrent\.keras_layer\.st_params\.fields\[0\]\.key",
     "Cross parameter 'preactivation' is not supported here; supported: projection_dim, use_bias, diag_scale"),
    (('key: "projection_dim" value { number_value: 4 }', 'key: "use_bias" value { bool_value: false }'),
     r"blocks\[1\]\.recurrent\.keras_layer\.st_params", "use_bias: false is not supported"),
    (('inputs { block_name: "sparse" }', 'inputs { block_name: "deep" input_fn: "lambda x: [x]" } inputs { block_name: "sparse" }'),
     r"blocks\[3\]\.inputs", "EasyRec's DLRM form, which adds a bottom MLP's output to the dotted vectors, is not supported"),
    (("concat_blocks", 'output_blocks: ["deep", "deep"] concat_blocks'), "output_blocks", "no per-task output_blocks"),
    (('class_name: "DotInteraction"', 'class_name: "DotInteraction" mlp { hidden_units: 4 }'),
     r"blocks\[3\]\.keras_layer\.mlp", "is not read on a DotInteraction layer"),
    (('feature_group_name: "all" } keras_layer { class_name: "MLP"', 'feature_group_name: "user" } keras_layer { class_name: "MLP"'),
     r"blocks\[0\]\.inputs", "the MLP block beside Cross / DotInteraction blocks reads every DEEP group once \\(all\\)"),
    (('inputs { feature_group_name: "all" } keras_layer { class_name: "MLP"',
      'inputs { feature_group_name: "user" } inputs { block_name: "sparse" } keras_layer { class_name: "MLP"'),
     r"blocks\[0\]\.inputs", "the MLP block beside Cross / DotInteraction blocks reads every DEEP group once \\(all\\)"),
])
def test_interaction_blocks_that_cannot_be_mapped_are_errors_naming_the_line(tmp_path, change, field, message):
    path = write_config(tmp_path, backbone=INTERACT.replace(*change))
    with pytest.raises(ConfigError, match=rf"x\.config:\d+: model_config\.backbone\.{field}: .*{message}"):
        load_config(path)


def test_a_dot_interaction_on_a_group_of_some_features_dots_those(tmp_path):
    """The DotInteraction's input_layer on a group with some of the sparse features: that group
    read by the MLP too (part of v), or by the input_layer alone (a group naming what to dot,
    not part of v; EasyRec shares a feature's embedding between groups)."""
    from aitm_torchrec.config import DotInteraction

    both = 'inputs { feature_group_name: "all" } inputs { feature_group_name: "user" }'
    backbone = INTERACT.replace('inputs { feature_group_name: "all" } keras_layer', f"{both} keras_layer")
    backbone = backbone.replace("""inputs { feature_group_name: "all" input_fn: 'lambda x: [x, x]' }""",
                                f"{both} extra_input_fn: 'lambda x: [x, x]'")
    path = write_config(tmp_path, backbone=backbone, model=TWO_GROUPS)
    cfg = load_config(path)
    assert cfg.model_config.backbone.cross.num_layers == 3  # the MLP and Cross on both groups
    assert cfg.model_config.backbone.dot_interaction == DotInteraction(True)  # user's uid is in all: every feature
    on_user = backbone.replace('name: "sparse" inputs { feature_group_name: "all" }',
                               'name: "sparse" inputs { feature_group_name: "user" }')
    cfg = load_config(write_config(tmp_path, backbone=on_user, model=TWO_GROUPS))
    assert cfg.model_config.backbone.dot_interaction == DotInteraction(True, ("uid",))
    assert [g.group_name for g in cfg.model_config.feature_groups] == ["all", "user"]

    pair = 'feature_groups { group_name: "pair" feature_names: "tags" feature_names: "uid" wide_deep: DEEP }'
    only = INTERACT.replace('name: "sparse" inputs { feature_group_name: "all" }',
                            'name: "sparse" inputs { feature_group_name: "pair" }')
    path = write_config(tmp_path, "pair.config", backbone=only, model=pair)
    cfg = load_config(path)
    assert cfg.model_config.backbone.dot_interaction == DotInteraction(True, ("tags", "uid"))
    assert [g.group_name for g in cfg.model_config.feature_groups] == ["all"]  # "pair" only names what is dotted
    model = build_model(cfg)
    assert model.input_dim == 16 and model.backbone.dot.columns.tolist() == [*range(8, 16), *range(8)]
    assert model.backbone.top_mlp[0].in_features == 16 + 16 + 3  # mlp, cross(v), <tags, uid> and the squares
    out = tmp_path / "pair.yaml"
    assert easyrec.main([str(path), "--to-yaml", str(out)]) == 0
    assert load_config(out) == cfg

    path = write_config(tmp_path, "lone.config", backbone=only, model=pair, groups='feature_names: "uid"')
    with pytest.raises(ConfigError, match=r"lone\.config:\d+: model_config\.backbone\.blocks\[2\]\.inputs: group 'pair' "
                                          r"lists 'tags', which no other DEEP group holds: our dot_interaction dots "
                                          r"sparse features of the DEEP groups the MLP block reads \(uid\)"):
        load_config(path)


def test_interaction_fields_elsewhere_in_the_backbone_are_errors(tmp_path):
    lambda_on_mlp = (BLOCKS % "").replace('inputs { block_name: "bottom" } keras_layer { class_name: "MLP" mlp { hidden_units: 12 } }',
                                          "inputs { block_name: \"bottom\" input_fn: 'lambda x: x' } "
                                          'keras_layer { class_name: "MLP" mlp { hidden_units: 12 } }', 1)
    with pytest.raises(ConfigError, match=r"blocks\[1\]\.inputs\[0\]\.input_fn: is read on the inputs of Cross and "
                                          r"DotInteraction blocks only"):
        load_config(write_config(tmp_path, backbone=lambda_on_mlp))
    top_alone = f"backbone {{ {MLP_BLOCK} top_mlp {{ hidden_units: [8] }} }}"
    with pytest.raises(ConfigError, match=r"backbone\.top_mlp: is supported beside Cross / DotInteraction blocks only"):
        load_config(write_config(tmp_path, "top.config", backbone=top_alone))


# --------------------------------------------------------------------------------------------
# EasyRec's PLE: model_class "PLE", its parameters in ple { }.

PLE_CONFIG = """\
train_input_path: "train.csv"
model_dir: "runs/ple"
data_config {
  batch_size: 32
  label_fields: "clk"
  label_fields: "buy"
}
feature_config {
  features { input_names: "uid" feature_type: IdFeature embedding_dim: 8 hash_bucket_size: 100 }
  features { input_names: "tags" feature_type: TagFeature embedding_dim: 8 hash_bucket_size: 50 }
}
model_config {
  model_class: "PLE"
  feature_groups { group_name: "all" feature_names: "uid" feature_names: "tags" wide_deep: DEEP }
  ple {
    extraction_networks {
      network_name: "layer1"
      expert_num_per_task: 2
      share_num: 1
      task_expert_net { hidden_units: [16, 8] }
      share_expert_net { hidden_units: [12, 8] use_bn: false }
    }
    extraction_networks {
      network_name: "layer2"
      expert_num_per_task: 1
      task_expert_net { hidden_units: 4 dropout_ratio: 0.1 }
    }
    task_towers { tower_name: "ctr" label_name: "clk" dnn { hidden_units: [8] } %s }
    task_towers { tower_name: "cvr" label_name: "buy" dnn { hidden_units: [8] } weight: 2.0 }
    %s
  }
  %s
}
"""


def test_easyrec_ple_maps_to_our_ple(tmp_path):
    path = tmp_path / "ple.config"
    path.write_text(PLE_CONFIG % ("", "", "embedding_regularization: 5e-6"))
    cfg = load_config(path)
    mc = cfg.model_config
    assert mc.model_class == "PLE" and mc.embedding_regularization == 5e-6
    first, last = mc.model_params.extraction_networks
    assert (first.network_name, first.expert_num_per_task, first.share_num) == ("layer1", 2, 1)
    assert (first.task_expert_net.hidden_units, first.task_expert_net.use_bn) == ((16, 8), True)  # EasyRec's DNN default
    assert (first.share_expert_net.hidden_units, first.share_expert_net.use_bn) == ((12, 8), False)
    assert (last.network_name, last.expert_num_per_task, last.share_num) == ("layer2", 1, 0)  # ple.proto's default
    assert (last.task_expert_net.hidden_units, last.task_expert_net.dropout_ratio) == ((4,), 0.1)
    assert [(t.tower_name, t.label_name, t.dnn.hidden_units, t.weight) for t in mc.model_params.task_towers] == [
        ("ctr", "clk", (8,), 1.0), ("cvr", "buy", (8,), 2.0)]
    assert mc.model_params.l2_regularization == 1e-4  # ple.proto's default, not ours (0)
    head = build_model(cfg).head
    layer1, layer2 = head.layers
    assert [g.out_features for g in layer1.task_gates] == [3, 3] and layer1.shared_gate.out_features == 5
    assert [g.out_features for g in layer2.task_gates] == [1, 1] and layer2.shared_gate is None
    assert head.towers[0][0].in_features == 4
    out = tmp_path / "ple.yaml"
    assert easyrec.main([str(path), "--to-yaml", str(out)]) == 0
    assert load_config(out) == cfg
    path.write_text(PLE_CONFIG % ("", "l2_regularization: 1e-6", ""))
    assert load_config(path).model_config.model_params.l2_regularization == 1e-6


@pytest.mark.parametrize("slots, message", [
    (('relation_tower_names: "cvr"', "", ""), r"ple.task_towers\[0\].relation_tower_names: unsupported field"),
    (("", "", "model_params { l2_regularization: 1e-6 }"), 'model_params: is not read with model_class "PLE"'),
    (("", "", 'feature_groups { group_name: "user" feature_names: "uid" }'),
     r"EasyRec's PLE reads one feature group, named 'all'; got \['all', 'user'\]"),
])
def test_easyrec_ple_shapes_that_cannot_be_mapped_are_errors(tmp_path, slots, message):
    path = tmp_path / "ple.config"
    path.write_text(PLE_CONFIG % slots)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(path) in str(e.value)
    path.write_text(easyrec_text(model='ple { l2_regularization: 1e-6 }'))
    with pytest.raises(ConfigError, match='ple: is read with model_class: "PLE" only'):
        load_config(path)


# --------------------------------------------------------------------------------------------
# Both fixtures train on 2 ranks from EasyRec-format CSV.

STEPS = 20
SHRINK = ["data_config.batch_size=64", "data_config.prefetch_size=2", f"train_config.num_steps={STEPS}",
          "train_config.log_step_count_steps=1", "train_config.save_checkpoints_steps=0",
          "train_config.sparse_optimizer={name: rowwise_adagrad, learning_rate: 0.2}",
          "train_config.dense_optimizer.learning_rate=0.01"]


@pytest.fixture(scope="module")
def easyrec_csv(tmp_path_factory) -> Path:
    """3000 train / 1000 eval rows of the Taobao schema as EasyRec CSV: header-less, columns in
    the fixtures' input_fields order, tags joined by '|'."""
    out = tmp_path_factory.mktemp("easyrec_csv")
    synthetic.main(["--out", str(out / "pq"), "--rows", "3000", "--eval-rows", "1000", "--string-ids", "--seed", "5"])
    columns = [f.input_name for f in load_config(FIXTURES / FORMS[0]).data_config.input_fields]
    for split in ("train", "eval"):
        csv_input.write_table(pq.read_table(out / "pq" / split).select(columns), out / f"taobao_{split}_data")
    return out


def shrink_overrides(name: str, data: Path, model_dir: Path) -> list[str]:
    raw = easyrec.to_raw(FIXTURES / name)
    extra = [f"train_input_path={data / 'taobao_train_data'}", f"eval_input_path={data / 'taobao_eval_data'}",
             f"model_dir={model_dir}"]
    for i, f in enumerate(raw["feature_config"]["features"]):
        if f.get("hash_bucket_size", 0) > 500:
            extra.append(f"feature_config.features.{i}.hash_bucket_size=500")
    extra.append("model_config.backbone.mlp.hidden_units=[64,32]")
    return SHRINK + extra


def _train(config: str, overrides: list[str]) -> dict:
    from launch.train import main

    return main(["--config", config, *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("name", FORMS)
def test_fixture_trains_on_two_ranks_from_easyrec_csv(easyrec_csv, tmp_path, name):
    model_dir = tmp_path / "run"
    # GAUC over the CSV's string user ids (not a feature's hashed rows), users split across ranks
    gauc = "model_config.model_params.task_towers.0.metrics_set=[{auc: {}}, {gauc: {uid_field: user_id}}]"
    overrides = [*shrink_overrides(name, easyrec_csv, model_dir), gauc]
    results = run_ranks(_train, str(FIXTURES / name), overrides)
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary == json.loads(json.dumps(results[0]))
    assert summary["world_size"] == 2 and summary["train"]["steps"] == STEPS
    assert summary["train"]["examples"] == STEPS * 2 * 64  # 1280 of the 1500 rows per rank
    assert [t["tower_name"] for t in summary["towers"]] == ["ctr", "cvr"]
    losses = [loss for _, loss in summary["train"]["loss"]]
    assert sum(losses[-5:]) < sum(losses[:5]), "loss did not fall"
    for tower_name, m in summary["eval"].items():
        assert 0.0 <= m["auc"] <= 1.0 and m["logloss"] > 0, f"{tower_name}: {m}"
    assert 0.0 < summary["eval"]["ctr"]["gauc"] < 1.0 and summary["eval"]["ctr"]["gauc_users"] > 0
    assert "gauc" not in summary["eval"]["cvr"]
    assert (model_dir / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").exists()
    # the model trained is the one the converted YAML describes
    out = tmp_path / "converted.yaml"
    assert easyrec.main([str(FIXTURES / name), "--to-yaml", str(out)]) == 0
    assert _shapes(load_config(out, overrides)) == _shapes(load_config(FIXTURES / name, overrides))
    assert yaml.safe_load(out.read_text())["model_dir"] == "experiments/aitm_taobao_ckpt"
