"""``benchmarks/true_form.py``: the generator's own model on every world of the family, its Newton
curvature, and learning it in one pass."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks import true_form
from datasets import synthetic

LABELS = ["clk", "cart", "buy"]  # three steps: the sequential dependence reaches step 3 through step 2
WORLDS = [None, *synthetic.PRESETS]  # the default world, then every preset


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Every world at toy size, 3 steps: name -> (directory, the knobs its _SUCCESS records)."""
    root = tmp_path_factory.mktemp("family")
    out = {}
    for name in WORLDS:
        data = root / (name or "default")
        synthetic.main(["--out", str(data), "--rows", "200", "--eval-rows", "3000", "--files", "1",
                        "--labels", ",".join(LABELS), "--seed", "5", *(["--preset", name] if name else [])])
        out[name] = (data, true_form.set_knobs(data, json.loads((data / "_SUCCESS").read_text())))
    return out


def _marginal(model: true_form.TrueForm, rows: true_form.Rows) -> np.ndarray:
    with torch.no_grad():
        return torch.cumprod(torch.sigmoid(model(rows)), 1).numpy()


@pytest.mark.parametrize("name", WORLDS, ids=lambda n: n or "default")
def test_true_form_is_the_generators_own_model_on_every_world(family, name):
    """With the generator's true parameters loaded, the model in the form the set's _SUCCESS records
    gives back every row's p_* column (the oracle) on a 3-step chain: ids and price, tags as a
    mean, the preset's interaction (category, item or both) of its dimension, its sequential
    dependence; to float32's precision, relative to each probability. Another world's parameters
    do not."""
    data, knobs = family[name]
    assert knobs == synthetic.resolve_knobs(name)
    rows = true_form.read_rows(data / "eval", LABELS)
    table = pq.read_table(data / "eval", columns=[f"p_{x}" for x in LABELS])
    truth = np.stack([table.column(f"p_{x}").to_numpy() for x in LABELS], 1)
    vocab = true_form.vocabulary(rows, knobs=knobs)
    assert {c: vocab[c] for c in synthetic.VOCAB_KNOBS.values()} == {c: knobs[k] for k, c in synthetic.VOCAB_KNOBS.items()}
    for world_seed, matches in ((5, True), (6, False)):
        model = true_form.TrueForm(vocab, len(LABELS), knobs=knobs)
        model.load_world(synthetic.World(LABELS, world_seed, **knobs))
        error = (np.abs(_marginal(model, rows) - truth) / truth).max(0)  # relative: later steps are rare
        assert (error < 1e-5).all() == matches, (world_seed, error)


@pytest.mark.parametrize("name", WORLDS, ids=lambda n: n or "default")
def test_the_prior_is_the_spread_the_generator_draws_from(family, name):
    """Every parameter table of 1,000 values or more has the spread of the model's prior (within
    10%) in the generator's world: the id effect scale and the latent scale of the preset."""
    _, knobs = family[name]
    model = true_form.TrueForm(true_form.vocabulary(knobs=knobs), len(LABELS), knobs=knobs)
    model.load_world(synthetic.World(LABELS, 5, **knobs))
    checked = []
    for n in model.names():
        values = model[n].detach()
        if model.prior_sd[n] is not None and values.numel() >= 1000:
            spread = float(values.pow(2).mean().sqrt())
            assert abs(spread / model.prior_sd[n] - 1) < 0.1, (n, spread, model.prior_sd[n])
            checked.append(n)
    assert len(checked) >= 5 and "user_vec" in checked, checked


def test_load_world_refuses_a_world_of_another_form(family):
    _, knobs = family["sparse"]
    model = true_form.TrueForm(true_form.vocabulary(knobs=knobs), len(LABELS), knobs=knobs)
    for knob, value in (("interaction", "both"), ("sequential_dependence", 0.0), ("latent_dim", 8)):
        with pytest.raises(ValueError, match=f"world's {knob}"):
            model.load_world(synthetic.World(LABELS, 5, **{**knobs, knob: value}))


def test_newton_curvature_is_the_gauss_newton_diagonal(tmp_path):
    """Per parameter, the curvature the Newton learner adds is sum over rows and at-risk steps of
    p (1 - p) (d logit / d parameter)^2, taken here row by row with autograd: on a world with both
    interactions and sequential dependence, so a step's effects reach the later steps' logits."""
    data = tmp_path / "d"
    synthetic.main(["--out", str(data), "--rows", "100", "--eval-rows", "400", "--files", "1", "--labels",
                    ",".join(LABELS), "--preset", "dense", "--sequential-dependence", "0.5", "--seed", "2"])
    knobs = true_form.set_knobs(data, json.loads((data / "_SUCCESS").read_text()))
    assert knobs["interaction"] == "both" and knobs["sequential_dependence"] == 0.5
    rows = true_form.read_rows(data / "eval", LABELS).slice(0, 96)
    model = true_form.TrueForm(true_form.vocabulary(rows, knobs=knobs), len(LABELS), knobs=knobs)
    model.load_world(synthetic.World(LABELS, 2, **knobs))
    logits = model(rows)
    curv = model.curvature(rows, logits.detach())
    params = [model[n] for n in model.names()]
    expected = [torch.zeros_like(p) for p in params]
    p = torch.sigmoid(logits.detach())
    at_risk = torch.cat([torch.ones_like(rows.labels[:, :1]), rows.labels[:, :-1]], 1)
    assert at_risk[:, 2].sum() > 0  # some rows reach the third step
    for i in range(len(rows)):
        for t in range(len(LABELS)):
            if at_risk[i, t]:
                grads = torch.autograd.grad(logits[i, t], params, retain_graph=True, allow_unused=True)
                for e, g in zip(expected, grads):
                    if g is not None:
                        e += p[i, t] * (1 - p[i, t]) * g ** 2
    for n, e in zip(model.names(), expected):
        assert torch.allclose(curv[n], e, rtol=1e-9, atol=1e-12), n
    assert set(curv) == set(model.names())


def test_true_form_learns_every_step_of_a_three_step_chain_in_one_pass(tmp_path):
    """On a world with both interactions and sequential dependence (the knobs read from _SUCCESS),
    both learners lift every step well above chance in one pass."""
    data = tmp_path / "d"
    synthetic.main(["--out", str(data), "--rows", "30000", "--eval-rows", "10000", "--labels", ",".join(LABELS),
                    "--interaction", "both", "--sequential-dependence", "0.5", "--seed", "4"])
    for optimizer, rate in (("newton", 0.5), ("adagrad", 0.1)):
        out = true_form.run(data, optimizer, rate, batch=1024)  # the chain and the form from the set's _SUCCESS
        assert out["rows"] == 30000 and set(out["auc"]) == set(LABELS) and out["preset"] is None
        assert all(out["auc"][x] > 0.65 for x in LABELS), out  # learned, not chance
    with pytest.raises(ValueError, match="newton or adagrad, not 'sgd'"):
        true_form.run(data, "sgd")


def test_newton_halves_an_update_that_raises_the_batch_loss(tmp_path, monkeypatch):
    """On a small catalogue (the dense preset) many rows share few ids: every parameter of a row
    takes a full diagonal step for the same residual, and at rate 1 the sum overshoots. The
    learner halves such updates (and counts them) and learns; without the halving it diverges to
    chance on the same set."""
    data = tmp_path / "d"
    synthetic.main(["--out", str(data), "--rows", "30000", "--eval-rows", "10000", "--labels", "clk,buy",
                    "--preset", "dense", "--seed", "4"])
    out = true_form.run(data, "newton", 1.0, batch=1024)
    assert out["halvings"] > 0 and all(auc > 0.7 for auc in out["auc"].values()), out
    monkeypatch.setattr(true_form, "MAX_HALVINGS", 0)
    plain = true_form.run(data, "newton", 1.0, batch=1024)
    assert plain["halvings"] == 0 and all(auc < 0.6 for auc in plain["auc"].values()), plain


def test_a_set_of_a_form_this_model_does_not_know_is_refused_by_file_and_knob(tmp_path, family):
    data, _ = family["sparse"]
    meta = json.loads((data / "_SUCCESS").read_text())
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "_SUCCESS").write_text(json.dumps({**meta, "knobs": {**meta["knobs"], "cold_start": 0.2}}))
    with pytest.raises(ValueError, match=re.escape(f"{odd / '_SUCCESS'}: knob 'cold_start'")):
        true_form.run(odd)
    (odd / "_SUCCESS").write_text(json.dumps({**meta, "sequential_dependence": 0.0}))
    with pytest.raises(ValueError, match="knob 'sequential_dependence' is 0.5 in knobs but 0.0"):
        true_form.run(odd)
    strings = tmp_path / "s"
    synthetic.main(["--out", str(strings), "--rows", "100", "--eval-rows", "100", "--files", "1", "--string-ids"])
    with pytest.raises(ValueError, match="column pid holds strings"):
        true_form.run(strings)
