"""Metrics are the same over ranks as over all rows; the binned AUC stays within 1e-4 of the
exact one (ties, one class, weights, skewed scores); training logs window metrics and periodic
evals."""

from __future__ import annotations

import json

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from aitm_torchrec.config import ConfigError, load_config
from aitm_torchrec.metrics import LogitHistogram, TaskMetrics, binned_auc, binned_auc_error_bound
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("form", ["exact", "binned"])
def test_metrics_on_cuda_take_cpu_inputs_and_equal_the_cpu_metrics(form):
    """Scoring feeds CPU tensors (read from Parquet) to metrics kept on the rank's CUDA device."""
    logits, labels, weights = _data()
    on_cpu, on_cuda = TaskMetrics(["a", "b"], auc=form), TaskMetrics(["a", "b"], "cuda", auc=form)
    on_cpu.update(logits, labels, weights)
    on_cuda.update(logits, labels, weights)
    assert on_cuda.sums.device.type == "cuda"
    got, want = on_cuda.compute(), on_cpu.compute()
    assert got.keys() == want.keys() == {"a", "b"}
    for task in want:
        assert got[task] == pytest.approx(want[task], rel=1e-6)


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


# --- the binned AUC against the exact one ---------------------------------------------------


def _exact(logits: torch.Tensor, positive: torch.Tensor) -> float:
    return float(binary_auroc(torch.sigmoid(logits.double()), positive.long()))


def _rank_sum(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The exact AUC in float64 by the rank-sum (Mann-Whitney) formula, tied scores given their
    average rank (torchmetrics computes in float32)."""
    values, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    counts = counts.double()
    average_rank = torch.cumsum(counts, 0) - counts + (counts + 1) / 2  # 1-based
    p, n = int(positive.sum()), int((~positive).sum())
    return float((average_rank[inverse][positive].sum() - p * (p + 1) / 2) / (p * n))


def _binned(logits: torch.Tensor, positive: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[float, float]:
    h = LogitHistogram(1)
    h.update(logits[:, None], positive[:, None], weights)
    return float(binned_auc(h.counts)), float(binned_auc_error_bound(h.counts))


def _skewed(n: int, seed: int = 0, mu: float = -3.0, sd: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """CTR-like scores: logits ~ N(mu, sd), labels drawn from sigmoid(logit) (~8 % positive)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g) * sd + mu
    return logits, torch.rand(n, generator=g) < torch.sigmoid(logits)


def test_binned_auc_counts_ties_half_as_the_exact_auc_does():
    positive = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    same = torch.full((8,), -2.5)
    assert _exact(same, positive) == pytest.approx(0.5) and _rank_sum(same, positive) == 0.5
    assert _binned(same, positive) == (0.5, 0.5)  # every pair shares the one bin: the bound says so
    # few distinct scores, many ties, all in different bins: exactly the exact AUC, bound 0 beyond ties
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([-6.0, -3.0, -1.0, 0.0, 2.5])[torch.randint(0, 5, (5000,), generator=g)]
    positive = torch.rand(5000, generator=g) < torch.sigmoid(logits)
    assert _binned(logits, positive)[0] == pytest.approx(_rank_sum(logits, positive), abs=1e-12)
    assert _rank_sum(logits, positive) == pytest.approx(_exact(logits, positive), abs=1e-6)


def test_binned_auc_orders_distinct_bins_exactly():
    positive = torch.tensor([0, 0, 0, 1, 1], dtype=torch.bool)
    logits = torch.tensor([-9.0, -4.0, -1.0, 0.5, 20.0])  # 20: past the range, in the top bin
    assert _binned(logits, positive) == (1.0, 0.0)
    assert _binned(-logits, positive) == (0.0, 0.0)
    logits = torch.tensor([-5.0, 1.0, -1.0, 0.5, -3.0])  # 3 of the 6 (positive, negative) pairs ordered
    assert _binned(logits, positive) == (0.5, 0.0) and _rank_sum(logits, positive) == 0.5


@pytest.mark.filterwarnings("ignore:No (positive|negative) samples in targets")
def test_one_class_gives_zero_in_both_forms_as_torchmetrics_does():
    logits = torch.randn(50, 1)
    for labels in (torch.zeros(50, 1), torch.ones(50, 1)):
        for form in ("exact", "binned"):
            m = TaskMetrics(["a"], auc=form)
            m.update(logits, labels, torch.ones(50))
            assert m.compute()["a"]["auc"] == 0.0, (form, labels[0])


def test_weights_count_rows_as_often_as_their_weight_and_zero_drops_them():
    logits, positive = _skewed(20000, seed=2)
    g = torch.Generator().manual_seed(3)
    w = torch.randint(0, 4, (20000,), generator=g)  # 0 to 3; a quarter of the rows weigh 0
    dup_logits, dup_pos = logits.repeat_interleave(w), positive.repeat_interleave(w)
    weighted = _binned(logits, positive, w.double())
    assert weighted == _binned(dup_logits, dup_pos)  # the same histogram, so the same numbers
    assert weighted[0] == pytest.approx(_rank_sum(dup_logits, dup_pos), abs=1e-4)
    # TaskMetrics: weight 0 marks padding, whatever its scores and labels
    keep = w > 0
    for form in ("exact", "binned"):
        m = TaskMetrics(["a"], auc=form)
        m.update(logits[:, None], positive[:, None].float(), w.float())
        got = m.compute()["a"]["auc"]
        assert got == pytest.approx(_exact(logits[keep], positive[keep]), abs=1e-4 if form == "binned" else 1e-6)


def test_binned_auc_equals_sklearns_on_hand_made_ties_and_fractional_weights():
    """scikit-learn's roc_auc_score (with sample_weight) as the reference: ties counted half,
    weights as row multiplicities, including fractional ones."""
    from sklearn.metrics import roc_auc_score

    logits = torch.tensor([-2.0, -2.0, 0.5, 0.5, 0.5, 3.0, -7.0, 1.25])  # two tied groups
    positive = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 3.0, 0.25, 1.0], dtype=torch.float64)
    for w in (None, weights):
        want = roc_auc_score(positive.numpy(), logits.numpy(), sample_weight=None if w is None else w.numpy())
        got = _binned(logits, positive, w)[0]
        assert got == pytest.approx(want, abs=1e-12), (w, got, want)
    # TaskMetrics (eval, windows, scoring) reads its weights as the padding mask: rows count once
    m = TaskMetrics(["a"], auc="binned")
    m.update(logits[:, None], positive[:, None].float(), weights.float())
    assert m.compute()["a"]["auc"] == pytest.approx(roc_auc_score(positive.numpy(), logits.numpy()), abs=1e-12)
    # one class: the AUC is undefined (scikit-learn has no value for it); 0, as torchmetrics gives
    assert _binned(logits, torch.ones(8, dtype=torch.bool))[0] == 0.0


@pytest.mark.parametrize("mu,sd", [(-3.0, 1.5), (-5.0, 1.0), (0.0, 3.0)])
def test_binned_auc_within_1e4_of_exact_on_a_million_skewed_scores(mu, sd):
    logits, positive = _skewed(1_000_000, mu=mu, sd=sd)
    binned, bound = _binned(logits, positive)
    exact = _rank_sum(logits, positive)
    assert exact == pytest.approx(_exact(logits, positive), abs=1e-6)
    assert bound < 1e-4
    assert abs(binned - exact) <= bound
    assert abs(binned - exact) < 1e-5  # the measured error sits far below the bound


def test_task_metrics_forms_agree_and_auto_switches_on_the_total_rows():
    logits, labels, weights = _data(n=3000)
    forms = {}
    for form in ("exact", "binned", "auto"):
        m = TaskMetrics(["a", "b"], auc=form, exact_max_rows=2000)
        for chunk in range(3):  # 1000 rows a chunk: auto passes its limit on the third
            s = slice(1000 * chunk, 1000 * (chunk + 1))
            m.update(logits[s], labels[s], weights[s])
        forms[form] = m.compute()
        assert m.form == ("binned" if form == "auto" else form)
        assert (m.exact is None) == (form != "exact")  # auto dropped the kept scores past the limit
    for name in ("a", "b"):
        e, b = forms["exact"][name], forms["binned"][name]
        assert forms["auto"][name] == b
        assert b["auc"] == pytest.approx(e["auc"], abs=1e-4)
        assert b["logloss"] == pytest.approx(e["logloss"], rel=1e-12)
        assert b["calibration"] == pytest.approx(e["calibration"], rel=1e-12)
    small = TaskMetrics(["a", "b"], auc="auto", exact_max_rows=3000)
    small.update(logits, labels, weights)
    got = small.compute()
    assert small.form == "exact"
    for name in ("a", "b"):  # one update of 3000 rows against three of 1000: sums grouped differently
        assert got[name] == pytest.approx(forms["exact"][name], rel=1e-9)


def test_eval_config_auc_is_validated():
    assert load_config(None, []).eval_config.auc == "auto"
    assert load_config(None, ["eval_config.auc=binned"]).eval_config.auc == "binned"
    with pytest.raises(ConfigError, match="eval_config.auc"):
        load_config(None, ["eval_config.auc=approx"])
    with pytest.raises(ValueError, match="auc must be one of"):
        TaskMetrics(["a"], auc="approx")


def _rank_binned(form: str, limit: int) -> dict:
    from aitm_torchrec import dist as aitm_dist

    env = aitm_dist.setup()
    logits, labels, weights = _data(n=4000)
    logits[:, 0] = logits[:, 0] - 3.0  # a skewed task beside the balanced one
    mine = slice(0, 1500) if env.rank == 0 else slice(1500, None)  # uneven shares
    m = TaskMetrics(["a", "b"], auc=form, exact_max_rows=limit)
    m.update(logits[mine], labels[mine], weights[mine])
    out = {"metrics": m.compute(), "form": m.form, "bound": m.error_bound, "kept_exact": m.exact is not None}
    aitm_dist.teardown()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("form,limit", [("binned", 0), ("auto", 2000)])
def test_binned_metrics_over_two_ranks_equal_one_process_over_all_rows(form, limit):
    """Two gloo ranks, one all_reduce of the histograms and sums: the same result as one process
    over the union. auto with a 2000-row limit: rank 0 holds 1500 rows (and keeps its scores),
    rank 1 2500 (and drops them); the total, 4000, is past the limit, so both choose binned."""
    results = run_ranks(_rank_binned, form, limit)
    assert all(results[0][k] == results[1][k] for k in ("metrics", "form", "bound"))
    assert results[0]["form"] == "binned"
    assert [r["kept_exact"] for r in (results[0], results[1])] == ([False, False] if form == "binned" else [True, False])
    logits, labels, weights = _data(n=4000)
    logits[:, 0] = logits[:, 0] - 3.0
    one = TaskMetrics(["a", "b"], auc="binned")
    one.update(logits, labels, weights)
    expected = one.compute()
    for name in ("a", "b"):
        got = results[0]["metrics"][name]
        assert got["auc"] == expected[name]["auc"]  # integer counts: the same histogram exactly
        # float32 sigmoid and BCE of the same row can differ by an ulp with the batch's length
        assert got["logloss"] == pytest.approx(expected[name]["logloss"], rel=1e-9)
        assert got["calibration"] == pytest.approx(expected[name]["calibration"], rel=1e-9)
        assert results[0]["bound"][name] == one.error_bound[name]


@pytest.mark.slow
def test_training_eval_and_windows_take_eval_config_auc(tiny_config):
    """The same training twice, exact and binned AUC (training is deterministic on the CPU): the
    same logloss and calibration, AUCs close but not bitwise equal (so the form was used). The
    tiny model's scores crowd into a few logit bins after 20 steps (AUC ~0.51), where the binned
    form's bound is above 1e-4; the 1e-4 claims are tested on spread scores above."""
    common = ["train_config.num_steps=20", "train_config.log_step_count_steps=10", "eval_config.num_steps=5"]
    exact = run_ranks(_train, str(tiny_config), common + ["eval_config.auc=exact"])[0]
    binned = run_ranks(_train, str(tiny_config), common + ["eval_config.auc=binned",
                                                            f"model_dir={tiny_config.parent / 'binned'}"])[0]
    pairs = [(exact["eval"], binned["eval"]), (exact["train"]["window"], binned["train"]["window"])]
    for e, b in pairs:
        for tower in ("ctr", "cvr"):
            assert b[tower]["auc"] == pytest.approx(e[tower]["auc"], abs=1e-3)
            assert b[tower]["logloss"] == pytest.approx(e[tower]["logloss"], rel=1e-6)
            assert b[tower]["calibration"] == pytest.approx(e[tower]["calibration"], rel=1e-6)
    assert any(b[t]["auc"] != e[t]["auc"] for e, b in pairs for t in ("ctr", "cvr"))
