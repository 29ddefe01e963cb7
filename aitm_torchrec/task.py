"""Task: the multi-task loss and the train wrapper around the model (``registry.build_model``).

The wrapper ``MultiTaskTrain`` owns the loss and follows TorchRec's
train-pipeline contract: ``forward(batch) -> (loss, (loss, logits, labels, weights))``, all
detached but the first.

    L = sum_t weight_t * BCE_t                                   (weighted mean over real rows;
                                                                  weight_t: tower x CLASSIFICATION weight)
      + sum_t alpha_t * mean( sum_{r in relations(t)} max(p_t - p_r, 0) )   ORDER_CALIBRATE_LOSS
      + l2_regularization * sum ||dense kernel||^2 / 2
      + embedding_regularization * ||pooled embeddings of this batch's rows||^2 / 2   (EasyRec: a sum;
                                                                  the task embeddings' too)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aitm_torchrec.config import Config
from aitm_torchrec.data import Batch
from aitm_torchrec.model import MultiTaskModel
from aitm_torchrec.precision import AUTOCAST_DTYPES, resolve
from aitm_torchrec.registry import build_model


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
        """``mixed_precision``: "none", "bf16" or "fp16" (resolved: ``precision.resolve``): autocast
        dtype of the dense layers (tables, loss and optimizer states stay fp32); ``device_type``
        of the dense layers."""
        super().__init__()
        self.model = model
        self.loss_fn = loss
        self.l2 = l2_regularization
        self.emb_reg = embedding_regularization
        self.kernels = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
        self.autocast_dtype = AUTOCAST_DTYPES[mixed_precision]
        self.device_type = device_type

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x, emb = self.model.embed(batch.dense, batch.sparse)
        wide = self.model.wide_logits(batch.sparse)  # fp32 table lookups, outside autocast
        task = self.model.task_embeddings(batch.sparse)  # the same
        with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self.model.predict(x, wide, task)
        logits = logits.float()
        loss = self.loss_fn(logits, batch.labels, batch.weights)
        if self.l2:
            loss = loss + self.l2 * sum(w.pow(2).sum() for w in self.kernels) / 2
        if self.emb_reg:
            # Only the rows this batch looked up (pooled), never whole tables.
            if task is not None:
                emb = torch.cat([emb, *task], dim=1)
            loss = loss + self.emb_reg * (emb.pow(2).sum(1) * batch.weights).sum() / 2
        return loss, (loss.detach(), logits.detach(), batch.labels.detach(), batch.weights.detach())


def build_train_module(cfg: Config, device: torch.device | str = "meta",
                       dense_device: torch.device | str | None = None) -> MultiTaskTrain:
    """The train wrapper; ``train_config.mixed_precision`` auto is resolved for ``dense_device``
    here (``train.run`` passes the value its ranks agreed on)."""
    mp = cfg.model_config.model_params
    dense_type = torch.device(dense_device or "cpu").type
    return MultiTaskTrain(
        build_model(cfg, device, dense_device),
        MultiTaskLoss([t.classification_weight for t in cfg.schema.tasks], cfg.schema.calibration_pairs),
        l2_regularization=mp.l2_regularization,
        embedding_regularization=cfg.model_config.embedding_regularization,
        mixed_precision=resolve(cfg.train_config.mixed_precision, dense_type).resolved,
        device_type=dense_type,
    )
