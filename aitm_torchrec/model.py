"""Model: AITM (Xi et al., KDD 2021) over an EmbeddingBagCollection.

    v      = concat(pooled embeddings and raw values of the feature groups)
    b      = backbone(v)                                  shared MLP (may be empty; + cross / dots: backbone.py)
    q_t    = tower_t(b)                                   one MLP per task
    p_rt   = transfer_rt(z_r)                             for each relation tower r of t
    z_t    = AIT([q_t] + [p_rt for r]) if use_ait and t has relation towers
           = relation_dnn_t(concat(q_t, z_r for r))       if not use_ait (DBMTL)
           = q_t                                          if t has no relation towers
    logit_t= output_t(output_dnn_t(z_t))                  output_dnn_t: an MLP, empty unless configured
           + w_t                                          with a wide part (WIDE feature groups)
    w_t    = sum over wide features f of column t of f's pooled wide table row(s)

With task-specific embeddings (STEM, ``task_embeddings``) tower t reads concat(b, u_t) instead of
b: u_t = e_t, task t's own tables' pooled rows of the listed features (B x F*d), or with the stem
gate u_t = s_t, the gated mix of every task's e_k (``stem.py``).

AIT scores each candidate u: ``self`` (the paper, its official code):
s_u = <h2(u), h3(u)> / sqrt(k); ``cross`` (EasyRec): s_u = <h2(q_t), h3(u)> / sqrt(k). Then
w = softmax over candidates, z_t = sum_u w_u h1(u). h1, h2, h3 are bias-free maps to k dims.

Towers may form a DAG (``relations``); they run in a topological order. Every model is a
``MultiTaskModel``: the shared input side (an EmbeddingBagCollection, usually built on ``meta``,
and the dense block), a backbone MLP, and a head that takes the B x H backbone output, so heads
are testable without tables. ``AITMHead`` is here; the baselines' heads are in ``baselines.py``;
``registry.py`` maps ``model_class`` to a head. The wide part (``wide_ebc``, its own
EmbeddingBagCollection) is added to every head's logits here, after the head; a head whose
logits are not its tasks' own (ESMM: marginals of a chain) sets ``takes_wide`` and adds it
inside (``forward(b, wide)``). The task embeddings (``task_ebc``, another collection, and the
optional ``task_gate``) reach the heads as a per-task extra input: every head takes ``extra_dims``
(the width each tower's input gains) and ``forward(b, ..., extra=None)`` (T x [B x extra_dims[t]]),
concatenated to each tower's input (``with_extra``); without them the heads are as before, state
dict and output alike. Nothing here knows of distribution, files or logging:
DistributedModelParallel shards the model from outside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, get_embedding_names_by_table
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from aitm_torchrec.schema import topological_order

Device = torch.device | str | None

# The wide part's EmbeddingBagCollection: its attribute name on MultiTaskModel, which sharding
# (its own table optimizer) and the checkpoint keys (``...wide_ebc.embedding_bags.<t>.weight``) use.
WIDE_EBC = "wide_ebc"
# The task-specific embeddings' EmbeddingBagCollection (``...task_ebc.embedding_bags.<t>.weight``).
TASK_EBC = "task_ebc"


def extra_dim(extra_dims: Sequence[int], t: int) -> int:
    """Width task t's tower input gains (``extra_dims`` empty: none)."""
    return extra_dims[t] if extra_dims else 0


def with_extra(x: torch.Tensor, extra: Sequence[torch.Tensor] | None, t: int) -> torch.Tensor:
    """Task t's tower input: ``x`` (B x D), with task t's extra input concatenated (B x (D + E_t))."""
    return x if extra is None else torch.cat([x, extra[t]], dim=1)


@dataclass(frozen=True)
class MLPSpec:
    """Plain sizes of an MLP: hidden sizes, dropout ratio after each activation, batch norm."""

    hidden_units: tuple[int, ...] = ()
    dropout: float = 0.0
    batch_norm: bool = False


class MLP(nn.Sequential):
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden size. B x in_dim -> B x out_dim
    (the last hidden size; in_dim when there are none, as the identity)."""

    def __init__(self, in_dim: int, spec: MLPSpec, device: Device = None) -> None:
        layers: list[nn.Module] = []
        for units in spec.hidden_units:
            layers.append(nn.Linear(in_dim, units, device=device))
            if spec.batch_norm:
                layers.append(nn.BatchNorm1d(units, device=device))
            layers.append(nn.ReLU(inplace=True))  # on the layer's own output; dense fwd + bwd 4-6% faster
            if spec.dropout:
                layers.append(nn.Dropout(spec.dropout))
            in_dim = units
        super().__init__(*layers)
        self.out_dim = in_dim


class AIT(nn.Module):
    """Adaptive information transfer: attention over a tower's own and transferred vectors.

    Args: dim: D of every candidate; project_dim: k. ``attention``: "self" or "cross".
    forward(candidates: B x C x D, own index 0) -> B x k.
    """

    def __init__(self, dim: int, project_dim: int, attention: Literal["self", "cross"] = "self",
                 device: Device = None) -> None:
        super().__init__()
        if attention not in ("self", "cross"):
            raise ValueError(f"AIT attention must be 'self' or 'cross', got {attention!r}")
        self.h1 = nn.Linear(dim, project_dim, bias=False, device=device)
        self.h2 = nn.Linear(dim, project_dim, bias=False, device=device)
        self.h3 = nn.Linear(dim, project_dim, bias=False, device=device)
        self.attention = attention
        self.scale = 1.0 / math.sqrt(project_dim)

    def weights(self, candidates: torch.Tensor) -> torch.Tensor:
        """B x C attention weights (softmax over the C candidates; candidate 0 is the own tower)."""
        keys = self.h3(candidates)  # B x C x k
        if self.attention == "self":
            scores = (self.h2(candidates) * keys).sum(-1)
        else:
            scores = (self.h2(candidates[:, 0]).unsqueeze(1) * keys).sum(-1)
        return torch.softmax(scores * self.scale, dim=1)

    def forward(self, candidates: torch.Tensor) -> torch.Tensor:
        # Broadcast multiply and sum rather than einsum: with C = 2 or 3 candidates einsum runs as
        # B tiny batched GEMMs, about twice as slow forward + backward on the CPU.
        return (self.weights(candidates).unsqueeze(-1) * self.h1(candidates)).sum(1)


@dataclass(frozen=True)
class TowerSpec:
    """Plain sizes for one task tower. ``relations``: indices of the towers that feed this one."""

    dnn: MLPSpec
    relations: tuple[int, ...] = ()
    use_ait: bool = True
    project_dim: int = 0  # 0 -> the tower's last hidden size
    transfer: MLPSpec = MLPSpec()  # hidden layers of each transfer MLP, before its output layer
    relation_dnn: MLPSpec = MLPSpec()  # DBMTL; no sizes -> one layer of the tower's last size
    stop_gradient: bool = False  # detach what the relation towers pass in
    output: MLPSpec = MLPSpec()  # after AIT / relation dnn, before the logit; relations read before it


class MultiTaskModel(nn.Module):
    """Every model's construction shape: input side -> backbone -> head.

    Args:
        ebc: EmbeddingBagCollection with one table per sparse feature (any device, ``meta`` ok),
            but the zch features'; None when every sparse feature is zch.
        groups: feature names per feature group, concatenated in order into the model input.
        dense_slices: RawFeature name -> (start, stop) columns of the dense input.
        backbone: shared MLP over the model input (B x input_dim -> B x H; may have no layers), or
            ``backbone.InteractionBackbone``, which reads the sparse embeddings from their columns of v.
        head: the model class's towers (B x H -> B x T logits), e.g. ``AITMHead``.
        mc_ebc: the zch features' tables (``zch.build_mc_ebc``), or None.
        wide_ebc: the wide tables (one per WIDE-group feature, all of one width >= T), or None.
        wide_columns: T, the wide tables' columns read: column t is added to task t's logit.
        task_ebc: the task tables (``Schema.task_embedding_bag_configs``), or None.
        task_tables: per task, the names of its tables in ``task_ebc``, in feature order.
        task_gate: ``stem.TaskGate`` over the tasks' embeddings and the shared embeddings of the
            same features, or None: each task reads its own.
        task_shared_columns: with ``task_gate``, the (start, stop) columns of the model input that
            hold those shared embeddings, in the task tables' feature order (``Schema.input_slices``).
    forward(dense: B x D_dense, sparse: KJT) -> B x T logits.
    """

    def __init__(self, ebc: EmbeddingBagCollection | None, groups: Sequence[Sequence[str]],
                 dense_slices: dict[str, tuple[int, int]], backbone: nn.Module, head: nn.Module,
                 mc_ebc: ManagedCollisionEmbeddingBagCollection | None = None,
                 wide_ebc: EmbeddingBagCollection | None = None, wide_columns: int = 0,
                 task_ebc: EmbeddingBagCollection | None = None, task_tables: Sequence[Sequence[str]] = (),
                 task_gate: nn.Module | None = None, task_shared_columns: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__()
        self.ebc = ebc
        self.mc_ebc = mc_ebc  # None: a plain attribute, so other models' state dicts are unchanged
        self.wide_ebc = wide_ebc  # the same
        wide_configs = wide_ebc.embedding_bag_configs() if wide_ebc is not None else []
        if wide_configs and not 0 < wide_columns <= min(c.embedding_dim for c in wide_configs):
            raise ValueError(f"wide tables of {[c.embedding_dim for c in wide_configs]} columns cannot give "
                             f"{wide_columns} logits")
        self.wide_shape = (len(wide_configs), wide_configs[0].embedding_dim if wide_configs else 0, wide_columns)
        configs = (ebc.embedding_bag_configs() if ebc is not None else []) + (
            mc_ebc._embedding_module.embedding_bag_configs() if mc_ebc is not None else [])
        dims = {c.feature_names[0]: c.embedding_dim for c in configs}
        self.zch_inputs = frozenset(c.feature_names[0] for c in mc_ebc._embedding_module.embedding_bag_configs()) \
            if mc_ebc is not None else frozenset()
        self.inputs = [name for g in groups for name in g]
        self.sparse_inputs = frozenset(dims)  # fixed here so forward stays fx-traceable
        self.dense_slices = dict(dense_slices)
        self.input_dim = sum(dims[n] if n in dims else dense_slices[n][1] - dense_slices[n][0]
                             for n in self.inputs)
        self.backbone = backbone
        self.head = head
        self.task_ebc = task_ebc  # None: plain attributes, as mc_ebc
        self.task_gate = task_gate
        self.task_keys: list[list[str]] = []  # per task, its tables' keys in the pooled output
        self.task_shared_columns = list(task_shared_columns)  # the gate's v: columns of the model input
        if task_gate is not None and not self.task_shared_columns:
            raise ValueError("a task gate needs task_shared_columns: the shared embeddings it reads")
        if task_ebc is not None:
            configs = task_ebc.embedding_bag_configs()
            # a feature read by several tables is pooled under "<feature>@<table>" (TorchRec's rule)
            key = {c.name: names[0] for c, names in zip(configs, get_embedding_names_by_table(configs))}
            self.task_keys = [[key[t] for t in tables] for tables in task_tables]

    def embed(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (model input B x input_dim, pooled embeddings B x E of all sparse features).
        Both table modules read the whole KJT; each looks up its own keys."""
        if self.mc_ebc is None:
            pooled = self.ebc(sparse)
            emb = pooled.to_dict()
            values = pooled.values()
        else:  # fx-traceable for the train pipeline: index the output dicts by name, never iterate them
            zch = self.mc_ebc(sparse)[0]
            pooled = [zch] if self.ebc is None else [self.ebc(sparse), zch]
            dicts = [kt.to_dict() for kt in pooled]
            emb = {n: dicts[-1][n] if n in self.zch_inputs else dicts[0][n] for n in self.sparse_inputs}
            values = torch.cat([kt.values() for kt in pooled], dim=1)
        parts = [emb[n] if n in self.sparse_inputs else dense[:, slice(*self.dense_slices[n])] for n in self.inputs]
        return torch.cat(parts, dim=1), values

    def wide_logits(self, sparse: KeyedJaggedTensor) -> torch.Tensor | None:
        """The wide part, B x T: per task t, the sum over the wide tables of column t of the
        pooled row(s) of the feature's ids; None without wide tables. Reads the whole KJT and
        looks up its own keys, as ``embed``'s tables do."""
        if self.wide_ebc is None:
            return None
        features, width, tasks = self.wide_shape
        # Every wide table has the same width, so the pooled values are B x (features * width).
        return self.wide_ebc(sparse).values().reshape(-1, features, width).sum(1)[:, :tasks]

    def task_embeddings(self, sparse: KeyedJaggedTensor) -> list[torch.Tensor] | None:
        """Per task t, e_t: B x (F * d), its own tables' pooled rows of the listed features in
        order; None without task tables. Reads the whole KJT, as ``embed``'s tables do."""
        if self.task_ebc is None:
            return None
        pooled = self.task_ebc(sparse).to_dict()  # by key: a sharded collection's order is its own
        return [torch.cat([pooled[k] for k in keys], dim=1) for keys in self.task_keys]

    def task_inputs(self, x: torch.Tensor, task: list[torch.Tensor]) -> list[torch.Tensor]:
        """What tower t reads beside its shared representation: e_t, or with the gate s_t
        (``stem.TaskGate``, its v the listed features' columns of the model input ``x``)."""
        if self.task_gate is None:
            return task
        shared = torch.cat([x[:, a:b] for a, b in self.task_shared_columns], dim=1)
        return self.task_gate(task, shared)

    def predict(self, x: torch.Tensor, wide: torch.Tensor | None = None,
                task: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Model input B x input_dim (and the wide part B x T, the task embeddings T x [B x F*d],
        ``task_embeddings``) -> B x T logits."""
        b = self.backbone(x)
        extra = {} if task is None else {"extra": self.task_inputs(x, task)}
        if wide is None:
            return self.head(b, **extra)
        if getattr(self.head, "takes_wide", False):
            return self.head(b, wide, **extra)
        return self.head(b, **extra) + wide

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """B x T logits."""
        return self.predict(self.embed(dense, sparse)[0], self.wide_logits(sparse), self.task_embeddings(sparse))


class AITMHead(nn.Module):
    """AITM's towers (and DBMTL's, for towers with ``use_ait`` false) over the backbone output.

    Args:
        in_dim: H, the backbone's output width.
        towers: one spec per task, in config order; relations must form a DAG.
        ait_attention: "self" (paper) or "cross" (EasyRec).
        extra_dims: per task, the width its tower input gains (task embeddings; empty: none).
    forward(b: B x H, extra: T x [B x extra_dims[t]] or None) -> B x T logits.
    """

    def __init__(self, in_dim: int, towers: Sequence[TowerSpec], ait_attention: Literal["self", "cross"] = "self",
                 device: Device = None, extra_dims: Sequence[int] = ()) -> None:
        super().__init__()
        self.specs = list(towers)
        self.order = topological_order([s.relations for s in self.specs])
        self.towers = nn.ModuleList(MLP(in_dim + extra_dim(extra_dims, t), s.dnn, device)
                                    for t, s in enumerate(self.specs))
        out_dims = [0] * len(self.specs)  # dim of z_t
        self.transfers = nn.ModuleDict()
        self.aits = nn.ModuleDict()
        self.relation_dnns = nn.ModuleDict()
        for t in self.order:
            s = self.specs[t]
            q_dim = self.towers[t].out_dim
            if s.relations and s.use_ait:
                for r in s.relations:
                    # The official code's "info" layer: Linear to the tower's size, then ReLU.
                    mlp = MLP(out_dims[r], s.transfer, device)
                    self.transfers[f"{r}_{t}"] = nn.Sequential(
                        mlp, nn.Linear(mlp.out_dim, q_dim, device=device), nn.ReLU(inplace=True))
                k = s.project_dim or q_dim
                self.aits[str(t)] = AIT(q_dim, k, ait_attention, device)
                out_dims[t] = k
            elif s.relations:  # DBMTL: concatenate own and relation features, then a relation dnn
                units = s.relation_dnn.hidden_units or (q_dim,)
                spec = MLPSpec(units, s.relation_dnn.dropout, s.relation_dnn.batch_norm)
                rel = MLP(q_dim + sum(out_dims[r] for r in s.relations), spec, device)
                self.relation_dnns[str(t)] = rel
                out_dims[t] = rel.out_dim
            else:
                out_dims[t] = q_dim
        self.output_dnns = nn.ModuleList(MLP(out_dims[t], s.output, device) for t, s in enumerate(self.specs))
        self.outputs = nn.ModuleList(nn.Linear(o.out_dim, 1, device=device) for o in self.output_dnns)

    def forward(self, b: torch.Tensor, extra: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Backbone output B x H -> B x T logits."""
        z: list[torch.Tensor | None] = [None] * len(self.specs)
        for t in self.order:
            s = self.specs[t]
            q = self.towers[t](with_extra(b, extra, t))
            received = [z[r].detach() if s.stop_gradient else z[r] for r in s.relations]
            if s.relations and s.use_ait:
                moved = [self.transfers[f"{r}_{t}"](v) for r, v in zip(s.relations, received)]
                z[t] = self.aits[str(t)](torch.stack([q] + moved, dim=1))
            elif s.relations:
                z[t] = self.relation_dnns[str(t)](torch.cat([q] + received, dim=1))
            else:
                z[t] = q
        return torch.cat([self.outputs[t](self.output_dnns[t](z[t])) for t in range(len(self.specs))], dim=1)
