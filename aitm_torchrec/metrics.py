"""Metrics: per-task AUC, logloss and calibration, exact across ranks (torchmetrics).

Each rank updates with its own real rows (weight > 0; padding is dropped); ``compute`` gathers
across the default process group, so every rank gets the same whole-eval values.
calibration = mean prediction / mean label (1.0 is perfectly calibrated).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC


class TaskMetrics:
    def __init__(self, tower_names: Sequence[str], device: torch.device | str = "cpu") -> None:
        self.names = list(tower_names)
        self.auc = [BinaryAUROC(thresholds=None).to(device) for _ in self.names]
        self.logloss = [MeanMetric().to(device) for _ in self.names]
        self.pred_sum = [SumMetric().to(device) for _ in self.names]
        self.label_sum = [SumMetric().to(device) for _ in self.names]

    def update(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """logits, labels: B x T; weights: B (0 marks padding)."""
        keep = weights > 0
        logits, labels = logits[keep].float(), labels[keep].float()
        probs = torch.sigmoid(logits)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        for t in range(len(self.names)):
            self.auc[t].update(probs[:, t], labels[:, t].long())
            self.logloss[t].update(bce[:, t])
            self.pred_sum[t].update(probs[:, t].sum())
            self.label_sum[t].update(labels[:, t].sum())

    def compute(self) -> dict[str, dict[str, float]]:
        out = {}
        for t, name in enumerate(self.names):
            labels = float(self.label_sum[t].compute())
            out[name] = {
                "auc": float(self.auc[t].compute()),
                "logloss": float(self.logloss[t].compute()),
                "calibration": float(self.pred_sum[t].compute()) / labels if labels else float("nan"),
            }
        return out
