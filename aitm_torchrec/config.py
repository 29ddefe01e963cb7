"""Config: YAML -> frozen dataclasses, validated once at load.

The vocabulary is EasyRec's (``feature_config.features``, ``model_config.feature_groups``,
``model_params.task_towers``, ``dnn.hidden_units``, ``relation_tower_names`` ...), written as
YAML instead of protobuf text. Every error names the file and the key path, and says what is
allowed. ``load_config(path, overrides)`` is the only entry point; overrides are
``key.path=value`` strings whose values are parsed as YAML (``a.b=[1,2]``, ``x.0.y=true``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from aitm_torchrec.schema import Normalizer, Schema, topological_order

__all__ = ["Normalizer", "topological_order"]  # re-exported: part of the config vocabulary

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "aitm_taobao.yaml"

FEATURE_TYPES = ("IdFeature", "TagFeature", "RawFeature")
LOSS_TYPES = ("CLASSIFICATION", "ORDER_CALIBRATE_LOSS")
SHARDING_TYPES_CPU = ("data_parallel", "table_wise", "column_wise", "table_column_wise")
SHARDING_TYPES_CUDA = SHARDING_TYPES_CPU + ("row_wise", "table_row_wise")
COMPUTE_KERNELS = ("dense", "fused", "fused_uvm", "fused_uvm_caching", "key_value")
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")
DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
# The model_config.model_class names, here so that validating a config needs no torch;
# registry.MODELS (torch) must have exactly these keys, in this order, and checks so at import.
MODEL_CLASSES = ("AITM", "DBMTL", "ESMM", "MMoE", "SharedBottom")


class ConfigError(ValueError):
    """A config problem, with the file and key path in the message."""


# --------------------------------------------------------------------------------------------
# Schema. Field names are the YAML keys.


@dataclass(frozen=True)
class Zch:
    """A managed-collision (zero-collision hashing) table: every kept id has a row of its own.

    ``zch_size`` rows in all (split evenly over the ranks; each rank's last row is the shared row
    of ids it does not hold: unseen and evicted ids). Every ``eviction_interval`` training steps
    the ids seen since the last eviction compete with the held ones under ``eviction_policy``
    (lfu: most seen; lru: most recent; distance_lfu: counts decayed by age with
    ``decay_exponent``); the losers' rows are re-initialised with their optimizer state.
    """

    zch_size: int = 0
    eviction_interval: int = 100  # training steps
    eviction_policy: Literal["lfu", "lru", "distance_lfu"] = "lfu"
    decay_exponent: float = 1.0  # lru and distance_lfu only


@dataclass(frozen=True)
class Feature:
    """One input column -> one embedding table (or dense values for RawFeature)."""

    input_names: tuple[str, ...]
    feature_type: Literal["IdFeature", "TagFeature", "RawFeature"] = "IdFeature"
    feature_name: str = ""  # defaults to input_names[0]
    embedding_dim: int = 16
    hash_bucket_size: int = 0  # ids (int or string) hashed into [0, hash_bucket_size)
    num_buckets: int = 0  # ids already in [0, num_buckets); out of range is an error
    zch: Zch | None = None  # managed-collision table instead of hashing (see Zch)
    separator: str = ""  # TagFeature stored as one string, e.g. "|"
    combiner: Literal["sum", "mean"] = "sum"  # pooling of the bag
    raw_input_dim: int = 1  # RawFeature width
    normalizer: Normalizer | None = None  # RawFeature only; none: values as they are

    @property
    def name(self) -> str:
        return self.feature_name or self.input_names[0]

    @property
    def column(self) -> str:
        return self.input_names[0]

    @property
    def num_embeddings(self) -> int:
        return self.hash_bucket_size or self.num_buckets or (self.zch.zch_size if self.zch else 0)


@dataclass(frozen=True)
class FeatureConfig:
    features: tuple[Feature, ...]


@dataclass(frozen=True)
class FeatureGroup:
    group_name: str
    feature_names: tuple[str, ...]
    wide_deep: Literal["DEEP"] = "DEEP"


@dataclass(frozen=True)
class DNN:
    """An MLP block: Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden size."""

    hidden_units: tuple[int, ...] = ()
    dropout_ratio: float = 0.0  # after every layer's activation
    use_bn: bool = False  # EasyRec's DNN defaults to true


@dataclass(frozen=True)
class Backbone:
    """Shared MLP over the concatenated feature groups (EasyRec backbone block ``mlp``)."""

    mlp: DNN = DNN()


@dataclass(frozen=True)
class Loss:
    loss_type: Literal["CLASSIFICATION", "ORDER_CALIBRATE_LOSS"] = "CLASSIFICATION"
    weight: float = 1.0  # for ORDER_CALIBRATE_LOSS this is alpha


@dataclass(frozen=True)
class MetricsSet:
    auc: dict | None = None


@dataclass(frozen=True)
class TaskTower:
    tower_name: str
    label_name: str
    loss_type: Literal["CLASSIFICATION", "ORDER_CALIBRATE_LOSS"] = "CLASSIFICATION"
    losses: tuple[Loss, ...] = ()  # when given, replaces loss_type
    metrics_set: tuple[MetricsSet, ...] = ()
    dnn: DNN = DNN()
    use_ait_module: bool = True
    ait_project_dim: int = 0  # 0 -> the tower's last hidden size
    relation_tower_names: tuple[str, ...] = ()
    relation_dnn: DNN = DNN()  # DBMTL (use_ait_module false); empty -> one layer of dnn's last size
    output_dnn: DNN = DNN()  # AITM/DBMTL: after AIT / relation dnn, before the logit (EasyRec backbone form)
    weight: float = 1.0
    num_class: int = 1

    @property
    def all_losses(self) -> tuple[Loss, ...]:
        return self.losses or (Loss(self.loss_type),)

    @property
    def classification_weight(self) -> float:
        """Weight of this tower's BCE: ``weight`` times its CLASSIFICATION entries' weights."""
        return self.weight * sum(l.weight for l in self.all_losses if l.loss_type == "CLASSIFICATION")

    @property
    def calibration_alpha(self) -> float:
        """Weight of this tower's ORDER_CALIBRATE_LOSS against its relation towers (0 if none)."""
        return sum(l.weight for l in self.all_losses if l.loss_type == "ORDER_CALIBRATE_LOSS")


@dataclass(frozen=True)
class ModelParams:
    task_towers: tuple[TaskTower, ...]
    l2_regularization: float = 0.0
    ait_attention: Literal["self", "cross"] = "self"  # self: the paper; cross: EasyRec (own tower queries)
    stop_gradient: bool = False  # detach what a tower receives from its relation towers
    transfer_mlp: DNN = DNN()  # hidden layers of the transfer MLP, before its output layer
    num_expert: int = 3  # MMoE
    expert_dnn: DNN = DNN()  # MMoE, required there


@dataclass(frozen=True)
class ModelConfig:
    feature_groups: tuple[FeatureGroup, ...]
    model_params: ModelParams
    model_class: str = "AITM"  # one of MODEL_CLASSES (= registry.MODELS' keys)
    model_name: str = ""
    backbone: Backbone = Backbone()
    embedding_regularization: float = 0.0
    # Tables start uniform in [-s, s]; 0: TorchRec's default [-sqrt(1/rows), sqrt(1/rows)] per table.
    embedding_init_scale: float = 0.0


@dataclass(frozen=True)
class InputField:
    """A column of EasyRec CSV input (``data_config.input_fields``), in file order."""

    input_name: str
    input_type: Literal["INT32", "INT64", "STRING", "FLOAT", "DOUBLE", "BOOL"] = "STRING"
    default_val: str = ""  # fills empty values; "" leaves them missing


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = 1024  # per rank
    label_fields: tuple[str, ...] = ()
    shuffle: bool = True
    shuffle_buffer_size: int = 0  # rows; 0 -> 8 batches
    prefetch_size: int = 4  # batches prepared ahead in a background thread
    eval_batch_size: int = 0  # 0 -> batch_size
    # A row where a later step of the chain (label_fields order) is 1 while an earlier one is 0:
    # error (default: usually swapped or misaligned label columns), drop the row, or keep it.
    label_chain_policy: Literal["error", "drop", "keep"] = "error"
    # EasyRec's CSV input: header-less, columns in input_fields order (see csv_input.py).
    input_type: Literal["ParquetInput", "CSVInput"] = "ParquetInput"
    input_fields: tuple[InputField, ...] = ()
    separator: str = ","  # CSVInput column delimiter


@dataclass(frozen=True)
class Optimizer:
    name: str
    learning_rate: float
    weight_decay: float = 0.0
    eps: float = 1e-8


@dataclass(frozen=True)
class LearningRateSchedule:
    """Multiplier on every optimizer's learning rate (dense and fused sparse alike)."""

    warmup_steps: int = 0  # linear ramp from warmup_start_ratio to 1
    warmup_start_ratio: float = 0.0
    decay: Literal["constant", "linear", "cosine", "exponential"] = "constant"
    decay_steps: int = 0  # linear/cosine: steps after warmup to reach min_ratio (0 -> to num_steps); exponential: period
    decay_rate: float = 0.5  # exponential: factor per decay_steps
    min_ratio: float = 0.0  # floor of the multiplier after warmup


@dataclass(frozen=True)
class LearningRateScaling:
    """Learning rates tied to the global batch (batch_size x world size): both optimizers' rates
    are multiplied by (global / reference_batch_size) ** p, p = 0 (none), 0.5 (sqrt), 1 (linear)."""

    rule: Literal["none", "sqrt", "linear"] = "none"
    reference_batch_size: int = 8192  # the global batch the configured rates are for

    def factor(self, global_batch: int) -> float:
        power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[self.rule]
        return (global_batch / self.reference_batch_size) ** power


@dataclass(frozen=True)
class TrainConfig:
    num_steps: int = 1000
    # One-epoch quality on the synthetic Taobao set (README, "Why these defaults"): a lower table
    # rate and an eps near a rare row's gradient scale keep one noisy example from moving a row far.
    sparse_optimizer: Optimizer = Optimizer("rowwise_adagrad", 0.01, eps=1e-5)
    dense_optimizer: Optimizer = Optimizer("adam", 3e-3)
    learning_rate_schedule: LearningRateSchedule = LearningRateSchedule()
    learning_rate_scaling: LearningRateScaling = LearningRateScaling()
    log_step_count_steps: int = 50
    save_checkpoints_steps: int = 0  # 0 -> only at the end
    keep_checkpoint_max: int = 5  # 0 -> keep all
    mixed_precision: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype for the dense layers
    nonfinite_policy: Literal["stop", "skip"] = "stop"  # a non-finite loss/gradient: stop, or skip the batch
    seed: int = 2021


@dataclass(frozen=True)
class EvalConfig:
    num_steps: int = 0  # 0 -> the whole eval input
    every_steps: int = 0  # also evaluate every N training steps; 0 -> only at the end


@dataclass(frozen=True)
class TableConstraint:
    sharding_types: tuple[str, ...] = ()
    compute_kernels: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardingConfig:
    """Planner inputs. Empty lists leave the choice to the planner."""

    sharding_types: tuple[str, ...] = ()  # allowed for every table
    compute_kernels: tuple[str, ...] = ()
    tables: tuple[tuple[str, TableConstraint], ...] = ()  # per feature name, overrides the above
    hbm_cap_gb: float = 0.0  # per rank; 0 -> the device's memory (CUDA) / unused (CPU)
    ddr_cap_gb: float = 0.0  # per rank; 0 -> host memory / local world size
    cache_load_factor: float = 0.2  # fused_uvm_caching: share of a table's rows cached in HBM


@dataclass(frozen=True)
class Config:
    feature_config: FeatureConfig
    model_config: ModelConfig
    data_config: DataConfig = DataConfig()
    train_config: TrainConfig = TrainConfig()
    eval_config: EvalConfig = EvalConfig()
    sharding_config: ShardingConfig = ShardingConfig()
    train_input_path: tuple[str, ...] = ()
    eval_input_path: tuple[str, ...] = ()
    model_dir: str = ""  # default runs/<config file stem>

    @property
    def features(self) -> dict:
        return {f.name: f for f in self.feature_config.features}

    @functools.cached_property
    def schema(self) -> Schema:
        """The resolved schema (feature layout, id rules, label order, tower indices), built once."""
        return Schema.from_config(self)

    @property
    def towers(self) -> tuple[TaskTower, ...]:
        return self.model_config.model_params.task_towers


def scaled_learning_rates(cfg: Config, world_size: int) -> Config:
    """``cfg`` with both optimizers' rates multiplied by ``learning_rate_scaling``'s factor for
    the global batch ``data_config.batch_size`` x ``world_size`` (unchanged for rule ``none``)."""
    tc = cfg.train_config
    factor = tc.learning_rate_scaling.factor(cfg.data_config.batch_size * world_size)
    if factor == 1.0:
        return cfg
    opts = {side: dataclasses.replace(getattr(tc, side), learning_rate=getattr(tc, side).learning_rate * factor)
            for side in ("sparse_optimizer", "dense_optimizer")}
    return dataclasses.replace(cfg, train_config=dataclasses.replace(tc, **opts))


# --------------------------------------------------------------------------------------------
# Loading.


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Reads a YAML config (or an EasyRec pipeline config, converted by ``easyrec.to_raw``),
    applies ``key.path=value`` overrides to its keys, builds and validates it."""
    path = Path(path) if path else DEFAULT_CONFIG
    raw = read_raw(path)
    for item in overrides:
        apply_override(raw, item, str(path))
    raw.setdefault("model_dir", str(Path("runs") / path.stem))
    return build_checked(raw, str(path))


def read_raw(path: Path) -> dict:
    """The config file as a plain mapping of our keys: YAML as it is, EasyRec converted."""
    from aitm_torchrec import easyrec  # imports this module

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    if easyrec.is_easyrec(path, text):
        return easyrec.to_raw(path, text)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def build_checked(raw: dict, where: str) -> Config:
    """``build`` then ``validate``: the Config of a raw mapping, or a ConfigError naming ``where``."""
    cfg = build(Config, raw, f"{where}:")
    validate(cfg, where)
    return cfg


def apply_override(raw: dict, item: str, where: str) -> None:
    """Sets ``a.b.0.c=value`` in the raw mapping; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"{where}: override {item!r} must look like key.path=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), where, create=True)
    last = parts[-1]
    parsed = yaml.safe_load(value) if value.strip() else ""
    if isinstance(node, list):
        node[_index(node, last, key, where)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise ConfigError(f"{where}: override {key}: {'.'.join(parts[:-1])} is not a mapping or list")


def _index(node: list, part: str, key: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: override {key}: {part!r} is not an index below {len(node)}")
    return int(part)


def _child(node: Any, part: str, key: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key, where)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = {}
        return node[part]
    raise ConfigError(f"{where}: override {key}: parent is a {type(node).__name__}, not a mapping")


def build(cls: type, data: Any, where: str) -> Any:
    """Builds dataclass ``cls`` from plain YAML data, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with keys {_keys(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where} unknown key {unknown[0]!r}; allowed keys: {_keys(cls)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key_where = f"{where}{'' if where.endswith(':') else '.'}{f.name}"
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], key_where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key_where} is required")
    return cls(**kwargs)


def _keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _convert(tp: Any, value: Any, where: str) -> Any:
    if tp == tuple[tuple[str, TableConstraint], ...]:
        # ShardingConfig.tables is a mapping in YAML: {feature_name: {sharding_types: [...]}}.
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must map feature names to constraints, got {value!r}")
        return tuple((str(k), build(TableConstraint, v, f"{where}.{k}")) for k, v in value.items())
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} is {value!r}; allowed: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            items = value if isinstance(value, list) else [value]  # EasyRec allows a scalar
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(items))
        raise TypeError(f"unsupported schema type {tp}")
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)  # YAML reads 1e-6 (no dot) as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported schema type {tp}")


# --------------------------------------------------------------------------------------------
# Cross-field checks.


def validate(cfg: Config, where: str) -> None:
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{where}: {key} {msg}")

    features = cfg.feature_config.features
    if not features:
        fail("feature_config.features", "must list at least one feature")
    seen: set[str] = set()
    for i, f in enumerate(features):
        key = f"feature_config.features[{i}]"
        if not f.input_names:
            fail(f"{key}.input_names", "must name the input column")
        if f.name in seen:
            fail(f"{key}.feature_name", f"{f.name!r} is defined twice")
        seen.add(f.name)
        if f.feature_type == "RawFeature":
            if f.hash_bucket_size or f.num_buckets or f.zch:
                fail(key, f"({f.name}) RawFeature takes no hash_bucket_size / num_buckets / zch")
            if f.raw_input_dim < 1:
                fail(f"{key}.raw_input_dim", "must be >= 1")
            if f.normalizer is not None and f.normalizer.std <= 0:
                fail(f"{key}.normalizer.std", f"({f.name}) must be > 0")
            if f.separator:
                fail(f"{key}.separator", f"({f.name}) is only allowed for TagFeature")
            continue
        if f.normalizer is not None:
            fail(f"{key}.normalizer", f"({f.name}) is only allowed for RawFeature")
        if [f.hash_bucket_size > 0, f.num_buckets > 0, f.zch is not None].count(True) != 1:
            fail(key, f"({f.name}) needs exactly one of hash_bucket_size or num_buckets (> 0), or zch")
        if f.zch is not None:
            if f.zch.zch_size < 2:
                fail(f"{key}.zch.zch_size", f"({f.name}) must be >= 2 (one row is kept for unseen ids), "
                     f"got {f.zch.zch_size}")
            if f.zch.eviction_interval < 1:
                fail(f"{key}.zch.eviction_interval", f"({f.name}) must be >= 1 step, got {f.zch.eviction_interval}")
            if f.zch.decay_exponent <= 0:
                fail(f"{key}.zch.decay_exponent", f"({f.name}) must be > 0, got {f.zch.decay_exponent}")
        if f.embedding_dim < 1:
            fail(f"{key}.embedding_dim", f"({f.name}) must be >= 1")
        if f.separator and f.feature_type != "TagFeature":
            fail(f"{key}.separator", f"({f.name}) is only allowed for TagFeature")

    mc = cfg.model_config
    if mc.model_class not in MODEL_CLASSES:
        fail("model_config.model_class", f"is {mc.model_class!r}; allowed: {', '.join(MODEL_CLASSES)}")
    if not mc.feature_groups:
        fail("model_config.feature_groups", "must list at least one group")
    for i, g in enumerate(mc.feature_groups):
        for name in g.feature_names:
            if name not in seen:
                fail(f"model_config.feature_groups[{i}].feature_names",
                     f"names unknown feature {name!r}; defined: {', '.join(sorted(seen))}")
    def check_dnn(key: str, dnn: DNN, owner: str = "", required: bool = False) -> None:
        owner = f"({owner}) " if owner else ""
        if required and not dnn.hidden_units:
            fail(f"{key}.hidden_units", f"{owner}must list at least one size")
        if any(u < 1 for u in dnn.hidden_units):
            fail(f"{key}.hidden_units", f"{owner}must list positive sizes, got {list(dnn.hidden_units)}")
        if not 0.0 <= dnn.dropout_ratio < 1.0:
            fail(f"{key}.dropout_ratio", f"{owner}must be in [0, 1), got {dnn.dropout_ratio}")

    check_dnn("model_config.backbone.mlp", mc.backbone.mlp)
    mp = mc.model_params
    check_dnn("model_config.model_params.transfer_mlp", mp.transfer_mlp)
    check_dnn("model_config.model_params.expert_dnn", mp.expert_dnn,
              required=mc.model_class == "MMoE")
    if mp.num_expert < 1:
        fail("model_config.model_params.num_expert", f"must be >= 1, got {mp.num_expert}")

    towers = mc.model_params.task_towers
    if len(towers) < 1:
        fail("model_config.model_params.task_towers", "must list at least one tower")
    names = [t.tower_name for t in towers]
    labels: dict[str, str] = {}
    for i, t in enumerate(towers):
        key = f"model_config.model_params.task_towers[{i}]"
        if names.count(t.tower_name) > 1:
            fail(f"{key}.tower_name", f"{t.tower_name!r} is used by more than one tower")
        if t.label_name in labels:
            fail(f"{key}.label_name", f"({t.tower_name}) label {t.label_name!r} is already used "
                 f"by tower {labels[t.label_name]!r}")
        labels[t.label_name] = t.tower_name
        if t.num_class != 1:
            fail(f"{key}.num_class", f"({t.tower_name}) must be 1 (binary tasks only)")
        check_dnn(f"{key}.dnn", t.dnn, t.tower_name, required=True)
        check_dnn(f"{key}.relation_dnn", t.relation_dnn, t.tower_name)
        check_dnn(f"{key}.output_dnn", t.output_dnn, t.tower_name)
        if t.output_dnn.hidden_units and mc.model_class not in ("AITM", "DBMTL"):
            fail(f"{key}.output_dnn", f"({t.tower_name}) is read by AITM and DBMTL only")
        if t.ait_project_dim < 0:
            fail(f"{key}.ait_project_dim", f"({t.tower_name}) must be >= 0")
        for j, r in enumerate(t.relation_tower_names):
            if r not in names:
                fail(f"{key}.relation_tower_names", f"({t.tower_name}) names unknown tower {r!r}; "
                     f"towers: {', '.join(names)}")
            if r == t.tower_name:
                fail(f"{key}.relation_tower_names", f"({t.tower_name}) names itself")
            if r in t.relation_tower_names[:j]:
                fail(f"{key}.relation_tower_names", f"({t.tower_name}) names tower {r!r} twice")
        if mc.model_class == "ESMM" and len(t.relation_tower_names) > 1:
            fail(f"{key}.relation_tower_names", f"({t.tower_name}) ESMM multiplies along a chain: "
                 f"name at most one earlier tower, got {list(t.relation_tower_names)}")
        if t.calibration_alpha and not t.relation_tower_names:
            fail(f"{key}.losses", f"({t.tower_name}) ORDER_CALIBRATE_LOSS needs relation_tower_names")
        if not any(l.loss_type == "CLASSIFICATION" for l in t.all_losses):
            fail(f"{key}.losses", f"({t.tower_name}) needs a CLASSIFICATION loss")
        if t.weight < 0 or any(l.weight < 0 for l in t.all_losses):
            fail(f"{key}", f"({t.tower_name}) weight and losses[].weight must be >= 0")
    try:
        _ = cfg.schema  # the one place tower indices are resolved; rejects cycles
    except ValueError as e:
        cycle = ", ".join(towers[i].tower_name for i in e.args[0])
        fail("model_config.model_params.task_towers", f"relation_tower_names form a cycle among towers: {cycle}")

    dc = cfg.data_config
    if dc.label_fields and tuple(dc.label_fields) != tuple(t.label_name for t in towers):
        fail("data_config.label_fields", f"{list(dc.label_fields)} must match the towers' "
             f"label_name in order: {[t.label_name for t in towers]}")
    if dc.batch_size < 1:
        fail("data_config.batch_size", "must be >= 1")
    if dc.shuffle_buffer_size < 0:
        fail("data_config.shuffle_buffer_size", "must be >= 0")
    if dc.prefetch_size < 0:
        fail("data_config.prefetch_size", "must be >= 0")
    if dc.eval_batch_size < 0:
        fail("data_config.eval_batch_size", "must be >= 0")
    if dc.input_type == "CSVInput":
        if len(dc.separator) != 1:
            fail("data_config.separator", f"must be one character for CSVInput, got {dc.separator!r}")
        fields = [f.input_name for f in dc.input_fields]
        for col in [f.column for f in features] + [t.label_name for t in towers]:
            if col not in fields:
                fail("data_config.input_fields", f"has no column {col!r} (CSVInput reads only input_fields); "
                     f"columns: {', '.join(fields) or 'none'}")
        if len(set(fields)) != len(fields):
            fail("data_config.input_fields", "names a column twice")
    columns = {f.column: f.name for f in features}
    for label in (t.label_name for t in towers):
        if label in columns:
            fail("data_config.label_fields", f"label {label!r} is also the input of feature {columns[label]!r}")
    if cfg.model_config.embedding_init_scale < 0:
        fail("model_config.embedding_init_scale", "must be >= 0 (0: TorchRec's default per table)")
    if cfg.train_config.num_steps < 0:
        fail("train_config.num_steps", "must be >= 0")
    for side, allowed in (("sparse_optimizer", SPARSE_OPTIMIZERS), ("dense_optimizer", DENSE_OPTIMIZERS)):
        opt = getattr(cfg.train_config, side)
        if opt.name not in allowed:
            fail(f"train_config.{side}.name", f"is {opt.name!r}; allowed: {', '.join(allowed)}")
        if opt.learning_rate <= 0:
            fail(f"train_config.{side}.learning_rate", "must be > 0")

    tc = cfg.train_config
    if tc.keep_checkpoint_max < 0 or tc.save_checkpoints_steps < 0 or tc.log_step_count_steps < 0:
        fail("train_config", "keep_checkpoint_max, save_checkpoints_steps and log_step_count_steps must be >= 0")
    lr = tc.learning_rate_schedule
    if tc.learning_rate_scaling.reference_batch_size < 1:
        fail("train_config.learning_rate_scaling.reference_batch_size", "must be >= 1")
    if lr.warmup_steps < 0 or lr.decay_steps < 0:
        fail("train_config.learning_rate_schedule", "warmup_steps and decay_steps must be >= 0")
    if lr.decay == "exponential" and not lr.decay_steps:
        fail("train_config.learning_rate_schedule.decay_steps", "must be > 0 for exponential decay")
    if not 0 <= lr.min_ratio <= 1 or not 0 <= lr.warmup_start_ratio <= 1 or not 0 < lr.decay_rate <= 1:
        fail("train_config.learning_rate_schedule", "min_ratio and warmup_start_ratio must be in [0, 1], "
             "decay_rate in (0, 1]")
    if cfg.eval_config.every_steps < 0 or cfg.eval_config.num_steps < 0:
        fail("eval_config", "num_steps and every_steps must be >= 0")

    sc = cfg.sharding_config
    if not 0 < sc.cache_load_factor <= 1:
        fail("sharding_config.cache_load_factor", "must be in (0, 1]")
    constraints = [("sharding_config", TableConstraint(sc.sharding_types, sc.compute_kernels))]
    zch_features = {f.name for f in features if f.zch is not None}
    for name, c in sc.tables:
        if name not in seen:
            fail(f"sharding_config.tables.{name}", "names no feature")
        if name in zch_features:
            fail(f"sharding_config.tables.{name}", "is a zch table; zch tables are always row-wise, "
                 "split evenly over the ranks")
        constraints.append((f"sharding_config.tables.{name}", c))
    for key, c in constraints:
        for s in c.sharding_types:
            if s not in SHARDING_TYPES_CUDA:
                fail(f"{key}.sharding_types", f"has {s!r}; allowed: {', '.join(SHARDING_TYPES_CUDA)}")
        for k in c.compute_kernels:
            if k not in COMPUTE_KERNELS:
                fail(f"{key}.compute_kernels", f"has {k!r}; allowed: {', '.join(COMPUTE_KERNELS)}")


def to_dict(cfg: Any) -> Any:
    """The config as plain data (for summaries and checkpoints)."""
    return dataclasses.asdict(cfg)
