"""The model math on small tensors with fixed weights, checked against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from aitm_torchrec.baselines import (
    DBMTLHead,
    ESMMHead,
    ExtractionSpec,
    MMoEHead,
    PLEHead,
    SharedBottomHead,
    marginal_logits,
)
from aitm_torchrec.config import load_config
from aitm_torchrec.data import Batch
from aitm_torchrec.model import AIT, MLP, AITMHead, MLPSpec, MultiTaskModel, TowerSpec
from aitm_torchrec.registry import build_model
from aitm_torchrec.task import MultiTaskLoss, MultiTaskTrain
from tests.conftest import REPO


def tiny_ebc(rows: int = 100, dim: int = 2) -> EmbeddingBagCollection:
    """Two sum-pooled tables, a and b, on the CPU."""
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=n, feature_names=[n], num_embeddings=rows, embedding_dim=dim) for n in ("a", "b")
    ], device=torch.device("cpu"))


def tiny_model(head_fn, backbone: tuple[int, ...] = (3,)) -> MultiTaskModel:
    """Tables a and b (input B x 4) -> backbone -> ``head_fn(backbone width)``."""
    mlp = MLP(4, MLPSpec(backbone))
    return MultiTaskModel(tiny_ebc(), [["a", "b"]], {}, mlp, head_fn(mlp.out_dim))


def tiny_aitm(towers: list[TowerSpec], backbone: tuple[int, ...] = (3,), **kwargs) -> MultiTaskModel:
    return tiny_model(lambda width: AITMHead(width, towers, **kwargs), backbone)


def two_towers(width: int = 2, **kwargs) -> list[TowerSpec]:
    return [TowerSpec(MLPSpec((width,))), TowerSpec(MLPSpec((width,)), relations=(0,), **kwargs)]


def set_weights(linear: nn.Linear, rows: list[list[float]]) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(rows))


# --------------------------------------------------------------------------------------------
# AIT


@pytest.fixture
def ait_inputs() -> tuple[torch.Tensor, list[list[float]]]:
    """Candidates B=2 x C=2 x D=3 (own tower first) and the fixed maps (D=3 -> k=2)."""
    candidates = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]],
                               [[0.0, 0.0, 1.0], [1.0, 3.0, 1.0]]])
    return candidates, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def fixed_ait(attention: str, h1: list, h23: list) -> AIT:
    ait = AIT(dim=3, project_dim=2, attention=attention)
    set_weights(ait.h1, h1)
    set_weights(ait.h2, h23)
    set_weights(ait.h3, h23)
    return ait


def test_ait_self_attention_scores_each_candidate_by_itself(ait_inputs):
    candidates, h1, h23 = ait_inputs
    ait = fixed_ait("self", h1, h23)
    # h2(u) = h3(u) = (u0, u2), so s_u = (u0^2 + u2^2) / sqrt(k), k = 2 (not D = 3).
    # row 0: s_q = 1/sqrt2, s_p = 4/sqrt2;  row 1: s_q = 1/sqrt2, s_p = 2/sqrt2.
    w0p = 1 / (1 + math.exp(-3 / math.sqrt(2)))
    w1p = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    expected_w = torch.tensor([[1 - w0p, w0p], [1 - w1p, w1p]])
    torch.testing.assert_close(ait.weights(candidates), expected_w)
    # z = sum_u w_u h1(u), h1(u) = (u0, u1): row 0: (w_q, w_p); row 1: w_p * (1, 3).
    torch.testing.assert_close(ait(candidates), torch.tensor([[1 - w0p, w0p], [w1p, 3 * w1p]]))


def test_ait_cross_attention_uses_the_own_tower_as_query(ait_inputs):
    candidates, h1, h23 = ait_inputs
    ait = fixed_ait("cross", h1, h23)
    # s_u = <h2(q), h3(u)> / sqrt2. row 0: h2(q) = (1, 0): s_q = 1/sqrt2, s_p = 0.
    # row 1: h2(q) = (0, 1): s_q = 1/sqrt2, s_p = 1/sqrt2 -> equal weights.
    w0q = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    torch.testing.assert_close(ait.weights(candidates), torch.tensor([[w0q, 1 - w0q], [0.5, 0.5]]))
    torch.testing.assert_close(ait(candidates), torch.tensor([[w0q, 1 - w0q], [0.5, 1.5]]))


def test_ait_softmax_runs_over_any_number_of_candidates():
    ait = AIT(dim=2, project_dim=2)
    set_weights(ait.h2, [[1.0, 0.0], [0.0, 1.0]])
    set_weights(ait.h3, [[1.0, 0.0], [0.0, 1.0]])
    # three candidates with squared norms 0, 2, 8 -> scores 0, 2/sqrt2, 8/sqrt2
    w = ait.weights(torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]]))
    e = [1.0, math.exp(math.sqrt(2)), math.exp(4 * math.sqrt(2))]
    torch.testing.assert_close(w, torch.tensor([[x / sum(e) for x in e]]))


# --------------------------------------------------------------------------------------------
# Loss: calibrator, task weights, regularization


def test_calibrator_is_zero_for_an_ordered_chain_and_positive_otherwise():
    loss = MultiTaskLoss([0.0, 0.0, 0.0], [(1, 0, 0.5), (2, 1, 0.5)])  # calibration only
    labels = torch.zeros(3, 3)
    ordered = torch.tensor([[2.0, 1.0, 0.0], [0.0, -1.0, -1.0], [5.0, 5.0, 5.0]])
    assert loss(ordered, labels, torch.ones(3)).item() == 0.0
    # row 1: p = (0.5, 0.75, 0.5): cart over click by 0.25, buy below cart. Row 2 is padding.
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, math.log(3.0), 0.0], [-9.0, 9.0, 9.0]])
    got = loss(logits, labels, torch.tensor([1.0, 1.0, 0.0]))
    assert got.item() == pytest.approx(0.5 * 0.25 / 2)  # alpha x mean over the 2 real rows


def test_task_weights_scale_each_tasks_bce():
    loss = MultiTaskLoss([1.0, 2.0], [])
    # logit 0 -> BCE = ln 2 for either label; padding rows do not count
    got = loss(torch.zeros(3, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([1.0, 1.0, 0.0]))
    assert got.item() == pytest.approx(3 * math.log(2))


def tiny_batch() -> Batch:
    """3 rows: (a=[1], b=[2]), (a=[3, 4], b=[]), padding (a=[5], b=[6]) with weight 0."""
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([1, 3, 4, 5, 2, 6]), lengths=torch.tensor([1, 2, 1, 1, 0, 1]))
    return Batch(torch.zeros(3, 0), sparse, torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]),
                 torch.tensor([1.0, 1.0, 0.0]))


def constant_model() -> MultiTaskModel:
    """Input 4 (two dim-2 tables) -> backbone [3] -> towers [2] -> transfer 2 -> AIT k=2 -> heads."""
    model = tiny_aitm(two_towers())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.fill_(0.1)
                if m.bias is not None:
                    m.bias.zero_()
        tables = model.ebc.embedding_bags
        tables["a"].weight.fill_(0.5)
        tables["b"].weight.fill_(-1.0)
    return model


def test_l2_regularization_sums_squared_dense_kernels():
    model = constant_model()
    batch = tiny_batch()
    base = MultiTaskTrain(model, MultiTaskLoss([1.0, 1.0], []))(batch)[0]
    with_l2 = MultiTaskTrain(model, MultiTaskLoss([1.0, 1.0], []), l2_regularization=0.2)(batch)[0]
    # kernels: backbone 4x3, towers 2 x (3x2), transfer 2x2, AIT 3 x (2x2), heads 2 x (2x1) = 44
    kernels = 4 * 3 + 2 * 3 * 2 + 2 * 2 + 3 * 2 * 2 + 2 * 2
    assert (with_l2 - base).item() == pytest.approx(0.2 * kernels * 0.1**2 / 2, rel=1e-5)


def test_embedding_regularization_covers_only_the_batchs_rows():
    model = constant_model()
    batch = tiny_batch()
    base = MultiTaskTrain(model, MultiTaskLoss([1.0, 1.0], []))(batch)[0]
    with_reg = MultiTaskTrain(model, MultiTaskLoss([1.0, 1.0], []), embedding_regularization=0.1)(batch)[0]
    # pooled row 0: a = (0.5, 0.5), b = (-1, -1) -> 0.5 + 2 = 2.5; row 1: a = (1, 1), b empty -> 2;
    # padding row: 0. Whole tables would give 100 x 2 x (0.25 + 1) = 250.
    assert (with_reg - base).item() == pytest.approx(0.1 * (2.5 + 2.0) / 2, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Towers: transfer gradients, DAG order, DBMTL


@pytest.mark.parametrize("use_ait", [True, False])
@pytest.mark.parametrize("stop_gradient", [False, True])
def test_later_task_trains_the_earlier_tower_unless_stopped(use_ait, stop_gradient):
    torch.manual_seed(0)
    model = tiny_aitm(two_towers(8, use_ait=use_ait, stop_gradient=stop_gradient), backbone=(8,))
    model.predict(torch.randn(16, 4))[:, 1].sum().backward()  # the later task's output only
    earlier = model.head.towers[0][0].weight.grad
    if stop_gradient:
        assert earlier is None or earlier.abs().sum() == 0
    else:
        assert earlier is not None and earlier.abs().sum() > 0
    assert model.backbone[0].weight.grad.abs().sum() > 0  # the shared part trains either way
    receiving = model.head.transfers["0_1"][1] if use_ait else model.head.relation_dnns["1"][0]
    assert receiving.weight.grad.abs().sum() > 0  # the transfer itself trains either way


def test_dag_towers_run_in_topological_order_and_attend_over_all_inputs():
    # buy (listed first) reads ctr and cart; cart reads ctr.
    towers = [TowerSpec(MLPSpec((2,)), relations=(1, 2)), TowerSpec(MLPSpec((2,))),
              TowerSpec(MLPSpec((2,)), relations=(1,))]
    model = tiny_aitm(towers)
    assert model.head.order == [1, 2, 0]
    assert set(model.head.transfers) == {"1_0", "2_0", "1_2"}
    seen = {}
    model.head.aits["0"].register_forward_hook(lambda m, args, out: seen.update(buy=args[0].shape))
    assert model.predict(torch.randn(5, 4)).shape == (5, 3)
    assert seen["buy"] == (5, 3, 2)  # own + 2 transferred candidates


def test_dbmtl_concatenates_own_and_relation_features_into_a_relation_dnn():
    torch.manual_seed(0)
    model = tiny_aitm(two_towers(use_ait=False))
    assert not model.head.aits and not model.head.transfers
    rel = model.head.relation_dnns["1"]
    assert rel[0].in_features == 2 + 2 and rel.out_dim == 2  # default: one layer of the tower's size
    seen = {}
    rel.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    x = torch.randn(4, 4)
    model.predict(x)
    b = model.backbone(x)
    torch.testing.assert_close(seen["x"], torch.cat([model.head.towers[1](b), model.head.towers[0](b)], dim=1))


def test_dbmtl_baseline_never_uses_ait():
    model = tiny_model(lambda width: DBMTLHead(width, two_towers(use_ait=True)))
    assert not model.head.aits and set(model.head.relation_dnns) == {"1"}


# --------------------------------------------------------------------------------------------
# Baselines


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_esmm_marginal_is_the_product_of_conditionals_along_the_chain():
    # conditionals 0.5, 0.5, 0.75 -> marginals 0.5, 0.25, 0.1875
    got = marginal_logits(torch.tensor([[0.0, 0.0, math.log(3.0)]]), [None, 0, 1])
    torch.testing.assert_close(got, torch.tensor([[0.0, logit(0.25), logit(0.1875)]]))
    # the chain need not follow the tower order: tower 0 follows tower 2, which follows tower 1
    got = marginal_logits(torch.tensor([[math.log(3.0), 0.0, 0.0]]), [2, None, 1])
    torch.testing.assert_close(got, torch.tensor([[logit(0.1875), 0.0, logit(0.25)]]))


def test_esmm_marginal_logits_stay_finite_at_the_extremes():
    c = torch.tensor([[40.0, 40.0], [-60.0, -60.0]], requires_grad=True)
    got = marginal_logits(c, [None, 0])
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(c.grad).all()
    assert got[0, 1].item() == pytest.approx(math.log(1 / 1e-6), rel=1e-3)  # p capped at 1 - 1e-6
    assert got[1, 1].item() == pytest.approx(-120.0, rel=1e-5)  # log p1 + log p2, p tiny


def test_esmm_model_outputs_marginals_of_its_towers():
    torch.manual_seed(0)
    model = tiny_model(lambda width: ESMMHead(width, [MLPSpec((2,))] * 3, parents=[None, 0, 1]))
    x = torch.randn(6, 4)
    cond = torch.sigmoid(model.head.conditional_logits(model.backbone(x)))
    marg = torch.sigmoid(model.predict(x))
    torch.testing.assert_close(marg[:, 0], cond[:, 0])
    torch.testing.assert_close(marg[:, 2], cond[:, 0] * cond[:, 1] * cond[:, 2])


def test_mmoe_gates_are_a_softmax_over_experts():
    torch.manual_seed(0)
    model = MMoEHead(4, MLPSpec((2,)), 3, [MLPSpec((2,))] * 2)  # a head alone: no tables needed
    with torch.no_grad():
        for gate, bias in zip(model.gates, ([0.0, math.log(2), math.log(3)], [0.0, 0.0, 0.0])):
            gate.weight.zero_()
            gate.bias.copy_(torch.tensor(bias))
    b = torch.randn(5, 4)
    w = model.gate_weights(b)
    torch.testing.assert_close(w[:, 0], torch.tensor([[1 / 6, 2 / 6, 3 / 6]] * 5))
    torch.testing.assert_close(w[:, 1], torch.full((5, 3), 1 / 3))
    e = [expert(b) for expert in model.experts]
    torch.testing.assert_close(model.mix(b)[:, 0], e[0] / 6 + e[1] * 2 / 6 + e[2] * 3 / 6)
    with torch.no_grad():
        model.gates[1].weight.normal_()
    torch.testing.assert_close(model.gate_weights(b).sum(-1), torch.ones(5, 2))  # per task, per row
    assert model(b).shape == (5, 2)


# PLE: 2 tasks, 3 rows, H = 2, two extraction layers of one expert per task and one shared
# expert (Linear 2 -> 2, ReLU), towers without hidden layers (the output layer only). Weights:
# (W as rows, bias) for each Linear, set by hand.
PLE_WEIGHTS = {
    "layers.0.task_experts.0.0.0": ([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]),
    "layers.0.task_experts.1.0.0": ([[0.0, 1.0], [1.0, 0.0]], [0.5, 0.0]),
    "layers.0.shared_experts.0.0": ([[1.0, 1.0], [0.0, -1.0]], [0.0, 1.0]),
    "layers.0.task_gates.0": ([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]),
    "layers.0.task_gates.1": ([[0.0, 0.0], [0.0, 0.0]], [0.0, math.log(3.0)]),
    "layers.0.shared_gate": ([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], [0.0, 0.0, 1.0]),
    "layers.1.task_experts.0.0.0": ([[2.0, 0.0], [0.0, 1.0]], [0.0, -1.0]),
    "layers.1.task_experts.1.0.0": ([[1.0, -1.0], [1.0, 1.0]], [0.0, 0.0]),
    "layers.1.shared_experts.0.0": ([[0.5, 0.5], [1.0, 0.0]], [1.0, 0.0]),
    "layers.1.task_gates.0": ([[0.0, 1.0], [1.0, 0.0]], [0.0, 0.0]),
    "layers.1.task_gates.1": ([[1.0, 1.0], [0.0, 0.0]], [0.0, 0.5]),
    "outputs.0": ([[1.0, -1.0]], [0.5]),
    "outputs.1": ([[0.5, 2.0]], [-1.0]),
}


def test_ple_layers_mix_task_and_shared_experts_as_computed_by_hand():
    spec = ExtractionSpec(1, MLPSpec((2,)), 1, MLPSpec((2,)))
    head = PLEHead(2, [spec, spec], [MLPSpec(), MLPSpec()])
    linears = {n: m for n, m in head.named_modules() if isinstance(m, nn.Linear)}
    assert set(linears) == set(PLE_WEIGHTS)  # the last layer has no shared gate
    with torch.no_grad():
        for name, (w, bias) in PLE_WEIGHTS.items():
            linears[name].weight.copy_(torch.tensor(w))
            linears[name].bias.copy_(torch.tensor(bias))
    b = np.array([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]])

    def lin(name, x):
        w, bias = PLE_WEIGHTS[name]
        return x @ np.array(w).T + np.array(bias)

    def expert(name, x):
        return np.maximum(lin(name, x), 0.0)

    def mix(scores, experts):  # softmax over the experts, per row
        g = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
        return sum(g[:, [j]] * e for j, e in enumerate(experts))

    # layer 1: every input is b; the shared gate mixes task 0's, task 1's and the shared expert
    e0, e1 = expert("layers.0.task_experts.0.0.0", b), expert("layers.0.task_experts.1.0.0", b)
    s = expert("layers.0.shared_experts.0.0", b)
    x0 = mix(lin("layers.0.task_gates.0", b), [e0, s])
    x1 = mix(lin("layers.0.task_gates.1", b), [e1, s])
    shared = mix(lin("layers.0.shared_gate", b), [e0, e1, s])
    # by hand, row 1 (b = (0, -1)): task 1's gate is constant, 1/4 own expert and 3/4 shared;
    # its expert is relu(-0.5, 0) = (0, 0), the shared one relu(-1, 2) = (0, 2)
    np.testing.assert_allclose(x1[1], [0.0, 1.5])
    bt = torch.tensor(b, dtype=torch.float32)
    with torch.no_grad():
        tasks, mixed = head.layers[0]([bt, bt], bt)
    for got, want in zip([*tasks, mixed], [x0, x1, shared]):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    # layer 2 (last): task t's experts and gate read x_t, the shared expert reads the shared mix
    s2 = expert("layers.1.shared_experts.0.0", shared)
    z0 = mix(lin("layers.1.task_gates.0", x0), [expert("layers.1.task_experts.0.0.0", x0), s2])
    z1 = mix(lin("layers.1.task_gates.1", x1), [expert("layers.1.task_experts.1.0.0", x1), s2])
    expected = np.concatenate([lin("outputs.0", z0), lin("outputs.1", z1)], axis=1)
    got = head(bt)
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-6, atol=1e-6)


def test_ple_last_task_experts_train_only_their_task_and_earlier_ones_reach_others_through_sharing():
    torch.manual_seed(0)
    spec = ExtractionSpec(2, MLPSpec((4,)), 1, MLPSpec((4,)))
    model = tiny_model(lambda width: PLEHead(width, [spec, spec], [MLPSpec((4,))] * 2), backbone=(8,))
    model.predict(torch.randn(16, 4))[:, 1].sum().backward()  # task 1's output only
    first, last = model.head.layers
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in last.task_experts[0].parameters())
    assert last.task_experts[1][0][0].weight.grad.abs().sum() > 0
    # task 0's first-layer experts feed the shared gate, whose mix feeds task 1's shared expert
    assert first.task_experts[0][0][0].weight.grad.abs().sum() > 0
    assert first.shared_gate.weight.grad.abs().sum() > 0 and last.shared_gate is None


def test_ple_last_layer_without_shared_experts_gates_only_each_tasks_own():
    # EasyRec's default share_num 0, which its last extraction layer often keeps
    head = PLEHead(3, [ExtractionSpec(2, MLPSpec((4,)), 3, MLPSpec((4,))), ExtractionSpec(2, MLPSpec((4,)))],
                   [MLPSpec((2,))] * 2)
    first, last = head.layers
    assert [g.out_features for g in first.task_gates] == [2 + 3] * 2 and first.shared_gate.out_features == 2 * 2 + 3
    assert [g.out_features for g in last.task_gates] == [2, 2] and not last.shared_experts
    assert head(torch.randn(5, 3)).shape == (5, 2)
    with pytest.raises(ValueError, match="shared experts must end in the task experts' width 4"):
        PLEHead(3, [ExtractionSpec(1, MLPSpec((4,)), 1, MLPSpec((5,)))], [MLPSpec((2,))])


def test_shared_bottom_has_no_transfer_between_towers():
    torch.manual_seed(0)
    model = tiny_model(lambda width: SharedBottomHead(width, [MLPSpec((8,))] * 2), backbone=(8,))
    model.predict(torch.randn(16, 4))[:, 1].sum().backward()
    assert model.head.towers[0][0].weight.grad.abs().sum() == 0  # task 1's loss never reaches tower 0
    assert model.head.towers[1][0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# From config


SMALL = [f"feature_config.features.{i}.hash_bucket_size=50" for i in range(17)]


def test_model_class_picks_the_model_with_the_same_input_side():
    models = {name: build_model(load_config(REPO / "configs" / name, SMALL), device="cpu")
              for name in ("aitm_taobao.yaml", "esmm_taobao.yaml", "mmoe_taobao.yaml",
                           "shared_bottom_taobao.yaml", "dbmtl_taobao.yaml", "ple_taobao.yaml")}
    assert [type(m.head).__name__ for m in models.values()] == ["AITMHead", "ESMMHead", "MMoEHead",
                                                                "SharedBottomHead", "DBMTLHead", "PLEHead"]
    tables = {n: [c.name for c in m.ebc.embedding_bag_configs()] for n, m in models.items()}
    assert len({tuple(t) for t in tables.values()}) == 1
    assert {m.input_dim for m in models.values()} == {17 * 16}


def test_options_reach_the_modules():
    cfg = load_config(REPO / "configs" / "aitm_3step.yaml", SMALL + [
        "model_config.model_params.ait_attention=cross",
        "model_config.model_params.stop_gradient=true",
        "model_config.model_params.transfer_mlp={hidden_units: [7], use_bn: true}",
        "model_config.backbone.mlp.dropout_ratio=0.25",
        "model_config.model_params.task_towers.1.dnn.use_bn=true",
    ])
    model = build_model(cfg, device="cpu")
    assert model.head.order == [0, 1, 2]
    assert {a.attention for a in model.head.aits.values()} == {"cross"}
    assert all(s.stop_gradient for s in model.head.specs)
    transfer = model.head.transfers["0_1"]
    assert transfer[0][0].out_features == 7 and isinstance(transfer[0][1], nn.BatchNorm1d)
    assert transfer[1].out_features == 128  # then the output layer, the receiving tower's size
    assert [m.p for m in model.backbone if isinstance(m, nn.Dropout)] == [0.25, 0.25]
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.head.towers[1])
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.head.towers[0])  # EasyRec's default differs
    assert cfg.schema.calibration_pairs == [(1, 0, 1.0), (2, 1, 1.0)]


def test_dag_config_calibrates_against_every_relation_tower():
    cfg = load_config(REPO / "configs" / "aitm_dag.yaml", SMALL)
    assert cfg.schema.calibration_pairs == [(2, 0, 1.0), (2, 1, 1.0)]
    model = build_model(cfg, device="cpu")
    assert set(model.head.transfers) == {"0_2", "1_2"} and set(model.head.aits) == {"2"}


# --------------------------------------------------------------------------------------------
# Registry and tracing: every model class is traceable (the train pipeline and serving need it)


MODEL_CONFIGS = {"AITM": "aitm_taobao.yaml", "ESMM": "esmm_taobao.yaml", "MMoE": "mmoe_taobao.yaml",
                 "SharedBottom": "shared_bottom_taobao.yaml", "DBMTL": "dbmtl_taobao.yaml", "PLE": "ple_taobao.yaml"}


def test_every_registered_model_class_has_a_config_here():
    from aitm_torchrec.registry import MODELS

    assert set(MODELS) == set(MODEL_CONFIGS)


@pytest.mark.parametrize("model_class", sorted(MODEL_CONFIGS))
def test_model_class_traces_with_torchrec_fx_and_gives_the_same_logits(model_class):
    from torchrec.fx import symbolic_trace

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / MODEL_CONFIGS[model_class], SMALL)
    model = build_model(cfg, device="cpu").eval()
    keys = cfg.schema.keys
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.arange(3 * len(keys)) % 50,
                                                 lengths=torch.ones(3 * len(keys), dtype=torch.int64))
    dense = torch.zeros(3, cfg.schema.dense_dim)
    traced = symbolic_trace(model)
    torch.testing.assert_close(traced(dense, sparse), model(dense, sparse))
    assert model(dense, sparse).shape == (3, len(cfg.schema.tasks))


# --------------------------------------------------------------------------------------------
# The wide part (WIDE feature groups): per task, the summed wide columns join the logits


def wide_ebc(rows: int = 10) -> EmbeddingBagCollection:
    """Wide tables of a and b, 4 columns (T = 2 rounded up to FBGEMM's 4), set by hand:
    wide_a[r] = (0.1 r, -0.2 r, 9, 9), wide_b[r] = (1, 0.01 r, 9, 9). Columns 2-3 are never read."""
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"wide_{n}", feature_names=[n], num_embeddings=rows, embedding_dim=4) for n in ("a", "b")
    ], device=torch.device("cpu"))
    r = torch.arange(rows, dtype=torch.float32)
    with torch.no_grad():
        ebc.embedding_bags["wide_a"].weight.copy_(torch.stack([0.1 * r, -0.2 * r, 9 + 0 * r, 9 + 0 * r], dim=1))
        ebc.embedding_bags["wide_b"].weight.copy_(torch.stack([1 + 0 * r, 0.01 * r, 9 + 0 * r, 9 + 0 * r], dim=1))
    return ebc


# tiny_batch's bags: row 0 a=[1] b=[2]; row 1 a=[3, 4] b=[]; row 2 a=[5] b=[6] (sum pooling).
WIDE_BY_HAND = torch.tensor([[0.1 + 1.0, -0.2 + 0.02],
                             [0.3 + 0.4, -0.6 - 0.8],
                             [0.5 + 1.0, -1.0 + 0.06]])


def wide_model(head) -> MultiTaskModel:
    torch.manual_seed(0)
    mlp = MLP(4, MLPSpec((3,)))
    return MultiTaskModel(tiny_ebc(), [["a", "b"]], {}, mlp, head(mlp.out_dim), wide_ebc=wide_ebc(), wide_columns=2)


def test_wide_part_adds_each_tasks_summed_wide_columns_to_the_deep_logits():
    model = wide_model(lambda width: SharedBottomHead(width, [MLPSpec((2,))] * 2))
    batch = tiny_batch()
    torch.testing.assert_close(model.wide_logits(batch.sparse), WIDE_BY_HAND)
    x = model.embed(batch.dense, batch.sparse)[0]
    deep = model.predict(x)  # the same towers without the wide part
    torch.testing.assert_close(model(batch.dense, batch.sparse), deep + WIDE_BY_HAND)
    # the train wrapper's logits are the model's (wide part included), and its loss reads them
    _, (_, logits, labels, weights) = MultiTaskTrain(model, MultiTaskLoss([1.0, 1.0], []))(batch)
    torch.testing.assert_close(logits, deep + WIDE_BY_HAND)


def test_esmm_takes_the_wide_part_into_its_conditional_logits():
    model = wide_model(lambda width: ESMMHead(width, [MLPSpec((2,))] * 2, [None, 0]))
    batch = tiny_batch()
    b = model.backbone(model.embed(batch.dense, batch.sparse)[0])
    conditional = model.head.conditional_logits(b) + WIDE_BY_HAND
    got = model(batch.dense, batch.sparse)
    torch.testing.assert_close(got, marginal_logits(conditional, [None, 0]))
    # P(buy) = sigmoid(c_buy) x P(click) <= P(click) still holds, whatever the wide part adds
    assert (torch.sigmoid(got[:, 1]) <= torch.sigmoid(got[:, 0])).all()


def _wide_config(tmp_path, name: str):
    """A shipped config (small tables) with a WIDE group of three of its features."""
    import yaml

    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    raw["model_config"]["feature_groups"].append(
        {"group_name": "wide", "feature_names": ["user_id", "adgroup_id", "tag_brand_list"], "wide_deep": "WIDE"})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, SMALL)


def test_wide_tables_are_built_from_the_wide_groups(tmp_path):
    from aitm_torchrec.registry import WIDE_INIT_SCALE

    cfg = _wide_config(tmp_path, "aitm_3step.yaml")
    model = build_model(cfg, device="cpu")
    configs = model.wide_ebc.embedding_bag_configs()
    assert [(c.name, c.feature_names, c.num_embeddings, c.embedding_dim) for c in configs] == [
        ("wide_user_id", ["user_id"], 50, 4), ("wide_adgroup_id", ["adgroup_id"], 50, 4),
        ("wide_tag_brand_list", ["tag_brand_list"], 50, 4)]  # 3 towers -> 4 columns
    weights = torch.cat([p.detach() for p in model.wide_ebc.parameters()])
    assert weights.abs().max() <= WIDE_INIT_SCALE and weights.abs().max() > 0
    assert model.input_dim == 17 * 16  # WIDE groups are not model input
    assert model.wide_shape == (3, 4, 3)
    plain = build_model(load_config(REPO / "configs" / "aitm_3step.yaml", SMALL), device="cpu")
    assert plain.wide_ebc is None and not any("wide" in k for k in plain.state_dict())


@pytest.mark.parametrize("model_class", sorted(MODEL_CONFIGS))
def test_model_class_with_a_wide_part_traces_with_torchrec_fx_and_gives_the_same_logits(model_class, tmp_path):
    from torchrec.fx import symbolic_trace

    torch.manual_seed(0)
    cfg = _wide_config(tmp_path, MODEL_CONFIGS[model_class])
    model = build_model(cfg, device="cpu").eval()
    with torch.no_grad():
        for p in model.wide_ebc.parameters():
            p.uniform_(-1.0, 1.0)  # a wide part large enough to show
    keys = cfg.schema.keys
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.arange(3 * len(keys)) % 50,
                                                 lengths=torch.ones(3 * len(keys), dtype=torch.int64))
    dense = torch.zeros(3, cfg.schema.dense_dim)
    traced = symbolic_trace(model)
    expected = model(dense, sparse)
    torch.testing.assert_close(traced(dense, sparse), expected)
    without = model.predict(model.embed(dense, sparse)[0])
    assert (expected - without).abs().max() > 1e-2, "the traced model must carry the wide part"
