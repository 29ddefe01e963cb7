"""A reference for what one pass can reach on the synthetic data (not library code).

The generator's own model class: a logistic regression on one-hot ids (one scalar per id and
step, tags summed), factorised along the chain as the generator is (each step given the one
before, trained on the rows where that one happened: P(buy) = P(click) x P(buy | click), and so
on for longer chains), zero-initialised, per-coordinate Adagrad, one pass at batch 8192. No
model of this project's shape can beat a correctly specified one by much in one pass, so its AUC
bounds what the defaults can be asked for.

    python -m launch.linear_reference --data data/q2m [--files 4] [--lr 0.1,0.2] [--labels clk,cart,buy]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(data: Path, files: int, lr: float, batch: int = 8192, labels: tuple[str, ...] = ()) -> dict:
    """``labels``: the chain, first to last; by default the generated set's own (its ``_SUCCESS``)."""
    from torchmetrics.functional.classification import binary_auroc

    from aitm_torchrec.config import load_config
    from launch import peer, quality

    labels = tuple(labels) or tuple(quality.oracle(data))

    cfg = load_config(None)
    ids, tags, sizes = peer.seed_layout(cfg)
    steps = len(labels)
    tr = peer.RowDataset(sorted((data / "train").glob("*.parquet"))[:files], ids, tags, list(labels), sizes)
    ev = peer.RowDataset(sorted((data / "eval").glob("*.parquet")), ids, tags, list(labels), sizes)
    torch.manual_seed(0)
    tables = [torch.nn.Embedding(sizes[c] + 1, steps, padding_idx=sizes[c], sparse=True) for c in ids + tags]
    for t in tables:
        torch.nn.init.zeros_(t.weight)
    bias = torch.zeros(steps, requires_grad=True)
    opt, opt_b = torch.optim.Adagrad([t.weight for t in tables], lr=lr), torch.optim.Adam([bias], lr=0.01)

    def logits(x, g):
        out = bias + sum(tables[i](x[:, i]) for i in range(len(ids)))
        for j, c in enumerate(tags):
            t = g[:, j]
            out = out + tables[len(ids) + j](torch.where(t < 0, sizes[c], t)).sum(1)
        return out

    x_all, g_all, y_all = torch.from_numpy(tr.ids), torch.from_numpy(tr.tags), torch.from_numpy(tr.labels)
    perm = torch.randperm(len(y_all))
    for s in range(0, len(y_all), batch):
        i = perm[s:s + batch]
        lo, y = logits(x_all[i], g_all[i]), y_all[i]
        loss = F.binary_cross_entropy_with_logits(lo[:, 0], y[:, 0], reduction="sum")
        for t in range(1, steps):  # step t given step t-1: only the rows where t-1 happened
            seen = y[:, t - 1] > 0
            loss = loss + F.binary_cross_entropy_with_logits(lo[seen, t], y[seen, t], reduction="sum")
        opt.zero_grad()
        opt_b.zero_grad()
        loss.backward()
        opt.step()
        opt_b.step()
    with torch.no_grad():
        marginal = torch.cumprod(torch.sigmoid(logits(torch.from_numpy(ev.ids), torch.from_numpy(ev.tags))), dim=1)
        y = torch.from_numpy(ev.labels).long()
    return {"rows": len(y_all), "lr": lr,
            **{name: float(binary_auroc(marginal[:, t], y[:, t])) for t, name in enumerate(labels)}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/q2m")
    p.add_argument("--files", type=int, default=4, help="first N training files")
    p.add_argument("--lr", default="0.1")
    p.add_argument("--labels", default="",
                   help="the chain's label columns, first to last (default: the generated set's, from its _SUCCESS)")
    args = p.parse_args(argv)
    labels = tuple(label.strip() for label in args.labels.split(",") if label.strip())
    for lr in args.lr.split(","):
        print(json.dumps(run(Path(args.data), args.files, float(lr), labels=labels)), flush=True)


if __name__ == "__main__":
    main()
