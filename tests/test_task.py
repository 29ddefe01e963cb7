"""The train wrapper: mixed precision stays in the dense layers."""

from __future__ import annotations

import pytest
import torch

from aitm_torchrec.config import load_config
from aitm_torchrec.dist import DistEnv
from aitm_torchrec.task import build_train_module
from aitm_torchrec.train import train_reader


@pytest.mark.parametrize("precision,dtype", [("none", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_runs_dense_layers_in_the_chosen_dtype(tiny_config, precision, dtype):
    cfg = load_config(tiny_config, [f"train_config.mixed_precision={precision}"])
    module = build_train_module(cfg, device="cpu")
    seen = []
    module.model.head.outputs[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    batch = next(iter(train_reader(cfg, env).epoch(0)))
    loss, (_, logits, _, _) = module(batch)
    assert seen == [dtype]
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    assert module.model.head.outputs[0].weight.grad.dtype == torch.float32
