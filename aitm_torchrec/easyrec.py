"""EasyRec pipeline configs (protobuf text format) -> this project's config.

    python -m aitm_torchrec.easyrec FILE.config --to-yaml OUT.yaml     # convert once, continue in YAML
    python launch/train.py --config FILE.config [key.path=value ...]   # train directly

``config.load_config`` calls ``to_raw(path)`` for a ``.config`` / ``.pbtxt`` file (or any file whose
text is not a YAML mapping), so every job that loads configs takes EasyRec configs; overrides
apply to the converted mapping (our YAML keys).

Parsing is schema-less: protobuf's own ``text_format.Tokenizer`` reads the file into a tree of
(field name, line, value), which is then checked against ``SCHEMA``, the supported subset of
EasyRec's ``EasyRecConfig`` (pipeline.proto). Every unsupported field, wrong value type or
unsupported enum value is collected and reported in ONE ``ConfigError``, each with its line and
field path. Fields that change nothing here are listed in ``IGNORED`` with the reason and logged.
Then ``convert`` maps the tree to our keys (docs/easyrec.md has the table). Two model
forms are understood as EasyRec ``MultiTaskModel``s:

- towers with ``use_ait_module`` / ``relation_tower_names`` / ``ait_project_dim`` (the seed's),
- a backbone of blocks: one ``MLP`` on the feature groups (our ``backbone.mlp``), one ``MLP`` per
  task on it (the task's ``dnn``), ``AITMTower`` blocks whose inputs are [own tower block,
  relation towers' output blocks] (AIT, ``transfer_mlp``, ``stop_gradient``), ``output_blocks``
  one per task; the task towers' own ``dnn`` then runs after the AIT (our ``output_dnn``).

and one more: ``model_class: "PLE"`` with its ``ple { extraction_networks, task_towers }`` over
the feature group ``all`` (our ``PLE``).

A backbone may instead hold EasyRec's interaction blocks beside its MLP block, every task tower
reading its output: a ``Cross`` block (one layer, or ``recurrent`` layers with x0 fixed) and a
``DotInteraction`` block on an ``input_layer``'s feature list, ``concat_blocks`` and ``top_mlp``
(our ``backbone.cross`` / ``dot_interaction`` / ``top_mlp``); other shapes are errors naming the line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import text_format

# One-way: this module needs the config package (its error type, and build_checked for the CLI);
# the package imports this module only when read_raw is called (to tell EasyRec text from YAML).
from aitm_torchrec.config import ConfigError, apply_override, build_checked
from aitm_torchrec.files import write_text_atomic

logger = logging.getLogger(__name__)

EASYREC_SUFFIXES = (".config", ".pbtxt", ".prototxt")


# --------------------------------------------------------------------------------------------
# Schema-less parse: protobuf's text-format tokenizer -> tree of Fields.


class Ident(str):
    """An unquoted identifier value (enum value, true/false)."""


@dataclass
class Field:
    name: str
    line: int
    value: Any  # str (quoted), Ident, int, float, or Msg


@dataclass
class Msg:
    """A message: its fields in file order. ``path``: e.g. ``model_config.feature_groups[0]``."""

    fields: list[Field]
    path: str
    line: int

    def all(self, name: str) -> list[Field]:
        return [f for f in self.fields if f.name == name]

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.fields)

    def get(self, name: str, default: Any = None) -> Any:
        found = self.all(name)
        return found[-1].value if found else default

    def values(self, name: str) -> list[Any]:
        return [f.value for f in self.all(name)]

    def msg(self, name: str) -> Msg | None:
        return self.get(name)

    def line_of(self, name: str) -> int:
        found = self.all(name)
        return found[-1].line if found else self.line

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name


def parse_text(text: str, where: str) -> Msg:
    """Protobuf text format -> tree, without a schema. Syntax errors name file and line."""
    tok = text_format.Tokenizer(text.splitlines())
    try:
        return Msg(_fields(tok, "", end=None), "", 1)
    except text_format.ParseError as e:
        raise _error(f"{where}:{e.GetLine() or ''}: not valid protobuf text format: {e}") from None


def _line(tok: text_format.Tokenizer) -> int:
    return tok.ParseError("").GetLine()  # the tokenizer's current line, 1-based (public API)


def _fields(tok: text_format.Tokenizer, path: str, end: str | None) -> list[Field]:
    fields: list[Field] = []
    while not (tok.AtEnd() if end is None else tok.TryConsume(end)):
        if tok.AtEnd():
            raise tok.ParseError(f"expected {end!r} to close {path or 'the message'}")
        line = _line(tok)
        name = tok.ConsumeIdentifierOrNumber()
        if tok.TryConsume(":"):
            if tok.TryConsume("["):  # a list of values or messages
                while not tok.TryConsume("]"):
                    fields.append(Field(name, _line(tok), _value(tok)))
                    if not tok.TryConsume(","):
                        tok.Consume("]")
                        break
                continue
        elif tok.token not in ("{", "<"):
            raise tok.ParseError(f"expected ':' or '{{' after field {name!r}")
        fields.append(Field(name, line, _value(tok)))
        if not tok.TryConsume(","):
            tok.TryConsume(";")
    return fields


def _value(tok: text_format.Tokenizer) -> Any:
    """A scalar or a message; a message's path is set by ``check``, which knows what repeats."""
    for open_, close in (("{", "}"), ("<", ">")):
        if tok.TryConsume(open_):
            line = _line(tok)
            return Msg(_fields(tok, "", close), "", line)
    if tok.token[:1] in ("'", '"'):
        return tok.ConsumeString()  # joins adjacent strings as protobuf does
    raw = tok.token
    tok.NextToken()
    try:
        return int(raw, 0)
    except ValueError:
        pass
    try:
        return float(raw[:-1] if raw[-1:] in "fF" and not raw.lower().endswith("inf") else raw)
    except ValueError:
        return Ident(raw)


# --------------------------------------------------------------------------------------------
# The supported subset of EasyRec's EasyRecConfig, and the fields that change nothing here.


@dataclass(frozen=True)
class Spec:
    kind: Any  # str | int | float | bool | tuple of allowed identifiers | dict (a message)
    repeated: bool = False
    ignored: str = ""  # non-empty: accepted, changes nothing here, for this reason
    allowed: tuple = ()  # scalar values allowed (empty: any)


def _msg(fields: dict[str, Spec], repeated: bool = False) -> Spec:
    return Spec(fields, repeated)


def _ignored(reason: str, kind: Any = None) -> Spec:
    return Spec(kind, ignored=reason)


_TF_ONLY = "a TensorFlow runtime setting with no counterpart in PyTorch"
_RELU = ("relu", "tf.nn.relu")

DNN_SPEC = {  # EasyRec dnn.proto DNN (task towers); use_bn defaults to true there
    "hidden_units": Spec(int, repeated=True),
    "dropout_ratio": Spec(float, repeated=True),
    "activation": Spec(str, allowed=_RELU),
    "use_bn": Spec(bool),
}
MLP_SPEC = {  # EasyRec dnn.proto MLP (backbone blocks); use_bn, use_final_bn default true
    **DNN_SPEC,
    "use_final_bn": Spec(bool),
    "final_activation": Spec(str, allowed=_RELU),
    "use_bias": _ignored("our Linear layers always have a bias (EasyRec omits it before batch norm)", bool),
    "use_final_bias": _ignored("our Linear layers always have a bias", bool),
}
FEATURE_SPEC = {
    "input_names": Spec(str, repeated=True),
    "feature_name": Spec(str),
    "feature_type": Spec(("IdFeature", "TagFeature", "RawFeature")),
    "embedding_dim": Spec(int),
    "hash_bucket_size": Spec(int),
    "num_buckets": Spec(int),
    "separator": Spec(str),
    "combiner": Spec(str, allowed=("sum", "mean")),
    "raw_input_dim": Spec(int),
}
LR_SPEC = {"constant_learning_rate": _msg({"learning_rate": Spec(float)})}
OPT_SPEC = {"learning_rate": _msg(LR_SPEC)}
LOSS_SPEC = {"loss_type": Spec(("CLASSIFICATION", "ORDER_CALIBRATE_LOSS")), "weight": Spec(float)}
METRICS_SPEC = {
    "auc": _msg({"num_thresholds": _ignored("eval_config.auc chooses the AUC (exact, or binned with 65536 logit bins)", int)}),
    "gauc": _msg({"uid_field": Spec(str), "reduction": Spec(str, allowed=("mean", "mean_by_sample_num",
                                                                          "mean_by_positive_num"))}),
}
GAUC_REDUCTION = "mean"  # EasyRec's default (eval.proto GAUC.reduction); ours is mean_by_sample_num
TOWER_SPEC = {
    "tower_name": Spec(str),
    "label_name": Spec(str),
    "loss_type": Spec(("CLASSIFICATION",)),
    "losses": _msg(LOSS_SPEC, repeated=True),
    "metrics_set": _msg(METRICS_SPEC, repeated=True),
    "dnn": _msg(DNN_SPEC),
    "relation_dnn": _msg(DNN_SPEC),
    "use_ait_module": Spec(bool),
    "ait_project_dim": Spec(int),
    "relation_tower_names": Spec(str, repeated=True),
    "weight": Spec(float),
    "num_class": Spec(int, allowed=(1,)),
}
# EasyRec's PLE towers are plain TaskTowers (tower.proto): no relation fields.
PLE_TOWER_SPEC = {k: v for k, v in TOWER_SPEC.items()
                  if k not in ("relation_dnn", "use_ait_module", "ait_project_dim", "relation_tower_names")}
PLE_SPEC = {  # EasyRec ple.proto PLE
    "extraction_networks": _msg({
        "network_name": Spec(str),
        "expert_num_per_task": Spec(int),
        "share_num": Spec(int),
        "task_expert_net": _msg(DNN_SPEC),
        "share_expert_net": _msg(DNN_SPEC),
    }, repeated=True),
    "task_towers": _msg(PLE_TOWER_SPEC, repeated=True),
    "l2_regularization": Spec(float),
}
KERAS_LAYER_SPEC = {
    "class_name": Spec(str, allowed=("MLP", "AITMTower", "Cross", "DotInteraction")),
    "mlp": _msg(MLP_SPEC),
    "aitm": _msg({"project_dim": Spec(int), "stop_gradient": Spec(bool), "transfer_mlp": _msg(MLP_SPEC)}),
    # google.protobuf.Struct: Cross's and DotInteraction's parameters (checked by the converter)
    "st_params": _msg({"fields": _msg({
        "key": Spec(str),
        "value": _msg({"number_value": Spec(float), "bool_value": Spec(bool), "string_value": Spec(str)}),
    }, repeated=True)}),
}
BLOCK_SPEC = {
    "name": Spec(str),
    # input_fn / input_slice / extra_input_fn: only the lambdas of the Cross / DotInteraction forms
    "inputs": _msg({"feature_group_name": Spec(str), "block_name": Spec(str), "input_fn": Spec(str),
                    "input_slice": Spec(str)}, repeated=True),
    "merge_inputs_into_list": Spec(bool),
    "extra_input_fn": Spec(str),
    "keras_layer": _msg(KERAS_LAYER_SPEC),
    "recurrent": _msg({"num_steps": Spec(int), "fixed_input_index": Spec(int), "keras_layer": _msg(KERAS_LAYER_SPEC)}),
    "input_layer": _msg({"only_output_feature_list": Spec(bool), "output_2d_tensor_and_feature_list": Spec(bool)}),
}
FEATURE_CONFIG_SPEC = _msg(FEATURE_SPEC, repeated=True)
SCHEMA: dict[str, Spec] = {
    "train_input_path": Spec(str),
    "eval_input_path": Spec(str),
    "model_dir": Spec(str),
    "data_config": _msg({
        "batch_size": Spec(int),
        "eval_batch_size": Spec(int),
        "label_fields": Spec(str, repeated=True),
        "input_type": Spec(("CSVInput", "ParquetInput")),
        "separator": Spec(str),
        "input_fields": _msg({
            "input_name": Spec(str),
            "input_type": Spec(("INT32", "INT64", "STRING", "FLOAT", "DOUBLE", "BOOL")),
            "default_val": Spec(str),
        }, repeated=True),
        "shuffle": Spec(bool),
        "shuffle_buffer_size": Spec(int),
        "prefetch_size": Spec(int),
        "num_epochs": _ignored("training runs train_config.num_steps steps, repeating epochs as needed", int),
        "num_parallel_calls": _ignored("each rank converts in one prefetch thread, vectorised", int),
        "shard": _ignored("every rank always reads its own share of the rows", bool),
        "file_shard": _ignored("every rank always reads its own share of the rows", bool),
        "drop_remainder": _ignored("a rank's last batch is padded with weight-0 rows instead", bool),
    }),
    "feature_config": _msg({"features": FEATURE_CONFIG_SPEC}),
    "feature_configs": FEATURE_CONFIG_SPEC,  # the older top-level form
    "model_config": _msg({
        "model_class": Spec(str, allowed=("MultiTaskModel", "PLE")),
        "model_name": Spec(str),
        "feature_groups": _msg({
            "group_name": Spec(str),
            "feature_names": Spec(str, repeated=True),
            "wide_deep": Spec(("DEEP", "WIDE")),
        }, repeated=True),
        "backbone": _msg({"blocks": _msg(BLOCK_SPEC, repeated=True), "output_blocks": Spec(str, repeated=True),
                          "concat_blocks": Spec(str, repeated=True), "top_mlp": _msg(MLP_SPEC)}),
        "model_params": _msg({"task_towers": _msg(TOWER_SPEC, repeated=True), "l2_regularization": Spec(float)}),
        "ple": _msg(PLE_SPEC),
        "embedding_regularization": Spec(float),
    }),
    "train_config": _msg({
        "optimizer_config": _msg({
            "adam_optimizer": _msg({**OPT_SPEC, "beta1": Spec(float), "beta2": Spec(float)}),
            "adagrad_optimizer": _msg(OPT_SPEC),
            "sgd_optimizer": _msg(OPT_SPEC),
            "use_moving_average": Spec(bool, allowed=(False,)),
            "embedding_learning_rate_multiplier": Spec(float),
        }, repeated=True),
        "num_steps": Spec(int),
        "save_checkpoints_steps": Spec(int),
        "keep_checkpoint_max": Spec(int),
        "log_step_count_steps": Spec(int),
        "gradient_clipping_by_norm": Spec(float),
        "sync_replicas": _ignored("training here is always synchronous data + model parallel", bool),
        "num_gpus_per_worker": _ignored("processes per host come from torchrun / TorchX (-j HOSTSxPROCS)", int),
        "save_summary_steps": _ignored("TensorBoard scalars are written every log_step_count_steps", int),
        "startup_delay_steps": _ignored("there are no parameter-server workers to stagger", float),
        "train_distribute": _ignored("distribution is TorchRec's DistributedModelParallel, planned by "
                                     "sharding_config", Ident),
        "inter_op_parallelism_threads": _ignored(_TF_ONLY, int),
        "intra_op_parallelism_threads": _ignored(_TF_ONLY, int),
        "is_profiling": _ignored(_TF_ONLY, bool),
        "write_graph": _ignored(_TF_ONLY, bool),
        "summary_model_vars": _ignored(_TF_ONLY, bool),
        "tensor_fuse": _ignored(_TF_ONLY, bool),
        "protocol": _ignored(_TF_ONLY, str),
        "sparse_accumulator_type": _ignored(_TF_ONLY, str),
    }),
    "eval_config": _msg({
        "metrics_set": _ignored("AUC, logloss and calibration are always computed per tower"),
        "eval_interval_secs": _ignored("evaluation runs at the end (eval_config.every_steps counts steps)", int),
    }),
    "export_config": _ignored("export is a separate job, not part of training"),
}


def _error(text: str) -> Exception:
    return ConfigError(text)


def _type_name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return "one of " + ", ".join(kind)
    return {str: "a quoted string", int: "an integer", float: "a number", bool: "true or false",
            Ident: "an identifier"}.get(kind, "a value")


def check(tree: Msg, where: str) -> list[str]:
    """Checks the whole tree against SCHEMA; raises ONE error listing every problem with its line
    and field path. Returns the ignored fields, as ``line: path (reason)`` lines."""
    problems: list[str] = []
    ignored: list[str] = []
    _check(tree, SCHEMA, problems, ignored)
    if problems:
        raise _error(f"{where}: {len(problems)} EasyRec field(s) not supported here (see "
                     "docs/easyrec.md):\n" + "\n".join(f"  {where}:{p}" for p in problems))
    return ignored


def _check(msg: Msg, schema: dict[str, Spec], problems: list[str], ignored: list[str]) -> None:
    seen: dict[str, int] = {}
    for f in msg.fields:
        key = msg.key(f.name)
        if isinstance(f.value, Msg):
            i = seen.get(f.name, 0)
            f.value.path = f"{key}[{i}]" if schema.get(f.name, Spec(None, True)).repeated else key
        spec = schema.get(f.name)
        if spec is None:
            problems.append(f"{f.line}: {key}: unsupported field")
            continue
        if spec.ignored:
            ignored.append(f"{f.line}: {key} ({spec.ignored})")
            continue
        if not spec.repeated and f.name in seen:
            problems.append(f"{f.line}: {key}: given more than once")
        seen[f.name] = seen.get(f.name, 0) + 1
        if isinstance(spec.kind, dict):
            if not isinstance(f.value, Msg):
                problems.append(f"{f.line}: {key}: must be a message {{ ... }}, got {f.value!r}")
            else:
                _check(f.value, spec.kind, problems, ignored)
            continue
        if isinstance(f.value, Msg):
            problems.append(f"{f.line}: {key}: must be {_type_name(spec.kind)}, not a message")
            continue
        value = _scalar(f.value, spec.kind)
        if value is None:
            if isinstance(spec.kind, tuple):
                problems.append(f"{f.line}: {key}: unsupported value {f.value}; supported: {', '.join(spec.kind)}")
            else:
                problems.append(f"{f.line}: {key}: must be {_type_name(spec.kind)}, got {f.value}")
            continue
        f.value = value
        if spec.allowed and value not in spec.allowed:
            problems.append(f"{f.line}: {key}: unsupported value {f.value!r}; supported: "
                            f"{', '.join(map(repr, spec.allowed))}")


def _scalar(value: Any, kind: Any) -> Any:
    """The value as ``kind``, or None when it is not one."""
    if isinstance(kind, tuple):
        return str(value) if isinstance(value, Ident) and value in kind else None
    if kind is bool:
        if isinstance(value, Ident) and value.lower() in ("true", "false", "t", "f"):
            return value.lower() in ("true", "t")
        return bool(value) if isinstance(value, int) and value in (0, 1) else None
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if kind is str:
        return value if isinstance(value, str) and not isinstance(value, Ident) else None
    if kind is Ident:
        return value if isinstance(value, Ident) else None
    return value


# --------------------------------------------------------------------------------------------
# Conversion of a checked tree to our raw config mapping.


# Backbone blocks that make our interaction backbone (backbone.cross, backbone.dot_interaction).
INTERACTION_BLOCKS = ("Cross", "DotInteraction")


def _block_class(b: Msg) -> str:
    """A block's layer: its keras_layer's class_name, ``Cross`` for recurrent Cross layers (other
    recurrent layers: ``recurrent``), or ``input_layer``."""
    if b.has("input_layer"):
        return "input_layer"
    if b.has("recurrent"):
        layer = b.msg("recurrent").msg("keras_layer")
        return "Cross" if layer is not None and layer.get("class_name") == "Cross" else "recurrent"
    return b.msg("keras_layer").get("class_name", "")


def _is_pair(fn: str | None) -> bool:
    """EasyRec's 'lambda x: [x, x]' (the input as [x0, x]), spaces aside."""
    return (fn or "").replace(" ", "") == "lambdax:[x,x]"


class _Converter:
    def __init__(self, where: str) -> None:
        self.where = where
        self.groups: dict[str, list[str]] = {}  # DEEP group -> feature names (set by convert)
        self.dot_only_group: str | None = None  # a DEEP group only a DotInteraction block reads
        self.feature_types: dict[str, str] = {}  # feature name -> feature_type (set by convert)

    def fail(self, msg: Msg, name: str, text: str) -> Exception:
        return _error(f"{self.where}:{msg.line_of(name)}: {msg.key(name)}: {text}")

    def dnn(self, m: Msg, mlp: bool = False) -> dict:
        """EasyRec DNN / MLP -> our dnn block. EasyRec's use_bn defaults to true (both)."""
        out: dict[str, Any] = {"hidden_units": [int(u) for u in m.values("hidden_units")]}
        dropout = set(m.values("dropout_ratio"))
        if len(dropout) > 1:
            raise self.fail(m, "dropout_ratio", f"one ratio for every layer is supported, got {sorted(dropout)}")
        if dropout:
            out["dropout_ratio"] = dropout.pop()
        use_bn = m.get("use_bn", True)
        if mlp and m.get("use_final_bn", True) != use_bn and out["hidden_units"]:
            raise self.fail(m, "use_final_bn", "must equal use_bn (batch norm after every layer or none)")
        out["use_bn"] = use_bn
        return out

    def feature(self, m: Msg) -> dict:
        out: dict[str, Any] = {"input_names": m.values("input_names")}
        for key in ("feature_name", "feature_type", "embedding_dim", "hash_bucket_size", "num_buckets",
                    "combiner", "raw_input_dim"):
            if m.has(key):
                out[key] = m.get(key)
        if m.get("feature_type", "IdFeature") == "TagFeature":
            # EasyRec pools a bag by its combiner, default "mean" (feature_config.proto); our key
            # defaults to the seed's "sum", so EasyRec's default is written out
            out.setdefault("combiner", "mean")
            out["separator"] = m.get("separator", "|")  # EasyRec's default
        elif m.has("separator") and m.get("separator") != "|":
            raise self.fail(m, "separator", "is only supported for TagFeature")
        return out

    def optimizers(self, tc: Msg) -> dict:
        """One optimizer_config: every variable (our sparse and dense optimizer alike); two: the
        first for embeddings, the second for dense weights (EasyRec's order)."""
        configs = [f.value for f in tc.all("optimizer_config")]
        if len(configs) > 2:
            raise self.fail(tc, "optimizer_config", "at most two (embeddings, then dense) are supported")
        out = []
        for cfg in configs:
            kinds = [f for f in cfg.fields if f.name.endswith("_optimizer")]
            if len(kinds) != 1:
                raise self.fail(cfg, "optimizer_config", "needs exactly one of adam_optimizer, "
                                "adagrad_optimizer, sgd_optimizer")
            opt: Msg = kinds[0].value
            lr = opt.msg("learning_rate")
            const = lr.msg("constant_learning_rate") if lr else None
            rate = const.get("learning_rate", 0.002) if const else None  # EasyRec's default
            if rate is None:
                raise self.fail(opt, "learning_rate", "needs constant_learning_rate { learning_rate: ... }")
            # EasyRec's (TF's) Adam: betas 0.9 / 0.999 unless set, epsilon 1e-8 (our eps default)
            betas = {b: opt.get(b) for b in ("beta1", "beta2") if opt.get(b) is not None}
            out.append((kinds[0].name.removesuffix("_optimizer"), rate, cfg.get("embedding_learning_rate_multiplier"),
                        betas))
        if not out:
            return {}
        (s_name, s_lr, mult, s_betas), (d_name, d_lr, _, d_betas) = out[0], out[-1]
        # sparse adam: FBGEMM's fused Adam on CUDA, torch Adam on the dense kernel on CPU (docs/easyrec.md)
        return {"sparse_optimizer": {"name": s_name, "learning_rate": s_lr * (mult or 1.0), **s_betas},
                "dense_optimizer": {"name": d_name, "learning_rate": d_lr, **d_betas}}

    def metric(self, m: Msg) -> dict:
        """One metrics_set entry: auc, or gauc with its reduction written out (EasyRec's default
        differs from ours)."""
        g = m.msg("gauc")
        if g is None:
            return {"auc": {}}
        if not g.has("uid_field"):
            raise self.fail(g, "uid_field", "is required (the user id column)")
        return {"gauc": {"uid_field": g.get("uid_field"), "reduction": g.get("reduction", GAUC_REDUCTION)}}

    def towers(self, mp: Msg, backbone: Msg | None) -> tuple[list[dict], dict]:
        """Task towers -> our task_towers and model_params extras (ait_attention, ...)."""
        towers = []
        for t in (f.value for f in mp.all("task_towers")):
            out: dict[str, Any] = {"tower_name": t.get("tower_name"), "label_name": t.get("label_name")}
            if out["tower_name"] is None or out["label_name"] is None:
                raise self.fail(t, "tower_name", "tower_name and label_name are required here")
            if t.has("loss_type"):
                out["loss_type"] = t.get("loss_type")
            if t.has("losses"):
                out["losses"] = [{k: v.get(k) for k in ("loss_type", "weight") if v.has(k)}
                                 for v in t.values("losses")]
            if t.has("metrics_set"):
                out["metrics_set"] = [self.metric(v) for v in t.values("metrics_set") if v.has("auc") or v.has("gauc")]
            if t.has("dnn"):
                out["dnn"] = self.dnn(t.msg("dnn"))
            for key in ("weight", "num_class"):
                if t.has(key):
                    out[key] = t.get(key)
            relations = t.values("relation_tower_names")
            if t.has("relation_dnn"):  # EasyRec checks relation_dnn first: DBMTL's transfer
                out.update(relation_tower_names=relations, use_ait_module=False,
                           relation_dnn=self.dnn(t.msg("relation_dnn")))
            elif relations:
                if not t.get("use_ait_module", False):
                    raise self.fail(t, "relation_tower_names", "needs use_ait_module: true or a relation_dnn "
                                    "(EasyRec would not use the relation towers' features)")
                out.update(relation_tower_names=relations, use_ait_module=True)
                if t.has("ait_project_dim"):
                    out["ait_project_dim"] = t.get("ait_project_dim")
            towers.append((t, out))
        extras: dict[str, Any] = {}
        seed_form = any(o.get("relation_tower_names") and o["use_ait_module"] for _, o in towers)
        if seed_form:  # EasyRec MultiTaskModel: the own tower queries the candidates, no stop-gradient
            extras.update(ait_attention="cross", stop_gradient=False)
        if backbone is not None:
            extras.update(self.backbone_towers(backbone, mp, towers, seed_form))
        return [o for _, o in towers], extras

    def backbone_towers(self, bb: Msg, mp: Msg, towers: list[tuple[Msg, dict]], seed_form: bool) -> dict:
        """The backbone-block form: sets each tower's dnn / relations from its blocks. Returns the
        model-level keys: backbone mlp, and for AITMTower blocks ait_attention, stop_gradient,
        transfer_mlp."""
        blocks = {}
        for b in (f.value for f in bb.all("blocks")):
            if b.get("name") is None or not any(b.has(k) for k in ("keras_layer", "recurrent", "input_layer")):
                raise self.fail(b, "name", "a block needs a name and a keras_layer (or recurrent Cross layers, "
                                "or an input_layer giving a DotInteraction its feature list) here")
            blocks[b.get("name")] = b
        if bb.has("concat_blocks") or bb.has("top_mlp") or any(
                _block_class(b) in INTERACTION_BLOCKS for b in blocks.values()):
            return {"backbone": self.interaction_backbone(bb, blocks)}
        for b in blocks.values():
            self.plain_block(b)
        outputs = bb.values("output_blocks")
        group_blocks = [b for b in blocks.values() if any(i.has("feature_group_name") for i in b.values("inputs"))]
        if len(group_blocks) != 1 or group_blocks[0].msg("keras_layer").get("class_name") != "MLP":
            raise self.fail(bb, "blocks", "one MLP block reading the feature groups (the shared bottom) is "
                            "supported, then one MLP block per task and AITMTower blocks")
        bottom = group_blocks[0]
        extras: dict[str, Any] = {"backbone": {"mlp": self.dnn(bottom.msg("keras_layer").msg("mlp"), mlp=True)}}
        if not outputs:  # EasyRec: every task tower reads the shared bottom
            return extras
        if seed_form:
            raise self.fail(bb, "output_blocks", "AIT is configured twice: in task towers (use_ait_module) "
                            "and as backbone blocks; use one form")
        if len(outputs) != len(towers):
            raise self.fail(bb, "output_blocks", f"must name one block per task tower ({len(towers)}), "
                            f"got {len(outputs)}")
        owner = dict(zip(outputs, (o["tower_name"] for _, o in towers)))
        aitm_params = []
        for out_name, (t, tower) in zip(outputs, towers):
            if tower.get("relation_tower_names"):
                raise self.fail(t, "relation_tower_names", "with backbone output_blocks, relations come from "
                                "AITMTower blocks, not from the task tower")
            block = blocks.get(out_name)
            if block is None:
                raise self.fail(bb, "output_blocks", f"names no block: {out_name!r}")
            layer = block.msg("keras_layer")
            if layer.get("class_name") == "AITMTower":
                inputs = [i.get("block_name") for i in block.values("inputs")]
                if len(inputs) < 2 or None in inputs:
                    raise self.fail(block, "inputs", "an AITMTower block takes block inputs [own tower, "
                                    "relation towers...]")
                relations = []
                for name in inputs[1:]:
                    if name not in owner:
                        raise self.fail(block, "inputs", f"relation input {name!r} must be another task's "
                                        f"output block ({', '.join(outputs)}): our towers pass on their output")
                    relations.append(owner[name])
                own = blocks.get(inputs[0])
                aitm = layer.msg("aitm") or Msg([], layer.key("aitm"), layer.line)
                aitm_params.append((block, aitm))
                tower.update(relation_tower_names=relations, use_ait_module=True)
                if aitm.has("project_dim"):
                    tower["ait_project_dim"] = aitm.get("project_dim")
            else:
                own = block
            if own is None or own.msg("keras_layer").get("class_name") != "MLP" or \
                    [i.get("block_name") for i in own.values("inputs")] != [bottom.get("name")]:
                raise self.fail(block, "inputs", f"({tower['tower_name']}) the task's tower must be one MLP "
                                f"block on {bottom.get('name')!r}")
            # EasyRec: block MLP -> [AITMTower] -> task tower dnn -> logit. Ours: dnn -> [AIT] -> output_dnn.
            if "dnn" in tower:
                tower["output_dnn"] = tower.pop("dnn")
            tower["dnn"] = self.dnn(own.msg("keras_layer").msg("mlp"), mlp=True)
        if aitm_params:
            extras.update(self.aitm_block(aitm_params, towers))
        return extras

    def plain_block(self, b: Msg) -> None:
        """An MLP or AITMTower block: none of the Cross / DotInteraction forms' fields."""
        if b.has("input_layer"):
            raise self.fail(b, "input_layer", "is read here as the feature list of a DotInteraction block only")
        if b.has("recurrent"):
            raise self.fail(b, "recurrent", "recurrent layers are supported for Cross blocks only")
        for i in b.values("inputs"):
            for key in ("input_fn", "input_slice"):
                if i.has(key):
                    raise self.fail(i, key, "is read on the inputs of Cross and DotInteraction blocks only here")
        if b.has("extra_input_fn"):
            raise self.fail(b, "extra_input_fn", "is read on Cross blocks only here")
        layer = b.msg("keras_layer")
        if layer is not None and layer.has("st_params"):
            raise self.fail(layer, "st_params", f"is read on Cross and DotInteraction layers only here; "
                            f"{layer.get('class_name')} takes its own message")

    def interaction_backbone(self, bb: Msg, blocks: dict[str, Msg]) -> dict:
        """A backbone with Cross / DotInteraction blocks -> our backbone keys (docs/easyrec.md):
        one MLP block on the feature groups (``mlp``), a Cross block on the same groups (``cross``),
        a DotInteraction block on the feature list of an input_layer block (``dot_interaction``),
        their outputs concatenated (``concat_blocks``: those blocks, in any order) and ``top_mlp``.
        Every task tower reads that output (no per-task blocks or output_blocks)."""
        if bb.has("output_blocks"):
            raise self.fail(bb, "output_blocks", "with Cross / DotInteraction blocks every task tower reads the "
                            "backbone's output here (concat_blocks, then top_mlp): no per-task output_blocks")
        by_class: dict[str, list[Msg]] = {}
        for b in blocks.values():
            by_class.setdefault(_block_class(b), []).append(b)
        for cls, found in by_class.items():
            if cls not in ("MLP", "input_layer", *INTERACTION_BLOCKS):
                raise self.fail(found[0], "keras_layer", f"{cls} blocks are not supported beside Cross / "
                                "DotInteraction blocks: one MLP block, a Cross block and a DotInteraction block "
                                "(on an input_layer block's feature list) are")
            if len(found) > 1:
                raise self.fail(found[1], "name", f"a second {cls} block; the backbone here has at most one "
                                "(the shared MLP, one cross network, one dot interaction)")
        if "MLP" not in by_class:
            raise self.fail(bb, "blocks", "needs one MLP block on the feature groups beside Cross / DotInteraction "
                            "blocks (our backbone.mlp; its output is concatenated with theirs)")
        bottom = by_class["MLP"][0]
        self.plain_block(bottom)
        groups = [i.get("feature_group_name") for i in bottom.values("inputs")]
        # A DEEP group that only the DotInteraction's input_layer reads names the features it dots
        # (dot_interaction.features); it is not part of the model input.
        dot = self.dot_source(by_class["DotInteraction"][0], blocks) if "DotInteraction" in by_class else None
        dot_group = dot[1] if dot else None
        if None not in groups and dot_group not in groups and sorted(groups) == sorted(g for g in self.groups if g != dot_group):
            self.dot_only_group = dot_group
        deep_groups = [g for g in self.groups if g != self.dot_only_group]
        if None in groups or sorted(groups) != sorted(deep_groups):
            raise self.fail(bottom, "inputs", f"the MLP block beside Cross / DotInteraction blocks reads every DEEP "
                            f"group once ({', '.join(deep_groups)}): here backbone.mlp and cross read the whole "
                            "model input v")
        out: dict[str, Any] = {"mlp": self.dnn(bottom.msg("keras_layer").msg("mlp"), mlp=True)}
        parts = [bottom.get("name")]
        if "Cross" in by_class:
            out["cross"] = self.cross_block(by_class["Cross"][0], groups)
            parts.append(by_class["Cross"][0].get("name"))
        if "DotInteraction" in by_class:
            out["dot_interaction"] = self.dot_block(by_class["DotInteraction"][0], *dot)
            parts.append(by_class["DotInteraction"][0].get("name"))
        fed = {i.get("block_name") for b in blocks.values() for i in b.values("inputs")}
        concat = bb.values("concat_blocks") or [n for n in blocks if n not in fed]  # EasyRec: the DAG's leaves
        if sorted(concat) != sorted(parts):
            raise self.fail(bb, "concat_blocks" if bb.has("concat_blocks") else "blocks",
                            f"the backbone's output here is the MLP block's beside the Cross and DotInteraction "
                            f"blocks' (b = top_mlp(concat(mlp(v), cross(v), dot))): concat_blocks must name "
                            f"{', '.join(parts)}, each once; got {', '.join(concat) or 'none'}")
        if bb.has("top_mlp"):
            if len(parts) == 1:
                raise self.fail(bb, "top_mlp", "is supported beside Cross / DotInteraction blocks only; without "
                                "them add its hidden_units to the MLP block")
            out["top_mlp"] = self.dnn(bb.msg("top_mlp"), mlp=True)
        return out

    def cross_block(self, b: Msg, groups: list[str]) -> dict:
        """A Cross block on the MLP block's feature groups -> ``cross``: one layer
        (``keras_layer``), or ``recurrent`` num_steps layers with x0 fixed (fixed_input_index 0 on
        [x, x], EasyRec's DCN-v2 form). ``projection_dim`` -> ``low_rank``."""
        if b.get("merge_inputs_into_list"):
            raise self.fail(b, "merge_inputs_into_list", "is not supported on a Cross block")
        inputs = b.values("inputs")
        if [i.get("feature_group_name") for i in inputs] != groups:
            raise self.fail(b, "inputs", f"a Cross block reads the feature groups the MLP block reads "
                            f"({', '.join(groups)}): our cross network runs on the model input v")
        pair = False
        for i in inputs:
            if i.has("input_slice"):
                raise self.fail(i, "input_slice", "is not supported on a Cross block's inputs")
            if i.has("input_fn"):
                if len(inputs) > 1 or not _is_pair(i.get("input_fn")):
                    raise self.fail(i, "input_fn", f"{i.get('input_fn')!r} is not supported: a Cross block takes "
                                    "its input x as [x, x] ('lambda x: [x, x]', on its only input) or as it is")
                pair = True
        if b.has("extra_input_fn"):
            if pair or not _is_pair(b.get("extra_input_fn")):
                raise self.fail(b, "extra_input_fn", f"{b.get('extra_input_fn')!r} is not supported: a Cross "
                                "block takes its input x as [x, x] ('lambda x: [x, x]') or as it is")
            pair = True
        if b.has("recurrent"):
            rec = b.msg("recurrent")
            if not pair:
                raise self.fail(b, "inputs", "a recurrent Cross block takes [x0, x]: set input_fn: 'lambda x: [x, x]'")
            if rec.get("fixed_input_index") != 0:
                raise self.fail(rec, "fixed_input_index", "must be 0: each Cross layer crosses the block input x0 "
                                "with the previous layer's output (DCN-v2)")
            layers, layer = rec.get("num_steps", 1), rec.msg("keras_layer")
            if layer is None or layer.get("class_name") != "Cross":
                raise self.fail(rec, "keras_layer", "recurrent layers are supported for Cross only")
        else:
            layers, layer = 1, b.msg("keras_layer")
        params = self.st_params(layer, {"projection_dim": float, "use_bias": bool, "diag_scale": float})
        if params.get("use_bias", True) is not True:
            raise self.fail(layer, "st_params", "use_bias: false is not supported: TorchRec's cross networks "
                            "always add a bias")
        if params.get("diag_scale", 0.0) != 0:
            raise self.fail(layer, "st_params", "diag_scale other than 0 is not supported: TorchRec's cross "
                            "networks have no diagonal term")
        rank = params.get("projection_dim", 0.0)  # EasyRec's default None: a full-rank kernel
        if "projection_dim" in params and (rank != int(rank) or rank < 1):
            raise self.fail(layer, "st_params", f"projection_dim must be a positive integer, got {rank}")
        return {"num_layers": layers, "low_rank": int(rank)}

    def dot_source(self, b: Msg, blocks: dict[str, Msg]) -> tuple[Msg, str]:
        """A DotInteraction block's input_layer block and the one feature group it reads."""
        inputs = b.values("inputs")
        source = blocks.get(inputs[0].get("block_name")) if len(inputs) == 1 else None
        if source is None or not source.has("input_layer") or b.get("merge_inputs_into_list") or b.has("extra_input_fn"):
            raise self.fail(b, "inputs", "a DotInteraction block reads one input here: the feature list of an "
                            "input_layer block (EasyRec's DLRM form, which adds a bottom MLP's output to the dotted "
                            "vectors, is not supported: here the MLP's output is concatenated beside the dot "
                            "products)")
        il, i = source.msg("input_layer"), inputs[0]
        picked = i.get("input_slice", "").replace(" ", "") == "[1]" or \
            i.get("input_fn", "").replace(" ", "") == "lambdax:x[1]"
        if il.get("only_output_feature_list"):
            ok = not i.has("input_slice") and not i.has("input_fn")
        elif il.get("output_2d_tensor_and_feature_list"):
            ok = picked and not (i.has("input_slice") and i.has("input_fn"))
        else:
            raise self.fail(source, "input_layer", "gives a DotInteraction its feature list here: set "
                            "only_output_feature_list: true (or output_2d_tensor_and_feature_list: true)")
        if not ok:
            raise self.fail(i, "block_name", "the DotInteraction must read the input_layer's feature list: as it "
                            "is (only_output_feature_list) or input_slice: '[1]' (output_2d_tensor_and_feature_list)")
        groups = [g.get("feature_group_name") for g in source.values("inputs")]
        if len(groups) != 1 or groups[0] is None:
            raise self.fail(source, "inputs", "an input_layer block reads one feature group here")
        return source, groups[0]

    def dot_block(self, b: Msg, source: Msg, group: str) -> dict:
        """A DotInteraction block ``b`` on the feature list of input_layer block ``source`` over
        ``group`` (``dot_source``) -> ``dot_interaction``: the group's features, each a sparse
        feature of the DEEP groups the MLP block reads (EasyRec shares a feature's embedding between
        groups); ``features`` unless they are all of those, in input order."""
        deep, listed = self.deep_sparse(), self.groups.get(group)
        raw = [n for n in listed or [] if self.feature_types.get(n) == "RawFeature"]
        other = [n for n in listed or [] if n not in deep]
        if listed is None or raw or other:
            why = (f"holds RawFeature {raw[0]!r}" if raw else f"lists {other[0]!r}, which no other DEEP group "
                   "holds") if listed is not None else "is not a DEEP group"
            raise self.fail(source, "inputs", f"group {group!r} {why}: our dot_interaction dots sparse features "
                            f"of the DEEP groups the MLP block reads ({', '.join(deep)})")
        # skip_gather only zero-fills the other triangle (n^2 outputs): the same products; ours are gathered
        params = self.st_params(b.msg("keras_layer"), {"self_interaction": bool, "skip_gather": bool})
        out: dict[str, Any] = {"self_interaction": params.get("self_interaction", False)}
        if list(dict.fromkeys(listed)) != deep:
            out["features"] = list(listed)
        return out

    def deep_sparse(self) -> list[str]:
        """The sparse features of the DEEP groups, each once, in input order (Schema.deep_sparse);
        without a group only the DotInteraction reads."""
        return list(dict.fromkeys(n for name, g in self.groups.items() if name != self.dot_only_group for n in g
                                  if self.feature_types.get(n, "IdFeature") != "RawFeature"))

    def st_params(self, layer: Msg, allowed: dict[str, type]) -> dict:
        """A keras_layer's ``st_params`` (google.protobuf.Struct) as {key: value}; a key outside
        ``allowed`` or a value not of its type (float: number_value, bool: bool_value) is an error
        naming its line."""
        out: dict[str, Any] = {}
        for f in layer.fields:
            if f.name not in ("class_name", "st_params"):
                raise self.fail(layer, f.name, f"is not read on a {layer.get('class_name')} layer (its parameters "
                                "are st_params)")
        st = layer.msg("st_params")
        for f in st.values("fields") if st is not None else []:
            key, value = f.get("key"), f.msg("value")
            if key not in allowed:
                raise self.fail(f, "key", f"{layer.get('class_name')} parameter {key!r} is not supported here; "
                                f"supported: {', '.join(allowed)}")
            kind = {float: "number_value", bool: "bool_value"}[allowed[key]]
            if value is None or [v.name for v in value.fields] != [kind]:
                raise self.fail(f, "value", f"{layer.get('class_name')} parameter {key!r} takes one {kind}")
            out[key] = value.get(kind)
        return out

    def aitm_block(self, params: list[tuple[Msg, Msg]], towers: list[tuple[Msg, dict]]) -> dict:
        """AITMTower blocks -> ait_attention cross (own tower queries), stop_gradient (EasyRec's
        default true), transfer_mlp (EasyRec's last size is the transfer output, ours adds an output
        layer of the receiving tower's size: the last size must be that size)."""
        stop = {a.get("stop_gradient", True) for _, a in params}
        if len(stop) > 1:
            raise self.fail(params[-1][1], "stop_gradient", "must be the same in every AITMTower block here")
        transfers = []
        for _, aitm in params:
            mlp = aitm.msg("transfer_mlp")
            transfers.append(self.dnn(mlp, mlp=True) if mlp else None)
        if any(t != transfers[0] for t in transfers):
            raise self.fail(params[-1][1], "transfer_mlp", "must be the same in every AITMTower block here")
        extras: dict[str, Any] = {"ait_attention": "cross", "stop_gradient": stop.pop()}
        transfer = transfers[0]
        if transfer is None:
            raise self.fail(params[0][1], "transfer_mlp", "is required here: our AIT always transfers through an MLP "
                            "whose output layer has the receiving tower's size")
        last = transfer["hidden_units"][-1] if transfer["hidden_units"] else None
        for _, tower in towers:
            size = tower["dnn"]["hidden_units"][-1] if tower["dnn"]["hidden_units"] else None
            if tower.get("relation_tower_names") and last != size:
                raise self.fail(params[0][1].msg("transfer_mlp"), "hidden_units",
                                f"the last size ({last}) must equal the receiving tower's size ({size}, "
                                f"{tower['tower_name']!r}): our transfer ends in a layer of that size")
        extras["transfer_mlp"] = {**transfer, "hidden_units": transfer["hidden_units"][:-1]}
        return extras

    def ple(self, mc: Msg) -> dict:
        """EasyRec's PLE (``model_class: "PLE"``, parameters in ``ple``) -> our PLE model_params.
        EasyRec's PLE reads the feature group ``all`` only and its own l2 default, 1e-4."""
        ple = mc.msg("ple")
        if ple is None:
            raise _error(f'{self.where}:{mc.line}: model_config.ple is required for model_class "PLE" '
                         "(the extraction networks and task towers)")
        for key in ("model_params", "backbone"):
            if mc.has(key):
                raise self.fail(mc, key, 'is not read with model_class "PLE": its parameters are in ple { }, '
                                "over the feature group 'all'")
        groups = [g.get("group_name", "") for g in mc.values("feature_groups")]
        if groups != ["all"]:
            raise self.fail(mc, "feature_groups", f"EasyRec's PLE reads one feature group, named 'all'; got {groups}")
        networks = []
        for n in ple.values("extraction_networks"):
            net = {k: n.get(k) for k in ("network_name", "expert_num_per_task", "share_num") if n.has(k)}
            for key in ("task_expert_net", "share_expert_net"):
                if n.has(key):
                    net[key] = self.dnn(n.msg(key))
            networks.append(net)
        towers, _ = self.towers(ple, None)
        return {"extraction_networks": networks, "task_towers": towers,
                "l2_regularization": ple.get("l2_regularization", 1e-4)}

    def data(self, dc: Msg) -> dict:
        out: dict[str, Any] = {}
        for key in ("batch_size", "eval_batch_size", "shuffle", "shuffle_buffer_size", "prefetch_size",
                    "input_type", "separator"):
            if dc.has(key):
                out[key] = dc.get(key)
        if dc.has("label_fields"):
            out["label_fields"] = dc.values("label_fields")
        if dc.has("input_fields"):
            out["input_fields"] = [{k: f.get(k) for k in ("input_name", "input_type", "default_val") if f.has(k)}
                                   for f in dc.values("input_fields")]
        if out.get("input_type") == "CSVInput" and not out.get("input_fields"):
            raise self.fail(dc, "input_type", "CSVInput needs input_fields (the columns, in order)")
        return out

    def convert(self, root: Msg) -> dict:
        raw: dict[str, Any] = {}
        for key in ("train_input_path", "eval_input_path"):
            if root.has(key):  # EasyRec joins several paths with commas
                raw[key] = [p.strip() for p in root.get(key).split(",") if p.strip()]
        if root.has("model_dir"):
            raw["model_dir"] = root.get("model_dir")
        if root.has("data_config"):
            raw["data_config"] = self.data(root.msg("data_config"))
        feats = [f.value for f in root.all("feature_configs")]
        if root.has("feature_config"):
            feats += root.msg("feature_config").values("features")
        raw["feature_config"] = {"features": [self.feature(f) for f in feats]}
        mc = root.msg("model_config")
        if mc is None:
            raise _error(f"{self.where}: model_config is required")
        model: dict[str, Any] = {"model_class": "AITM"}
        if mc.has("model_name"):
            model["model_name"] = mc.get("model_name")
        # WIDE groups: a wide table per feature, added to every task's logit (docs/easyrec.md)
        model["feature_groups"] = [
            {"group_name": g.get("group_name", ""), "feature_names": g.values("feature_names"),
             "wide_deep": g.get("wide_deep", "DEEP")}
            for g in mc.values("feature_groups")]
        wide = {g["group_name"] for g in model["feature_groups"] if g["wide_deep"] == "WIDE"}
        # what the backbone's DotInteraction block is checked against
        self.groups = {g["group_name"]: g["feature_names"] for g in model["feature_groups"] if g["group_name"] not in wide}
        self.feature_types = {f.get("feature_name") or f["input_names"][0]: f.get("feature_type", "IdFeature")
                              for f in raw["feature_config"]["features"]}
        for block in (mc.msg("backbone").values("blocks") if mc.has("backbone") and wide else []):
            for i in block.values("inputs"):
                if i.get("feature_group_name") in wide:
                    raise self.fail(i, "feature_group_name", f"reads WIDE group {i.get('feature_group_name')!r}: "
                                    "here a WIDE group is the wide part added to every task's logit, not a block input")
        if mc.get("model_class") == "PLE":
            model.update(model_class="PLE", model_params=self.ple(mc))
        else:
            if mc.has("ple"):
                raise self.fail(mc, "ple", 'is read with model_class: "PLE" only')
            mp = mc.msg("model_params")
            if mp is None:
                raise _error(f"{self.where}:{mc.line}: model_config.model_params is required (the task towers)")
            towers, extras = self.towers(mp, mc.msg("backbone"))
            if "backbone" in extras:
                model["backbone"] = extras.pop("backbone")
            params: dict[str, Any] = {"task_towers": towers, **extras}
            if mp.has("l2_regularization"):
                params["l2_regularization"] = mp.get("l2_regularization")
            model["model_params"] = params
        if self.dot_only_group is not None:  # its features are dotted (backbone.dot_interaction.features), not in v
            model["feature_groups"] = [g for g in model["feature_groups"] if g["group_name"] != self.dot_only_group]
        if mc.has("embedding_regularization"):
            model["embedding_regularization"] = mc.get("embedding_regularization")
        raw["model_config"] = model
        tc = root.msg("train_config")
        if tc is not None:
            train = {k: tc.get(k) for k in ("num_steps", "save_checkpoints_steps", "keep_checkpoint_max",
                                            "log_step_count_steps", "gradient_clipping_by_norm") if tc.has(k)}
            train.update(self.optimizers(tc))
            if "sparse_optimizer" in train and any(g["wide_deep"] == "WIDE" for g in model["feature_groups"]):
                # EasyRec trains the wide embeddings with the embedding optimizer (the first of two)
                train["wide_optimizer"] = dict(train["sparse_optimizer"])
            raw["train_config"] = train
        return raw


def is_easyrec(path: Path, text: str) -> bool:
    """An EasyRec config: by suffix, or (any suffix) text that is not a YAML mapping."""
    if path.suffix.lower() in EASYREC_SUFFIXES:
        return True
    if path.suffix.lower() in (".yaml", ".yml"):
        return False
    try:
        return not isinstance(yaml.safe_load(text), dict)
    except yaml.YAMLError:
        return True


def to_raw(path: str | Path, text: str | None = None) -> dict:
    """EasyRec config file -> our raw config mapping (YAML keys), before build/validate. Raises
    ConfigError listing every unsupported field with its line; logs the ignored ones."""
    path = Path(path)
    if text is None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise _error(f"{path}: config file not found") from None
    tree = parse_text(text, str(path))
    ignored = check(tree, str(path))
    if ignored:
        logger.warning("%s: EasyRec fields ignored, they change nothing here:\n  %s", path, "\n  ".join(ignored))
    return _Converter(str(path)).convert(tree)


def ignored_fields(path: str | Path) -> list[str]:
    """``line: path (reason)`` for each field of the config that is ignored here."""
    text = Path(path).read_text()
    return check(parse_text(text, str(path)), str(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Convert an EasyRec pipeline config to this project's YAML.")
    p.add_argument("config", help="EasyRec pipeline config (protobuf text format)")
    p.add_argument("--to-yaml", required=True, metavar="OUT.yaml", help="where to write the YAML")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="overrides on the converted config")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        raw = to_raw(args.config)
        for item in args.overrides:
            apply_override(raw, item, args.config)
        build_checked(raw, args.config)  # the YAML we write must load
        ignored = ignored_fields(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = [f"# Converted from the EasyRec config {args.config} by `python -m aitm_torchrec.easyrec`.",
              "# Keys and defaults: docs/config.md and docs/easyrec.md."]
    if ignored:
        header.append("# EasyRec fields ignored (they change nothing here):")
        header += [f"#   line {i}" for i in ignored]
    write_text_atomic(args.to_yaml, "\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False))
    print(f"wrote {args.to_yaml}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
