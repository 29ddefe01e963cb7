"""Synthetic conversion-chain data with the seed's Taobao schema and a known oracle.

Input: nothing (a seed). Output: ``OUT/train/part-*.parquet`` and ``OUT/eval/part-*.parquet``
with the columns of EasyRec's ``aitm_on_taobao`` sample (``tests/fixtures/easyrec/``):

    labels   : one int8 column per step (default clk, buy), each 0/1
    ids      : pid, adgroup_id, cate_id, campaign_id, customer, brand, user_id, cms_segid,
               cms_group_id, final_gender_code, age_level, pvalue_level, shopping_level,
               occupation, new_user_class_level  (int64, or strings with --string-ids)
    tags     : tag_category_list, tag_brand_list  (list<int64>, or "|"-joined strings)
    price    : int64 in [0, 50)
    oracle   : p_<label> per step, float32, the row's true marginal probability of that step

Ids are Zipf-distributed (P(rank k) ~ 1/(k+1)^a, ``--zipf`` a, default 1.1). Each step t happens
only after step t-1, with probability sigmoid(bias_t + sum of per-id effects + a user x item
latent interaction), so a perfect model reaches the AUC of the ``p_*`` columns (the oracle),
printed at the end. ``--sequential-dependence D`` makes each later step inherit the earlier step's
hidden state: its logit becomes (1-D) x its own effects + D x 1.5 tanh(the previous step's centred
logit), so a rare later step is mostly predictable from what the earlier, frequent step learns
(AITM's case); 0 keeps the steps' effects independent (the default).

A family of worlds. The knobs (``DEFAULT_KNOBS``; CLI flags of the same names) vary what real logs
vary: the id cardinalities (``users`` = user_id, ``items`` = adgroup_id, and the long-tail fields
campaign_id, customer, brand, cate_id and the two tag lists; ``--large-vocab N`` sets users and
items both), the popularity skew (``zipf``), the strength of the per-id effects
(``id_effect_scale``, a multiplier on every id, tag and price effect's standard deviation) against
the latent interaction (``latent_scale``, the standard deviation of each latent component, so the
interaction's is latent_scale^2 x sqrt(latent_dim)), the latent dimension, which item side the
user's latent vector meets (``interaction``: ``category`` = cate_id, the default; ``item`` =
adgroup_id; ``both``: the sum of the two), the positive rate of each step (``rates``: P(step 1),
then P(step t | step t-1); the biases are solved so the world's rows reach them; unset: the fixed
biases -3.6, -2.2, ... which give about 6.8% clicks and 18% buys per click) and the sequential
dependence. ``--preset NAME`` starts from one of ``PRESETS`` (below, each with what it models);
explicit flags override its values. With no preset and no knob flags the data is exactly the
default world's (same parameters, same draws).

``OUT/_SUCCESS`` is written last, so its presence means the set is whole. It is JSON: the rows,
the preset, every knob's value, the biases used, the eval split's positive rate per step
(``eval_positive_rate``) and per step given the one before (``eval_step_rate``), and the oracle's
eval AUC per step (``oracle_eval_auc``).

Command:  python -m datasets.synthetic --out data/taobao_synth --rows 200000 --eval-rows 50000
          python -m datasets.synthetic --out data/long_tail --preset long-tail --zipf 0.9
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# column -> (vocabulary in the default world, effect scale)
ID_FEATURES = {
    "pid": (2, 0.3),
    "adgroup_id": (20000, 0.6),
    "cate_id": (1000, 0.5),
    "campaign_id": (10000, 0.3),
    "customer": (10000, 0.3),
    "brand": (5000, 0.4),
    "user_id": (20000, 0.6),
    "cms_segid": (100, 0.2),
    "cms_group_id": (13, 0.2),
    "final_gender_code": (2, 0.2),
    "age_level": (7, 0.2),
    "pvalue_level": (4, 0.2),
    "shopping_level": (3, 0.2),
    "occupation": (2, 0.1),
    "new_user_class_level": (5, 0.1),
}
TAG_FEATURES = {"tag_category_list": (1000, 0.4), "tag_brand_list": (5000, 0.4)}
LARGE_ID_FEATURES = ("user_id", "adgroup_id")  # grown by --large-vocab
PRICE_BUCKETS = 50
LATENT = 4  # the default latent dimension
LATENT_SCALE = 0.5  # the default standard deviation of a latent component
PRICE_SCALE = 0.3  # the price effects' standard deviation (x id_effect_scale)
DEFAULT_BIAS = (-3.6, -2.2)  # the first step's bias, then every later step's, when no rates are set
INTERACTIONS = ("category", "item", "both")
INTERACTION_SCALE = (1.0, 1.5)  # the interaction's weight on the first and the last step (linear between)
DEPENDENCE_GAIN = 1.5  # sequential dependence: step t inherits d x 1.5 tanh(step t-1's centred logit)
CALIBRATION_ROWS = 100_000  # rows drawn (from their own stream) to solve the biases for target rates

# knob -> the column whose vocabulary it sets
VOCAB_KNOBS = {
    "users": "user_id", "items": "adgroup_id", "campaigns": "campaign_id", "customers": "customer",
    "brands": "brand", "categories": "cate_id", "tag_categories": "tag_category_list",
    "tag_brands": "tag_brand_list",
}
DEFAULT_KNOBS: dict = {
    **{k: {**ID_FEATURES, **TAG_FEATURES}[c][0] for k, c in VOCAB_KNOBS.items()},
    "zipf": 1.1,  # popularity skew: P(rank k) ~ 1/(k+1)^zipf
    "id_effect_scale": 1.0,  # x every id, tag and price effect's standard deviation
    "latent_scale": LATENT_SCALE,  # standard deviation of each user / item latent component
    "latent_dim": LATENT,
    "interaction": "category",  # the item side the user's latent vector meets: category, item or both
    "rates": None,  # [P(step 1), P(step t | step t-1), ...]; None: the fixed DEFAULT_BIAS
    "sequential_dependence": 0.0,
}

# The family: each preset is a dict of knob values over DEFAULT_KNOBS (unset knobs keep the
# default). Ordered from long-tail and sparse to head-heavy and dense. A rates list shorter than the
# chain repeats its last value for the later steps. Documented in docs/data.md.
PRESETS: dict[str, dict] = {
    # A marketplace's long tail: every id field 5-10x the default vocabulary under a flat popularity
    # curve (zipf 0.8), so most ids are seen a handful of times and per-id memorisation hardly pays;
    # the user x item (adgroup) interaction carries the personal signal.
    "long-tail": dict(users=200_000, items=200_000, campaigns=100_000, customers=100_000, brands=50_000,
                      categories=5000, tag_categories=5000, tag_brands=50_000, zipf=0.8,
                      interaction="item", rates=[0.05, 0.15]),
    # Few positives on a wide id space: 1.5% clicks, 5% of clicks buy, 5x the default vocabularies,
    # weaker per-id effects, and the buy step mostly carried by the click step's hidden state
    # (sequential dependence 0.5): where AITM's transfer from the frequent step should matter.
    "sparse": dict(users=100_000, items=100_000, campaigns=50_000, customers=50_000, brands=20_000,
                   categories=2000, tag_categories=2000, tag_brands=20_000, zipf=1.0, id_effect_scale=0.7,
                   interaction="item", rates=[0.015, 0.05], sequential_dependence=0.5),
    # Taobao's rates (about 4.5% clicks, 1% of clicks buy) on the default vocabularies and skew, with
    # the user meeting both the category and the item (adgroup).
    "taobao": dict(interaction="both", rates=[0.045, 0.01]),
    # The gap the default world lacks: a user x item (adgroup) latent interaction of dimension 8 that
    # outweighs the per-id effects (interaction sd 0.36 x sqrt(8) = 1.0 x 1 ... 1.5 per step; id
    # effects at 0.6x).
    "interaction": dict(interaction="item", latent_dim=8, latent_scale=0.6, id_effect_scale=0.6,
                        rates=[0.05, 0.15]),
    # A small catalogue with a steep head: 10x smaller vocabularies, zipf 1.5 (a few ids take most
    # rows), strong per-id effects: memorising the head ids is most of the signal.
    "head-heavy": dict(users=2000, items=2000, campaigns=1000, customers=1000, brands=500, categories=100,
                       tag_categories=100, tag_brands=500, zipf=1.5, id_effect_scale=1.3, rates=[0.06, 0.2]),
    # Dense feedback (a feed where users act often): 20% clicks, 30% of clicks buy, 4x smaller
    # vocabularies, zipf 1.2, a strong category-and-item interaction of dimension 8.
    "dense": dict(users=5000, items=5000, campaigns=2500, customers=2500, brands=1000, categories=250,
                  tag_categories=250, tag_brands=1000, zipf=1.2, latent_dim=8, latent_scale=0.6,
                  interaction="both", rates=[0.2, 0.3]),
}


def zipf_ids(rng: np.random.Generator, vocab: int, n: int, a: float = 1.1) -> np.ndarray:
    """n ids in [0, vocab) with P(rank k) ~ 1/(k+1)^a, head ids scattered over the range."""
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** a)
    ranks = np.searchsorted(cdf, rng.random(n) * cdf[-1])
    return np.random.default_rng(vocab).permutation(vocab)[np.minimum(ranks, vocab - 1)]


def resolve_knobs(preset: str | None = None, **overrides) -> dict:
    """DEFAULT_KNOBS, then the preset's values, then ``overrides`` (None values ignored), checked."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
    unknown = set(overrides) - set(DEFAULT_KNOBS)
    if unknown:
        raise ValueError(f"unknown knobs {sorted(unknown)}; known: {sorted(DEFAULT_KNOBS)}")
    knobs = {**DEFAULT_KNOBS, **(PRESETS[preset] if preset else {}),
             **{k: v for k, v in overrides.items() if v is not None}}
    for k in VOCAB_KNOBS:
        if int(knobs[k]) < 1:
            raise ValueError(f"{k} must be at least 1, not {knobs[k]}")
        knobs[k] = int(knobs[k])
    if knobs["zipf"] < 0 or knobs["id_effect_scale"] < 0 or knobs["latent_scale"] < 0:
        raise ValueError("zipf, id_effect_scale and latent_scale must be >= 0")
    if int(knobs["latent_dim"]) < 1:
        raise ValueError(f"latent_dim must be at least 1, not {knobs['latent_dim']}")
    knobs["latent_dim"] = int(knobs["latent_dim"])
    if knobs["interaction"] not in INTERACTIONS:
        raise ValueError(f"interaction must be one of {INTERACTIONS}, not {knobs['interaction']!r}")
    if knobs["rates"] is not None:
        knobs["rates"] = [float(r) for r in knobs["rates"]]
        if not knobs["rates"] or not all(0.0 < r < 1.0 for r in knobs["rates"]):
            raise ValueError(f"rates must be one or more values in (0, 1), not {knobs['rates']}")
    if not 0.0 <= knobs["sequential_dependence"] <= 1.0:
        raise ValueError("sequential_dependence must be in [0, 1]")
    return knobs


def step_rates(rates: list[float], steps: int) -> list[float]:
    """``rates`` fitted to a chain of ``steps``: its first values, the last repeated for later steps."""
    return (list(rates) + [rates[-1]] * steps)[:steps]


def _solve_bias(z: np.ndarray, weight: np.ndarray, rate: float) -> float:
    """The b with sum(weight x sigmoid(b + z)) / sum(weight) = rate (bisection; monotone in b)."""
    lo, hi = -40.0, 40.0
    total = weight.sum()
    for _ in range(80):
        mid = (lo + hi) / 2
        if (weight / (1.0 + np.exp(-(mid + z)))).sum() / total < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class World:
    """The hidden truth: per-id effects for every step, user / item latent vectors, step biases.

    ``knobs`` are any of ``DEFAULT_KNOBS`` (the default world without them); ``large_vocab`` sets
    the user and item vocabularies both."""

    def __init__(self, labels: list[str], seed: int, large_vocab: int = 0,
                 sequential_dependence: float = 0.0, **knobs) -> None:
        if large_vocab:
            knobs = {"users": large_vocab, "items": large_vocab, **knobs}
        self.knobs = resolve_knobs(None, sequential_dependence=sequential_dependence, **knobs)
        k = self.knobs
        rng = np.random.default_rng(seed)
        self.labels = labels
        self.dependence = k["sequential_dependence"]
        self.zipf = k["zipf"]
        steps = len(labels)
        vocab = {c: k[knob] for knob, c in VOCAB_KNOBS.items()}
        self.id_features = {c: (vocab.get(c, v), s) for c, (v, s) in ID_FEATURES.items()}
        self.tag_features = {c: (vocab.get(c, v), s) for c, (v, s) in TAG_FEATURES.items()}
        scale = k["id_effect_scale"]
        self.effects = {c: rng.normal(0, s * scale, size=(v, steps))
                        for c, (v, s) in {**self.id_features, **self.tag_features}.items()}
        self.price_effect = rng.normal(0, PRICE_SCALE * scale, size=(PRICE_BUCKETS, steps))
        dim, sd = k["latent_dim"], k["latent_scale"]
        self.user_vec = rng.normal(0, sd, size=(self.id_features["user_id"][0], dim))
        # item_vec: per category (cate_id); adgroup_vec: per item (adgroup_id); None where unused
        self.item_vec = (rng.normal(0, sd, size=(self.id_features["cate_id"][0], dim))
                         if k["interaction"] in ("category", "both") else None)
        self.adgroup_vec = (rng.normal(0, sd, size=(self.id_features["adgroup_id"][0], dim))
                            if k["interaction"] in ("item", "both") else None)
        if k["rates"] is None:
            # First step ~7% positive; each later step ~18% of the step before.
            self.bias = np.array([DEFAULT_BIAS[0]] + [DEFAULT_BIAS[1]] * (steps - 1))
        else:
            self.bias = self._calibrate(step_rates(k["rates"], steps), seed)

    def _calibrate(self, rates: list[float], seed: int) -> np.ndarray:
        """Biases such that the world's rows reach ``rates``: P(step 1) = rates[0], and
        P(step t | step t-1) = rates[t], on CALIBRATION_ROWS rows of a stream of their own."""
        self.bias = np.zeros(len(rates))
        z, _ = self._logit(np.random.default_rng([seed, 1 << 20]), CALIBRATION_ROWS)  # centred logits
        bias, weight = [], np.ones(len(z))
        for t, rate in enumerate(rates):
            b = _solve_bias(z[:, t], weight, rate)
            bias.append(b)
            weight = weight / (1.0 + np.exp(-(b + z[:, t])))  # P(step t) per row, the next step's weight
        return np.array(bias)

    def _logit(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, dict]:
        """N x T conditional logits and the drawn features: id arrays, (tag values, counts), price."""
        steps = len(self.labels)
        logit = np.tile(self.bias, (n, 1))
        raw_ids = {}
        for c, (vocab, _) in self.id_features.items():
            ids = zipf_ids(rng, vocab, n, self.zipf)
            raw_ids[c] = ids
            logit += self.effects[c][ids]
        tags = {}
        for c, (vocab, _) in self.tag_features.items():
            counts = rng.poisson(2.0, n)
            flat = zipf_ids(rng, vocab, int(counts.sum()), self.zipf)
            owner = np.repeat(np.arange(n), counts)
            eff = np.zeros((n, steps))
            np.add.at(eff, owner, self.effects[c][flat])
            logit += eff / np.maximum(counts, 1)[:, None]
            tags[c] = (flat, counts)
        price = rng.integers(0, PRICE_BUCKETS, n)
        logit += self.price_effect[price]
        user = self.user_vec[raw_ids["user_id"]]
        inter = 0.0
        if self.item_vec is not None:
            inter = np.einsum("nd,nd->n", user, self.item_vec[raw_ids["cate_id"]])
        if self.adgroup_vec is not None:
            inter = inter + np.einsum("nd,nd->n", user, self.adgroup_vec[raw_ids["adgroup_id"]])
        logit += inter[:, None] * np.linspace(*INTERACTION_SCALE, steps)

        if self.dependence:
            # Sequential dependence: step t's own effects shrink and it inherits the previous
            # step's hidden state (its centred logit), so later, rarer steps are mostly carried
            # by what the earlier step reveals (the transfer AITM is about).
            d = self.dependence
            for t in range(1, steps):
                own = logit[:, t] - self.bias[t]
                prev = logit[:, t - 1] - self.bias[t - 1]
                logit[:, t] = self.bias[t] + (1 - d) * own + d * DEPENDENCE_GAIN * np.tanh(prev)
        return logit, {"ids": raw_ids, "tags": tags, "price": price}

    def sample(self, rng: np.random.Generator, n: int, string_ids: bool) -> pa.Table:
        logit, drawn = self._logit(rng, n)
        cols: dict[str, pa.Array] = {}
        for c, (flat, counts) in drawn["tags"].items():
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            if string_ids:
                pieces = np.split(flat.astype(str), offsets[1:-1])
                cols[c] = pa.array(["|".join(p) for p in pieces], pa.string())
            else:
                cols[c] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int64()))
        cond = 1.0 / (1.0 + np.exp(-logit))  # P(step t | step t-1)
        marginal = np.cumprod(cond, axis=1)
        happened = np.ones(n, bool)
        out: dict[str, pa.Array] = {}
        for t, name in enumerate(self.labels):
            happened &= rng.random(n) < cond[:, t]
            out[name] = pa.array(happened.astype(np.int8))
        for c, ids in drawn["ids"].items():
            out[c] = pa.array(ids.astype(str)) if string_ids else pa.array(ids, pa.int64())
        out.update(cols)
        out["price"] = pa.array(drawn["price"], pa.int64())
        for t, name in enumerate(self.labels):
            out[f"p_{name}"] = pa.array(marginal[:, t].astype(np.float32))
        return pa.table(out)


def write_split(world: World, out_dir: Path, rows: int, seed: int, string_ids: bool,
                files: int, row_group_size: int) -> None:
    """Writes ``rows`` rows over ``files`` Parquet files, each atomically (tmp name, rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = [rows // files + (i < rows % files) for i in range(files)]
    for i, n in enumerate(per_file):
        final = out_dir / f"part-{i:05d}.parquet"
        tmp = final.with_name(final.name + ".tmp")
        with pq.ParquetWriter(tmp, world.sample(rng, 1, string_ids).schema) as writer:
            done = 0
            while done < n:
                m = min(row_group_size, n - done)
                writer.write_table(world.sample(rng, m, string_ids), row_group_size=row_group_size)
                done += m
        os.replace(tmp, final)


def oracle_auc(path: Path, labels: list[str]) -> dict[str, float]:
    """AUC of the true probabilities (the best any model can do) on the files under ``path``."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    table = pq.read_table(path, columns=labels + [f"p_{l}" for l in labels])
    return {
        l: float(binary_auroc(torch.from_numpy(table.column(f"p_{l}").to_numpy()),
                              torch.from_numpy(table.column(l).to_numpy().astype(np.int64))))
        for l in labels
    }


def positive_rates(path: Path, labels: list[str]) -> tuple[dict[str, float], dict[str, float | None]]:
    """Per step on the files under ``path``: the positive rate, and the rate among the rows where
    the step before happened (None where it never did)."""
    table = pq.read_table(path, columns=labels)
    y = [table.column(l).to_numpy().astype(np.int64) for l in labels]
    positive = {l: float(v.mean()) if len(v) else 0.0 for l, v in zip(labels, y)}
    given, before = {}, np.ones_like(y[0]) if y else None
    for l, v in zip(labels, y):
        given[l] = float(v.sum() / before.sum()) if before.sum() else None
        before = v
    return positive, given


def _rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/taobao_synth", help="output directory")
    p.add_argument("--rows", type=int, default=200_000, help="training rows")
    p.add_argument("--eval-rows", type=int, default=50_000, help="evaluation rows")
    p.add_argument("--labels", default="clk,buy", help="comma-separated chain of steps, first to last")
    p.add_argument("--files", type=int, default=2, help="files per split")
    p.add_argument("--row-group-size", type=int, default=16384)
    p.add_argument("--string-ids", action="store_true", help="ids as strings, tags as '|'-joined strings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="start from a named world of the family (datasets.synthetic.PRESETS); explicit "
                        "flags below override its values. Default: none, the default world")
    p.add_argument("--large-vocab", type=int, default=0,
                   help="distinct user_id and adgroup_id ids (default 0: the preset's, else 20000 each); "
                        "--users / --items override it")
    k = p.add_argument_group("knobs (default: the preset's value, else the default world's, shown)")
    for knob, column in VOCAB_KNOBS.items():
        k.add_argument("--" + knob.replace("_", "-"), type=int, default=None, metavar="N",
                       help=f"{column} vocabulary (default {DEFAULT_KNOBS[knob]})")
    k.add_argument("--zipf", type=float, default=None, metavar="A",
                   help="popularity skew of every id field: P(rank k) ~ 1/(k+1)^A (default 1.1)")
    k.add_argument("--id-effect-scale", type=float, default=None, metavar="K",
                   help="x the standard deviation of every per-id, tag and price effect (default 1.0)")
    k.add_argument("--latent-scale", type=float, default=None, metavar="S",
                   help="standard deviation of each user / item latent component (default 0.5)")
    k.add_argument("--latent-dim", type=int, default=None, metavar="D",
                   help=f"dimension of the user x item latent interaction (default {LATENT})")
    k.add_argument("--interaction", choices=INTERACTIONS, default=None,
                   help="what the user's latent vector meets: category (cate_id, the default), "
                        "item (adgroup_id) or both (the sum)")
    k.add_argument("--rates", type=_rates, default=None, metavar="R1,R2,...",
                   help="target positive rates: P(step 1), then P(step t | step t-1); the last repeats "
                        "for longer chains (default: none, the fixed biases -3.6, -2.2, ...)")
    k.add_argument("--sequential-dependence", type=float, default=None, metavar="D",
                   help="in [0, 1]: step t's logit = (1-D) x its own effects + D x 1.5 tanh(step t-1's "
                        "centred logit); 0 (default): independent per-step effects")
    args = p.parse_args(argv)
    labels = [l.strip() for l in args.labels.split(",") if l.strip()]
    if not labels:
        p.error("--labels must name at least one step")
    overrides = {knob: getattr(args, knob) for knob in DEFAULT_KNOBS}
    if args.large_vocab:
        overrides["users"] = args.users or args.large_vocab
        overrides["items"] = args.items or args.large_vocab
    try:
        knobs = resolve_knobs(args.preset, **overrides)
        world = World(labels, args.seed, **knobs)
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out)
    write_split(world, out / "train", args.rows, args.seed + 1, args.string_ids, args.files, args.row_group_size)
    write_split(world, out / "eval", args.eval_rows, args.seed + 2, args.string_ids, args.files, args.row_group_size)
    positive, given = positive_rates(out / "eval", labels)
    stats = {"out": str(out), "train_rows": args.rows, "eval_rows": args.eval_rows,
             "sequential_dependence": knobs["sequential_dependence"],
             "preset": args.preset, "seed": args.seed, "labels": labels, "knobs": knobs,
             "bias": [float(b) for b in world.bias],
             "eval_positive_rate": positive, "eval_step_rate": given,
             "oracle_eval_auc": oracle_auc(out / "eval", labels)}
    marker = out / "_SUCCESS"  # written last: its presence means both splits are complete
    tmp = out / "._SUCCESS.tmp"
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, marker)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
