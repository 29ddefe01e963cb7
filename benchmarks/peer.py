"""``python -m benchmarks peer``: this trainer beside a plain PyTorch AITM, written the way
research code usually is (a benchmark peer, not library code).

The peer: one process; one ``nn.Embedding`` per field (tags: padded lists summed); a per-row
``Dataset`` and ``DataLoader``; the paper's model (shared bottom, towers, a transfer "info" layer,
AIT self attention, order calibration); dense Adam over every parameter, tables included;
PyTorch's default initialisation (embeddings N(0, 1)). Same data (the synthetic Parquet set),
same table sizes as ``configs/aitm_taobao.yaml`` (ids reach rows by ``id % rows``; the synthetic
ids are below every table's size, so no two ids share a row), same layer sizes.

Speed, measured in the same invocation one after the other (so both see the same machine): the
peer's training examples/s (one process, all cores, DataLoader included) and this trainer's (2
gloo ranks x 1 thread through ``train.run`` from Parquet, eval off), at the seed's table sizes
and with the large tables grown to ``--big-table-rows`` rows in all; their ratios.
Quality: both trained for one epoch over the same ``--rows``-row set (the peer at its batch of
2048, this trainer at each of ``--ours-batches`` per rank), per-task AUC and the oracle's.

    python -m benchmarks peer [--rows 2000000] [--no-speed] [--no-epoch] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks import quality
from benchmarks.common import REPO, big_table_overrides, cpu_seconds, train_rank

HELP = "a plain PyTorch AITM (research-code style) beside this trainer"

MAX_TAGS = 8


class RowDataset(Dataset):
    """Rows of Parquet files: ids (F), padded tags (G x MAX_TAGS, -1 = none), labels (T)."""

    def __init__(self, paths: list[Path], id_cols: list[str], tag_cols: list[str], labels: list[str],
                 sizes: dict[str, int]) -> None:
        table = pq.read_table(paths, columns=id_cols + tag_cols + labels)
        self.ids = np.stack([table.column(c).to_numpy() % sizes[c] for c in id_cols], 1).astype(np.int64)
        self.tags = np.full((table.num_rows, len(tag_cols), MAX_TAGS), -1, np.int64)
        for g, c in enumerate(tag_cols):
            col = table.column(c).combine_chunks()
            offsets, values = col.offsets.to_numpy(), col.values.to_numpy() % sizes[c]
            lengths = np.diff(offsets)
            owner = np.repeat(np.arange(table.num_rows), lengths)
            pos = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
            keep = pos < MAX_TAGS
            self.tags[owner[keep], g, pos[keep]] = values[keep]
        self.labels = np.stack([table.column(c).to_numpy() for c in labels], 1).astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.ids[i]), torch.from_numpy(self.tags[i]), torch.from_numpy(self.labels[i])


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class PeerAITM(nn.Module):
    def __init__(self, id_sizes: list[int], tag_sizes: list[int], tasks: int, dim: int = 16,
                 bottom: tuple[int, ...] = (512, 256), tower: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        self.ids = nn.ModuleList(nn.Embedding(n, dim) for n in id_sizes)
        self.tags = nn.ModuleList(nn.Embedding(n + 1, dim, padding_idx=n) for n in tag_sizes)
        self.tag_pad = tag_sizes
        width = dim * (len(id_sizes) + len(tag_sizes))
        self.bottom = mlp([width, *bottom])
        self.towers = nn.ModuleList(mlp([bottom[-1], *tower]) for _ in range(tasks))
        k = tower[-1]
        self.info = nn.ModuleList(nn.Sequential(nn.Linear(k, k), nn.ReLU()) for _ in range(tasks - 1))
        self.h1, self.h2, self.h3 = (nn.ModuleList(nn.Linear(k, k, bias=False) for _ in range(tasks - 1))
                                     for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(k, 1) for _ in range(tasks))
        self.k = k

    def forward(self, ids: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        parts = [e(ids[:, f]) for f, e in enumerate(self.ids)]
        for g, e in enumerate(self.tags):
            t = tags[:, g]
            parts.append(e(torch.where(t < 0, self.tag_pad[g], t)).sum(1))
        b = self.bottom(torch.cat(parts, 1))
        z, logits = None, []
        for t, tower in enumerate(self.towers):
            q = tower(b)
            if t:  # AIT over own tower output and the transferred previous step
                c = torch.stack([q, self.info[t - 1](z)], 1)
                s = (self.h2[t - 1](c) * self.h3[t - 1](c)).sum(-1) / math.sqrt(self.k)
                q = (torch.softmax(s, 1).unsqueeze(-1) * self.h1[t - 1](c)).sum(1)
            z = q
            logits.append(self.heads[t](q))
        return torch.cat(logits, 1)


def seed_layout(cfg) -> tuple[list[str], list[str], dict[str, int]]:
    """(id columns, tag columns, column -> table rows) of a config's features."""
    feats = cfg.feature_config.features
    ids = [f.column for f in feats if f.feature_type == "IdFeature"]
    tags = [f.column for f in feats if f.feature_type == "TagFeature"]
    return ids, tags, {f.column: f.num_embeddings for f in feats}


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0).sum()
    p = torch.sigmoid(logits)
    return loss + alpha * torch.relu(p[:, 1:] - p[:, :-1]).sum(1).mean()


def build(cfg, sizes_override: dict[str, int] | None = None, seed: int = 0):
    ids, tags, sizes = seed_layout(cfg)
    sizes = {**sizes, **(sizes_override or {})}
    torch.manual_seed(seed)
    model = PeerAITM([sizes[c] for c in ids], [sizes[c] for c in tags], len(cfg.towers))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), ids, tags, sizes


def loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def examples_per_s(cfg, data: Path, batch_size: int, steps: int, sizes_override: dict[str, int] | None = None,
                   warmup: int = 3) -> dict:
    """Training examples/s over ``steps`` steps (after ``warmup``), DataLoader included."""
    model, opt, ids, tags, sizes = build(cfg, sizes_override)
    labels = cfg.schema.label_names
    files = sorted((data / "train").glob("*.parquet"))[:1]
    ds = RowDataset(files, ids, tags, labels, sizes)
    it = iter(loader(ds, batch_size, True))
    n, t0 = 0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        x, g, y = next(it)
        opt.zero_grad()
        loss_fn(model(x, g), y).backward()
        opt.step()
        n += len(y) if step >= warmup else 0
    dt = time.perf_counter() - t0
    return {"examples_per_s": n / dt, "steps": steps, "batch_size": batch_size,
            "table_rows_total": sum(sizes.values()), "threads": torch.get_num_threads()}


def one_epoch(cfg, data: Path, batch_size: int = 2048, seed: int = 0) -> dict:
    """Trains one epoch over ``data/train``; per-task AUC on ``data/eval``."""
    from torchmetrics.functional.classification import binary_auroc

    model, opt, ids, tags, sizes = build(cfg, seed=seed)
    labels = cfg.schema.label_names
    train = RowDataset(sorted((data / "train").glob("*.parquet")), ids, tags, labels, sizes)
    t0, n = time.perf_counter(), 0
    model.train()
    for x, g, y in loader(train, batch_size, True, seed):
        opt.zero_grad()
        loss_fn(model(x, g), y).backward()
        opt.step()
        n += len(y)
    seconds = time.perf_counter() - t0
    model.eval()
    ev = RowDataset(sorted((data / "eval").glob("*.parquet")), ids, tags, labels, sizes)
    preds, ys = [], []
    with torch.no_grad():
        for x, g, y in loader(ev, 8192, False):
            preds.append(model(x, g))
            ys.append(y)
    p, y = torch.cat(preds), torch.cat(ys)
    auc = {t.tower_name: float(binary_auroc(p[:, i], y[:, i].long())) for i, t in enumerate(cfg.towers)}
    return {"auc": auc, "examples": n, "seconds": round(seconds, 1), "examples_per_s": n / seconds,
            "batch_size": batch_size}


# ---- the benchmark: the peer beside this trainer ----------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2_000_000, help="rows of the one-epoch set (generated if missing)")
    p.add_argument("--eval-rows", type=int, default=100_000)
    p.add_argument("--data-root", default=str(REPO / "data"))
    p.add_argument("--data", help="an existing generated set (DIR with train/, eval/, _SUCCESS) instead of --rows")
    p.add_argument("--ours-batches", default="4096,1024",
                   help="this trainer's batches per rank for the one-epoch comparison; empty: peer only")
    p.add_argument("--peer-batch", type=int, default=2048)
    p.add_argument("--speed-steps", type=int, default=20, help="timed peer steps (this trainer: 5x as many)")
    p.add_argument("--big-table-rows", type=int, default=14_000_000)
    p.add_argument("--no-epoch", dest="epoch", action="store_false", help="speed only")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="one-epoch quality only")
    p.add_argument("--seed", type=int, default=1)


def _ours_rank(config: str | None, overrides: list[str]) -> float:
    return train_rank(config, overrides)["train"]["examples_per_s"]


def ours_examples_per_s(data: Path, steps: int, extra: list[str]) -> float:
    from aitm_torchrec.dist import run_local

    model_dir = Path(tempfile.mkdtemp(prefix="peer_ours_"))
    try:
        return run_local(_ours_rank, None, extra + [
            f"train_input_path=[{data / 'train'}]", "eval_input_path=[]", f"model_dir={model_dir}",
            f"train_config.num_steps={steps}", f"train_config.log_step_count_steps={steps}",
            "train_config.save_checkpoints_steps=0"], nproc=2, threads=1)[0]
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def speed(args, cfg, data: Path, big: list[str], big_sizes: dict[str, int]) -> dict:
    """Peer and this trainer, one after the other in this invocation, at both table sizes."""
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    sp = {"peer_small": examples_per_s(cfg, data, args.peer_batch, args.speed_steps),
          "ours_small": ours_examples_per_s(data, 5 * args.speed_steps, []),
          "peer_big": examples_per_s(cfg, data, args.peer_batch, max(args.speed_steps // 4, 3), big_sizes),
          "ours_big": ours_examples_per_s(data, 5 * args.speed_steps, big)}
    wall, cpu1 = time.perf_counter() - t0, cpu_seconds()
    out = {}
    for name, p, o in (("seed_tables", sp["peer_small"], sp["ours_small"]), ("big_tables", sp["peer_big"], sp["ours_big"])):
        out[name] = {"table_rows_total": p["table_rows_total"], "peer_examples_per_s": round(p["examples_per_s"]),
                     "ours_examples_per_s": round(o), "ratio": round(o / p["examples_per_s"], 1)}
    out["machine_cpu_s_other_processes"] = round(cpu1["machine_busy"] - cpu0["machine_busy"] -
                                                 (cpu1["process"] - cpu0["process"]), 1)
    out["wall_s"] = round(wall, 1)
    return out


def cmd(args: argparse.Namespace) -> dict:
    import torch

    from aitm_torchrec.config import load_config

    torch.set_num_threads(2)
    cfg = load_config(None)
    data = Path(args.data) if args.data else quality.ensure_data(Path(args.data_root), args.rows, args.eval_rows,
                                                                 "clk,buy")
    big = big_table_overrides(cfg, args.big_table_rows)
    big_sizes = {cfg.feature_config.features[int(o.split(".")[2])].column: int(o.split("=")[1]) for o in big}
    result = {"benchmark": "peer",
              "peer": "benchmarks/peer.py: nn.Embedding per field, dense Adam over all parameters (lr 1e-3), per-row "
                      "Dataset + DataLoader, one process, 2 threads",
              "ours": "launch/train.py path: 2 gloo ranks x 1 thread, sharded tables, fused table optimizer, "
                      "Parquet reader"}
    if args.speed:
        result["speed"] = speed(args, cfg, data, big, big_sizes)
        print(json.dumps(result["speed"]), file=sys.stderr)
    if args.epoch:
        ours = {f"ours_batch_{b}": quality.one_epoch(None, data, [f"train_config.seed={args.seed}"], batch_size=b)
                for b in [int(b) for b in args.ours_batches.split(",") if b]}
        p = one_epoch(cfg, data, args.peer_batch, seed=args.seed)
        truth = quality.oracle(data)
        labels = {t.tower_name: t.label_name for t in cfg.schema.tasks}
        result["quality"] = {
            "rows": quality.train_rows(data), "data": str(data), "seed": args.seed,
            "oracle": {t: round(truth[l], 4) for t, l in labels.items()},
            f"peer_batch_{args.peer_batch}": {t: round(v, 4) for t, v in p["auc"].items()},
            **{k: {t: round(v, 4) for t, v in r["auc"].items()} for k, r in ours.items()},
            "peer_epoch_examples_per_s": round(p["examples_per_s"]),
        }
    print(json.dumps(result, indent=1))
    return result
