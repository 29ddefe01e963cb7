"""Quality work: the generator's sequential dependence, the init-scale and learning-rate-scaling
keys, the plain PyTorch peer, and ``bench.py quality`` end to end at a tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from aitm_torchrec.config import ConfigError, load_config, scaled_learning_rates
from aitm_torchrec.registry import build_model, embedding_bag_configs
from datasets import synthetic


def _sample(dependence: float, n: int = 4000):
    world = synthetic.World(["clk", "cart", "buy"], 3, sequential_dependence=dependence)
    return world.sample(np.random.default_rng(5), n, False)


def test_sequential_dependence_zero_keeps_the_data():
    a, b = _sample(0.0), synthetic.World(["clk", "cart", "buy"], 3).sample(np.random.default_rng(5), 4000, False)
    assert a.equals(b)


def test_sequential_dependence_ties_later_steps_to_the_earlier_one():
    def conditional_logits(table):
        p = np.stack([table.column(f"p_{l}").to_numpy().astype(np.float64) for l in ("clk", "cart", "buy")], 1)
        cond = p / np.concatenate([np.ones((len(p), 1)), p[:, :-1]], 1)  # P(step t | step t-1)
        return np.log(cond / (1 - cond))

    free, tied = conditional_logits(_sample(0.0)), conditional_logits(_sample(0.9))
    assert np.allclose(free[:, 0], tied[:, 0], atol=1e-4)  # the first step is unchanged
    corr = lambda x: np.corrcoef(x[:, 0], x[:, 1])[0, 1]  # noqa: E731
    assert abs(corr(free)) < 0.3 < 0.8 < corr(tied)
    assert not np.allclose(free[:, 2], tied[:, 2])


def test_sequential_dependence_cli_records_it_and_checks_range(tmp_path):
    synthetic.main(["--out", str(tmp_path / "d"), "--rows", "300", "--eval-rows", "300",
                    "--sequential-dependence", "0.5"])
    assert json.loads((tmp_path / "d" / "_SUCCESS").read_text())["sequential_dependence"] == 0.5
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "e"), "--sequential-dependence", "1.5"])


def test_embedding_init_scale_reaches_the_tables():
    default = embedding_bag_configs(load_config(None))
    assert default[1].get_weight_init_max() == pytest.approx((1 / 100000) ** 0.5)
    cfg = load_config(None, ["model_config.embedding_init_scale=0.05"])
    tables = embedding_bag_configs(cfg)
    assert {(t.get_weight_init_min(), t.get_weight_init_max()) for t in tables} == {(-0.05, 0.05)}
    small = load_config(None, ["model_config.embedding_init_scale=0.05"] +
                        [f"feature_config.features.{i}.hash_bucket_size=50" for i in (1, 3, 4, 5, 6, 15, 16)])
    weight = build_model(small, device="cpu").ebc.embedding_bags["user_id"].weight  # unsharded: init_fn
    assert 0.04 < float(weight.abs().max()) <= 0.05
    with pytest.raises(ConfigError, match="embedding_init_scale"):
        load_config(None, ["model_config.embedding_init_scale=-1"])


def test_learning_rate_scaling_rules():
    cfg = load_config(None)
    assert scaled_learning_rates(cfg, 16) is cfg  # rule none
    sqrt = load_config(None, ["train_config.learning_rate_scaling.rule=sqrt",
                              "train_config.learning_rate_scaling.reference_batch_size=8192"])
    s16 = scaled_learning_rates(sqrt, 16)  # 4096 x 16 = 65536 = 8 x 8192
    tc, base = s16.train_config, sqrt.train_config
    assert tc.dense_optimizer.learning_rate == pytest.approx(base.dense_optimizer.learning_rate * 8 ** 0.5)
    assert tc.sparse_optimizer.learning_rate == pytest.approx(base.sparse_optimizer.learning_rate * 8 ** 0.5)
    lin = load_config(None, ["train_config.learning_rate_scaling.rule=linear"])
    assert scaled_learning_rates(lin, 1).train_config.dense_optimizer.learning_rate == pytest.approx(
        lin.train_config.dense_optimizer.learning_rate / 2)
    with pytest.raises(ConfigError, match="rule"):
        load_config(None, ["train_config.learning_rate_scaling.rule=cube"])


def test_peer_model_trains_on_the_seed_layout(tiny_data):
    from launch import peer

    cfg = load_config(None)
    sizes = {c: 64 for c in peer.seed_layout(cfg)[2]}
    model, opt, ids, tags, sizes = peer.build(cfg, sizes)
    ds = peer.RowDataset(sorted((tiny_data / "train").glob("*.parquet")), ids, tags, ["clk", "buy"], sizes)
    assert len(ds) == 12000 and ds.tags.shape[1:] == (2, peer.MAX_TAGS)
    table = pq.read_table(tiny_data / "train", columns=["tag_brand_list"]).column(0).to_pylist()
    first = [t % 64 for t in table[0][:peer.MAX_TAGS]]
    assert list(ds.tags[0, 1, :len(first)]) == first and (ds.tags[0, 1, len(first):] == -1).all()
    x, g, y = next(iter(peer.loader(ds, 256, True)))
    before = [p.detach().clone() for p in model.parameters()]
    loss = peer.loss_fn(model(x, g), y)
    loss.backward()
    opt.step()
    assert model(x, g).shape == (256, 2) and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_bench_quality_end_to_end_tiny(tmp_path, tiny_data):
    from launch import bench

    small = ["data_config.batch_size=256", "model_config.backbone.mlp.hidden_units=[32]"] + [
        f"feature_config.features.{i}.hash_bucket_size=500" for i in (1, 3, 4, 5, 6, 15, 16)]
    out = tmp_path / "q"
    result = bench.main(["quality", "--rows", "3000", "--eval-rows", "1000", "--seeds", "1",
                         "--models", "AITM,SharedBottom", "--sequential-dependence", "0.5",
                         "--data-root", str(tmp_path / "data"), "--out", str(out), *small])
    summary = {(e["model"], e["data"]): e for e in result["summary"]}
    assert set(summary) == {("AITM", "2step"), ("SharedBottom", "2step"), ("AITM", "2step_seq"),
                            ("SharedBottom", "2step_seq")}
    for e in summary.values():
        assert e["seeds"] == [1] and set(e["tasks"]) == {"ctr", "cvr"}
        for v in e["tasks"].values():
            assert 0 < v["auc"] < 1 and v["gap"] == pytest.approx(v["oracle"] - v["auc"], abs=1e-3)
    saved = json.loads(Path(out).with_suffix(".json").read_text())
    assert len(saved["runs"]) == 4
    assert "| AITM |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_bench_all_table_skips_missing_subcommands_and_renders(tmp_path, monkeypatch):
    from launch import bench, bench_all

    calls = []

    def fake_main(argv):
        calls.append(argv)
        return {"peer": {"speed": {k: {"table_rows_total": 10, "peer_examples_per_s": 100, "ours_examples_per_s": 500,
                                       "ratio": 5.0} for k in ("seed_tables", "big_tables")}}}.get(argv[0], {"x": 1})

    monkeypatch.setattr(bench, "main", fake_main)
    import argparse

    args = argparse.Namespace(out=str(tmp_path / "b"), only=None, quick=True, render_only=False)
    results = bench_all.cmd(args, available={"peer", "serve"})
    assert [c[0] for c in calls] == ["peer", "serve"]  # train/data/quality/score/export absent here: skipped
    assert set(results) == {"machine", "command", "peer", "serve"}
    md = (tmp_path / "b" / "results.md").read_text()
    assert "| seed_tables | 10 | 100 | 500 | 5.0 |" in md and "## serve" in md
    assert (tmp_path / "b" / "speed.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "b" / "serve.json").read_text()) == {"x": 1}


def test_true_form_is_the_generators_own_model(tmp_path):
    """With the generator's true parameters loaded, the one-pass reference's model gives back every
    row's p_* column (the oracle) on a 3-step chain: tags as a mean, price and the user x category
    interaction included. Another world's parameters do not."""
    from launch import true_form

    labels = ["clk", "cart", "buy"]
    data = tmp_path / "d"
    synthetic.main(["--out", str(data), "--rows", "2000", "--eval-rows", "3000", "--labels", ",".join(labels),
                    "--seed", "5"])
    rows = true_form.read_rows(data / "eval", labels)
    table = pq.read_table(data / "eval", columns=[f"p_{x}" for x in labels])
    truth = np.stack([table.column(f"p_{x}").to_numpy() for x in labels], 1)
    for world_seed, matches in ((5, True), (6, False)):
        model = true_form.TrueForm(true_form.vocabulary(rows), len(labels))
        model.load_world(synthetic.World(labels, world_seed))
        with torch.no_grad():
            marginal = torch.cumprod(torch.sigmoid(model(rows)), 1).numpy()
        assert (np.abs(marginal - truth).max() < 1e-6) == matches


def test_true_form_learns_every_step_of_a_three_step_chain_in_one_pass(tmp_path):
    from launch import true_form

    data = tmp_path / "d"
    synthetic.main(["--out", str(data), "--rows", "30000", "--eval-rows", "10000", "--labels", "clk,cart,buy",
                    "--seed", "4"])
    for optimizer, rate in (("newton", 0.5), ("adagrad", 0.1)):
        out = true_form.run(data, optimizer, rate, batch=1024)  # the chain from the set's _SUCCESS
        assert out["rows"] == 30000 and set(out["auc"]) == {"clk", "cart", "buy"}
        assert out["auc"]["clk"] > 0.65 and out["auc"]["cart"] > 0.65, out  # learned, not chance
    with pytest.raises(ValueError, match="newton or adagrad, not 'sgd'"):
        true_form.run(data, "sgd")
    seq = tmp_path / "s"
    synthetic.main(["--out", str(seq), "--rows", "100", "--eval-rows", "100", "--sequential-dependence", "0.5"])
    with pytest.raises(ValueError, match="sequential-dependence 0.5"):
        true_form.run(seq)
