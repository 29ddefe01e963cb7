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

Ids are Zipf-distributed; ``--large-vocab N`` gives user_id and adgroup_id N distinct ids each
(default 20000), an id space larger than a hashed table, for comparing hashing with zch tables. Each step t happens only after step t-1, with probability
sigmoid(bias_t + sum of per-id effects + a user x item interaction), so a perfect model reaches
the AUC of the ``p_*`` columns (the oracle), printed at the end. ``--sequential-dependence D``
makes each later step inherit the earlier step's hidden state: its logit becomes
(1-D) x its own effects + D x 1.5 tanh(the previous step's centred logit), so a rare later step
is mostly predictable from what the earlier, frequent step learns (AITM's case); 0 keeps the
steps' effects independent (the default, the data unchanged).

``OUT/_SUCCESS`` is written last (with the oracle AUCs), so its presence means the set is whole.

Command:  python -m datasets.synthetic --out data/taobao_synth --rows 200000 --eval-rows 50000
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# column -> (vocabulary in the synthetic data, effect scale)
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
LATENT = 4


def zipf_ids(rng: np.random.Generator, vocab: int, n: int, a: float = 1.1) -> np.ndarray:
    """n ids in [0, vocab) with P(rank k) ~ 1/(k+1)^a, head ids scattered over the range."""
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** a)
    ranks = np.searchsorted(cdf, rng.random(n) * cdf[-1])
    return np.random.default_rng(vocab).permutation(vocab)[np.minimum(ranks, vocab - 1)]


class World:
    """The hidden truth: per-id effects for every step, and user / item latent vectors."""

    def __init__(self, labels: list[str], seed: int, large_vocab: int = 0,
                 sequential_dependence: float = 0.0) -> None:
        rng = np.random.default_rng(seed)
        self.labels = labels
        self.dependence = sequential_dependence
        steps = len(labels)
        self.id_features = dict(ID_FEATURES)
        if large_vocab:
            for c in LARGE_ID_FEATURES:
                self.id_features[c] = (large_vocab, ID_FEATURES[c][1])
        self.effects = {c: rng.normal(0, s, size=(v, steps))
                        for c, (v, s) in {**self.id_features, **TAG_FEATURES}.items()}
        self.price_effect = rng.normal(0, 0.3, size=(PRICE_BUCKETS, steps))
        self.user_vec = rng.normal(0, 0.5, size=(self.id_features["user_id"][0], LATENT))
        self.item_vec = rng.normal(0, 0.5, size=(ID_FEATURES["cate_id"][0], LATENT))
        # First step ~5% positive; each later step ~15% of the step before.
        self.bias = np.array([-3.6] + [-2.2] * (steps - 1))

    def sample(self, rng: np.random.Generator, n: int, string_ids: bool) -> pa.Table:
        steps = len(self.labels)
        cols: dict[str, pa.Array] = {}
        logit = np.tile(self.bias, (n, 1))
        raw_ids = {}
        for c, (vocab, _) in self.id_features.items():
            ids = zipf_ids(rng, vocab, n)
            raw_ids[c] = ids
            logit += self.effects[c][ids]
        for c, (vocab, _) in TAG_FEATURES.items():
            counts = rng.poisson(2.0, n)
            flat = zipf_ids(rng, vocab, int(counts.sum()))
            owner = np.repeat(np.arange(n), counts)
            eff = np.zeros((n, steps))
            np.add.at(eff, owner, self.effects[c][flat])
            logit += eff / np.maximum(counts, 1)[:, None]
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            if string_ids:
                pieces = np.split(flat.astype(str), offsets[1:-1])
                cols[c] = pa.array(["|".join(p) for p in pieces], pa.string())
            else:
                cols[c] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int64()))
        price = rng.integers(0, PRICE_BUCKETS, n)
        logit += self.price_effect[price]
        inter = np.einsum("nd,nd->n", self.user_vec[raw_ids["user_id"]], self.item_vec[raw_ids["cate_id"]])
        logit += inter[:, None] * np.linspace(1.0, 1.5, steps)

        if self.dependence:
            # Sequential dependence: step t's own effects shrink and it inherits the previous
            # step's hidden state (its centred logit), so later, rarer steps are mostly carried
            # by what the earlier step reveals (the transfer AITM is about).
            d = self.dependence
            for t in range(1, steps):
                own = logit[:, t] - self.bias[t]
                prev = logit[:, t - 1] - self.bias[t - 1]
                logit[:, t] = self.bias[t] + (1 - d) * own + d * 1.5 * np.tanh(prev)
        cond = 1.0 / (1.0 + np.exp(-logit))  # P(step t | step t-1)
        marginal = np.cumprod(cond, axis=1)
        happened = np.ones(n, bool)
        out: dict[str, pa.Array] = {}
        for t, name in enumerate(self.labels):
            happened &= rng.random(n) < cond[:, t]
            out[name] = pa.array(happened.astype(np.int8))
        for c, ids in raw_ids.items():
            out[c] = pa.array(ids.astype(str)) if string_ids else pa.array(ids, pa.int64())
        out.update(cols)
        out["price"] = pa.array(price, pa.int64())
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
    p.add_argument("--large-vocab", type=int, default=0,
                   help="distinct user_id and adgroup_id ids (default 0: 20000 each)")
    p.add_argument("--sequential-dependence", type=float, default=0.0, metavar="D",
                   help="in [0, 1]: step t's logit = (1-D) x its own effects + D x 1.5 tanh(step t-1's "
                        "centred logit); 0 (default): independent per-step effects, the data as before")
    args = p.parse_args(argv)
    labels = [l.strip() for l in args.labels.split(",") if l.strip()]
    if not labels:
        p.error("--labels must name at least one step")
    if not 0.0 <= args.sequential_dependence <= 1.0:
        p.error("--sequential-dependence must be in [0, 1]")
    world = World(labels, args.seed, args.large_vocab, args.sequential_dependence)
    out = Path(args.out)
    write_split(world, out / "train", args.rows, args.seed + 1, args.string_ids, args.files, args.row_group_size)
    write_split(world, out / "eval", args.eval_rows, args.seed + 2, args.string_ids, args.files, args.row_group_size)
    stats = {"out": str(out), "train_rows": args.rows, "eval_rows": args.eval_rows,
             "sequential_dependence": args.sequential_dependence,
             "oracle_eval_auc": oracle_auc(out / "eval", labels)}
    marker = out / "_SUCCESS"  # written last: its presence means both splits are complete
    tmp = out / "._SUCCESS.tmp"
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, marker)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
