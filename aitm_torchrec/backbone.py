"""Backbone: the shared layers between the model input v and the heads, with feature interaction.

Without interaction blocks the backbone is the plain ``model.MLP`` over v. With them
(``InteractionBackbone``), as EasyRec's backbone concatenates its ``concat_blocks`` and runs its
``top_mlp``::

    b = top_mlp(concat(mlp(v), cross(v), dot(E)))        each part only when configured

- ``mlp(v)``: the backbone MLP (v itself when it has no layers);
- ``cross(v)`` (DCN-v2, Wang et al. 2021): x_0 = v, x_{l+1} = x_0 * (W_l x_l + b_l) + x_l for
  ``num_layers`` layers, W_l full rank (TorchRec's ``CrossNet``) or U_l V_l of rank ``low_rank``
  (``LowRankCrossNet``); B x input_dim;
- ``dot(E)`` (DLRM, Naumov et al. 2019): E = B x F x d, the pooled embeddings of the F sparse
  features of the DEEP groups (all of one dim d), read from their columns of v; the dot products
  <e_i, e_j> for i < j (TorchRec's ``InteractionArch``), and <e_i, e_i> too with
  ``self_interaction``; B x F(F-1)/2 (+ F);
- ``top_mlp``: an MLP over the concatenation (the identity when it has no layers).

The heads take b, B x H with H = ``out_dim``. Everything here is dense: trained by the dense
optimizer and replicated (DDP) like the MLPs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.models.dlrm import InteractionArch
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet

from aitm_torchrec.model import MLP, Device, MLPSpec


def cross_net(in_dim: int, num_layers: int, low_rank: int = 0, device: Device = None) -> nn.Module:
    """TorchRec's DCN-v2 cross network over B x in_dim: ``CrossNet`` (full-rank W_l) for
    ``low_rank`` 0, else ``LowRankCrossNet`` (W_l = U_l V_l, U_l in_dim x r, V_l r x in_dim).
    B x in_dim -> B x in_dim."""
    net = CrossNet(in_dim, num_layers) if not low_rank else LowRankCrossNet(in_dim, num_layers, low_rank)
    return net.to(device) if device is not None else net


class DotInteraction(nn.Module):
    """Pairwise dot products of F equal-width feature vectors taken from columns of v.

    Args:
        columns: the F * d columns of v holding the F vectors, vector after vector.
        dim: d, each vector's width.
        self_interaction: also <e_i, e_i> (EasyRec's ``self_interaction``).
    forward(v: B x input_dim) -> B x (F(F-1)/2 [+ F]): the pairs i < j in TorchRec's order (row by
    row of the upper triangle), then the F squared norms with ``self_interaction``.

    The pairs are TorchRec's ``InteractionArch``, which dots [dense, sparse_1, ...] pairwise and
    returns the dense vector before the products: here e_1 takes the dense slot, so its output is
    e_1 then the pairs of all F vectors, and e_1 is dropped.
    """

    def __init__(self, columns: Sequence[int], dim: int, self_interaction: bool = False, device: Device = None) -> None:
        super().__init__()
        if dim < 1 or not columns or len(columns) % dim:
            raise ValueError(f"{len(columns)} columns do not hold vectors of width {dim}")
        self.num_features = len(columns) // dim
        self.dim = dim
        self.self_interaction = self_interaction
        # Not persistent: derived from the schema, so the state dict holds only weights.
        self.register_buffer("columns", torch.tensor(list(columns), dtype=torch.int64, device=device), persistent=False)
        self.pairs = InteractionArch(self.num_features - 1)
        if device is not None:
            self.pairs.to(device)
        self.out_dim = self.num_features * (self.num_features - 1) // 2 + (self.num_features if self_interaction else 0)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        e = v.index_select(1, self.columns).reshape(-1, self.num_features, self.dim)  # B x F x d
        dots = self.pairs(e[:, 0], e[:, 1:])[:, self.dim:]
        if self.self_interaction:
            dots = torch.cat([dots, (e * e).sum(-1)], dim=1)
        return dots


class InteractionBackbone(nn.Module):
    """b = top_mlp(concat(mlp(v), cross(v), dot(v))), the parts that are not None.

    Args:
        mlp: the backbone MLP over v (B x input_dim -> B x mlp.out_dim).
        cross: ``cross_net`` over v (B x input_dim -> B x input_dim), or None.
        dot: ``DotInteraction`` (B x input_dim -> B x dot.out_dim), or None.
        top: sizes of the MLP over the concatenation (no layers: b is the concatenation).
        in_dim: input_dim, the width of v.
    forward(v: B x input_dim) -> B x out_dim.
    """

    def __init__(self, mlp: MLP, cross: nn.Module | None, dot: DotInteraction | None, top: MLPSpec,
                 in_dim: int, device: Device = None) -> None:
        super().__init__()
        if cross is None and dot is None:
            raise ValueError("an InteractionBackbone needs a cross network or a dot interaction; "
                             "without them the backbone is the MLP alone")
        self.mlp = mlp
        self.cross = cross
        self.dot = dot
        width = mlp.out_dim + (in_dim if cross is not None else 0) + (dot.out_dim if dot is not None else 0)
        self.top_mlp = MLP(width, top, device)
        self.out_dim = self.top_mlp.out_dim

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        # The parts meet in the MLP output's dtype: under bf16 autocast the cross layers' output
        # is fp32 (x_0 * (...) + x_l with x_0 = v), and an fp32 concatenation would only be cast
        # back to bf16 by the Linear that reads it (the top MLP's, else each tower's first).
        # Casting first gives that Linear the same input and saves ~5% of the dense step; in
        # the backward the towers' gradients then add up in bf16 rather than fp32
        # (docs/benchmarks.md, "Cost of the best config").
        parts = [self.mlp(v)]
        if self.cross is not None:
            parts.append(self.cross(v).to(parts[0].dtype))
        if self.dot is not None:
            parts.append(self.dot(v).to(parts[0].dtype))
        return self.top_mlp(torch.cat(parts, dim=1))
