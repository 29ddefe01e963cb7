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
    PLE            L extraction layers; layer l has E_l experts per task and S_l shared experts.
                   x_t^0 = s^0 = b;  e_tj = expert_tj(x_t^(l-1)), e_sj = shared_j(s^(l-1));
                   x_t^l = sum_j g_tj e_j over task t's and the shared experts,
                           g_t = softmax(W_t x_t^(l-1) + c_t);
                   s^l   = sum_j h_j e_j over every task's and the shared experts,
                           h = softmax(W_s s^(l-1) + c_s)   (not in the last layer);
                   logit_t = output_t(tower_t(x_t^L))
    DBMTL          AITM's head with every tower's use_ait false: relation dnn over concat(own, relations)

Every head takes ``extra_dims`` and ``forward(..., extra=None)`` as ``AITMHead`` does: with task
embeddings (STEM) tower t's input is concat(its shared representation, u_t), where the shared
representation is b (SharedBottom, ESMM), t's expert mixture (MMoE) or t's output of the last
extraction layer (PLE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aitm_torchrec.model import MLP, AITMHead, Device, MLPSpec, TowerSpec, extra_dim, with_extra
from aitm_torchrec.schema import topological_order

# Marginal probabilities are capped at exp(MAX_LOG_PROB) ~ 1 - 1e-6 so their logits stay finite.
MAX_LOG_PROB = -1e-6


class SharedBottomHead(nn.Module):
    """One tower and output layer per task. forward(b: B x H, extra=None) -> B x T logits."""

    def __init__(self, in_dim: int, towers: Sequence[MLPSpec], device: Device = None,
                 extra_dims: Sequence[int] = ()) -> None:
        super().__init__()
        self.towers = nn.ModuleList(MLP(in_dim + extra_dim(extra_dims, t), s, device) for t, s in enumerate(towers))
        self.outputs = nn.ModuleList(nn.Linear(t.out_dim, 1, device=device) for t in self.towers)

    def forward(self, b: torch.Tensor, extra: list[torch.Tensor] | None = None) -> torch.Tensor:
        return torch.cat([out(tower(with_extra(b, extra, t))) for t, (tower, out) in enumerate(zip(self.towers, self.outputs))],
                         dim=1)


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
    forward(b, wide=None, extra=None) -> B x T logits of the marginal probabilities over all
    impressions; ``wide`` (B x T, the model's wide part) is added to the conditional logits.
    """

    takes_wide = True  # MultiTaskModel passes the wide part in instead of adding it to the output

    def __init__(self, in_dim: int, towers: Sequence[MLPSpec], parents: Sequence[int | None],
                 device: Device = None, extra_dims: Sequence[int] = ()) -> None:
        if len(parents) != len(towers):
            raise ValueError(f"ESMM needs one parent entry per tower: {len(parents)} for {len(towers)}")
        super().__init__(in_dim, towers, device, extra_dims)
        self.parents = list(parents)

    def conditional_logits(self, b: torch.Tensor, extra: list[torch.Tensor] | None = None) -> torch.Tensor:
        """B x T logits of each step given its parent step."""
        return super().forward(b, extra)

    def forward(self, b: torch.Tensor, wide: torch.Tensor | None = None,
                extra: list[torch.Tensor] | None = None) -> torch.Tensor:
        conditional = self.conditional_logits(b, extra)
        if wide is not None:
            conditional = conditional + wide
        return marginal_logits(conditional, self.parents)


class MMoEHead(nn.Module):
    """Multi-gate mixture of experts (Ma et al., KDD 2018) over the backbone output.
    forward(b: B x H, extra=None) -> B x T logits."""

    def __init__(self, in_dim: int, expert: MLPSpec, num_expert: int, towers: Sequence[MLPSpec],
                 device: Device = None, extra_dims: Sequence[int] = ()) -> None:
        super().__init__()
        self.experts = nn.ModuleList(MLP(in_dim, expert, device) for _ in range(num_expert))
        self.gates = nn.ModuleList(nn.Linear(in_dim, num_expert, device=device) for _ in towers)
        expert_dim = self.experts[0].out_dim
        self.towers = nn.ModuleList(MLP(expert_dim + extra_dim(extra_dims, t), s, device) for t, s in enumerate(towers))
        self.outputs = nn.ModuleList(nn.Linear(t.out_dim, 1, device=device) for t in self.towers)

    def gate_weights(self, b: torch.Tensor) -> torch.Tensor:
        """B x T x E: per task, a softmax over the experts."""
        return torch.stack([torch.softmax(gate(b), dim=1) for gate in self.gates], dim=1)

    def mix(self, b: torch.Tensor) -> torch.Tensor:
        """B x T x D: each task's gated sum of the expert outputs."""
        experts = torch.stack([e(b) for e in self.experts], dim=1)  # B x E x D
        return torch.einsum("bte,bed->btd", self.gate_weights(b), experts)

    def forward(self, b: torch.Tensor, extra: list[torch.Tensor] | None = None) -> torch.Tensor:
        mixed = self.mix(b)
        return torch.cat([out(tower(with_extra(mixed[:, t], extra, t)))
                          for t, (tower, out) in enumerate(zip(self.towers, self.outputs))], dim=1)


@dataclasses.dataclass(frozen=True)
class ExtractionSpec:
    """Plain sizes of one PLE extraction layer: ``task_experts`` experts per task (each
    ``task_expert``) and ``shared_experts`` shared ones (each ``shared_expert``), all ending in
    the same width."""

    task_experts: int
    task_expert: MLPSpec
    shared_experts: int = 0
    shared_expert: MLPSpec = MLPSpec()


def gated_sum(scores: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """softmax(scores: B x E) over the E experts, times their outputs (E x [B x D]) -> B x D."""
    # Broadcast multiply and sum, as in AIT: with a few experts an einsum runs as B tiny GEMMs.
    return (torch.softmax(scores, dim=1).unsqueeze(-1) * torch.stack(list(experts), dim=1)).sum(1)


class ExtractionLayer(nn.Module):
    """One PLE extraction layer (a CGC block): experts per task and shared experts; task t's gate,
    from task t's input, mixes task t's experts and the shared ones; the shared gate, from the
    shared input, mixes every expert into the next layer's shared input (``shared_gate`` false:
    the last layer, which has none).

    forward(tasks: T x [B x in_dim], shared: B x in_dim) -> (T x [B x out_dim], B x out_dim or None).
    """

    def __init__(self, in_dim: int, spec: ExtractionSpec, num_tasks: int, shared_gate: bool,
                 device: Device = None) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList(
            nn.ModuleList(MLP(in_dim, spec.task_expert, device) for _ in range(spec.task_experts))
            for _ in range(num_tasks))
        self.shared_experts = nn.ModuleList(MLP(in_dim, spec.shared_expert, device)
                                            for _ in range(spec.shared_experts))
        own = spec.task_experts + spec.shared_experts
        self.task_gates = nn.ModuleList(nn.Linear(in_dim, own, device=device) for _ in range(num_tasks))
        every = num_tasks * spec.task_experts + spec.shared_experts
        # None in the last layer: a plain attribute, no parameters
        self.shared_gate = nn.Linear(in_dim, every, device=device) if shared_gate else None
        self.out_dim = self.task_experts[0][0].out_dim
        if any(e.out_dim != self.out_dim for e in self.shared_experts):
            raise ValueError(f"PLE's shared experts must end in the task experts' width {self.out_dim}")

    def forward(self, tasks: list[torch.Tensor], shared: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        shared_out = [e(shared) for e in self.shared_experts]
        task_out = [[e(x) for e in experts] for experts, x in zip(self.task_experts, tasks)]
        mixed = [gated_sum(gate(x), own + shared_out) for gate, x, own in zip(self.task_gates, tasks, task_out)]
        if self.shared_gate is None:
            return mixed, None
        return mixed, gated_sum(self.shared_gate(shared), [e for own in task_out for e in own] + shared_out)


class PLEHead(nn.Module):
    """Progressive layered extraction (Tang et al., RecSys 2020) over the backbone output: a
    stack of extraction layers, then one tower and output layer per task on the task's output of
    the last layer. Every input of the first layer is b. As in EasyRec's PLE, the gates are a
    Linear (with bias) and a softmax over the layer input, the last layer has no shared gate, and
    a layer may have no shared experts (EasyRec's default ``share_num`` 0, which its last layer
    often keeps: then task t's last gate mixes only task t's experts, where the paper also mixes
    the shared ones). forward(b: B x H, extra=None) -> B x T logits.
    """

    def __init__(self, in_dim: int, layers: Sequence[ExtractionSpec], towers: Sequence[MLPSpec],
                 device: Device = None, extra_dims: Sequence[int] = ()) -> None:
        super().__init__()
        if not layers:
            raise ValueError("PLE needs at least one extraction layer")
        self.layers = nn.ModuleList()
        for i, spec in enumerate(layers):
            layer = ExtractionLayer(in_dim, spec, len(towers), shared_gate=i < len(layers) - 1, device=device)
            self.layers.append(layer)
            in_dim = layer.out_dim
        self.towers = nn.ModuleList(MLP(in_dim + extra_dim(extra_dims, t), s, device) for t, s in enumerate(towers))
        self.outputs = nn.ModuleList(nn.Linear(t.out_dim, 1, device=device) for t in self.towers)

    def forward(self, b: torch.Tensor, extra: list[torch.Tensor] | None = None) -> torch.Tensor:
        tasks, shared = [b] * len(self.towers), b
        for layer in self.layers:
            tasks, shared = layer(tasks, shared)
        return torch.cat([out(tower(with_extra(x, extra, t)))
                          for t, (x, tower, out) in enumerate(zip(tasks, self.towers, self.outputs))], dim=1)


class DBMTLHead(AITMHead):
    """DBMTL (Bayesian-network multi-task): AITM's towers with a relation dnn for every tower
    that has relation towers, never AIT."""

    def __init__(self, in_dim: int, towers: Sequence[TowerSpec], device: Device = None,
                 extra_dims: Sequence[int] = ()) -> None:
        super().__init__(in_dim, [dataclasses.replace(s, use_ait=False) for s in towers], device=device,
                         extra_dims=extra_dims)
