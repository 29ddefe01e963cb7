"""``python -m benchmarks true_form``: what one pass can reach on the synthetic data: the
generator's true model, learned online (not library code).

The model is exactly the one ``datasets/synthetic.py`` samples from: per step, a bias, one effect
per id (price included), the *mean* of the tags' effects, and the user x category latent
interaction (u_user . v_cate, x the step's scale 1 ... 1.5); each step given the one before
(P(buy) = P(click) x P(buy | click), trained on the rows where the step before happened). With
the generator's true parameters loaded it gives back every row's ``p_*`` column (the oracle), which
``tests/test_true_form.py`` checks. It learns in one pass at batch 8192 (the seed's global batch),
starting at the prior's mean (zero effects, small random latent vectors), with one of:

- ``newton``: a diagonal online Newton step, the Gaussian filtering of the generator's prior: each
  parameter keeps its curvature (1 / prior variance + the sum over the rows that saw it of
  p (1 - p)) and moves by ``rate`` x gradient / curvature;
- ``adagrad``: per-coordinate Adagrad at ``rate`` (the bias at 0.01).

A learner that knows the data's form this well is not a bound on what one pass can reach (a better
online learner may go further), but it shows what the data allows in one pass, which is what the
goals are measured against. ``--no-latent`` drops the interaction (a logistic regression on
one-hot ids); ``--passes N`` makes N passes.

    python -m benchmarks true_form --data data/q2m [--optimizer newton,adagrad] [--rate 0.5] [--seeds 1,2,3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from benchmarks import quality
from datasets.synthetic import ID_FEATURES, LATENT, PRICE_BUCKETS, TAG_FEATURES

HELP = "what one pass of the generator's own model, learned online, reaches on a synthetic set"
DESCRIPTION = "What one pass can reach on the synthetic data: the generator's true model, learned online (not library code)."

LATENT_SCALE = 0.5  # the generator's user / item latent vectors ~ N(0, 0.5^2)
PRICE_SCALE = 0.3  # and its price effects ~ N(0, 0.3^2)
ID_COLUMNS = [*ID_FEATURES, "price"]


@dataclass
class Rows:
    """One split as tensors: ids N x F (``ID_COLUMNS``), tags per tag column as (flat values,
    N + 1 offsets), labels N x T (the chain, first to last)."""

    ids: torch.Tensor
    tags: list[tuple[torch.Tensor, torch.Tensor]]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> Rows:
        tags = [(values[offsets[start]:offsets[stop]], offsets[start:stop + 1] - offsets[start])
                for values, offsets in self.tags]
        return Rows(self.ids[start:stop], tags, self.labels[start:stop])


def read_rows(path: Path, labels: list[str]) -> Rows:
    """Every Parquet file under ``path``, in name order (the generator's rows are i.i.d., so file
    order is a random order)."""
    table = pq.read_table(sorted(path.glob("*.parquet")), columns=ID_COLUMNS + list(TAG_FEATURES) + labels)
    ids = torch.from_numpy(np.stack([table.column(c).to_numpy() for c in ID_COLUMNS], 1).astype(np.int64))
    tags = []
    for c in TAG_FEATURES:
        col = table.column(c).combine_chunks()
        offsets = col.offsets.to_numpy().astype(np.int64)
        tags.append((torch.from_numpy(col.flatten().to_numpy().astype(np.int64)),
                     torch.from_numpy(offsets - offsets[0])))
    y = torch.from_numpy(np.stack([table.column(c).to_numpy() for c in labels], 1).astype(np.float64))
    return Rows(ids, tags, y)


def vocabulary(*splits: Rows) -> dict[str, int]:
    """Table rows per column: the generator's vocabularies, grown to the largest id seen (a set
    made with ``--large-vocab``)."""
    vocab = {c: v for c, (v, _) in {**ID_FEATURES, **TAG_FEATURES}.items()}
    vocab["price"] = PRICE_BUCKETS
    for rows in splits:
        for c, top in zip(ID_COLUMNS, rows.ids.max(0).values.tolist()):
            vocab[c] = max(vocab[c], top + 1)
        for c, (values, _) in zip(TAG_FEATURES, rows.tags):
            vocab[c] = max(vocab[c], int(values.max()) + 1 if len(values) else 0)
    return vocab


def _bincounts(index: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """size x W: column j sums weights[:, j] per index."""
    return torch.stack([torch.bincount(index, weights[:, j], size) for j in range(weights.shape[1])], 1)


class TrueForm(torch.nn.Module):
    """The generator's logit, step by step: N rows -> N x T conditional logits (float64)."""

    def __init__(self, vocab: dict[str, int], steps: int, seed: int = 0) -> None:
        super().__init__()
        self.user, self.cate = ID_COLUMNS.index("user_id"), ID_COLUMNS.index("cate_id")
        shapes = {"bias": (steps,), **{f"id:{c}": (vocab[c], steps) for c in ID_COLUMNS},
                  **{f"tag:{c}": (vocab[c], steps) for c in TAG_FEATURES},
                  "user_vec": (vocab["user_id"], LATENT), "item_vec": (vocab["cate_id"], LATENT)}
        self.prior_sd = {"bias": None, **{f"id:{c}": s for c, (_, s) in ID_FEATURES.items()},
                         "id:price": PRICE_SCALE, **{f"tag:{c}": s for c, (_, s) in TAG_FEATURES.items()},
                         "user_vec": LATENT_SCALE, "item_vec": LATENT_SCALE}
        self.params = torch.nn.ParameterDict({name.replace(":", "__"): torch.nn.Parameter(
            torch.zeros(shape, dtype=torch.float64)) for name, shape in shapes.items()})
        g = torch.Generator().manual_seed(seed)  # at zero the latent vectors' gradients are zero
        with torch.no_grad():
            for name in ("user_vec", "item_vec"):
                self[name].normal_(0, 0.01, generator=g)
        self.inter_scale = torch.linspace(1.0, 1.5, steps, dtype=torch.float64)  # the generator's, fixed

    def __getitem__(self, name: str) -> torch.nn.Parameter:
        return self.params[name.replace(":", "__")]

    def names(self) -> list[str]:
        return list(self.prior_sd)

    def forward(self, rows: Rows) -> torch.Tensor:
        out = self["bias"] + sum(self[f"id:{c}"][rows.ids[:, i]] for i, c in enumerate(ID_COLUMNS))
        for c, (values, offsets) in zip(TAG_FEATURES, rows.tags):
            # the mean of the row's tag effects, 0 for a row without tags (as the generator)
            out = out + F.embedding_bag(values, self[f"tag:{c}"], offsets[:-1], mode="mean")
        inter = (self["user_vec"][rows.ids[:, self.user]] * self["item_vec"][rows.ids[:, self.cate]]).sum(1)
        return out + inter[:, None] * self.inter_scale

    def curvature(self, rows: Rows, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The diagonal of the chain NLL's Hessian over ``rows`` per parameter, for the N x T
        conditional probabilities ``p``: p (1 - p) summed over the rows that see the parameter
        (step t: the rows where step t-1 happened; a tag of a row with k tags at 1 / k^2); a
        latent component also x the other vector's squared component x the step's scale^2."""
        y = rows.labels
        at_risk = torch.cat([torch.ones_like(y[:, :1]), y[:, :-1]], 1)
        w = at_risk * p * (1 - p)  # N x T
        curv = {"bias": w.sum(0)}
        for i, c in enumerate(ID_COLUMNS):
            curv[f"id:{c}"] = _bincounts(rows.ids[:, i], w, len(self[f"id:{c}"]))
        for c, (values, offsets) in zip(TAG_FEATURES, rows.tags):
            k = offsets.diff()
            curv[f"tag:{c}"] = _bincounts(values, torch.repeat_interleave(w / k.clamp(min=1)[:, None] ** 2, k, 0),
                                          len(self[f"tag:{c}"]))
        scaled = (w * self.inter_scale ** 2).sum(1, keepdim=True)
        u, v = self["user_vec"].detach(), self["item_vec"].detach()
        curv["user_vec"] = _bincounts(rows.ids[:, self.user], scaled * v[rows.ids[:, self.cate]] ** 2, len(u))
        curv["item_vec"] = _bincounts(rows.ids[:, self.cate], scaled * u[rows.ids[:, self.user]] ** 2, len(v))
        return curv

    def load_world(self, world) -> None:
        """Sets every parameter to a ``datasets.synthetic.World``'s truth (the oracle's own model)."""
        truth = {"bias": world.bias, **{f"id:{c}": world.effects[c] for c in ID_FEATURES},
                 "id:price": world.price_effect, **{f"tag:{c}": world.effects[c] for c in TAG_FEATURES},
                 "user_vec": world.user_vec, "item_vec": world.item_vec}
        with torch.no_grad():
            for name, value in truth.items():
                self[name].zero_()[:len(value)] = torch.from_numpy(value)


def chain_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed NLL of the chain: step 0 on every row, step t on the rows where step t-1 happened."""
    nll = F.binary_cross_entropy_with_logits(logits[:, 0], y[:, 0], reduction="sum")
    for t in range(1, y.shape[1]):
        seen = y[:, t - 1] > 0
        nll = nll + F.binary_cross_entropy_with_logits(logits[seen, t], y[seen, t], reduction="sum")
    return nll


def marginal_auc(model: TrueForm, rows: Rows, labels: list[str]) -> dict[str, float]:
    """Per-step AUC of the chain's marginal probability (the product of the steps up to it)."""
    from torchmetrics.functional.classification import binary_auroc

    with torch.no_grad():
        marginal = torch.cumprod(torch.sigmoid(model(rows)), dim=1)
    return {name: float(binary_auroc(marginal[:, t], rows.labels[:, t].long())) for t, name in enumerate(labels)}


def learn(model: TrueForm, train: Rows, optimizer: str, rate: float, batch: int = 8192, passes: int = 1,
          latent: bool = True) -> None:
    """``passes`` passes over ``train`` in order, one update per ``batch`` rows."""
    names = [n for n in model.names() if latent or n not in ("user_vec", "item_vec")]
    prior = {n: (1 / model.prior_sd[n] ** 2 if model.prior_sd[n] else 1e-3) for n in names}
    state = {n: (torch.full_like(model[n], prior[n]) if optimizer == "newton" else torch.zeros_like(model[n]))
             for n in names}
    for _ in range(passes):
        for start in range(0, len(train), batch):
            rows = train.slice(start, min(start + batch, len(train)))
            model.zero_grad()
            logits = model(rows)
            chain_nll(logits, rows.labels).backward()
            with torch.no_grad():
                curv = model.curvature(rows, torch.sigmoid(logits)) if optimizer == "newton" else None
                for n in names:
                    param = model[n]
                    if optimizer == "newton":
                        state[n] += curv[n]
                        param -= rate * param.grad / state[n]
                    else:
                        state[n] += param.grad ** 2
                        param -= (0.01 if n == "bias" else rate) * param.grad / (state[n].sqrt() + 1e-10)


def run(data: Path, optimizer: str = "newton", rate: float = 0.5, seed: int = 1, batch: int = 8192,
        passes: int = 1, latent: bool = True, splits: tuple[Rows, Rows] | None = None) -> dict:
    """One learner on ``data`` (a set made by ``datasets.synthetic``): per-step eval AUC, the oracle's,
    and the distance between them."""
    meta = json.loads((data / "_SUCCESS").read_text())
    if meta.get("sequential_dependence", 0.0):
        raise ValueError(f"{data}: generated with --sequential-dependence {meta['sequential_dependence']}; "
                         "this model is the independent form only")
    knobs = meta.get("knobs", {})
    if knobs.get("interaction", "category") != "category" or knobs.get("latent_dim", LATENT) != LATENT:
        raise ValueError(f"{data}: generated with interaction {knobs['interaction']!r}, latent_dim "
                         f"{knobs['latent_dim']}; this model is the default world's user x category "
                         f"interaction of dimension {LATENT} only")
    if optimizer not in ("newton", "adagrad"):
        raise ValueError(f"optimizer must be newton or adagrad, not {optimizer!r}")
    oracle = meta["oracle_eval_auc"]
    labels = list(oracle)
    train, ev = splits or (read_rows(data / "train", labels), read_rows(data / "eval", labels))
    model = TrueForm(vocabulary(train, ev), len(labels), seed)
    learn(model, train, optimizer, rate, batch, passes, latent)
    auc = marginal_auc(model, ev, labels)
    return {"optimizer": optimizer, "rate": rate, "seed": seed, "latent": latent, "passes": passes,
            "rows": len(train), "auc": auc, "gap": {k: oracle[k] - auc[k] for k in labels}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/q2m", help="a set made by datasets.synthetic")
    p.add_argument("--optimizer", default="newton", help="newton, adagrad or both (comma-separated)")
    p.add_argument("--rate", default="0.5", help="step size(s), comma-separated")
    p.add_argument("--seeds", default="1", help="latent-vector initialisations, comma-separated")
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--no-latent", action="store_true", help="without the user x category interaction")


def cmd(args: argparse.Namespace) -> None:
    data = Path(args.data)
    labels = list(quality.oracle(data))  # the chain, first to last, as the generator wrote it
    splits = (read_rows(data / "train", labels), read_rows(data / "eval", labels))
    for opt in args.optimizer.split(","):
        for rate in (float(r) for r in args.rate.split(",")):
            results = [run(data, opt, rate, int(s), args.batch, args.passes, not args.no_latent, splits)
                       for s in args.seeds.split(",")]
            for r in results:
                print(json.dumps(r), flush=True)
            if len(results) > 1:
                gap = {k: (statistics.fmean(r["gap"][k] for r in results), statistics.pstdev(r["gap"][k] for r in results))
                       for k in labels}
                print(json.dumps({"optimizer": opt, "rate": rate, "seeds": len(results),
                                  "mean_gap": {k: round(m, 4) for k, (m, _) in gap.items()},
                                  "std_gap": {k: round(s, 4) for k, (_, s) in gap.items()}}), flush=True)

