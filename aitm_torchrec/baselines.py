"""Baselines users compare AITM against: heads over the same input side and backbone.

Each is a head of a ``MultiTaskModel`` (B x H backbone output -> B x T logits), so the train
wrapper, DistributedModelParallel and the train pipeline run them unchanged.

    SharedBottom   logit_t = output_t(tower_t(b))
    ESMM           c_t = output_t(tower_t(b)) [+ w_t] is the logit of P(step t | step r) for t's
                   relation tower r; the output is the logit of the marginal P(step t) = prod of
                   sigmoid(c) along the chain (pCTCVR = pCTR x pCVR), trained on all impressions.
                   The wide part w_t (WIDE groups) joins the conditional logit, so the chain's
                   marginals still only fall along it.
    MMoE           e_i = expert_i(b); g_t = softmax(W_t b + c_t) over experts;
                   logit_t = output_t(tower_t(sum_i g_ti e_i))
    DBMTL          AITM's head with every tower's use_ait false: relation dnn over concat(own, relations)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aitm_torchrec.model import MLP, AITMHead, Device, MLPSpec, TowerSpec
from aitm_torchrec.schema import topological_order

# Marginal probabilities are capped at exp(MAX_LOG_PROB) ~ 1 - 1e-6 so their logits stay finite.
MAX_LOG_PROB = -1e-6


class SharedBottomHead(nn.Module):
    """One tower and output layer per task. forward(b: B x H) -> B x T logits."""

    def __init__(self, in_dim: int, towers: Sequence[MLPSpec], device: Device = None) -> None:
        super().__init__()
        self.towers = nn.ModuleList(MLP(in_dim, s, device) for s in towers)
        self.outputs = nn.ModuleList(nn.Linear(t.out_dim, 1, device=device) for t in self.towers)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([out(tower(b)) for tower, out in zip(self.towers, self.outputs)], dim=1)


def log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_p)) for log_p < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(log_p > -0.6931471805599453, torch.log(-torch.expm1(log_p)),
                       torch.log1p(-torch.exp(log_p)))


def marginal_logits(conditional: torch.Tensor, parents: Sequence[int | None]) -> torch.Tensor:
    """ESMM's chain rule on logits.

    conditional: B x T logits of P(step t | step parents[t]), or of P(step t) where parents[t] is
    None; parents form chains (no cycles). Returns B x T logits of the marginal probabilities
    P(step t) = sigmoid(c_t) * P(step parents[t]), computed in log space.
    """
    conditional = conditional.float()  # log space needs float32 even under autocast
    log_p: list[torch.Tensor | None] = [None] * len(parents)
    out: list[torch.Tensor | None] = [None] * len(parents)
    for t in topological_order([[] if p is None else [p] for p in parents]):
        own = F.logsigmoid(conditional[:, t])
        if parents[t] is None:
            log_p[t], out[t] = own, conditional[:, t]  # already the marginal's logit, exactly
        else:
            log_p[t] = own + log_p[parents[t]]
            lp = log_p[t].clamp(max=MAX_LOG_PROB)
            out[t] = lp - log1mexp(lp)  # logit(p) = log p - log(1 - p)
    return torch.stack(out, dim=1)


class ESMMHead(SharedBottomHead):
    """Entire-space multi-task model (Ma et al., SIGIR 2018), for chains of any length: shared-
    bottom towers whose outputs are conditional logits, chained into marginals.

    ``parents[t]``: the tower whose step must happen before step t (None for a first step).
    forward(b, wide=None) -> B x T logits of the marginal probabilities over all impressions;
    ``wide`` (B x T, the model's wide part) is added to the conditional logits.
    """

    takes_wide = True  # MultiTaskModel passes the wide part in instead of adding it to the output

    def __init__(self, in_dim: int, towers: Sequence[MLPSpec], parents: Sequence[int | None],
                 device: Device = None) -> None:
        if len(parents) != len(towers):
            raise ValueError(f"ESMM needs one parent entry per tower: {len(parents)} for {len(towers)}")
        super().__init__(in_dim, towers, device)
        self.parents = list(parents)

    def conditional_logits(self, b: torch.Tensor) -> torch.Tensor:
        """B x T logits of each step given its parent step."""
        return super().forward(b)

    def forward(self, b: torch.Tensor, wide: torch.Tensor | None = None) -> torch.Tensor:
        conditional = self.conditional_logits(b)
        if wide is not None:
            conditional = conditional + wide
        return marginal_logits(conditional, self.parents)


class MMoEHead(nn.Module):
    """Multi-gate mixture of experts (Ma et al., KDD 2018) over the backbone output.
    forward(b: B x H) -> B x T logits."""

    def __init__(self, in_dim: int, expert: MLPSpec, num_expert: int, towers: Sequence[MLPSpec],
                 device: Device = None) -> None:
        super().__init__()
        self.experts = nn.ModuleList(MLP(in_dim, expert, device) for _ in range(num_expert))
        self.gates = nn.ModuleList(nn.Linear(in_dim, num_expert, device=device) for _ in towers)
        expert_dim = self.experts[0].out_dim
        self.towers = nn.ModuleList(MLP(expert_dim, s, device) for s in towers)
        self.outputs = nn.ModuleList(nn.Linear(t.out_dim, 1, device=device) for t in self.towers)

    def gate_weights(self, b: torch.Tensor) -> torch.Tensor:
        """B x T x E: per task, a softmax over the experts."""
        return torch.stack([torch.softmax(gate(b), dim=1) for gate in self.gates], dim=1)

    def mix(self, b: torch.Tensor) -> torch.Tensor:
        """B x T x D: each task's gated sum of the expert outputs."""
        experts = torch.stack([e(b) for e in self.experts], dim=1)  # B x E x D
        return torch.einsum("bte,bed->btd", self.gate_weights(b), experts)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        mixed = self.mix(b)
        return torch.cat([out(tower(mixed[:, t])) for t, (tower, out) in enumerate(zip(self.towers, self.outputs))],
                         dim=1)


class DBMTLHead(AITMHead):
    """DBMTL (Bayesian-network multi-task): AITM's towers with a relation dnn for every tower
    that has relation towers, never AIT."""

    def __init__(self, in_dim: int, towers: Sequence[TowerSpec], device: Device = None) -> None:
        super().__init__(in_dim, [dataclasses.replace(s, use_ait=False) for s in towers], device=device)
