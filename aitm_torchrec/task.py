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

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from aitm_torchrec.baselines import DBMTL, ESMM, MMoE, SharedBottom
from aitm_torchrec.config import DNN, Config
from aitm_torchrec.data import Batch
from aitm_torchrec.features import embedding_bag_configs
from aitm_torchrec.model import AITM, EmbeddingInput, MLPSpec, TowerSpec


def mlp_spec(dnn: DNN) -> MLPSpec:
    return MLPSpec(tuple(dnn.hidden_units), dnn.dropout_ratio, dnn.use_bn)


def build_model(cfg: Config, device: torch.device | str = "meta",
                dense_device: torch.device | str | None = None) -> EmbeddingInput:
    """The config's model (``model_config.model_class``). Tables on ``device`` (``meta`` for
    sharding), dense layers on ``dense_device`` (default: ``cpu`` when tables are on ``meta``)."""
    if dense_device is None:
        dense_device = "cpu" if str(device) == "meta" else device
    feats = cfg.feature_config.features
    ebc = EmbeddingBagCollection(tables=embedding_bag_configs(feats), device=torch.device(device))
    dense_slices, pos = {}, 0
    for f in feats:
        if f.feature_type == "RawFeature":
            dense_slices[f.name] = (pos, pos + f.raw_input_dim)
            pos += f.raw_input_dim
    mc = cfg.model_config
    mp = mc.model_params
    inputs = dict(ebc=ebc, groups=[g.feature_names for g in mc.feature_groups], dense_slices=dense_slices,
                  backbone=mlp_spec(mc.backbone.mlp))
    index = {t.tower_name: i for i, t in enumerate(cfg.towers)}
    dnns = [mlp_spec(t.dnn) for t in cfg.towers]
    if mc.model_class == "SharedBottom":
        return SharedBottom(**inputs, towers=dnns, device=dense_device)
    if mc.model_class == "ESMM":
        parents = [index[t.relation_tower_names[0]] if t.relation_tower_names else None for t in cfg.towers]
        return ESMM(**inputs, towers=dnns, parents=parents, device=dense_device)
    if mc.model_class == "MMoE":
        return MMoE(**inputs, expert=mlp_spec(mp.expert_dnn), num_expert=mp.num_expert, towers=dnns,
                    device=dense_device)
    towers = [
        TowerSpec(
            dnn=dnn,
            relations=tuple(index[r] for r in t.relation_tower_names),
            use_ait=t.use_ait_module,
            project_dim=t.ait_project_dim,
            transfer=mlp_spec(mp.transfer_mlp),
            relation_dnn=mlp_spec(t.relation_dnn),
            stop_gradient=mp.stop_gradient,
        )
        for t, dnn in zip(cfg.towers, dnns)
    ]
    if mc.model_class == "DBMTL":
        return DBMTL(**inputs, towers=towers, device=dense_device)
    return AITM(**inputs, towers=towers, ait_attention=mp.ait_attention, device=dense_device)


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


def calibration_pairs(cfg: Config) -> list[tuple[int, int, float]]:
    index = {t.tower_name: i for i, t in enumerate(cfg.towers)}
    return [(i, index[r], t.calibration_alpha) for i, t in enumerate(cfg.towers)
            if t.calibration_alpha for r in t.relation_tower_names]


class MultiTaskTrain(nn.Module):
    """Owns the loss. forward(batch) -> (loss, (loss, B x T logits, B x T labels, B weights))."""

    def __init__(self, model: EmbeddingInput, loss: MultiTaskLoss, l2_regularization: float = 0.0,
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
        MultiTaskLoss([t.classification_weight for t in cfg.towers], calibration_pairs(cfg)),
        l2_regularization=mp.l2_regularization,
        embedding_regularization=cfg.model_config.embedding_regularization,
        mixed_precision=cfg.train_config.mixed_precision,
        device_type=torch.device(dense_device or "cpu").type,
    )
