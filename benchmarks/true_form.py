"""``python -m benchmarks true_form``: what one pass can reach on the synthetic data: the
generator's true model, learned online (not library code).

The model is exactly the one ``datasets/synthetic.py`` samples from, in the form the set's
``_SUCCESS`` records (its ``knobs``), for every world of the family (every preset):

- per step, a bias, one effect per id (price included) and the *mean* of the tags' effects, over
  the set's vocabularies (``users``, ``items``, ... ``tag_brands``), with the generator's prior:
  N(0, (the column's scale x ``id_effect_scale``)^2);
- the latent interaction the set was made with (``interaction``): the user's vector meets the
  category's (u_user . v_cate, ``category``), the item's (u_user . v_adgroup, ``item``) or both
  (the sum, ``both``); vectors of ``latent_dim`` components with prior N(0, ``latent_scale``^2);
  the interaction enters step t's logit x the generator's fixed scale (1 ... 1.5 over the steps);
- the ``sequential_dependence`` d: step t's centred logit is (1 - d) x its own effects
  + d x 1.5 tanh(step t-1's centred logit), step t-1's already carrying its own dependence;
- each step given the one before (P(buy) = P(click) x P(buy | click), trained on the rows where
  the step before happened).

With the generator's true parameters loaded it gives back every row's ``p_*`` column (the oracle)
on every preset, which ``tests/test_true_form.py`` checks. It learns in one pass at batch 8192 (the
seed's global batch), starting at the prior's mean (zero effects, small random latent vectors),
with one of:

- ``newton``: a diagonal online Newton step, the Gaussian filtering of the generator's prior: each
  parameter keeps its curvature (1 / prior variance + the sum over the rows that saw it of the
  Gauss-Newton diagonal, p (1 - p) x the squared derivative of the logit) and moves by ``rate`` x
  gradient / curvature; an update that raises the batch's loss is halved until it does not
  (at most ``MAX_HALVINGS`` times; the result's ``halvings`` counts them). Where many rows share
  few ids, every parameter of a row takes a full diagonal step for the same residual and the sum
  overshoots: without the halving the learner diverges on the small-catalogue presets;
- ``adagrad``: per-coordinate Adagrad at ``rate`` (the bias at 0.01).

A learner that knows the data's form this well is not a bound on what one pass can reach (a better
online learner may go further), but it shows what the data allows in one pass, which is what the
goals are measured against. ``--no-latent`` drops the interaction (a logistic regression on
one-hot ids, with the dependence kept); ``--passes N`` makes N passes.

    python -m benchmarks true_form --data data/q2m [--optimizer newton,adagrad] [--rate 0.5] [--seeds 1,2,3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from benchmarks import quality
from datasets.synthetic import (
    DEFAULT_KNOBS,
    DEPENDENCE_GAIN,
    ID_FEATURES,
    INTERACTION_SCALE,
    PRICE_BUCKETS,
    PRICE_SCALE,
    TAG_FEATURES,
    VOCAB_KNOBS,
    resolve_knobs,
)

HELP = "what one pass of the generator's own model, learned online, reaches on a synthetic set"
DESCRIPTION = "What one pass can reach on the synthetic data: the generator's true model, learned online (not library code)."

ID_COLUMNS = [*ID_FEATURES, "price"]
MAX_HALVINGS = 8  # a Newton update is halved at most this often (then rate / 256 of it stays)
# the latent vectors the user's meets, by interaction: name (the generator's World attribute) -> id column
LATENT_SIDES = {"category": {"item_vec": "cate_id"}, "item": {"adgroup_vec": "adgroup_id"},
                "both": {"item_vec": "cate_id", "adgroup_vec": "adgroup_id"}}


def set_knobs(data: Path, meta: dict) -> dict:
    """The generator's knobs a set was made with, from its ``_SUCCESS`` (``meta``), every knob
    filled in (a set that records none is the default world's, with its ``sequential_dependence``).
    A ValueError names the file and the knob this model does not know."""
    success = Path(data) / "_SUCCESS"
    knobs = dict(meta.get("knobs") or {})
    unknown = sorted(set(knobs) - set(DEFAULT_KNOBS))
    if unknown:
        raise ValueError(f"{success}: knob {unknown[0]!r} is not one this model knows "
                         f"({', '.join(sorted(DEFAULT_KNOBS))})")
    recorded = meta.get("sequential_dependence")
    if recorded is not None:
        if float(knobs.setdefault("sequential_dependence", recorded)) != float(recorded):
            raise ValueError(f"{success}: knob 'sequential_dependence' is {knobs['sequential_dependence']} "
                             f"in knobs but {recorded} at the top level")
    try:
        return resolve_knobs(None, **knobs)
    except ValueError as e:
        raise ValueError(f"{success}: {e}") from None


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
    order is a random order). Integer ids only: a set made with ``--string-ids`` is refused."""
    files = sorted(Path(path).glob("*.parquet"))
    table = pq.read_table(files, columns=ID_COLUMNS + list(TAG_FEATURES) + labels)
    for c in ID_COLUMNS + list(TAG_FEATURES):
        kind = table.schema.field(c).type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            raise ValueError(f"{files[0]}: column {c} holds strings (a set made with --string-ids); "
                             "this model reads integer ids")
    ids = torch.from_numpy(np.stack([table.column(c).to_numpy() for c in ID_COLUMNS], 1).astype(np.int64))
    tags = []
    for c in TAG_FEATURES:
        col = table.column(c).combine_chunks()
        offsets = col.offsets.to_numpy().astype(np.int64)
        tags.append((torch.from_numpy(col.flatten().to_numpy().astype(np.int64)),
                     torch.from_numpy(offsets - offsets[0])))
    y = torch.from_numpy(np.stack([table.column(c).to_numpy() for c in labels], 1).astype(np.float64))
    return Rows(ids, tags, y)


def vocabulary(*splits: Rows, knobs: dict | None = None) -> dict[str, int]:
    """Table rows per column: the vocabularies of ``knobs`` (the default world's without them),
    grown to the largest id seen in ``splits``."""
    vocab = {c: v for c, (v, _) in {**ID_FEATURES, **TAG_FEATURES}.items()}
    vocab.update({c: int(knobs[k]) for k, c in VOCAB_KNOBS.items()} if knobs else {})
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
    """The generator's logit, step by step: N rows -> N x T conditional logits (float64), in the
    form of ``knobs`` (``datasets.synthetic.DEFAULT_KNOBS``' names; unset ones the default
    world's). Latent vectors carry the generator's names: ``user_vec`` per user, ``item_vec`` per
    category, ``adgroup_vec`` per item, those of the interaction only."""

    def __init__(self, vocab: dict[str, int], steps: int, seed: int = 0, knobs: dict | None = None) -> None:
        super().__init__()
        self.knobs = resolve_knobs(None, **(knobs or {}))
        scale, dim, sd = self.knobs["id_effect_scale"], self.knobs["latent_dim"], self.knobs["latent_scale"]
        self.dependence = float(self.knobs["sequential_dependence"])
        self.user = ID_COLUMNS.index("user_id")
        self.sides = {name: ID_COLUMNS.index(c) for name, c in LATENT_SIDES[self.knobs["interaction"]].items()}
        shapes = {"bias": (steps,), **{f"id:{c}": (vocab[c], steps) for c in ID_COLUMNS},
                  **{f"tag:{c}": (vocab[c], steps) for c in TAG_FEATURES},
                  "user_vec": (vocab["user_id"], dim),
                  **{name: (vocab[ID_COLUMNS[i]], dim) for name, i in self.sides.items()}}
        self.prior_sd = {"bias": None, **{f"id:{c}": s * scale for c, (_, s) in ID_FEATURES.items()},
                         "id:price": PRICE_SCALE * scale,
                         **{f"tag:{c}": s * scale for c, (_, s) in TAG_FEATURES.items()},
                         **{name: sd for name in ("user_vec", *self.sides)}}
        self.params = torch.nn.ParameterDict({name.replace(":", "__"): torch.nn.Parameter(
            torch.zeros(shape, dtype=torch.float64)) for name, shape in shapes.items()})
        g = torch.Generator().manual_seed(seed)  # at zero the latent vectors' gradients are zero
        with torch.no_grad():
            for name in self.latent_names():
                if sd > 0:  # a zero prior: the vectors are zero
                    self[name].normal_(0, 0.01, generator=g)
        self.inter_scale = torch.linspace(*INTERACTION_SCALE, steps, dtype=torch.float64)  # the generator's, fixed

    def __getitem__(self, name: str) -> torch.nn.Parameter:
        return self.params[name.replace(":", "__")]

    def names(self) -> list[str]:
        """Every parameter, by name (``bias``, ``id:COLUMN``, ``tag:COLUMN``, the latent vectors)."""
        return list(self.prior_sd)

    def latent_names(self) -> list[str]:
        return ["user_vec", *self.sides]

    def own(self, rows: Rows) -> torch.Tensor:
        """N x T: each step's own centred logit (its effects and the interaction x the step's scale),
        before the sequential dependence."""
        out = sum(self[f"id:{c}"][rows.ids[:, i]] for i, c in enumerate(ID_COLUMNS))
        for c, (values, offsets) in zip(TAG_FEATURES, rows.tags):
            # the mean of the row's tag effects, 0 for a row without tags (as the generator)
            out = out + F.embedding_bag(values, self[f"tag:{c}"], offsets[:-1], mode="mean")
        return out + self.interaction(rows)[:, None] * self.inter_scale

    def interaction(self, rows: Rows) -> torch.Tensor:
        """N: u_user . (the sum of the interaction's item-side vectors)."""
        return (self["user_vec"][rows.ids[:, self.user]] * self._side(rows, self.params)).sum(1)

    def _side(self, rows: Rows, params) -> torch.Tensor:
        return sum(params[name][rows.ids[:, i]] for name, i in self.sides.items())

    def chain(self, own: torch.Tensor) -> torch.Tensor:
        """N x T centred logits: step 0's own; step t's (1 - d) x its own + d x 1.5 tanh(step t-1's)."""
        d = self.dependence
        if not d:
            return own
        centred = [own[:, 0]]
        for t in range(1, own.shape[1]):
            centred.append((1 - d) * own[:, t] + d * DEPENDENCE_GAIN * torch.tanh(centred[-1]))
        return torch.stack(centred, 1)

    def forward(self, rows: Rows) -> torch.Tensor:
        return self["bias"] + self.chain(self.own(rows))

    def jacobian(self, centred: torch.Tensor) -> torch.Tensor:
        """N x T x T: d (step t's centred logit) / d (step s's own logit) at the N x T ``centred``
        logits; the identity without sequential dependence."""
        n, steps = centred.shape
        d = self.dependence
        jac = torch.zeros(n, steps, steps, dtype=centred.dtype)
        jac[:, 0, 0] = 1.0
        for t in range(1, steps):
            jac[:, t, t] = 1 - d
            if d:
                slope = d * DEPENDENCE_GAIN * (1 - torch.tanh(centred[:, t - 1]) ** 2)
                jac[:, t, :t] = slope[:, None] * jac[:, t - 1, :t]
        return jac

    def curvature(self, rows: Rows, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Gauss-Newton diagonal of the chain NLL over ``rows`` per parameter, at the N x T
        conditional ``logits``: over the steps t a row is at risk for (step t: the rows where step
        t-1 happened), p_t (1 - p_t) x (d logit_t / d parameter)^2, summed over the rows that see
        the parameter. Step s's effects reach step t >= s through the sequential dependence (a tag
        of a row with k tags, seen c times there, at c / k); a latent component's derivative is the
        other side's component x the interaction's reach over the steps."""
        y = rows.labels
        p = torch.sigmoid(logits)
        at_risk = torch.cat([torch.ones_like(y[:, :1]), y[:, :-1]], 1)
        w = at_risk * p * (1 - p)  # N x T
        jac = self.jacobian(logits - self["bias"].detach())  # N x T (logit) x T (own)
        own_w = (w[:, :, None] * jac ** 2).sum(1)  # N x T: per own step s, sum_t w_t (d logit_t / d own_s)^2
        reach = (jac * self.inter_scale).sum(2)  # N x T: d logit_t / d interaction
        inter_w = (w * reach ** 2).sum(1, keepdim=True)  # N x 1
        curv = {"bias": w.sum(0)}
        for i, c in enumerate(ID_COLUMNS):
            curv[f"id:{c}"] = _bincounts(rows.ids[:, i], own_w, len(self[f"id:{c}"]))
        for c, (values, offsets) in zip(TAG_FEATURES, rows.tags):
            k = offsets.diff()
            size = len(self[f"tag:{c}"])
            owner = torch.repeat_interleave(torch.arange(len(k)), k)
            pairs, seen = torch.unique(owner * size + values, return_counts=True)  # (row, tag), times
            row = pairs // size
            share = (seen.to(own_w.dtype) / k[row])[:, None]
            curv[f"tag:{c}"] = _bincounts(pairs % size, own_w[row] * share ** 2, size)
        params = {n: self[n].detach() for n in self.latent_names()}
        users = rows.ids[:, self.user]
        curv["user_vec"] = _bincounts(users, inter_w * self._side(rows, params) ** 2, len(params["user_vec"]))
        for name, i in self.sides.items():
            curv[name] = _bincounts(rows.ids[:, i], inter_w * params["user_vec"][users] ** 2, len(params[name]))
        return curv

    def load_world(self, world) -> None:
        """Sets every parameter to a ``datasets.synthetic.World``'s truth (the oracle's own model).
        The world must have this model's interaction, latent dimension and sequential dependence."""
        for knob in ("interaction", "latent_dim", "sequential_dependence"):
            if world.knobs[knob] != self.knobs[knob]:
                raise ValueError(f"the world's {knob} is {world.knobs[knob]!r}, this model's {self.knobs[knob]!r}")
        truth = {"bias": world.bias, **{f"id:{c}": world.effects[c] for c in ID_FEATURES},
                 "id:price": world.price_effect, **{f"tag:{c}": world.effects[c] for c in TAG_FEATURES},
                 **{name: getattr(world, name) for name in self.latent_names()}}
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
          latent: bool = True) -> int:
    """``passes`` passes over ``train`` in order, one update per ``batch`` rows. A parameter whose
    prior standard deviation is 0 (a knob at 0) stays at 0. A Newton update that raises the batch's
    chain NLL is halved until it does not (``_backtrack``); returns the number of halvings."""
    names = [n for n in model.names() if model.prior_sd[n] != 0 and (latent or n not in model.latent_names())]
    prior = {n: (1e-3 if model.prior_sd[n] is None else 1 / model.prior_sd[n] ** 2) for n in names}
    state = {n: (torch.full_like(model[n], prior[n]) if optimizer == "newton" else torch.zeros_like(model[n]))
             for n in names}
    halvings = 0
    for _ in range(passes):
        for start in range(0, len(train), batch):
            rows = train.slice(start, min(start + batch, len(train)))
            model.zero_grad()
            logits = model(rows)
            before = chain_nll(logits, rows.labels)
            before.backward()
            with torch.no_grad():
                if optimizer == "newton":
                    curv = model.curvature(rows, logits.detach())
                    steps = {}
                    for n in names:
                        state[n] += curv[n]
                        steps[n] = rate * model[n].grad / state[n]
                        model[n].sub_(steps[n])
                    halvings += _backtrack(model, rows, before.detach(), steps)
                else:
                    for n in names:
                        param = model[n]
                        state[n] += param.grad ** 2
                        param -= (0.01 if n == "bias" else rate) * param.grad / (state[n].sqrt() + 1e-10)
    return halvings


def _backtrack(model: TrueForm, rows: Rows, before: torch.Tensor, steps: dict[str, torch.Tensor]) -> int:
    """Halves the Newton update just applied (``steps``, by parameter) while it leaves the batch's
    chain NLL above ``before`` or not finite, at most ``MAX_HALVINGS`` times; returns how often."""
    for k in range(MAX_HALVINGS):
        after = chain_nll(model(rows), rows.labels)
        if torch.isfinite(after) and after <= before:
            return k
        for n, step in steps.items():
            step /= 2
            model[n].add_(step)  # back by half of what is applied: half the step stays
    return MAX_HALVINGS


def run(data: Path, optimizer: str = "newton", rate: float = 0.5, seed: int = 1, batch: int = 8192,
        passes: int = 1, latent: bool = True, splits: tuple[Rows, Rows] | None = None) -> dict:
    """One learner on ``data`` (a set made by ``datasets.synthetic``, in the form its ``_SUCCESS``
    records): per-step eval AUC, the oracle's, the distance between them, and the seconds taken
    (learning and eval, not reading)."""
    data = Path(data)
    meta = json.loads((data / "_SUCCESS").read_text())
    knobs = set_knobs(data, meta)
    if optimizer not in ("newton", "adagrad"):
        raise ValueError(f"optimizer must be newton or adagrad, not {optimizer!r}")
    oracle = meta["oracle_eval_auc"]
    labels = list(oracle)
    train, ev = splits or (read_rows(data / "train", labels), read_rows(data / "eval", labels))
    began = time.perf_counter()
    model = TrueForm(vocabulary(train, ev, knobs=knobs), len(labels), seed, knobs)
    halvings = learn(model, train, optimizer, rate, batch, passes, latent)
    auc = marginal_auc(model, ev, labels)
    return {"preset": meta.get("preset"), "optimizer": optimizer, "rate": rate, "seed": seed, "latent": latent,
            "passes": passes, "rows": len(train), "halvings": halvings, "auc": auc, "oracle": oracle,
            "gap": {k: oracle[k] - auc[k] for k in labels}, "seconds": round(time.perf_counter() - began, 1)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/q2m", help="a set made by datasets.synthetic")
    p.add_argument("--optimizer", default="newton", help="newton, adagrad or both (comma-separated)")
    p.add_argument("--rate", default="0.5", help="step size(s), comma-separated")
    p.add_argument("--seeds", default="1", help="latent-vector initialisations, comma-separated")
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--no-latent", action="store_true", help="without the latent interaction (a logistic regression on one-hot ids)")


def cmd(args: argparse.Namespace) -> None:
    data = Path(args.data)
    set_knobs(data, json.loads((data / "_SUCCESS").read_text()))  # refuses a set of another form before reading it
    labels = list(quality.oracle(data))  # the chain, first to last, as the generator wrote it
    splits = (read_rows(data / "train", labels), read_rows(data / "eval", labels))
    for opt in args.optimizer.split(","):
        for rate in (float(r) for r in args.rate.split(",")):
            results = []
            for s in args.seeds.split(","):
                results.append(run(data, opt, rate, int(s), args.batch, args.passes, not args.no_latent, splits))
                print(json.dumps(results[-1]), flush=True)
            if len(results) > 1:
                auc = {k: statistics.fmean(r["auc"][k] for r in results) for k in labels}
                gap = {k: (statistics.fmean(r["gap"][k] for r in results), statistics.pstdev(r["gap"][k] for r in results))
                       for k in labels}
                print(json.dumps({"optimizer": opt, "rate": rate, "seeds": len(results),
                                  "mean_auc": {k: round(v, 4) for k, v in auc.items()},
                                  "mean_gap": {k: round(m, 4) for k, (m, _) in gap.items()},
                                  "std_gap": {k: round(s, 4) for k, (_, s) in gap.items()}}), flush=True)
