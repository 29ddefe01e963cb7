"""Metrics are exact across ranks; training logs window metrics and periodic evals."""

from __future__ import annotations

import json

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from tests.multiprocess import run_ranks


def _data(seed: int = 0, n: int = 600) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, 2, generator=g) < 0.3).float()
    logits = torch.randn(n, 2, generator=g) + 1.5 * labels  # informative, not perfect
    weights = torch.ones(n)
    weights[-37:] = 0  # padding rows must not count
    return logits, labels, weights


def _rank_metrics() -> dict:
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.metrics import TaskMetrics

    env = aitm_dist.setup()
    logits, labels, weights = _data()
    half = len(logits) // 2
    mine = slice(0, half) if env.rank == 0 else slice(half, None)
    m = TaskMetrics(["a", "b"])
    m.update(logits[mine], labels[mine], weights[mine])
    out = m.compute()
    aitm_dist.teardown()
    return out


@pytest.mark.slow
def test_metrics_over_two_ranks_equal_the_metrics_of_all_rows():
    results = run_ranks(_rank_metrics)
    assert results[0] == results[1]
    logits, labels, weights = _data()
    keep = weights > 0
    for t, name in enumerate(["a", "b"]):
        p, y = torch.sigmoid(logits[keep, t]), labels[keep, t]
        expected_auc = float(binary_auroc(p, y.long()))
        expected_logloss = float(torch.nn.functional.binary_cross_entropy(p, y))
        got = results[0][name]
        assert got["auc"] == pytest.approx(expected_auc, abs=1e-6)
        assert got["logloss"] == pytest.approx(expected_logloss, rel=1e-5)
        assert got["calibration"] == pytest.approx(float(p.mean() / y.mean()), rel=1e-5)
        assert 0.6 < got["auc"] < 1.0


def _train(config_path: str, overrides: list[str]) -> dict:
    from launch.train import main

    return main(["--config", config_path, *overrides])


@pytest.mark.slow
def test_periodic_eval_window_metrics_and_bf16(tiny_config):
    results = run_ranks(_train, str(tiny_config), ["train_config.num_steps=30", "train_config.log_step_count_steps=10",
                                                  "eval_config.every_steps=10", "eval_config.num_steps=5",
                                                  "train_config.mixed_precision=bf16"])
    s0, s1 = results[0], results[1]
    assert [e["step"] for e in s0["eval_history"]] == [10, 20]  # the final eval is "eval"
    assert s0["eval_history"] == s1["eval_history"] and s0["train"]["window"] == s1["train"]["window"]
    for tower in ("ctr", "cvr"):
        assert set(s0["train"]["window"][tower]) == {"auc", "logloss", "calibration"}
        assert 0.0 < s0["eval"][tower]["logloss"] < 1.0
    assert [step for step, _ in s0["train"]["loss"]] == [10, 20, 30]
    on_disk = json.loads((tiny_config.parent / "run" / "summary.json").read_text())
    assert on_disk["eval_history"] == s0["eval_history"]
