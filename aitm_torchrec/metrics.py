"""Metrics: per-task AUC, logloss and calibration over all ranks' rows, identical on every rank.

Each rank updates with its own real rows (weight > 0; padding is dropped; a real row counts once).
calibration = mean prediction / mean label (1.0 is perfectly calibrated).

AUC has two forms (``eval_config.auc``):

- **exact**: torchmetrics' ``BinaryAUROC(thresholds=None)``. It keeps every probability and
  label (12 bytes a row per task) and gathers them to every rank: right for small sets, tens of
  GB per rank for a day of impressions (1e8-1e9 rows).
- **binned**: :class:`LogitHistogram`, a fixed-size state per rank: per task and label, the
  count of rows whose logit falls in each of ``BINS`` equal bins over ``[-LOGIT_LIMIT,
  LOGIT_LIMIT]`` (logits outside fall in the end bins). Bins are in logit space because
  recommender probabilities crowd near 0 (a CTR of 1-5 % is a logit of -4.6 to -2.9): equal
  probability bins would put most rows in the first few. Binning is monotone, so a
  (positive, negative) pair in different bins is ordered as the exact AUC orders it, and a pair
  in the same bin counts half, as a tie does in the exact AUC. Equal scores are therefore exact;
  the only error is from distinct scores sharing a bin, at most
  ``0.5 * sum_b pos_b * neg_b / (P * N)`` (:func:`binned_auc_error_bound`, computed from the
  histogram itself; logged when above ``1e-4``). With ``BINS = 65536`` (width 4.9e-4 in logit)
  that bound is 3.2e-5 for scores spread like a CTR model's (1e6 rows, logits ~ N(-3, 1.5),
  labels drawn from them), and the measured error is far below it, 2e-7 (tests/test_metrics.py,
  ``python -m benchmarks eval_memory``). The error is about ``2 * bound * (AUC within a bin -
  0.5)``: it nears the bound only when the model ranks rows by logit differences finer than a
  bin (4.9e-4, a 0.05 % change of the probability), as a barely trained model with near-constant
  scores does.
- **auto** (the default): exact when the eval holds at most ``EXACT_MAX_ROWS`` (1e6) real rows
  over all ranks, binned above. Both states are kept until a rank's own rows pass the limit;
  then that rank drops the exact one (so it holds at most 12 MB per task of it).

Logloss, calibration and the row count are sums; they travel in the same single ``all_reduce``
as the histograms (one collective per ``compute``; the exact form adds torchmetrics' gathers).

Why not a library's bounded AUC: torchmetrics' ``BinaryAUROC(thresholds=n)`` keeps an
``n x 2 x 2`` confusion matrix (bounded) but builds it by comparing every row with every
threshold (O(rows x n) per update: at 65536 thresholds, 1e8 rows are 6.5e12 comparisons), takes
no row weights, and syncs by all-gathering the state. ``torchrec.metrics`` AUC keeps a window of
the last ``window_size`` raw predictions, labels and weights and gathers them: bounded only by
evaluating the last window instead of the whole set, and ties are ordered by the sort, not
counted half. The histogram costs O(rows) (one bin index and one ``index_add_``) and one sum.
One class only (no positives or no negatives): AUC is undefined; both forms return 0.0, as
torchmetrics does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC

log = logging.getLogger(__name__)

AUC_FORMS = ("auto", "exact", "binned")
EXACT_MAX_ROWS = 1_000_000  # auto: exact AUC up to this many real rows over all ranks
BINS = 65536
LOGIT_LIMIT = 16.0  # float32 probabilities clipped to [1e-7, 1 - 1e-7] are logits within +-16.1
BOUND_WARN = 1e-4


class LogitHistogram:
    """Per task, weighted counts of negatives and positives in ``bins`` equal logit bins over
    ``[-limit, limit]``: ``counts`` is T x 2 x bins float64 (index 0 negatives, 1 positives)."""

    def __init__(self, tasks: int, device: torch.device | str = "cpu", bins: int = BINS,
                 limit: float = LOGIT_LIMIT) -> None:
        self.bins, self.limit = bins, limit
        self.scale = bins / (2 * limit)
        self.counts = torch.zeros(tasks, 2, bins, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, positive: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """logits, positive (bool): B x T; weights: B row weights (None: 1 each)."""
        tasks = self.counts.shape[0]
        b = ((logits.float().clamp(-self.limit, self.limit) + self.limit) * self.scale).long().clamp_(0, self.bins - 1)
        offset = torch.arange(tasks, device=b.device) * (2 * self.bins)
        index = (b + positive.long() * self.bins + offset).flatten()
        if weights is None:
            w = torch.ones(index.numel(), dtype=torch.float64, device=b.device)
        else:
            w = weights.to(torch.float64)[:, None].expand(-1, tasks).flatten()
        self.counts.view(-1).index_add_(0, index, w)


def binned_auc(counts: torch.Tensor) -> torch.Tensor:
    """AUC per task from ``LogitHistogram.counts`` (T x 2 x bins): pairs in different bins
    ordered by bin, pairs in the same bin counted half; 0.0 where a task has one class only."""
    neg, pos = counts[:, 0], counts[:, 1]
    below = torch.cumsum(neg, dim=1) - neg
    pairs = pos.sum(1) * neg.sum(1)
    wins = (pos * (below + 0.5 * neg)).sum(1)
    return torch.where(pairs > 0, wins / pairs.clamp_min(1e-300), torch.zeros_like(pairs))


def binned_auc_error_bound(counts: torch.Tensor) -> torch.Tensor:
    """Largest possible |binned - exact| AUC per task: half the share of (positive, negative)
    pairs that share a bin (each counted half; exact counts 0, 1/2 or 1)."""
    neg, pos = counts[:, 0], counts[:, 1]
    pairs = pos.sum(1) * neg.sum(1)
    return torch.where(pairs > 0, 0.5 * (pos * neg).sum(1) / pairs.clamp_min(1e-300), torch.zeros_like(pairs))


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class TaskMetrics:
    """AUC, logloss and calibration per task; ``auc``: one of ``AUC_FORMS`` (module docstring).
    After ``compute``: ``form`` is the AUC form used, ``error_bound`` the binned form's bound per
    task (0.0 for the exact form)."""

    def __init__(self, tower_names: Sequence[str], device: torch.device | str = "cpu", auc: str = "auto",
                 exact_max_rows: int = EXACT_MAX_ROWS, bins: int = BINS) -> None:
        if auc not in AUC_FORMS:
            raise ValueError(f"auc must be one of {AUC_FORMS}, not {auc!r}")
        self.names = list(tower_names)
        self.mode, self.exact_max_rows = auc, exact_max_rows
        tasks = len(self.names)
        self.sums = torch.zeros(tasks, 3, dtype=torch.float64, device=device)  # bce, probability, label
        self.rows = 0  # this rank's real rows
        self.hist = LogitHistogram(tasks, device, bins) if auc != "exact" else None
        self.exact: list[BinaryAUROC] | None = (
            [BinaryAUROC(thresholds=None).to(device) for _ in self.names] if auc != "binned" else None)
        self.form = ""
        self.error_bound: dict[str, float] = {}

    def update(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """logits, labels: B x T; weights: B (0 marks padding); on any device (moved to this one's)."""
        device = self.sums.device
        keep = weights.to(device) > 0
        logits, labels = logits.to(device)[keep].float(), labels.to(device)[keep].float()
        probs = torch.sigmoid(logits)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        self.sums += torch.stack([bce.sum(0, dtype=torch.float64), probs.sum(0, dtype=torch.float64),
                                  labels.sum(0, dtype=torch.float64)], dim=1)
        self.rows += len(logits)
        positive = labels > 0.5
        if self.hist is not None:
            self.hist.update(logits, positive)
        if self.exact is not None and self.mode == "auto" and self.rows > self.exact_max_rows:
            self.exact = None  # past the limit on this rank alone: the total is too, binned it is
        if self.exact is not None:
            for t, m in enumerate(self.exact):
                m.update(probs[:, t], positive[:, t].long())

    def compute(self) -> dict[str, dict[str, float]]:
        tasks = len(self.names)
        parts = [self.sums.flatten(), torch.tensor([float(self.rows)], dtype=torch.float64, device=self.sums.device)]
        if self.hist is not None:
            parts.append(self.hist.counts.flatten())
        state = torch.cat(parts)
        if _world() > 1:
            dist.all_reduce(state)  # the one collective: sums, row count and histograms
        sums, rows = state[:3 * tasks].view(tasks, 3), float(state[3 * tasks])
        exact = self.mode == "exact" or (self.mode == "auto" and rows <= self.exact_max_rows)
        if exact:
            assert self.exact is not None  # auto: every rank's rows <= the total <= the limit
            aucs = [float(m.compute()) for m in self.exact]
            self.form, self.error_bound = "exact", {n: 0.0 for n in self.names}
        else:
            counts = state[3 * tasks + 1:].view(tasks, 2, -1)
            aucs = binned_auc(counts).tolist()
            bounds = binned_auc_error_bound(counts).tolist()
            self.form, self.error_bound = "binned", dict(zip(self.names, bounds))
            for name, bound in self.error_bound.items():
                if bound > BOUND_WARN:
                    log.warning("%s: binned AUC may differ from the exact AUC by up to %.2g "
                                "(scores crowd into few bins; eval_config.auc: exact is exact)", name, bound)
        out = {}
        for t, name in enumerate(self.names):
            bce, prob, label = (float(v) for v in sums[t])
            out[name] = {
                "auc": aucs[t],
                "logloss": bce / rows if rows else float("nan"),
                "calibration": prob / label if label else float("nan"),
            }
        return out
