"""Models by name, and the model built from a config.

Every model is a ``MultiTaskModel`` (input side -> backbone -> head); only the head differs. The
backbone (``build_backbone``) is the config's MLP, with ``backbone.py``'s interaction blocks when
``model_config.backbone`` has them; every head takes its B x H output.
``MODELS`` maps ``model_config.model_class`` to a builder of the head: it takes the schema (tower
order and relations), the config's ``model_params``, the backbone's output width, the device and
the width each tower's input gains (``extra_dims``: the task embeddings, empty without them), and
returns the head (B x H -> B x T logits). Adding a model class is one head class and one entry in
``MODELS``, and its name in ``config.MODEL_CLASSES`` (configs are validated without importing
torch, so the config knows the names on its own; importing this module fails if the two lists
differ). ``build_model(cfg)`` assembles the whole model; it needs no process group, data or
training loop, so scoring and the exports build exactly the model training built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from aitm_torchrec.backbone import DotInteraction, InteractionBackbone, cross_net
from aitm_torchrec.baselines import DBMTLHead, ESMMHead, ExtractionSpec, MMoEHead, PLEHead, SharedBottomHead
from aitm_torchrec.config import MODEL_CLASSES, Config
from aitm_torchrec.model import MLP, AITMHead, Device, MLPSpec, MultiTaskModel, TowerSpec
from aitm_torchrec.schema import Schema
from aitm_torchrec.stem import TaskGate
from aitm_torchrec.zch import build_mc_ebc

HeadBuilder = Callable[[Schema, Any, int, Device, Sequence[int]], nn.Module]


def mlp_spec(dnn: Any) -> MLPSpec:
    """A config ``DNN`` as plain sizes."""
    return MLPSpec(tuple(dnn.hidden_units), dnn.dropout_ratio, dnn.use_bn)


def tower_specs(schema: Schema, params: Any) -> list[TowerSpec]:
    """AITM/DBMTL tower specs: each config tower's sizes with its relations from the schema."""
    return [
        TowerSpec(dnn=mlp_spec(t.dnn), relations=task.relations, use_ait=t.use_ait_module,
                  project_dim=t.ait_project_dim, transfer=mlp_spec(params.transfer_mlp),
                  relation_dnn=mlp_spec(t.relation_dnn), stop_gradient=params.stop_gradient,
                  output=mlp_spec(t.output_dnn))
        for t, task in zip(params.task_towers, schema.tasks)
    ]


def _tower_mlps(params: Any) -> list[MLPSpec]:
    return [mlp_spec(t.dnn) for t in params.task_towers]


def _aitm(schema: Schema, params: Any, in_dim: int, device: Device, extra: Sequence[int] = ()) -> nn.Module:
    return AITMHead(in_dim, tower_specs(schema, params), params.ait_attention, device, extra)


def _dbmtl(schema: Schema, params: Any, in_dim: int, device: Device, extra: Sequence[int] = ()) -> nn.Module:
    return DBMTLHead(in_dim, tower_specs(schema, params), device, extra)


def _esmm(schema: Schema, params: Any, in_dim: int, device: Device, extra: Sequence[int] = ()) -> nn.Module:
    parents = [t.relations[0] if t.relations else None for t in schema.tasks]
    return ESMMHead(in_dim, _tower_mlps(params), parents, device, extra)


def _mmoe(schema: Schema, params: Any, in_dim: int, device: Device, extra: Sequence[int] = ()) -> nn.Module:
    return MMoEHead(in_dim, mlp_spec(params.expert_dnn), params.num_expert, _tower_mlps(params), device, extra)


def _ple(schema: Schema, params: Any, in_dim: int, device: Device, extra: Sequence[int] = ()) -> nn.Module:
    layers = [ExtractionSpec(n.expert_num_per_task, mlp_spec(n.task_expert_net), n.share_num, mlp_spec(n.share_expert_net))
              for n in params.extraction_networks]
    return PLEHead(in_dim, layers, _tower_mlps(params), device, extra)


def _shared_bottom(schema: Schema, params: Any, in_dim: int, device: Device, extra: Sequence[int] = ()) -> nn.Module:
    return SharedBottomHead(in_dim, _tower_mlps(params), device, extra)


MODELS: dict[str, HeadBuilder] = {
    "AITM": _aitm,
    "DBMTL": _dbmtl,
    "ESMM": _esmm,
    "MMoE": _mmoe,
    "PLE": _ple,
    "SharedBottom": _shared_bottom,
}


# Validation lists the allowed model_class values from MODEL_CLASSES: a model added here but not
# there could never be configured, one added there but not here would pass validation and fail
# at build time. Same order too, so the "allowed:" message lists them as MODELS does.
if tuple(MODELS) != MODEL_CLASSES:
    raise RuntimeError(f"registry.MODELS {list(MODELS)} and config.MODEL_CLASSES {list(MODEL_CLASSES)} "
                       "must name the same model classes in the same order")


def build_model(cfg: Config, device: torch.device | str = "meta",
                dense_device: torch.device | str | None = None) -> MultiTaskModel:
    """The config's model (``model_config.model_class``, see ``registry.MODELS``); zch features'
    tables in ``mc_ebc`` (see ``zch.py``), the others in ``ebc``, the wide tables in ``wide_ebc``,
    the task tables (``model_config.task_embeddings``) in ``task_ebc`` with, for ``gate: stem``,
    the ``stem.TaskGate``. Tables on ``device`` (``meta`` for sharding), dense layers on
    ``dense_device`` (default: ``cpu`` when tables are on ``meta``)."""
    if dense_device is None:
        dense_device = "cpu" if str(device) == "meta" else device
    schema, mc = cfg.schema, cfg.model_config
    plain = embedding_bag_configs(cfg, zch=False)
    ebc = EmbeddingBagCollection(tables=plain, device=torch.device(device)) if plain else None
    backbone = build_backbone(schema, mc.backbone, dense_device)
    extra = [schema.task_width] * len(schema.tasks) if schema.task_features else []
    head = MODELS[mc.model_class](schema, mc.model_params, backbone.out_dim, dense_device, extra)
    mc_ebc = build_mc_ebc(schema, device, embedding_bag_configs(cfg, zch=True))
    wide = wide_embedding_bag_configs(cfg)
    wide_ebc = EmbeddingBagCollection(tables=wide, device=torch.device(device)) if wide else None
    # Built after everything else, so a model without them draws the same initial weights as before.
    task = task_embedding_bag_configs(cfg)
    task_ebc = EmbeddingBagCollection(tables=task, device=torch.device(device)) if task else None
    task_gate = None
    if task and mc.task_embeddings.gate == "stem":
        shared = sum(schema.feature_dim(n) for n in schema.task_features)
        task_gate = TaskGate(len(schema.tasks), schema.task_width, shared, dense_device)
    return MultiTaskModel(ebc, schema.groups, schema.dense_slices, backbone, head, mc_ebc,
                          wide_ebc, len(schema.tasks), task_ebc, task_tables(schema), task_gate,
                          [schema.input_slices[n] for n in schema.task_features] if task_gate else ())


def task_tables(schema: Schema) -> list[list[str]]:
    """Per task, the names of its tables, in ``task_features`` order (``Schema.task_tables``)."""
    by_tower: dict[str, list[str]] = {t: [] for t in schema.tower_names}
    for name, (tower, _) in schema.task_tables.items():
        by_tower[tower].append(name)
    return list(by_tower.values()) if schema.task_features else []


def task_embedding_bag_configs(cfg: Config) -> list:
    """The task tables (``Schema.task_embedding_bag_configs``), initialised as the feature tables
    (``embedding_init_scale``; 0: TorchRec's default per table)."""
    tables = cfg.schema.task_embedding_bag_configs()
    s = cfg.model_config.embedding_init_scale
    if not s:
        return tables
    return [dataclasses.replace(t, weight_init_min=-s, weight_init_max=s, init_fn=None) for t in tables]


def build_backbone(schema: Schema, bb: Any, device: Device) -> nn.Module:
    """The config's ``model_config.backbone`` over the model input (``backbone.py``): the plain
    MLP without interaction blocks (the modules and state dict keys a model had before them),
    else an ``InteractionBackbone`` of the MLP, the cross network and the dot products of
    ``dot_interaction.features`` or else ``Schema.deep_sparse`` (their columns of the model input)."""
    mlp = MLP(schema.input_dim, mlp_spec(bb.mlp), device)
    if bb.cross is None and bb.dot_interaction is None:
        return mlp
    cross = cross_net(schema.input_dim, bb.cross.num_layers, bb.cross.low_rank, device) if bb.cross else None
    dot = None
    if bb.dot_interaction is not None:
        slices = schema.input_slices
        names = bb.dot_interaction.features or schema.deep_sparse
        columns = [c for n in names for c in range(*slices[n])]
        dot = DotInteraction(columns, schema.feature_dim(names[0]), bb.dot_interaction.self_interaction, device)
    return InteractionBackbone(mlp, cross, dot, mlp_spec(bb.top_mlp), schema.input_dim, device)


# The wide tables start near zero, so the wide part begins as a small correction to the deep
# logits (the wide-part study's init).
WIDE_INIT_SCALE = 1e-4


def wide_embedding_bag_configs(cfg: Config) -> list:
    """The WIDE groups' tables (``Schema.wide_embedding_bag_configs``), uniform in
    [-WIDE_INIT_SCALE, WIDE_INIT_SCALE] (sharded kernels read weight_init_min/max, an unsharded
    collection the init_fn TorchRec derives from them)."""
    return [dataclasses.replace(t, weight_init_min=-WIDE_INIT_SCALE, weight_init_max=WIDE_INIT_SCALE, init_fn=None)
            for t in cfg.schema.wide_embedding_bag_configs()]


def embedding_bag_configs(cfg: Config, zch: bool | None = None) -> list:
    """The schema's tables (all, or only the zch / only the other ones, see
    ``Schema.embedding_bag_configs``) with the config's initialisation: uniform in [-s, s] for
    ``model_config.embedding_init_scale`` s > 0 (sharded kernels read weight_init_min/max, an
    unsharded collection its init_fn), else TorchRec's default [-sqrt(1/rows), sqrt(1/rows)]."""
    tables = cfg.schema.embedding_bag_configs(zch)
    s = cfg.model_config.embedding_init_scale
    if not s:
        return tables
    return [dataclasses.replace(t, weight_init_min=-s, weight_init_max=s, init_fn=None) for t in tables]
