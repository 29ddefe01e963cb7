"""``benchmarks/true_form.py``: the generator's own model, and learning it in one pass."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks import true_form
from datasets import synthetic


def test_true_form_is_the_generators_own_model(tmp_path):
    """With the generator's true parameters loaded, the one-pass reference's model gives back every
    row's p_* column (the oracle) on a 3-step chain: tags as a mean, price and the user x category
    interaction included. Another world's parameters do not."""
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
    item = tmp_path / "i"  # a preset's user x item interaction is not this model's form
    synthetic.main(["--out", str(item), "--rows", "100", "--eval-rows", "100", "--preset", "interaction"])
    with pytest.raises(ValueError, match="interaction 'item'"):
        true_form.run(item)
