"""The backbone's interaction blocks (aitm_torchrec/backbone.py): the dot products and a cross
layer worked out by hand, how the backbone concatenates its parts, the plain-MLP path unchanged,
every model class fx-traced with them, the config errors, and (slow) a tiny model with both
blocks trained on 2 gloo ranks whose checkpoint scores, serves (fp32 and int8 Linear layers),
exports tables and resumes on 1 rank with the scores the checkpoint's own model gives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from aitm_torchrec.backbone import DotInteraction, InteractionBackbone, cross_net
from aitm_torchrec.config import ConfigError, load_config
from aitm_torchrec.model import MLP
from aitm_torchrec.registry import build_model
from tests.conftest import REPO, scored, tiny_config_dict
from tests.multiprocess import run_ranks

# Rows of two features of dim 2, a = (a0, a1) and b = (b0, b1), with a raw column r between them:
# v = [a0, a1, r, b0, b1], so the dot reads columns 0, 1, 3, 4.
A = [[1.0, 2.0], [0.0, 1.0], [-1.0, 3.0]]
B = [[3.0, 4.0], [2.0, -1.0], [0.5, 2.0]]
V = torch.tensor([a + [9.0] + b for a, b in zip(A, B)])


def test_dot_interaction_gives_the_pairwise_dot_products_computed_by_hand():
    dot = DotInteraction([0, 1, 3, 4], dim=2)
    # <a, b>: 1*3 + 2*4, 0*2 + 1*(-1), -1*0.5 + 3*2
    torch.testing.assert_close(dot(V), torch.tensor([[11.0], [-1.0], [5.5]]))
    assert dot.out_dim == 1 and dot.state_dict() == {}  # nothing to train, nothing in checkpoints
    with_self = DotInteraction([0, 1, 3, 4], dim=2, self_interaction=True)
    # then <a, a> and <b, b>
    torch.testing.assert_close(with_self(V), torch.tensor([[11.0, 5.0, 25.0], [-1.0, 1.0, 5.0], [5.5, 10.0, 4.25]]))
    assert with_self.out_dim == 3


def test_dot_interaction_lists_the_pairs_row_by_row_of_the_upper_triangle():
    e = torch.tensor([[1.0, 0.0, 2.0, 0.0, 3.0, 1.0]])  # e0 = (1, 0), e1 = (2, 0), e2 = (3, 1)
    torch.testing.assert_close(DotInteraction(range(6), dim=2)(e), torch.tensor([[2.0, 3.0, 6.0]]))  # 01, 02, 12


def test_one_cross_layer_computed_by_hand():
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0], [2.0, 1.0]])
    full = cross_net(2, num_layers=1)
    with torch.no_grad():
        full.kernels[0].copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        full.bias[0].copy_(torch.tensor([[0.5], [-1.0]]))
    # x1 = x0 * (W x0 + b) + x0; row 1: W x0 = (5, 11), + b = (5.5, 10), * x0 = (5.5, 20), + x0 = (6.5, 22)
    torch.testing.assert_close(full(x), torch.tensor([[6.5, 22.0], [0.0, 4.0], [11.0, 10.0]]))
    low = cross_net(2, num_layers=1, low_rank=1)
    with torch.no_grad():
        low.W_kernels[0].copy_(torch.tensor([[1.0], [2.0]]))
        low.V_kernels[0].copy_(torch.tensor([[1.0, 1.0]]))
        low.bias[0].zero_()
    # W (V x0) with V x0 = x0_0 + x0_1: row 1: 3 -> (3, 6), * x0 = (3, 12), + x0 = (4, 14)
    torch.testing.assert_close(low(x), torch.tensor([[4.0, 14.0], [0.0, 1.0], [8.0, 7.0]]))


def test_interaction_backbone_concatenates_mlp_cross_and_dots_then_runs_top_mlp():
    from aitm_torchrec.model import MLPSpec

    torch.manual_seed(0)
    mlp, cross, dot = MLP(5, MLPSpec((3,))), cross_net(5, 2), DotInteraction([0, 1, 3, 4], 2, self_interaction=True)
    plain = InteractionBackbone(mlp, cross, dot, MLPSpec(), in_dim=5)
    assert plain.out_dim == 3 + 5 + 3
    torch.testing.assert_close(plain(V), torch.cat([mlp(V), cross(V), dot(V)], dim=1))
    top = InteractionBackbone(mlp, None, dot, MLPSpec((4,)), in_dim=5)
    assert top.out_dim == 4 and top.top_mlp[0].in_features == 3 + 3
    torch.testing.assert_close(top(V), top.top_mlp(torch.cat([mlp(V), dot(V)], dim=1)))
    with pytest.raises(ValueError, match="needs a cross network or a dot interaction"):
        InteractionBackbone(mlp, None, None, MLPSpec(), in_dim=5)


SMALL = [f"feature_config.features.{i}.hash_bucket_size=50" for i in range(17)] + [
    "model_config.backbone.mlp.hidden_units=[16]"]
CONFIGS = {"AITM": "aitm_taobao.yaml", "ESMM": "esmm_taobao.yaml", "MMoE": "mmoe_taobao.yaml",
           "SharedBottom": "shared_bottom_taobao.yaml", "DBMTL": "dbmtl_taobao.yaml", "PLE": "ple_taobao.yaml"}
BOTH = ["model_config.backbone.cross={num_layers: 2}", "model_config.backbone.dot_interaction={}"]


def test_without_interaction_blocks_the_backbone_is_the_plain_mlp():
    """The modules and state dict keys of a model from before the interaction blocks."""
    model = build_model(load_config(REPO / "configs" / "aitm_taobao.yaml", SMALL), device="cpu")
    assert type(model.backbone) is MLP
    assert [k for k in model.state_dict() if k.startswith("backbone.")] == ["backbone.0.weight", "backbone.0.bias"]


def test_the_blocks_read_the_deep_groups_model_input():
    cfg = load_config(REPO / "configs" / "aitm_taobao.yaml", SMALL + BOTH + ["model_config.backbone.top_mlp.hidden_units=[8]"])
    model = build_model(cfg, device="cpu")
    bb, d = model.backbone, cfg.schema.input_dim  # 17 features of dim 16
    assert bb.cross.kernels[0].shape == (d, d) and len(bb.cross.kernels) == 2
    assert bb.dot.num_features == 17 and bb.dot.out_dim == 17 * 16 // 2
    assert bb.top_mlp[0].in_features == 16 + d + 136 and bb.out_dim == 8
    assert model.head.towers[0][0].in_features == 8  # the head takes B x H
    assert bb.dot.columns.tolist() == list(range(d))  # every column: the group holds only sparse features
    assert not any(k.startswith("backbone.dot") for k in model.state_dict())


def test_int8_dense_layers_leave_the_cross_kernels_fp32():
    """--dense-quant int8 swaps nn.Linear layers; the cross kernels are plain parameters (TorchRec
    multiplies by them with matmul), which PyTorch's dynamic quantization does not cover."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from aitm_torchrec.export_model import quantize_dense

    model = quantize_dense(build_model(load_config(REPO / "configs" / "aitm_taobao.yaml", SMALL + BOTH), device="cpu"))
    assert type(model.backbone.mlp[0]) is DynamicLinear
    assert all(k.dtype == torch.float32 for k in model.backbone.cross.kernels)


def test_under_bf16_autocast_the_parts_meet_in_bf16_and_the_logits_are_those_of_an_fp32_concat():
    """The cross and dot outputs are cast to the MLP output's dtype before the concatenation: the
    backbone's output is bf16 under autocast, and the towers' first Linear gets the values it got
    from the fp32 concatenation (it casts its input to bf16 itself), so the logits are equal."""
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / "aitm_taobao_best.yaml", SMALL + BOTH)
    model = build_model(cfg, device="cpu").eval()
    bb, x = model.backbone, torch.randn(64, cfg.schema.input_dim)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        b = bb(x)
        fp32 = torch.cat([bb.mlp(x).float(), bb.cross(x), bb.dot(x).float()], dim=1)
        assert b.dtype == torch.bfloat16 and fp32.dtype == torch.float32
        torch.testing.assert_close(model.head(b), model.head(fp32), rtol=0, atol=0)
    with torch.no_grad():
        assert bb(x).dtype == torch.float32  # without autocast nothing changes dtype


FORMS = {
    "cross": ["model_config.backbone.cross={num_layers: 2}"],
    "cross_low_rank": ["model_config.backbone.cross={num_layers: 2, low_rank: 4}"],
    "dot": ["model_config.backbone.dot_interaction={}"],
    "dot_features": ["model_config.backbone.dot_interaction={features: [brand, user_id, cate_id]}"],
    "dot_self_top_mlp": ["model_config.backbone.dot_interaction={self_interaction: true}",
                         "model_config.backbone.top_mlp.hidden_units=[8]"],
}
CASES = [("AITM", name) for name in FORMS] + [(m, "both") for m in CONFIGS]


@pytest.mark.parametrize("model_class, form", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_each_block_traces_with_torchrec_fx_and_gives_the_same_logits(model_class, form):
    from torchrec.fx import symbolic_trace

    torch.manual_seed(0)
    cfg = load_config(REPO / "configs" / CONFIGS[model_class], SMALL + FORMS.get(form, BOTH))
    model = build_model(cfg, device="cpu").eval()
    keys = cfg.schema.keys
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.arange(3 * len(keys)) % 50,
                                                 lengths=torch.ones(3 * len(keys), dtype=torch.int64))
    dense = torch.zeros(3, cfg.schema.dense_dim)
    traced = symbolic_trace(model)
    torch.testing.assert_close(traced(dense, sparse), model(dense, sparse))
    assert model(dense, sparse).shape == (3, len(cfg.schema.tasks))


@pytest.mark.parametrize("overrides, message", [
    (["model_config.backbone.cross={num_layers: 0}"], r"model_config\.backbone\.cross\.num_layers must be >= 1, got 0"),
    (["model_config.backbone.cross={low_rank: -1}"], r"model_config\.backbone\.cross\.low_rank must be >= 0"),
    (["model_config.backbone.dot_interaction={}", "feature_config.features.0.embedding_dim=8",
      "feature_config.features.5.embedding_dim=4"],
     r"model_config\.backbone\.dot_interaction dots the pooled embeddings of the DEEP groups' sparse features, "
     r"which must share one embedding_dim; got 16 \(user_id, cms_segid, .*\), 4 \(brand\), 8 \(pid\)"),
    (["model_config.backbone.dot_interaction={}", "model_config.feature_groups.0.feature_names=[user_id]"],
     r"dot_interaction dots .* and needs at least 2; they have 1: user_id"),
    (["model_config.backbone.dot_interaction={features: [user_id, clk]}"],
     r"model_config\.backbone\.dot_interaction\.features 'clk' is not a sparse feature of the DEEP groups"),
    (["model_config.backbone.dot_interaction={features: [user_id, brand, user_id]}"],
     r"model_config\.backbone\.dot_interaction\.features lists 'user_id' twice"),
    (["model_config.backbone.dot_interaction={features: [brand]}"],
     r"dot_interaction dots the pooled embeddings of the features listed and needs at least 2; they have 1: brand"),
    (["model_config.backbone.dot_interaction={features: [user_id, brand]}", "feature_config.features.5.embedding_dim=4"],
     r"dot_interaction dots the pooled embeddings of the features listed, which must share one embedding_dim; "
     r"got 16 \(user_id\), 4 \(brand\)"),
    (["model_config.backbone.top_mlp.hidden_units=[8]"],
     r"model_config\.backbone\.top_mlp is read with cross or dot_interaction only"),
    (["model_config.backbone.cross={num_layers: 1}", "model_config.backbone.top_mlp.hidden_units=[0]"],
     r"model_config\.backbone\.top_mlp\.hidden_units must list positive sizes"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "aitm_taobao.yaml", overrides)


def test_dot_interaction_features_dots_only_those_in_their_order(tmp_path):
    """features: [brand, user_id] reads brand's columns then user_id's (a 2-task, 3-row example by
    hand), whatever the group's order."""
    raw = yaml.safe_load((REPO / "configs" / "aitm_taobao.yaml").read_text())
    for f in raw["feature_config"]["features"]:
        f["embedding_dim"] = 2
    raw["model_config"]["feature_groups"][0]["feature_names"] = ["user_id", "cms_segid", "brand"]
    raw["model_config"]["backbone"]["dot_interaction"] = {"features": ["brand", "user_id"], "self_interaction": True}
    config = tmp_path / "sub.yaml"
    config.write_text(yaml.safe_dump(raw))
    dot = build_model(load_config(config), device="cpu").backbone.dot
    assert dot.columns.tolist() == [4, 5, 0, 1] and dot.out_dim == 3  # brand after user_id and cms_segid
    v = torch.tensor([b + [7.0, 7.0] + a for a, b in zip(A, B)])  # user_id = B's rows, cms_segid 7s, brand = A's
    # <brand, user_id> = <a, b> as in the first test, then <brand, brand>, <user_id, user_id>
    torch.testing.assert_close(dot(v), torch.tensor([[11.0, 5.0, 25.0], [-1.0, 1.0, 5.0], [5.5, 10.0, 4.25]]))


def test_dot_interaction_skips_raw_features_and_allows_one_feature_with_itself(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "aitm_taobao.yaml").read_text())
    raw["feature_config"]["features"].append({"input_names": ["score"], "feature_type": "RawFeature", "raw_input_dim": 3})
    raw["model_config"]["feature_groups"][0]["feature_names"] = ["score", "user_id"]
    raw["model_config"]["backbone"]["dot_interaction"] = {"self_interaction": True}
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump(raw))
    dot = build_model(load_config(config), device="cpu").backbone.dot
    assert dot.columns.tolist() == [3 + i for i in range(16)] and dot.out_dim == 1  # user_id after score's 3 columns


# ---- every job on a tiny model with both blocks (2 gloo ranks) -------------------------------------

STEPS = 6
ROWS = 600


def _train(config: str, overrides: list[str]) -> dict:
    from launch.train import main

    return main(["--config", config, *overrides])


def _score(argv: list[str]) -> dict:
    from launch.score import main

    return main(argv)


def _export(argv: list[str]) -> dict:
    from launch.export import main

    return main(argv)


@pytest.mark.slow
def test_trained_checkpoint_scores_serves_exports_and_resumes_as_its_model(tiny_data, tmp_path):
    from aitm_torchrec.data import ParquetReader
    from aitm_torchrec.from_checkpoint import local_model, resolve_checkpoint
    from aitm_torchrec.serving import Predictor

    raw = tiny_config_dict(tiny_data, tmp_path / "run")
    raw["eval_input_path"] = []
    raw["train_config"].update(num_steps=STEPS, save_checkpoints_steps=STEPS)
    raw["sharding_config"] = {"sharding_types": ["table_wise"]}  # tables that reshard (docs/training.md)
    # dot products of three features (dot_interaction.features), in an order other than the group's
    raw["model_config"]["backbone"].update(cross={"num_layers": 2, "low_rank": 8},
                                           dot_interaction={"features": ["cate_id", "user_id", "adgroup_id"]},
                                           top_mlp={"hidden_units": [32]})
    config = tmp_path / "interact.yaml"
    config.write_text(yaml.safe_dump(raw))
    summary = run_ranks(_train, str(config), [])[0]
    assert summary["world_size"] == 2 and summary["train"]["steps"] == STEPS

    cfg = load_config(config)
    model = local_model(cfg, resolve_checkpoint(cfg))
    assert type(model.backbone).__name__ == "InteractionBackbone"
    rows = tmp_path / "rows"
    rows.mkdir()
    pq.write_table(pq.read_table(sorted((tiny_data / "eval").glob("*.parquet"))[0]).slice(0, ROWS),
                   rows / "a.parquet")
    (batch,) = ParquetReader([str(rows / "a.parquet")], cfg.schema, batch_size=ROWS, prefetch=0).epoch(0)
    with torch.no_grad():
        expected = torch.sigmoid(model(batch.dense, batch.sparse)).numpy()
    towers = cfg.schema.tower_names

    def probs(table: pa.Table | dict) -> np.ndarray:
        return np.stack([np.asarray(table[f"probs_{t}"] if isinstance(table, pa.Table) else table[t]) for t in towers], 1)

    _score(["--config", str(config), "--input", str(rows), "--output", str(tmp_path / "scores")])
    np.testing.assert_allclose(probs(scored(tmp_path / "scores")), expected, rtol=0, atol=1e-5)

    table = pq.read_table(rows / "a.parquet")
    for dense_quant, tol in (("none", 1e-5), ("int8", 2e-2)):
        out = tmp_path / f"artefact_{dense_quant}"
        _export(["model", "--config", str(config), "--output", str(out), "--quant", "none", "--dense-quant", dense_quant])
        predictor = Predictor(out, threads=1)
        assert np.abs(probs(predictor.predict_arrow(table)) - expected).max() <= tol, dense_quant
    assert predictor.meta["self_check"]["max_abs_diff_vs_checkpoint_model"] <= 2e-2

    _export(["embeddings", "--config", str(config), "--output", str(tmp_path / "tables"), "--tables", "user_id"])
    exported = pq.read_table(tmp_path / "tables" / "user_id")
    weights = model.ebc.embedding_bags["user_id"].weight.detach().numpy()
    np.testing.assert_array_equal(np.stack(exported.column("embedding").to_numpy(zero_copy_only=False)),
                                  weights[exported.column("row").to_numpy()])

    # the 2-rank checkpoint (cross kernels and top MLP replicated, DDP) resumes on 1 rank
    again = run_ranks(_train, str(config), [f"train_config.num_steps={STEPS + 1}"], nproc=1)[0]
    assert again["train"]["resumed_from_step"] == STEPS and again["world_size"] == 1
