"""``datasets/synthetic.py``'s family of worlds: every preset generated at toy size shows the
properties it documents (vocabularies, skew, positive rates per step, the chain, its record in
``_SUCCESS``); explicit flags override a preset; the default world's data stays as it was."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasets import synthetic

ROWS = 5000  # per split


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Every preset, generated once: name -> (directory, train + eval table, _SUCCESS)."""
    root = tmp_path_factory.mktemp("family")
    out = {}
    for name in synthetic.PRESETS:
        synthetic.main(["--out", str(root / name), "--rows", str(ROWS), "--eval-rows", str(ROWS), "--files", "1",
                        "--preset", name, "--seed", "3"])
        table = pq.read_table([root / name / split / "part-00000.parquet" for split in ("train", "eval")])
        out[name] = (root / name, table, json.loads((root / name / "_SUCCESS").read_text()))
    return out


def _top_share(ids: np.ndarray) -> float:
    return float(np.bincount(ids).max() / len(ids))


def test_there_are_at_least_five_presets_from_long_tail_to_dense():
    assert len(synthetic.PRESETS) >= 5
    assert {"long-tail", "sparse", "taobao", "head-heavy", "dense"} <= set(synthetic.PRESETS)
    for name, values in synthetic.PRESETS.items():
        assert set(values) <= set(synthetic.DEFAULT_KNOBS), name
        synthetic.resolve_knobs(name)  # every preset's values pass the checks


@pytest.mark.parametrize("name", list(synthetic.PRESETS))
def test_success_records_the_preset_and_every_knob(family, name):
    _, _, meta = family[name]
    assert meta["preset"] == name
    assert meta["knobs"] == synthetic.resolve_knobs(name)
    assert set(meta["knobs"]) == set(synthetic.DEFAULT_KNOBS)
    assert meta["sequential_dependence"] == meta["knobs"]["sequential_dependence"]
    assert set(meta["oracle_eval_auc"]) == {"clk", "buy"} and len(meta["bias"]) == 2
    auc = {label: v for label, v in meta["oracle_eval_auc"].items() if meta["eval_positive_rate"][label] > 0}
    assert "clk" in auc and all(0.6 < v <= 1.0 for v in auc.values()), meta["oracle_eval_auc"]


@pytest.mark.parametrize("name", list(synthetic.PRESETS))
def test_ids_stay_within_the_presets_vocabularies(family, name):
    _, table, meta = family[name]
    for knob, column in synthetic.VOCAB_KNOBS.items():
        col = table.column(column)
        ids = (col.combine_chunks().flatten() if column in synthetic.TAG_FEATURES else col).to_numpy()
        vocab = meta["knobs"][knob]
        assert ids.min() >= 0 and ids.max() < vocab, (column, ids.max(), vocab)
        assert len(np.unique(ids)) <= vocab


def test_head_heavy_concentrates_rows_on_fewer_ids_than_long_tail(family):
    for column in ("adgroup_id", "user_id", "brand"):
        head = _top_share(family["head-heavy"][1].column(column).to_numpy())
        tail = _top_share(family["long-tail"][1].column(column).to_numpy())
        assert head > 2 * tail, (column, head, tail)
    head_ids = len(np.unique(family["head-heavy"][1].column("adgroup_id").to_numpy()))
    tail_ids = len(np.unique(family["long-tail"][1].column("adgroup_id").to_numpy()))
    assert tail_ids > 3 * head_ids


@pytest.mark.parametrize("name", list(synthetic.PRESETS))
def test_positive_rates_per_step_reach_the_presets_targets(family, name):
    """The expected rates (from the oracle columns, less noisy than the labels) near the targets:
    within 5% on 100,000 rows of the same world, within 15% (first step) and 35% (the later step,
    carried by few rows where it is rare) on the generated set; the first step's observed rate
    within 5 binomial standard deviations; the chain holds."""
    _, table, meta = family[name]
    target = synthetic.step_rates(meta["knobs"]["rates"], 2)
    big = synthetic.World(["clk", "buy"], 3, **meta["knobs"]).sample(np.random.default_rng(9), 100_000, False)
    for t, rel in ((table, (0.15, 0.35)), (big, (0.05, 0.05))):
        p_clk, p_buy = (t.column(c).to_numpy().astype(np.float64) for c in ("p_clk", "p_buy"))
        assert p_clk.mean() == pytest.approx(target[0], rel=rel[0])
        assert p_buy.sum() / p_clk.sum() == pytest.approx(target[1], rel=rel[1])
    clk, buy = (table.column(c).to_numpy() for c in ("clk", "buy"))
    sd = (target[0] * (1 - target[0]) / len(clk)) ** 0.5
    assert abs(clk.mean() - target[0]) < 5 * sd
    assert not (buy > clk).any()  # a buy only after a click
    assert meta["eval_positive_rate"]["clk"] == pytest.approx(clk[ROWS:].mean())


def test_a_longer_chain_repeats_the_last_rate_and_keeps_the_chain(tmp_path):
    synthetic.main(["--out", str(tmp_path / "d"), "--rows", "4000", "--eval-rows", "1000", "--files", "1",
                    "--preset", "dense", "--labels", "clk,cart,buy"])
    table = pq.read_table(tmp_path / "d" / "train")
    p = [table.column(f"p_{x}").to_numpy().astype(np.float64) for x in ("clk", "cart", "buy")]
    assert p[0].mean() == pytest.approx(0.2, rel=0.1)
    assert p[1].sum() / p[0].sum() == pytest.approx(0.3, rel=0.1)
    assert p[2].sum() / p[1].sum() == pytest.approx(0.3, rel=0.1)
    y = [table.column(x).to_numpy() for x in ("clk", "cart", "buy")]
    assert not (y[1] > y[0]).any() and not (y[2] > y[1]).any()


def test_explicit_flags_override_the_preset(tmp_path):
    synthetic.main(["--out", str(tmp_path / "d"), "--rows", "2000", "--eval-rows", "500", "--files", "1",
                    "--preset", "head-heavy", "--items", "300", "--zipf", "1.2", "--interaction", "item",
                    "--rates", "0.1,0.5", "--latent-dim", "3"])
    meta = json.loads((tmp_path / "d" / "_SUCCESS").read_text())
    preset = synthetic.PRESETS["head-heavy"]
    assert meta["knobs"] == {**synthetic.DEFAULT_KNOBS, **preset, "items": 300, "zipf": 1.2,
                             "interaction": "item", "rates": [0.1, 0.5], "latent_dim": 3}
    ids = pq.read_table(tmp_path / "d" / "train").column("adgroup_id").to_numpy()
    assert ids.max() < 300 and meta["knobs"]["users"] == preset["users"]
    # --large-vocab sets users and items, an explicit --users wins over it
    synthetic.main(["--out", str(tmp_path / "e"), "--rows", "200", "--eval-rows", "200", "--preset", "dense",
                    "--large-vocab", "70000", "--users", "9"])
    knobs = json.loads((tmp_path / "e" / "_SUCCESS").read_text())["knobs"]
    assert knobs["items"] == 70000 and knobs["users"] == 9


@pytest.mark.parametrize("argv", [["--preset", "nope"], ["--zipf", "-1"], ["--rates", "0.5,1.5"],
                                  ["--interaction", "user"], ["--latent-dim", "0"], ["--users", "0"]])
def test_bad_knobs_are_refused(tmp_path, argv):
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "d"), "--rows", "10", "--eval-rows", "10", *argv])


def test_the_default_world_is_unchanged(tmp_path):
    """No preset, default flags: the default world's draws, pinned (committed results and
    ``benchmarks/true_form.py`` depend on them)."""
    synthetic.main(["--out", str(tmp_path / "d"), "--rows", "3000", "--eval-rows", "1000"])
    meta = json.loads((tmp_path / "d" / "_SUCCESS").read_text())
    assert meta["preset"] is None and meta["knobs"] == synthetic.DEFAULT_KNOBS and meta["bias"] == [-3.6, -2.2]
    assert meta["oracle_eval_auc"] == pytest.approx({"clk": 0.8147560954093933, "buy": 0.8373136520385742},
                                                    abs=1e-7)
    train = pq.read_table(tmp_path / "d" / "train")
    assert train.column("adgroup_id").to_numpy()[:5].tolist() == [1725, 14687, 11990, 2151, 9732]
    assert train.column("user_id").to_numpy()[:5].tolist() == [6193, 3637, 7122, 6340, 9732]
    assert train.column("p_clk").to_numpy()[:3].tolist() == pytest.approx(
        [0.014895934611558914, 0.015663301572203636, 0.0039054236840456724], rel=1e-6)
    assert (int(train.column("clk").to_numpy().sum()), int(train.column("buy").to_numpy().sum())) == (211, 43)
