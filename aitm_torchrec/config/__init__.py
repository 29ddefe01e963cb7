"""Config: YAML -> frozen dataclasses, validated once at load.

The vocabulary is EasyRec's (``feature_config.features``, ``model_config.feature_groups``,
``model_params.task_towers``, ``dnn.hidden_units``, ``relation_tower_names`` ...), written as
YAML instead of protobuf text. Every error names the file and the key path, and says what is
allowed. ``load_config(path, overrides)`` is the only entry point; overrides are
``key.path=value`` strings whose values are parsed as YAML (``a.b=[1,2]``, ``x.0.y=true``).

The package imports neither torch nor torchrec, so reading and checking a config is cheap and
works where they are absent. Its parts:

- ``types``: the dataclasses (field names are the YAML keys) and the tuples of allowed names,
- ``loading``: file -> raw mapping -> overrides -> ``build`` (generic, by annotations) -> validate,
- ``validation``: the cross-field checks, one function per section,
- ``errors``: ``ConfigError``.

Everything is imported from here (``from aitm_torchrec.config import Config, load_config``); the
submodules are an arrangement of this one namespace, not separate APIs.
"""

from aitm_torchrec.config.errors import ConfigError
from aitm_torchrec.config.loading import (
    DEFAULT_CONFIG,
    apply_override,
    build,
    build_checked,
    load_config,
    read_raw,
    to_dict,
)
from aitm_torchrec.config.types import (
    COMPUTE_KERNELS,
    DENSE_OPTIMIZERS,
    DNN,
    FEATURE_TYPES,
    LOSS_TYPES,
    MODEL_CLASSES,
    SHARDING_TYPES_CPU,
    SHARDING_TYPES_CUDA,
    SPARSE_OPTIMIZERS,
    Backbone,
    Config,
    Cross,
    DataConfig,
    DotInteraction,
    EvalConfig,
    ExtractionNetwork,
    Feature,
    FeatureConfig,
    FeatureGroup,
    Gauc,
    InputField,
    LearningRateScaling,
    LearningRateSchedule,
    Loss,
    MetricsSet,
    ModelConfig,
    ModelParams,
    Optimizer,
    ShardingConfig,
    TableConstraint,
    TaskEmbeddings,
    TaskTower,
    TrainConfig,
    Zch,
    scaled_learning_rates,
)
from aitm_torchrec.config.validation import validate

# Part of the config vocabulary (a RawFeature's normalizer; the towers' relation order), defined
# with the schema that resolves them.
from aitm_torchrec.schema import Normalizer, topological_order

__all__ = [
    # loading
    "DEFAULT_CONFIG", "load_config", "read_raw", "apply_override", "build", "build_checked", "to_dict",
    # checking
    "ConfigError", "validate",
    # allowed names
    "FEATURE_TYPES", "LOSS_TYPES", "MODEL_CLASSES", "SHARDING_TYPES_CPU", "SHARDING_TYPES_CUDA",
    "COMPUTE_KERNELS", "SPARSE_OPTIMIZERS", "DENSE_OPTIMIZERS",
    # the dataclasses, outermost first
    "Config", "FeatureConfig", "Feature", "Zch", "Normalizer", "ModelConfig", "FeatureGroup", "Backbone",
    "Cross", "DotInteraction", "DNN", "ModelParams", "ExtractionNetwork", "TaskTower", "TaskEmbeddings", "Loss",
    "MetricsSet", "Gauc", "DataConfig", "InputField",
    "TrainConfig",
    "Optimizer", "LearningRateSchedule", "LearningRateScaling", "EvalConfig", "ShardingConfig",
    "TableConstraint",
    # derived
    "scaled_learning_rates", "topological_order",
]
