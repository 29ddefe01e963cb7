"""The serving artefact's dense layers: Linear (with the ReLU after it) and DCN-v2 cross layers
that run fp32 as exported and, once the Predictor packs them, bf16 GEMMs on oneDNN's packed weights.

``fold_batch_norms(model)`` folds each Linear -> BatchNorm pair of an MLP into one Linear;
``serving_layers(model)`` (``export_model.script_model`` calls both on the eager copy it scripts)
then swaps, in place:

- every ``nn.Linear`` for a ``ServingLinear`` holding the same fp32 weight and bias; a ReLU right
  after it in an ``nn.Sequential`` (``model.MLP``'s Linear -> ReLU, or Linear -> folded BatchNorm
  -> ReLU) moves into it (the ReLU's slot becomes ``nn.Identity``);
- every TorchRec ``CrossNet`` / ``LowRankCrossNet`` for a ``ServingCrossNet`` of the same layers,
  each W_l x_l + b_l a ``ServingLinear`` (W_l = U_l V_l: two of them).

As exported, a ``ServingLinear`` computes ``F.linear`` (+ ReLU) in fp32: the artefact's
probabilities are the eager model's. ``pack_bf16(min_rows)`` reorders the weight once into
oneDNN's blocked bf16 layout (``torch.ops.mkldnn._reorder_linear_weight``); the Predictor calls it
on the model it loaded when its precision resolves to bf16 (``serving.pack_bf16``, which finds the
layers by their class name). From then on inputs of at least
``min_rows`` rows run ``torch.ops.mkldnn._linear_pointwise`` (AMX bf16 GEMM, the ReLU fused into
it) and return bf16, and smaller ones stay fp32. Measured on the seed model at 512 rows, one
thread of an AMX CPU: 2.1-2.2 ms against 3.1-3.3 ms under bf16 autocast, which casts every weight
on every call and runs the ReLUs apart (docs/serving.md, "Precision").

What reads a bf16 activation: the next ServingLinear (takes either dtype), elementwise ops and
``torch.cat`` (promote with fp32 operands: the cross layers' x_0 * (...) + x_l stays fp32),
BatchNorm (bf16 input, fp32 statistics), softmax, and the MMoE einsum (both operands bf16). The
logits are cast to float before the sigmoid (``export_model.ServingModel``).

Packed weights are oneDNN tensors: a packed model runs outside ``torch.autocast`` only
(TorchScript's autocast pass cannot read them), and cannot be saved; ``pack_bf16`` acts on the
loaded copy, never on the file. The file itself has plain fp32 weights and runs anywhere.
"""

# No ``from __future__ import annotations``: TorchScript compiles these forwards.

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_linear_bn_eval
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet


class ServingLinear(nn.Module):
    """``nn.Linear`` (``activation`` "relu": then ReLU) that packs its weight for bf16 on request.

    forward(x: B x ... x in) -> B x ... x out: fp32 ``F.linear`` until ``pack_bf16``; after it,
    a bf16 oneDNN GEMM (bf16 out) for B >= ``min_rows`` and fp32 below.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none") -> None:
        super().__init__()
        if activation not in ("none", "relu"):
            raise ValueError(f"ServingLinear activation must be 'none' or 'relu', got {activation!r}")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.activation = activation
        self.has_bias = bias is not None
        # Set by pack_bf16 on a loaded model; empty and 0 in the exported file.
        self.packed_weight = torch.empty(0)
        self.packed_bias = torch.empty(0)
        self.min_rows = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str = "none") -> "ServingLinear":
        return cls(linear.weight, linear.bias, activation)

    @torch.jit.export
    def pack_bf16(self, min_rows: int) -> None:
        """Packs the weight (and bias) for bf16 GEMMs on inputs of at least ``min_rows`` rows."""
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().to(torch.bfloat16), None)
        bias = self.bias
        if bias is not None:
            self.packed_bias = bias.detach().to(torch.bfloat16)
        self.min_rows = min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.min_rows > 0 and x.size(0) >= self.min_rows:
            bias: torch.Tensor | None = self.packed_bias if self.has_bias else None
            return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed_weight, bias,
                                                      self.activation, [], "")
        y = F.linear(x, self.weight, self.bias)
        return F.relu(y) if self.activation == "relu" else y


class ServingCrossNet(nn.Module):
    """DCN-v2's cross network from a trained TorchRec ``CrossNet`` or ``LowRankCrossNet``:
    x_0 = v, x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, each W_l x_l + b_l a ``ServingLinear`` (W_l =
    U_l V_l: V_l then U_l, the bias on the second). forward(v: B x N) -> B x N, fp32."""

    def __init__(self, cross: nn.Module) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if isinstance(cross, LowRankCrossNet):
            for v, w, b in zip(cross.V_kernels, cross.W_kernels, cross.bias):
                layers.append(nn.Sequential(ServingLinear(v, None), ServingLinear(w, b)))
        elif isinstance(cross, CrossNet):
            # CrossNet computes W_l @ x_l per row with a N x N kernel and an N x 1 bias
            layers = [ServingLinear(k, b.reshape(-1)) for k, b in zip(cross.kernels, cross.bias)]
        else:
            raise TypeError(f"ServingCrossNet takes a CrossNet or LowRankCrossNet, got {type(cross).__name__}")
        self.layers = nn.ModuleList(layers)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        x = v
        for layer in self.layers:
            x = v * layer(x) + x
        return x


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Folds every eval-mode ``nn.BatchNorm1d`` that follows an ``nn.Linear`` in an
    ``nn.Sequential`` (``model.MLP``'s Linear -> BatchNorm -> ReLU) into that Linear's weight and
    bias (``torch.nn.utils.fusion.fuse_linear_bn_eval``), in place; the BatchNorm's slot becomes
    ``nn.Identity``. Returns ``model``. One GEMM instead of a GEMM and a normalisation, and the
    ReLU after it can then fold into a ``ServingLinear``. A BatchNorm in training mode or without
    running statistics is left as it is."""
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name, child), (bn_name, bn) in zip(children, children[1:]):
            if (type(child) is nn.Linear and type(bn) is nn.BatchNorm1d and not child.training
                    and not bn.training and bn.running_mean is not None):
                setattr(parent, name, fuse_linear_bn_eval(child, bn))
                setattr(parent, bn_name, nn.Identity())
    return model


def serving_layers(model: nn.Module) -> nn.Module:
    """Swaps ``model``'s ``nn.Linear`` layers (with the ReLU right after each in a Sequential, or
    after the Identity a folded BatchNorm left: ``fold_batch_norms`` first)
    and cross networks for their serving forms, in place; returns ``model``. Quantized Linears
    (``export_model.quantize_dense``) and everything else are left as they are."""
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if isinstance(child, (CrossNet, LowRankCrossNet)):
                setattr(parent, name, ServingCrossNet(child))
            elif type(child) is nn.Linear:
                # the next layer that computes anything (a folded BatchNorm left an Identity)
                after = next((c for c in children[i + 1:] if type(c[1]) is not nn.Identity), None)
                fuse = isinstance(parent, nn.Sequential) and after is not None and type(after[1]) is nn.ReLU
                setattr(parent, name, ServingLinear.from_linear(child, "relu" if fuse else "none"))
                if fuse:
                    setattr(parent, after[0], nn.Identity())
    return model

