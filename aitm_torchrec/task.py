"""Task: the model built from a config, the multi-task loss, and the train wrapper.

``build_model(cfg)`` needs no process group, data or training loop: scoring and export jobs call
it exactly as training does. The wrapper ``MultiTaskTrain`` owns the loss and follows TorchRec's
train-pipeline contract: ``forward(batch) -> (loss, (loss, logits, labels, weights))``, all
detached but the first.

    L = sum_t weight_t * BCE_t                                   (weighted mean over real rows;
                                                                  weight_t: tower x CLASSIFICATION weight)
      + sum_t alpha_t * mean( sum_{r in relations(t)} max(p_t - p_r, 0) )   ORDER_CALIBRATE_LOSS
      + l2_regularization * sum ||dense kernel||^2 / 2
      + embedding_regularization * ||pooled embeddings of this batch's rows||^2 / 2   (EasyRec: a sum)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from aitm_torchrec.config import Config
from aitm_torchrec.data import Batch
from aitm_torchrec.model import MLP, MultiTaskModel
from aitm_torchrec.registry import MODELS, mlp_spec
from aitm_torchrec.zch import build_mc_ebc


def build_model(cfg: Config, device: torch.device | str = "meta",
                dense_device: torch.device | str | None = None) -> MultiTaskModel:
    """The config's model (``model_config.model_class``, see ``registry.MODELS``); zch features'
    tables in ``mc_ebc`` (see ``zch.py``), the others in ``ebc``. Tables on
    ``device`` (``meta`` for sharding), dense layers on ``dense_device`` (default: ``cpu`` when
    tables are on ``meta``)."""
    if dense_device is None:
        dense_device = "cpu" if str(device) == "meta" else device
    schema, mc = cfg.schema, cfg.model_config
    plain = embedding_bag_configs(cfg, zch=False)
    ebc = EmbeddingBagCollection(tables=plain, device=torch.device(device)) if plain else None
    backbone = MLP(schema.input_dim, mlp_spec(mc.backbone.mlp), dense_device)
    head = MODELS[mc.model_class](schema, mc.model_params, backbone.out_dim, dense_device)
    mc_ebc = build_mc_ebc(schema, device, embedding_bag_configs(cfg, zch=True))
    return MultiTaskModel(ebc, schema.groups, schema.dense_slices, backbone, head, mc_ebc)


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


class MultiTaskLoss(nn.Module):
    """Weighted BCE per task + order calibration. Inputs: B x T logits, B x T labels, B weights."""

    def __init__(self, task_weights: Sequence[float], calibrations: Sequence[tuple[int, int, float]]) -> None:
        super().__init__()
        self.register_buffer("task_weights", torch.tensor(list(task_weights), dtype=torch.float32), persistent=False)
        self.calibrations = list(calibrations)  # (later task t, earlier task r, alpha)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        denom = weights.sum().clamp_min(1.0)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # B x T
        loss = ((bce * weights[:, None]).sum(0) / denom * self.task_weights.to(logits.device)).sum()
        if self.calibrations:
            p = torch.sigmoid(logits)
            for t, r, alpha in self.calibrations:
                loss = loss + alpha * (F.relu(p[:, t] - p[:, r]) * weights).sum() / denom
        return loss


class MultiTaskTrain(nn.Module):
    """Owns the loss. forward(batch) -> (loss, (loss, B x T logits, B x T labels, B weights))."""

    def __init__(self, model: MultiTaskModel, loss: MultiTaskLoss, l2_regularization: float = 0.0,
                 embedding_regularization: float = 0.0, mixed_precision: str = "none",
                 device_type: str = "cpu") -> None:
        """``mixed_precision``: "none", "bf16" or "fp16": autocast dtype of the dense layers
        (tables, loss and optimizer states stay fp32); ``device_type`` of the dense layers."""
        super().__init__()
        self.model = model
        self.loss_fn = loss
        self.l2 = l2_regularization
        self.emb_reg = embedding_regularization
        self.kernels = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
        self.autocast_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
        self.device_type = device_type

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x, emb = self.model.embed(batch.dense, batch.sparse)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self.model.predict(x)
        logits = logits.float()
        loss = self.loss_fn(logits, batch.labels, batch.weights)
        if self.l2:
            loss = loss + self.l2 * sum(w.pow(2).sum() for w in self.kernels) / 2
        if self.emb_reg:
            # Only the rows this batch looked up (pooled), never whole tables.
            loss = loss + self.emb_reg * (emb.pow(2).sum(1) * batch.weights).sum() / 2
        return loss, (loss.detach(), logits.detach(), batch.labels.detach(), batch.weights.detach())


def build_train_module(cfg: Config, device: torch.device | str = "meta",
                       dense_device: torch.device | str | None = None) -> MultiTaskTrain:
    mp = cfg.model_config.model_params
    return MultiTaskTrain(
        build_model(cfg, device, dense_device),
        MultiTaskLoss([t.classification_weight for t in cfg.schema.tasks], cfg.schema.calibration_pairs),
        l2_regularization=mp.l2_regularization,
        embedding_regularization=cfg.model_config.embedding_regularization,
        mixed_precision=cfg.train_config.mixed_precision,
        device_type=torch.device(dense_device or "cpu").type,
    )
