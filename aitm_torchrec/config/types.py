"""The config's types: frozen dataclasses whose field names are the YAML keys, and the allowed values.

A ``Config`` is the whole file; each field's type is what the YAML value must be (``loading.build``
reads the annotations: a dataclass is a mapping, ``tuple[X, ...]`` a list (or one scalar), a
``Literal`` one of its values, ``X | None`` also accepts null); its default applies when the key is
absent, and a field without a default is required. The comments beside the fields say what each
key means. Cross-field rules (what must be > 0, which names must exist) are ``validation``'s.

The tuples of allowed names (``MODEL_CLASSES``, ``SHARDING_TYPES_CPU`` ...) are the vocabulary that
``validation`` checks against and the rest of the library reads. Nothing here imports torch:
``Config.schema`` builds the resolved ``Schema``, which imports torchrec only when asked for tables.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

from aitm_torchrec.schema import Normalizer, Schema

FEATURE_TYPES = ("IdFeature", "TagFeature", "RawFeature")
LOSS_TYPES = ("CLASSIFICATION", "ORDER_CALIBRATE_LOSS")
SHARDING_TYPES_CPU = ("data_parallel", "table_wise", "column_wise", "table_column_wise")
SHARDING_TYPES_CUDA = SHARDING_TYPES_CPU + ("row_wise", "table_row_wise")
COMPUTE_KERNELS = ("dense", "fused", "fused_uvm", "fused_uvm_caching", "key_value")
# adam: FBGEMM fused on CUDA, TorchRec dense kernel + torch Adam on CPU; partial_rowwise_adam: CUDA only
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam", "partial_rowwise_adam")
DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
# The wide tables' learning rate when train_config.wide_optimizer is not given (the sparse
# optimizer otherwise): the best of the wide-part study (docs/benchmarks.md, "Studies").
WIDE_LEARNING_RATE = 0.05
# The model_config.model_class names, here so that validating a config needs no torch;
# registry.MODELS (torch) must have exactly these keys, in this order, and checks so at import.
MODEL_CLASSES = ("AITM", "DBMTL", "ESMM", "MMoE", "PLE", "SharedBottom")


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
    """DEEP: the features' embeddings (and raw values) are concatenated, in order, into the model
    input. WIDE: each listed id feature gets a wide table of its own (``wide_<feature>``, a column
    per task), whose pooled column t is added to task t's logit (docs/model.md, "The wide part")."""

    group_name: str
    feature_names: tuple[str, ...]
    wide_deep: Literal["DEEP", "WIDE"] = "DEEP"


@dataclass(frozen=True)
class DNN:
    """An MLP block: Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden size."""

    hidden_units: tuple[int, ...] = ()
    dropout_ratio: float = 0.0  # after every layer's activation
    use_bn: bool = False  # EasyRec's DNN defaults to true


@dataclass(frozen=True)
class Cross:
    """DCN-v2's cross network over the model input (EasyRec backbone block ``Cross``, stacked
    ``num_layers`` times as its ``recurrent`` block does): x_{l+1} = x_0 * (W_l x_l + b_l) + x_l."""

    num_layers: int = 1
    low_rank: int = 0  # 0: full-rank W_l (TorchRec CrossNet); r > 0: W_l = U_l V_l of rank r (LowRankCrossNet)


@dataclass(frozen=True)
class DotInteraction:
    """DLRM's pairwise dot products of the DEEP groups' sparse features' pooled embeddings (EasyRec
    backbone block ``DotInteraction``), or of the ``features`` named; they must share one embedding_dim."""

    self_interaction: bool = False  # also each feature's dot product with itself
    features: tuple[str, ...] = ()  # the sparse features dotted, in this order; empty: every DEEP one


@dataclass(frozen=True)
class Backbone:
    """Shared layers over the concatenated feature groups (EasyRec's backbone): the ``mlp`` block,
    and optionally interaction blocks beside it, b = top_mlp(concat(mlp(v), cross(v), dot)) (docs/model.md)."""

    mlp: DNN = DNN()
    cross: Cross | None = None  # none: no cross network
    dot_interaction: DotInteraction | None = None  # none: no dot products
    top_mlp: DNN = DNN()  # over the concatenation; only with cross or dot_interaction


@dataclass(frozen=True)
class Loss:
    loss_type: Literal["CLASSIFICATION", "ORDER_CALIBRATE_LOSS"] = "CLASSIFICATION"
    weight: float = 1.0  # for ORDER_CALIBRATE_LOSS this is alpha


@dataclass(frozen=True)
class Gauc:
    """Group AUC (EasyRec's GAUC): per user, the AUC of that user's rows; users whose rows are all
    one class are skipped; the mean over users, weighted by ``reduction`` (aitm_torchrec/gauc.py)."""

    uid_field: str  # the input column whose raw values (not hashed buckets) name the users
    # mean_by_sample_num: weighted by the user's rows; mean: one per user (EasyRec's default);
    # mean_by_positive_num: weighted by the user's positive rows
    reduction: Literal["mean_by_sample_num", "mean", "mean_by_positive_num"] = "mean_by_sample_num"


@dataclass(frozen=True)
class MetricsSet:
    """One entry of a tower's ``metrics_set``: ``{auc: {}}`` or ``{gauc: {uid_field: COL}}``."""

    auc: dict | None = None
    gauc: Gauc | None = None


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
class ExtractionNetwork:
    """One PLE extraction layer (EasyRec ple.proto ``ExtractionNetwork``): experts per task and
    shared experts, mixed by per-task gates and (but in the last layer) a shared gate."""

    network_name: str
    expert_num_per_task: int
    task_expert_net: DNN  # each task expert's MLP
    share_num: int = 0  # shared experts; EasyRec's default 0 (its last layer often sets none)
    share_expert_net: DNN = DNN()  # each shared expert's MLP; required when share_num > 0


@dataclass(frozen=True)
class ModelParams:
    task_towers: tuple[TaskTower, ...]
    l2_regularization: float = 0.0
    ait_attention: Literal["self", "cross"] = "self"  # self: the paper; cross: EasyRec (own tower queries)
    stop_gradient: bool = False  # detach what a tower receives from its relation towers
    transfer_mlp: DNN = DNN()  # hidden layers of the transfer MLP, before its output layer
    num_expert: int = 3  # MMoE
    expert_dnn: DNN = DNN()  # MMoE, required there
    extraction_networks: tuple[ExtractionNetwork, ...] = ()  # PLE, required there


@dataclass(frozen=True)
class TaskEmbeddings:
    """STEM's task-specific embeddings (Su et al., AAAI 2024): every task (tower) gets its own
    table (``task_<tower>_<feature>``) of each listed feature beside the shared one, read into its
    tower's input; ``gate: stem`` mixes every task's embeddings into each tower's, with gradient
    only to the tower's own (docs/model.md, "Task-specific embeddings")."""

    features: tuple[str, ...]  # sparse features of the DEEP groups, each once
    embedding_dim: int = 16  # columns of every task table (a multiple of 4, as FBGEMM's kernels take)
    gate: Literal["none", "stem"] = "none"  # none: each tower reads its own; stem: the all-forward gate


@dataclass(frozen=True)
class ModelConfig:
    feature_groups: tuple[FeatureGroup, ...]
    model_params: ModelParams
    model_class: str = "AITM"  # one of MODEL_CLASSES (= registry.MODELS' keys)
    model_name: str = ""
    backbone: Backbone = Backbone()
    embedding_regularization: float = 0.0
    # Feature (and task) tables start uniform in [-s, s]; 0: TorchRec's default [-sqrt(1/rows),
    # sqrt(1/rows)] per table (wide tables: registry.WIDE_INIT_SCALE).
    embedding_init_scale: float = 0.0
    task_embeddings: TaskEmbeddings | None = None  # none: every task reads the shared tables only


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
    beta1: float = 0.9  # adam, partial_rowwise_adam
    beta2: float = 0.999


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
    # One-epoch quality on the synthetic Taobao set (docs/benchmarks.md, "Studies"): a lower table
    # rate and an eps near a rare row's gradient scale keep one noisy example from moving a row far.
    sparse_optimizer: Optimizer = Optimizer("rowwise_adagrad", 0.01, eps=1e-5)
    dense_optimizer: Optimizer = Optimizer("adam", 3e-3)
    # The WIDE groups' tables; none: sparse_optimizer at WIDE_LEARNING_RATE (wide_tables_optimizer).
    wide_optimizer: Optimizer | None = None
    learning_rate_schedule: LearningRateSchedule = LearningRateSchedule()
    learning_rate_scaling: LearningRateScaling = LearningRateScaling()
    log_step_count_steps: int = 50
    save_checkpoints_steps: int = 0  # 0 -> only at the end
    keep_checkpoint_max: int = 5  # 0 -> keep all
    # autocast dtype of the dense layers; auto: bf16 on CUDA with bf16 and on CPUs with AMX, else
    # none (aitm_torchrec/precision.py)
    mixed_precision: Literal["auto", "none", "bf16", "fp16"] = "auto"
    nonfinite_policy: Literal["stop", "skip"] = "stop"  # a non-finite loss/gradient: stop, or skip the batch
    # EasyRec's key: the dense parameters' gradients are scaled so their global L2 norm is at most
    # this before the dense optimizer's step; 0: no clipping (the tables' fused updates are not clipped)
    gradient_clipping_by_norm: float = 0.0
    seed: int = 2021

    @property
    def wide_tables_optimizer(self) -> Optimizer:
        """The optimizer of the wide tables: ``wide_optimizer``, else ``sparse_optimizer`` with
        learning rate ``WIDE_LEARNING_RATE``."""
        if self.wide_optimizer is not None:
            return self.wide_optimizer
        return dataclasses.replace(self.sparse_optimizer, learning_rate=WIDE_LEARNING_RATE)


@dataclass(frozen=True)
class EvalConfig:
    num_steps: int = 0  # 0 -> the whole eval input
    every_steps: int = 0  # also evaluate every N training steps; 0 -> only at the end
    # AUC: exact (every score kept and gathered), binned (a fixed-size logit histogram per rank,
    # summed across ranks), or auto: exact up to metrics.EXACT_MAX_ROWS rows over all ranks
    auc: Literal["auto", "exact", "binned"] = "auto"


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
    """``cfg`` with every optimizer's rate (sparse, dense and the wide tables') multiplied by
    ``learning_rate_scaling``'s factor for the global batch ``data_config.batch_size`` x
    ``world_size`` (unchanged for rule ``none``)."""
    tc = cfg.train_config
    factor = tc.learning_rate_scaling.factor(cfg.data_config.batch_size * world_size)
    if factor == 1.0:
        return cfg
    opts = {side: dataclasses.replace(getattr(tc, side), learning_rate=getattr(tc, side).learning_rate * factor)
            for side in ("sparse_optimizer", "dense_optimizer")}
    wide = tc.wide_tables_optimizer
    opts["wide_optimizer"] = dataclasses.replace(wide, learning_rate=wide.learning_rate * factor)
    return dataclasses.replace(cfg, train_config=dataclasses.replace(tc, **opts))
