"""Task-specific embeddings (STEM, ``model_config.task_embeddings``): the logits worked out by hand
in numpy with and without the stem gate, the gate's all-forward / task-specific-backward
gradients, the tables built from a config, and every model class fx-traced with them (a wide
part too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from aitm_torchrec.baselines import SharedBottomHead
from aitm_torchrec.config import load_config
from aitm_torchrec.data import Batch
from aitm_torchrec.model import MLP, MLPSpec, MultiTaskModel
from aitm_torchrec.registry import build_model
from aitm_torchrec.stem import TaskGate
from aitm_torchrec.task import MultiTaskLoss, MultiTaskTrain
from tests.conftest import REPO

# ---- by hand ------------------------------------------------------------------------------------
# Three rows, sum pooling: row 0 a=[1] b=[2]; row 1 a=[3, 4] b=[]; row 2 a=[5] b=[6].
A_IDS, B_IDS = [[1], [3, 4], [5]], [[2], [], [6]]
ROWS = 10
r = np.arange(ROWS, dtype=np.float32)[:, None]
SHARED = {"a": np.hstack([0.1 * r, -0.2 * r]), "b": np.hstack([1 + 0 * r, 0.05 * r])}  # 2 columns each
# task 0's and task 1's own tables of feature a (2 columns)
TASK = {"task_t0_a": np.hstack([0.3 * r, 1 + 0 * r]), "task_t1_a": np.hstack([-0.1 * r, 0.2 * r])}
# output layer of each tower (identity towers): logit_t = OUT_W[t] . [x ; u_t] + OUT_B[t]
OUT_W = np.array([[0.5, -1.0, 0.25, 2.0, 1.0, -0.5], [-0.3, 0.2, 1.0, -1.0, 0.7, 0.4]], np.float32)
OUT_B = np.array([0.1, -0.2], np.float32)
# gate of each task: softmax(GATE_W[t] . [e_t ; v] + GATE_B[t]) over the 2 tasks, v = x's columns of a
GATE_W = np.array([[[0.2, -0.1, 0.5, 0.3], [-0.4, 0.6, 0.1, -0.2]],
                   [[0.0, 0.3, -0.5, 0.2], [0.1, -0.2, 0.4, 0.6]]], np.float32)
GATE_B = np.array([[0.05, -0.05], [0.2, 0.0]], np.float32)


def pooled(table: np.ndarray, bags: list[list[int]]) -> np.ndarray:
    return np.stack([table[ids].sum(0) if ids else np.zeros(table.shape[1], np.float32) for ids in bags])


def logits_by_hand(gate: bool) -> np.ndarray:
    x = np.hstack([pooled(SHARED["a"], A_IDS), pooled(SHARED["b"], B_IDS)])  # B x 4
    e = [pooled(TASK["task_t0_a"], A_IDS), pooled(TASK["task_t1_a"], A_IDS)]  # per task B x 2
    u = e
    if gate:
        v = x[:, :2]
        u = []
        for t in range(2):
            s = np.hstack([e[t], v]) @ GATE_W[t].T + GATE_B[t]  # B x 2
            g = np.exp(s) / np.exp(s).sum(1, keepdims=True)
            u.append(g[:, :1] * e[0] + g[:, 1:] * e[1])
    return np.stack([np.hstack([x, u[t]]) @ OUT_W[t] + OUT_B[t] for t in range(2)], axis=1)


def _ebc(tables: dict[str, np.ndarray], features: dict[str, str]) -> EmbeddingBagCollection:
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=n, feature_names=[features[n]], num_embeddings=ROWS, embedding_dim=2) for n in tables
    ], device=torch.device("cpu"))
    with torch.no_grad():
        for n, w in tables.items():
            ebc.embedding_bags[n].weight.copy_(torch.from_numpy(w))
    return ebc


def hand_model(gate: bool) -> MultiTaskModel:
    head = SharedBottomHead(4, [MLPSpec(())] * 2, extra_dims=[2, 2])  # identity towers on [x ; u_t]
    task_gate = TaskGate(2, 2, 2) if gate else None
    with torch.no_grad():
        for t, out in enumerate(head.outputs):
            out.weight.copy_(torch.from_numpy(OUT_W[t:t + 1]))
            out.bias.copy_(torch.from_numpy(OUT_B[t:t + 1]))
        for t, g in enumerate(task_gate.gates if gate else []):
            g.weight.copy_(torch.from_numpy(GATE_W[t]))
            g.bias.copy_(torch.from_numpy(GATE_B[t]))
    return MultiTaskModel(_ebc(SHARED, {"a": "a", "b": "b"}), [["a", "b"]], {}, MLP(4, MLPSpec(())), head,
                          task_ebc=_ebc(TASK, {n: "a" for n in TASK}), task_tables=[["task_t0_a"], ["task_t1_a"]],
                          task_gate=task_gate, task_shared_columns=[(0, 2)] if gate else ())  # a: columns 0-1


def hand_batch() -> Batch:
    ids = A_IDS + B_IDS
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([i for bag in ids for i in bag]),
                                                 lengths=torch.tensor([len(bag) for bag in ids]))
    return Batch(dense=torch.zeros(3, 0), sparse=sparse, labels=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]),
                 weights=torch.ones(3))


@pytest.mark.parametrize("gate", [False, True], ids=["none", "stem"])
def test_each_tower_reads_its_task_embeddings_beside_the_shared_representation(gate):
    model, batch = hand_model(gate), hand_batch()
    expected = torch.from_numpy(logits_by_hand(gate))
    torch.testing.assert_close(model(batch.dense, batch.sparse), expected)
    # the train wrapper computes the same logits (task tables looked up outside autocast)
    _, (_, logits, _, _) = MultiTaskTrain(model, MultiTaskLoss([1.0, 1.0], []))(batch)
    torch.testing.assert_close(logits, expected)
    assert not np.allclose(logits_by_hand(False), logits_by_hand(True)), "the gate must change the numbers"


def test_embedding_regularization_covers_the_task_embeddings_of_the_batch():
    model, batch = hand_model(gate=True), hand_batch()
    shared = np.hstack([pooled(SHARED["a"], A_IDS), pooled(SHARED["b"], B_IDS)])
    task = [pooled(TASK[n], A_IDS) for n in ("task_t0_a", "task_t1_a")]
    by_hand = 0.5 * sum(float((m ** 2).sum()) for m in [shared, *task])  # three rows of weight 1
    plain, regularised = (MultiTaskTrain(model, MultiTaskLoss([1.0, 1.0], []), embedding_regularization=c)(batch)[0]
                          for c in (0.0, 1.0))
    assert float(regularised - plain) == pytest.approx(by_hand, rel=1e-5)


def _grads(model: MultiTaskModel, batch: Batch, task: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(batch.dense, batch.sparse)[:, task].sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if "ebc." in n}


def test_stem_gate_trains_only_the_towers_own_tables_but_forwards_every_tasks():
    model, batch = hand_model(gate=True), hand_batch()
    for task, (own, other) in enumerate([("task_t0_a", "task_t1_a"), ("task_t1_a", "task_t0_a")]):
        grads = _grads(model, batch, task)
        own_grad, other_grad = (grads[f"task_ebc.embedding_bags.{n}.weight"] for n in (own, other))
        assert own_grad is not None and own_grad.abs().sum() > 0
        assert other_grad is None or not other_grad.any(), f"task {task}'s loss trained {other}"
        assert grads["ebc.embedding_bags.a.weight"].abs().sum() > 0  # the shared table: every task
    # all forward: task 1's table moves task 0's logit (through task 0's gate)
    before = model(batch.dense, batch.sparse).detach()
    with torch.no_grad():
        model.task_ebc.embedding_bags["task_t1_a"].weight.mul_(2.0)
    assert (model(batch.dense, batch.sparse)[:, 0] - before[:, 0]).abs().max() > 1e-3


# ---- from a config ----------------------------------------------------------------------------

SMALL = [f"feature_config.features.{i}.hash_bucket_size=50" for i in range(17)]
MODEL_CONFIGS = {"AITM": "aitm_taobao.yaml", "DBMTL": "dbmtl_taobao.yaml", "ESMM": "esmm_taobao.yaml",
                 "MMoE": "mmoe_taobao.yaml", "PLE": "ple_taobao.yaml", "SharedBottom": "shared_bottom_taobao.yaml"}
TASK_FEATURES = ["user_id", "brand", "tag_brand_list"]


def stem_config(model_class: str, gate: str = "stem", wide: bool = False):
    """A shipped config (small tables) with task embeddings of three features (and a WIDE group)."""
    path = REPO / "configs" / MODEL_CONFIGS[model_class]
    te = f"{{features: [{', '.join(TASK_FEATURES)}], embedding_dim: 8, gate: {gate}}}"
    overrides = [*SMALL, f"model_config.task_embeddings={te}"]
    if wide:
        deep = ", ".join(load_config(path, SMALL).model_config.feature_groups[0].feature_names)
        overrides.append(f"model_config.feature_groups=[{{group_name: all, feature_names: [{deep}]}}, "
                         "{group_name: wide, feature_names: [user_id, pid], wide_deep: WIDE}]")
    return load_config(path, overrides)


def test_every_registered_model_class_is_covered():
    from aitm_torchrec.registry import MODELS

    assert set(MODELS) == set(MODEL_CONFIGS)


def test_task_tables_are_built_per_tower_and_feature():
    cfg = stem_config("AITM", "none")
    model = build_model(cfg, device="cpu")
    configs = model.task_ebc.embedding_bag_configs()
    assert [(c.name, c.feature_names, c.num_embeddings, c.embedding_dim) for c in configs] == [
        (f"task_{t}_{f}", [f], 50, 8) for t in ("ctr", "cvr") for f in TASK_FEATURES]
    assert model.task_gate is None and model.input_dim == 17 * 16  # the model input is unchanged
    assert model.head.towers[0][0].in_features == 256 + 3 * 8  # the backbone's output, then e_t
    gated = build_model(stem_config("AITM"), device="cpu")
    assert [g.in_features for g in gated.task_gate.gates] == [3 * 8 + 3 * 16] * 2  # [e_t ; v]
    plain = build_model(load_config(REPO / "configs" / "aitm_taobao.yaml", SMALL), device="cpu")
    assert plain.task_ebc is None and not any("task" in k for k in plain.state_dict())


@pytest.mark.parametrize("model_class", sorted(MODEL_CONFIGS))
def test_first_towers_loss_never_trains_the_second_towers_tables_through_the_gate(model_class):
    torch.manual_seed(0)
    cfg = stem_config(model_class)
    model = build_model(cfg, device="cpu")
    keys = cfg.schema.keys
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.arange(4 * len(keys)) % 50,
                                                 lengths=torch.ones(4 * len(keys), dtype=torch.int64))
    model(torch.zeros(4, cfg.schema.dense_dim), sparse)[:, 0].sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "task_ebc." in n}
    for f in TASK_FEATURES:
        assert grads[f"task_ebc.embedding_bags.task_ctr_{f}.weight"].abs().sum() > 0
        g = grads[f"task_ebc.embedding_bags.task_cvr_{f}.weight"]
        assert g is None or not g.any(), f"{model_class}: ctr's loss trained task_cvr_{f}"


@pytest.mark.parametrize("gate", ["none", "stem"])
@pytest.mark.parametrize("model_class", sorted(MODEL_CONFIGS))
def test_model_class_with_task_embeddings_and_a_wide_part_traces_and_gives_the_same_logits(model_class, gate):
    from torchrec.fx import symbolic_trace

    torch.manual_seed(0)
    cfg = stem_config(model_class, gate, wide=True)
    model = build_model(cfg, device="cpu").eval()
    assert model.wide_ebc is not None and model.task_ebc is not None
    keys = cfg.schema.keys
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.arange(3 * len(keys)) % 50,
                                                 lengths=torch.ones(3 * len(keys), dtype=torch.int64))
    dense = torch.zeros(3, cfg.schema.dense_dim)
    traced = symbolic_trace(model)
    expected = model(dense, sparse)
    torch.testing.assert_close(traced(dense, sparse), expected)
    with torch.no_grad():
        for p in model.task_ebc.parameters():
            p.mul_(-3.0)
    moved = traced(dense, sparse)
    assert (moved - expected).abs().max() > 1e-4, "the traced model must read the task tables"
    torch.testing.assert_close(moved, model(dense, sparse))
