"""The dense-compute roofline of a config: its GEMMs, their training FLOPs, and how fast this
machine runs them (used by ``train``).

- ``linear_gemms``: every ``nn.Linear`` of the built model (backbone, towers, transfer layers,
  the AIT projections h1/h2/h3 once per candidate, heads) with the rows it sees in one B-row
  ``predict`` (a forward hook), so a layer run on B x C candidates counts C.
- ``training_flops``: 2*rows*in*out multiply-adds forward, x3 for forward + the two backward GEMMs
  (input and weight gradients; every layer needs both, since gradients flow to the embeddings).
  Not counted: biases, activations, batch norm, dropout, AIT scores and softmax, the loss,
  embedding lookups and their fused update, the dense optimizer.
- ``gemm_seconds``: ``torch.mm`` on exactly those shapes (forward x @ W^T, backward dY @ W
  and dY^T @ x) in fp32 or another dtype (bf16: what autocast runs under
  ``train_config.mixed_precision`` bf16), the fastest of several passes;
  ``world_gemm_flops_per_s`` sums it over ranks measuring at once.
"""

from __future__ import annotations

import math
import time


def linear_gemms(cfg, batch_size: int) -> list[tuple[str, int, int, int]]:
    """(layer name, rows, in, out) of every ``nn.Linear`` in one forward of ``batch_size`` rows,
    and of every layer of TorchRec's cross networks (``backbone.cross``: ``CrossNet``'s in x in
    kernel, ``LowRankCrossNet``'s in x r and r x in ones; their elementwise terms not counted).

    Rows come from a forward hook on ``predict`` of the config's model (tables on ``meta``, dense
    layers on the CPU), so a layer applied to B x C inputs (AIT projections) has B*C rows.
    """
    import torch
    from torch import nn
    from torchrec.modules.crossnet import CrossNet, LowRankCrossNet

    from aitm_torchrec.registry import build_model

    model = build_model(cfg, device="meta", dense_device="cpu")
    found: list[tuple[str, int, int, int]] = []

    def cross_layers(name: str, mod: nn.Module, rows: int) -> None:
        # CrossNet: x_l @ W_l^T with W_l in x in; LowRankCrossNet: x_l @ V_l^T (r x in), then @ W_l^T (in x r)
        if isinstance(mod, CrossNet):
            layers = [[("kernels", w)] for w in mod.kernels]
        else:
            layers = [[("V_kernels", v), ("W_kernels", w)] for v, w in zip(mod.V_kernels, mod.W_kernels)]
        for i, layer in enumerate(layers):
            for kind, w in layer:
                found.append((f"{name}.{kind}.{i}", rows, w.shape[1], w.shape[0]))

    hooks = [m.register_forward_hook(
        lambda mod, inp, out, name=name: found.append(
            (name, inp[0].numel() // mod.in_features, mod.in_features, mod.out_features)))
        for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    hooks += [m.register_forward_hook(lambda mod, inp, out, name=name: cross_layers(name, mod, inp[0].shape[0]))
              for name, m in model.named_modules() if isinstance(m, (CrossNet, LowRankCrossNet))]
    # task embeddings (model_config.task_embeddings): zeros of their width, so their gate and the
    # towers' wider inputs are counted too
    task = [torch.zeros(batch_size, w) for w in [cfg.schema.task_width] * len(cfg.schema.tasks)] \
        if cfg.schema.task_features else None
    with torch.no_grad():
        model.predict(torch.zeros(batch_size, model.input_dim), task=task)
    for h in hooks:
        h.remove()
    return found


def training_flops(gemms: list[tuple[str, int, int, int]], batch_size: int) -> tuple[float, dict[str, float]]:
    """(training FLOPs per example, the same per top-level module group): 3 GEMMs (forward,
    input gradient, weight gradient) of 2*rows*in*out FLOPs per Linear, divided by the batch."""
    groups: dict[str, float] = {}
    for name, rows, k, n in gemms:
        group = name.split(".")[0]
        groups[group] = groups.get(group, 0.0) + 3 * 2 * rows * k * n / batch_size
    return sum(groups.values()), groups


def gemm_seconds(gemms: list[tuple[str, int, int, int]], passes: int = 5, inner: int = 5,
                 dtype=None, device=None) -> tuple[float, float]:
    """(FLOPs, seconds) of one pass of the model's GEMMs in ``dtype`` (None: fp32) on ``device``
    (None: the CPU, at this thread count): for each Linear, forward x @ W^T (rows x in x out), input
    gradient dY @ W and weight gradient dY^T @ x, each timed as the fastest of ``passes`` runs of
    ``inner`` calls (on CUDA, to the device's completion of the last)."""
    import torch

    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flops = seconds = 0.0
    for _, rows, k, n in gemms:
        x, w, dy = (torch.randn(*shape, device=device).to(dtype) for shape in ((rows, k), (n, k), (rows, n)))
        for a, b in ((x, w.t()), (dy, w), (dy.t(), x)):
            out = torch.empty(a.shape[0], b.shape[1], dtype=dtype, device=device)
            torch.mm(a, b, out=out)  # warm: the BLAS picks its kernel
            best = math.inf
            for _ in range(passes):
                sync()
                t0 = time.perf_counter()
                for _ in range(inner):
                    torch.mm(a, b, out=out)
                sync()
                best = min(best, (time.perf_counter() - t0) / inner)
            flops += 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
            seconds += best
    return flops, seconds


def world_gemm_flops_per_s(gemms, dtype=None, device=None) -> float:
    """Sum over ranks of this GEMM mix's FLOP/s in ``dtype`` (None: fp32) on each rank's training
    ``device`` (None: the CPU), all ranks measuring at once. The sum travels on ``device``: NCCL
    reduces CUDA tensors only."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    flops, seconds = gemm_seconds(gemms, dtype=dtype, device=device)
    rate = torch.tensor([flops / seconds], dtype=torch.float64, device=device)
    dist.all_reduce(rate)
    return float(rate)
