"""The library's quality keys: the generator's sequential dependence, the init-scale and
learning-rate-scaling keys (the benchmarks that measure quality: ``tests/test_benchmarks.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
    cfg = load_config(None, ["train_config.learning_rate_scaling.rule=none"])
    assert scaled_learning_rates(cfg, 16) is cfg
    shipped = load_config(None)  # sqrt from a global batch of 2048: 4096 x 2 doubles the rates
    assert scaled_learning_rates(shipped, 2).train_config.sparse_optimizer.learning_rate == pytest.approx(
        shipped.train_config.sparse_optimizer.learning_rate * 2)
    sqrt = load_config(None, ["train_config.learning_rate_scaling.rule=sqrt",
                              "train_config.learning_rate_scaling.reference_batch_size=8192"])
    s16 = scaled_learning_rates(sqrt, 16)  # 4096 x 16 = 65536 = 8 x 8192
    tc, base = s16.train_config, sqrt.train_config
    assert tc.dense_optimizer.learning_rate == pytest.approx(base.dense_optimizer.learning_rate * 8 ** 0.5)
    assert tc.sparse_optimizer.learning_rate == pytest.approx(base.sparse_optimizer.learning_rate * 8 ** 0.5)
    lin = load_config(None, ["train_config.learning_rate_scaling={rule: linear, reference_batch_size: 8192}"])
    assert scaled_learning_rates(lin, 1).train_config.dense_optimizer.learning_rate == pytest.approx(
        lin.train_config.dense_optimizer.learning_rate / 2)
    with pytest.raises(ConfigError, match="rule"):
        load_config(None, ["train_config.learning_rate_scaling.rule=cube"])
