"""The serving artefact's dense layers (aitm_torchrec/serving_dense.py): a ServingLinear worked out
by hand in fp32 and, packed, in bf16 (exact on small integers) with fp32 below its batch floor;
the cross networks equal TorchRec's; the ReLU moves into the Linear before it and nowhere else;
a BatchNorm folds into the Linear before it (by hand);
and every model class with every dense option (cross, low-rank cross, dot, task embeddings with
the STEM gate and a wide part, batch norm) scripted: fp32 as the eager model, and packed bf16
close to it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet

from aitm_torchrec.config import load_config
from aitm_torchrec.export_model import eager_probs, example_inputs, script_model
from aitm_torchrec.model import MLP, MLPSpec
from aitm_torchrec.registry import build_model
from aitm_torchrec.serving import PACKABLE_LINEAR, pack_bf16
from aitm_torchrec.serving_dense import ServingCrossNet, ServingLinear, fold_batch_norms, serving_layers
from tests.conftest import REPO
from tests.test_backbone import BOTH as BOTH_BLOCKS
from tests.test_backbone import CASES, CONFIGS, FORMS, SMALL
from tests.test_stem import stem_config

BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU's oneDNN has no bf16")

W = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
BIAS = torch.tensor([0.5, -1.0])
X = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 0.0]])
# W x + b per row: [1 - 2 + 0.5, 4 - 1], [3 + 1 + 0.5, -2 - 1], [0.5, -1]
LINEAR = torch.tensor([[-0.5, 3.0], [4.5, -3.0], [0.5, -1.0]])


def test_the_class_name_the_predictor_packs_by():
    assert ServingLinear.__name__ == PACKABLE_LINEAR


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_serving_linear_by_hand_fp32_then_packed_bf16_above_its_floor(activation):
    expected = LINEAR.clamp(min=0) if activation == "relu" else LINEAR
    layer = torch.jit.script(ServingLinear(W, BIAS, activation))
    out = layer(X)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    if not BF16:
        pytest.skip("this CPU's oneDNN has no bf16: the packed half is not run")
    layer.pack_bf16(2)
    packed = layer(X)
    assert packed.dtype == torch.bfloat16  # 3 rows >= 2: the packed GEMM
    torch.testing.assert_close(packed.float(), expected, rtol=0, atol=0)  # small integers: exact in bf16
    one = layer(X[1:2])
    assert one.dtype == torch.float32  # 1 row < 2: fp32
    torch.testing.assert_close(one, expected[1:2], rtol=0, atol=0)


def test_serving_linear_without_bias_and_a_bad_activation():
    torch.testing.assert_close(torch.jit.script(ServingLinear(W, None))(X), LINEAR - BIAS, rtol=0, atol=0)
    with pytest.raises(ValueError, match="activation must be 'none' or 'relu', got 'gelu'"):
        ServingLinear(W, None, "gelu")


@pytest.mark.parametrize("cross", [CrossNet(6, 2), LowRankCrossNet(6, 2, 3)], ids=["full", "low_rank"])
def test_serving_cross_net_equals_torchrec(cross):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in cross.parameters():
            p.uniform_(-0.5, 0.5)  # biases too: TorchRec starts them at 0
    v = torch.randn(5, 6)
    serving = torch.jit.script(ServingCrossNet(cross))
    torch.testing.assert_close(serving(v), cross(v), rtol=1e-6, atol=1e-6)
    if BF16:
        assert pack_bf16(serving, 1) == (2 if isinstance(cross, CrossNet) else 4)
        out = serving(v)
        assert out.dtype == torch.float32  # x_0 * (...) + x_l promotes the bf16 GEMM to fp32
        torch.testing.assert_close(out, cross(v), rtol=0, atol=0.05)


def test_relu_moves_into_the_linear_right_before_it_only():
    torch.manual_seed(0)
    plain, normed = MLP(4, MLPSpec((3, 2))).eval(), MLP(4, MLPSpec((3,), batch_norm=True)).eval()
    x = torch.randn(5, 4)
    expected = plain(x), normed(x)
    serving_layers(plain)
    serving_layers(normed)
    assert [type(m).__name__ for m in plain] == ["ServingLinear", "Identity"] * 2
    assert [plain[0].activation, plain[2].activation] == ["relu", "relu"]
    assert [type(m).__name__ for m in normed] == ["ServingLinear", "BatchNorm1d", "ReLU"]
    assert normed[0].activation == "none"
    torch.testing.assert_close((plain(x), normed(x)), expected, rtol=0, atol=0)


def test_batch_norm_folds_into_the_linear_before_it_then_the_relu_moves_in():
    # Linear W, BIAS on X -> LINEAR; BatchNorm (eps ~0) with mean [1, -1], var [4, 1], gamma [2, 1],
    # beta [0, 0.5]: ((LINEAR - mean) / sd) * gamma + beta, then ReLU, by hand:
    # row 1: [(-0.5 - 1) / 2 * 2, (3 + 1) + 0.5] = [-1.5, 4.5] -> [0, 4.5]
    # row 2: [(4.5 - 1) / 2 * 2, (-3 + 1) + 0.5] = [3.5, -1.5] -> [3.5, 0]
    # row 3: [(0.5 - 1) / 2 * 2, (-1 + 1) + 0.5] = [-0.5, 0.5] -> [0, 0.5]
    expected = torch.tensor([[0.0, 4.5], [3.5, 0.0], [0.0, 0.5]])
    mlp = MLP(2, MLPSpec((2,), batch_norm=True))
    linear, bn = mlp[0], mlp[1]
    with torch.no_grad():
        linear.weight.copy_(W)
        linear.bias.copy_(BIAS)
        bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0]))
        bn.weight.copy_(torch.tensor([2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.5]))
    bn.eps = 1e-12  # as good as 0 at this tolerance; torch 2.11 refuses an eps of 0
    training = fold_batch_norms(copy.deepcopy(mlp).train())
    assert [type(m).__name__ for m in training] == ["Linear", "BatchNorm1d", "ReLU"]  # batch statistics: left
    mlp.eval()
    torch.testing.assert_close(mlp(X), expected, rtol=0, atol=1e-6)
    serving_layers(fold_batch_norms(mlp))
    assert [type(m).__name__ for m in mlp] == ["ServingLinear", "Identity", "Identity"]
    assert mlp[0].activation == "relu"
    torch.testing.assert_close(torch.jit.script(mlp)(X), expected, rtol=0, atol=1e-6)


# (id, config file or, with no overrides, the model class for test_stem's config, overrides)
DENSE_CASES = ([(f"{m}-{f}", CONFIGS[m], SMALL + FORMS.get(f, BOTH_BLOCKS)) for m, f in CASES]
               + [(f"{m}-stem-wide", m, None) for m in CONFIGS]
               + [("AITM-batch_norm", CONFIGS["AITM"], SMALL + ["model_config.model_params.task_towers.1.dnn.use_bn=true"])])


@pytest.mark.parametrize("name, config, overrides", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_every_model_class_and_dense_option_serves_fp32_exact_and_packed_bf16_close(name, config, overrides):
    torch.manual_seed(0)
    cfg = stem_config(config, wide=True) if overrides is None else load_config(REPO / "configs" / config, overrides)
    model = build_model(cfg, device="cpu").eval()
    inputs = example_inputs(cfg.schema, 8)
    expected = eager_probs(model, cfg.schema, inputs)
    scripted = script_model(model, cfg.schema, "none")
    names = [f"probs_{t}" for t in cfg.schema.tower_names]
    with torch.no_grad():
        got = torch.stack([scripted(dict(inputs))[n] for n in names], dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if not BF16:
        pytest.skip("this CPU's oneDNN has no bf16: the packed half is not run")
    linears = sum(type(m) is nn.Linear for m in model.modules())
    crosses = sum(len(m.kernels) for m in model.modules() if isinstance(m, CrossNet))
    crosses += sum(2 * len(m.W_kernels) for m in model.modules() if isinstance(m, LowRankCrossNet))
    assert pack_bf16(scripted, 2) == linears + crosses
    with torch.no_grad():
        packed = torch.stack([scripted(dict(inputs))[n] for n in names], dim=1)
        one = example_inputs(cfg.schema, 1)
        single = torch.stack([scripted(dict(one))[n] for n in names], dim=1)
    assert packed.dtype == torch.float32
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-2)
    assert (packed != expected).any()  # the bf16 GEMMs ran
    torch.testing.assert_close(single, eager_probs(model, cfg.schema, one), rtol=0, atol=1e-6)  # below the floor: fp32


def test_predictor_packs_at_load_or_serves_through_autocast_where_it_cannot(tmp_path, monkeypatch):
    """An artefact whose config asks for bf16: the Predictor packs every ServingLinear at load
    (where oneDNN has bf16); where packing is not available it runs the same file under bf16
    autocast. Both close to the eager fp32 model, both in bf16 (not equal to it)."""
    from aitm_torchrec import serving
    from aitm_torchrec.export_model import export

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / CONFIGS["AITM"], SMALL + ["model_config.backbone.cross={num_layers: 2}"])
    model = build_model(cfg, device="cpu").eval()
    export(model, cfg.schema, tmp_path / "artefact", "none", {"mixed_precision": "bf16"})
    inputs = example_inputs(cfg.schema, 8)
    expected = eager_probs(model, cfg.schema, inputs).numpy()
    packed = serving.Predictor(tmp_path / "artefact", bf16_min_rows=4)
    assert packed.precision.resolved == "bf16"
    linears = sum(type(m) is nn.Linear for m in model.modules()) + 2  # and the two cross layers
    assert packed.packed_layers == (linears if BF16 else 0)
    monkeypatch.setattr(serving, "_packing_available", lambda: False)
    autocast = serving.Predictor(tmp_path / "artefact", bf16_min_rows=4)
    assert autocast.packed_layers == 0
    for p in (packed, autocast):
        got = p.predict_inputs(inputs)
        probs = np.stack([got[t] for t in cfg.schema.tower_names], axis=1)
        np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-2)
        assert (probs != expected).any()
