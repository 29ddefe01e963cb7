"""A benchmark peer, not library code: AITM written the way research code usually is.

One process; one ``nn.Embedding`` per field (tags: padded lists summed); a per-row ``Dataset``
and ``DataLoader``; the paper's model (shared bottom, towers, a transfer "info" layer, AIT self
attention, order calibration); dense Adam over every parameter, tables included; PyTorch's
default initialisation (embeddings N(0, 1)). Same data (the synthetic Parquet set), same table
sizes as ``configs/aitm_taobao.yaml`` (ids reach rows by ``id % rows``; the synthetic ids are
below every table's size, so no two ids share a row), same layer sizes. ``launch/bench.py peer``
times it and trains it for one epoch.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

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
