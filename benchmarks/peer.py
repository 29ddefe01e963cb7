"""``python -m benchmarks peer``: this trainer beside a plain PyTorch AITM that follows MTReclib,
the public multi-task research library (https://github.com/easezyc/Multitask-Recommendation-Library,
read at commit 8c6529c), in its AITM model and its training script (a benchmark peer, not library
code).

What the peer takes from MTReclib (file:line at that commit):

- embeddings: one ``nn.Embedding`` of ``sum(field_dims)`` rows shared by all fields, each field's
  ids shifted by the sizes of the fields before it (``models/layers.py:8-9,16``); a field's size
  is its data's vocabulary: ``field_dims = max code + 1`` per categorical column of the train set
  (``datasets/aliexpress.py:16,20``, ``main.py:152,157``), on the integer codes the AliExpress
  data carries as they are (``data/preprocess.py:42,44,51``: train and test joined, the columns
  kept, no re-encoding), so one row per code; initialised
  xavier-uniform (``models/layers.py:10``): for a (rows, dim) table the bound is
  ``sqrt(6 / (rows + dim))`` with rows the total over all fields; width 128
  (``main.py:201``, ``--embed_dim``);
- MLP block: ``Linear -> BatchNorm1d -> ReLU -> Dropout(0.2)`` per layer (``models/layers.py:24-29``,
  dropout ``main.py:46``); Linear layers keep PyTorch's default initialisation (MTReclib sets none);
- one bottom MLP per task, not a shared one, over all field embeddings concatenated, sizes
  (512, 256) with no output layer (``models/aitm.py:27``, ``main.py:46``);
- AIT on the bottom outputs (width 256): for task i >= 1, ``p = g[i-1](fea[i-1])`` (a plain
  Linear with bias, no activation, one per transfer; ``models/aitm.py:22,42``) and
  ``q = fea[i]`` stacked as [p, q]; V, K, Q from three Linear layers with bias shared by every
  transfer (``h1, h2, h3``, ``models/aitm.py:23-25,45-47``); weights
  ``softmax_over_{p,q}(sum(K * Q) / sqrt(256))``; ``fea[i] = sum(weights * V)``
  (``models/aitm.py:48``). ``fea[i-1]`` is the previous task's AIT output, so the chain runs
  click -> buy (-> ...);
- one tower MLP per task after the AIT, sizes (128, 64) then a Linear to one logit
  (``models/aitm.py:28,50``, ``models/layers.py:30-31``, ``main.py:46``);
- loss: binary cross-entropy per task, averaged over the tasks (``main.py:80-84``; ``BCELoss`` on
  the sigmoid, ``main.py:160``, ``models/aitm.py:50``); no calibration term and no label masking:
  every task is fitted on every row, labels in their column order (click, then buy);
- Adam over every parameter (tables and BatchNorm included), lr 1e-3, weight_decay 1e-6
  (``main.py:161,199,202``); batch 2048, shuffled (``main.py:154,200``).

Where the peer differs, and why:

- features: the Taobao schema of ``configs/aitm_taobao.yaml`` (16 id and 2 tag fields), not
  MTReclib's AliExpress set (16 id fields and its numeric columns through one Linear,
  ``models/aitm.py:17,37``, ``datasets/aliexpress.py:16-17``). The schema has no numeric features,
  so there is no numeric Linear; the two tag fields (lists, which AliExpress lacks) take rows of
  the same shared table and are summed per field (up to 8 tags a row; -1 pads and is masked, so
  there is no padding row);
- field sizes (``Vocab``): the data's ids are raw ids, not codes, so the peer codes them: per
  field the sorted distinct ids of train and eval together get indices 0..n-1 and the field n
  rows, MTReclib's ``max code + 1`` on such codes. Coding eval too gives every eval id a row (a
  train-only ``max + 1`` would index past the table for an eval-only code); those rows get no data
  gradient in training, like any row outside a batch. The config's ``hash_bucket_size`` is not
  used by the one-epoch run;
- epochs: one, the benchmark's comparison of one pass. MTReclib trains up to 50 epochs and stops
  after two without a better mean AUC on the test set, keeping the best (``main.py:163-177,196``);
- the loss is computed from logits (``binary_cross_entropy_with_logits``): the same value as
  ``BCELoss`` on the sigmoid, minus that loss's clamp of log at -100;
- ``--peer-calibration A`` adds the AITM paper's order-calibration term
  ``A * mean(relu(p_buy - p_click))`` (off by default; MTReclib has none);
- batches: sliced (``index_select``) from the in-memory tensors along one seeded permutation per
  epoch, the very batches ``DataLoader(shuffle=True)`` with that seeded generator gives over the
  rows (MTReclib: a per-row ``Dataset`` and ``DataLoader``, ``main.py:154``), at a fraction of its
  collation cost;
- the speed runs build the peer at this trainer's table sizes (the config's ``hash_bucket_size``,
  or ``--big-table-rows``; ids reach rows by ``id % rows``) and the config's embedding width (16)
  rather than 128, so both trainers hold the same table bytes and the 14M-row peer (with its Adam
  state) fits in memory: they compare speed at equal tables, not the peer's data-sized table.

Speed, measured in the same invocation one after the other (so both see the same machine): the
peer's training examples/s (one process, all cores, batching included) and this trainer's (2
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
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from benchmarks import quality
from benchmarks.common import REPO, big_table_overrides, cpu_seconds, train_rank

HELP = "a plain PyTorch AITM following MTReclib (research code) beside this trainer"

MAX_TAGS = 8
EMBED_DIM = 128          # MTReclib main.py:201
BOTTOM = (512, 256)      # main.py:46
TOWER = (128, 64)        # main.py:46
DROPOUT = 0.2            # main.py:46
LR = 1e-3                # main.py:199
WEIGHT_DECAY = 1e-6      # main.py:202
BATCH = 2048             # main.py:200


class Vocab:
    """Per field, the sorted distinct raw ids of a data set (train and eval together) and their
    contiguous indices 0..n-1: MTReclib's categorical columns are such codes and its
    ``field_dims`` is their count per field (``datasets/aliexpress.py:20``)."""

    def __init__(self, paths: list[Path], id_cols: list[str], tag_cols: list[str]) -> None:
        table = pq.read_table(paths, columns=id_cols + tag_cols)
        self.values = {c: np.unique(table.column(c).to_numpy()) for c in id_cols}
        self.values.update({c: np.unique(pc.list_flatten(table.column(c)).to_numpy()) for c in tag_cols})

    @property
    def sizes(self) -> dict[str, int]:
        """Column -> number of distinct ids (the field's rows in the table)."""
        return {c: len(v) for c, v in self.values.items()}

    def index(self, column: str, raw: np.ndarray) -> np.ndarray:
        """Raw ids of ``column`` (all in the vocabulary) -> their indices."""
        return np.searchsorted(self.values[column], raw)


class RowDataset:
    """Parquet rows in memory as tensors: ids (N, F), padded tags (N, G, MAX_TAGS; -1 = none),
    labels (N, T). Ids reach rows through ``vocab`` (one row per distinct id) or, with ``sizes``,
    by ``id % sizes[column]``."""

    def __init__(self, paths: list[Path], id_cols: list[str], tag_cols: list[str], labels: list[str],
                 sizes: dict[str, int] | None = None, vocab: Vocab | None = None) -> None:
        assert (sizes is None) != (vocab is None), "one of sizes and vocab"
        rows = vocab.index if vocab is not None else (lambda c, raw: raw % sizes[c])
        table = pq.read_table(paths, columns=id_cols + tag_cols + labels)
        ids = np.stack([rows(c, table.column(c).to_numpy()) for c in id_cols], 1).astype(np.int64)
        tags = np.full((table.num_rows, len(tag_cols), MAX_TAGS), -1, np.int64)
        for g, c in enumerate(tag_cols):
            col = table.column(c).combine_chunks()
            offsets, values = col.offsets.to_numpy(), rows(c, col.values.to_numpy())
            lengths = np.diff(offsets)
            owner = np.repeat(np.arange(table.num_rows), lengths)
            pos = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
            keep = pos < MAX_TAGS
            tags[owner[keep], g, pos[keep]] = values[keep]
        labels_ = np.stack([table.column(c).to_numpy() for c in labels], 1).astype(np.float32)
        self.ids, self.tags, self.labels = torch.from_numpy(ids), torch.from_numpy(tags), torch.from_numpy(labels_)

    def __len__(self) -> int:
        return len(self.labels)


def mlp(sizes: list[int], dropout: float, output_layer: bool) -> nn.Sequential:
    """MTReclib's MLP block: per layer Linear, BatchNorm1d, ReLU, Dropout; then Linear to 1 if
    ``output_layer``."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(), nn.Dropout(dropout)]
    if output_layer:
        layers.append(nn.Linear(sizes[-1], 1))
    return nn.Sequential(*layers)


class AIT(nn.Module):
    """Self attention over two items, the transferred one and the task's own: V, K, Q from
    ``h1``, ``h2``, ``h3`` (Linear with bias), weights softmax(sum(K * Q) / sqrt(width)) over the
    two items, output the weighted sum of V."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.h1, self.h2, self.h3 = (nn.Linear(width, width) for _ in range(3))
        self.width = width

    def forward(self, transferred: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        x = torch.stack([transferred, own], 1)                       # (B, 2, width)
        v, k, q = self.h1(x), self.h2(x), self.h3(x)
        w = torch.softmax((k * q).sum(2, keepdim=True) / math.sqrt(self.width), 1)
        return (w * v).sum(1)


class PeerAITM(nn.Module):
    """MTReclib's AITM on the Taobao schema: one shared table with per-field offsets (xavier
    uniform), a bottom MLP per task, AIT between consecutive tasks, a tower MLP per task; returns
    one logit per task, (B, tasks)."""

    def __init__(self, id_sizes: list[int], tag_sizes: list[int], tasks: int, dim: int = EMBED_DIM,
                 bottom: tuple[int, ...] = BOTTOM, tower: tuple[int, ...] = TOWER,
                 dropout: float = DROPOUT) -> None:
        super().__init__()
        sizes = list(id_sizes) + list(tag_sizes)
        self.embedding = nn.Embedding(sum(sizes), dim)
        nn.init.xavier_uniform_(self.embedding.weight)
        offsets = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()], dtype=torch.int64)
        self.register_buffer("offsets", offsets, persistent=False)
        self.n_ids = len(id_sizes)
        width = dim * len(sizes)
        self.bottom = nn.ModuleList(mlp([width, *bottom], dropout, False) for _ in range(tasks))
        self.g = nn.ModuleList(nn.Linear(bottom[-1], bottom[-1]) for _ in range(tasks - 1))
        self.ait = AIT(bottom[-1])
        self.tower = nn.ModuleList(mlp([bottom[-1], *tower], dropout, True) for _ in range(tasks))

    def embed(self, ids: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        """(B, fields * dim): id rows, and per tag field the sum of its tags' rows (-1: none)."""
        f = self.n_ids
        id_emb = self.embedding(ids + self.offsets[:f])                             # (B, F, dim)
        keep = (tags >= 0).unsqueeze(-1)
        rows = torch.where(tags >= 0, tags, 0) + self.offsets[f:].view(1, -1, 1)
        tag_emb = (self.embedding(rows) * keep).sum(2)                              # (B, G, dim)
        return torch.cat([id_emb, tag_emb], 1).flatten(1)

    def forward(self, ids: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        emb = self.embed(ids, tags)
        fea = [b(emb) for b in self.bottom]
        for i in range(1, len(fea)):
            fea[i] = self.ait(self.g[i - 1](fea[i - 1]), fea[i])
        return torch.cat([t(x) for t, x in zip(self.tower, fea)], 1)


def seed_layout(cfg) -> tuple[list[str], list[str], dict[str, int]]:
    """(id columns, tag columns, column -> table rows) of a config's features."""
    feats = cfg.feature_config.features
    ids = [f.column for f in feats if f.feature_type == "IdFeature"]
    tags = [f.column for f in feats if f.feature_type == "TagFeature"]
    return ids, tags, {f.column: f.num_embeddings for f in feats}


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, calibration: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy per task averaged over the tasks; ``calibration`` > 0 adds the AITM
    paper's order term ``calibration * mean(sum over steps of relu(p_next - p_prev))``."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0).mean()
    if calibration:
        p = torch.sigmoid(logits)
        loss = loss + calibration * torch.relu(p[:, 1:] - p[:, :-1]).sum(1).mean()
    return loss


def build(cfg, sizes_override: dict[str, int] | None = None, seed: int = 0, dim: int = EMBED_DIM):
    """(model, Adam over every parameter at lr 1e-3 and weight_decay 1e-6, id columns, tag
    columns, column -> table rows). Rows per field: the config's, replaced by ``sizes_override``
    where it names the column (``one_epoch`` passes the data's vocabulary sizes for every field)."""
    ids, tags, sizes = seed_layout(cfg)
    sizes = {**sizes, **(sizes_override or {})}
    torch.manual_seed(seed)
    model = PeerAITM([sizes[c] for c in ids], [sizes[c] for c in tags], len(cfg.towers), dim=dim)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    return model, opt, ids, tags, sizes


def loader(ds: RowDataset, batch_size: int, shuffle: bool, seed: int = 0):
    """Batches (ids, tags, labels) sliced from the in-memory tensors. Shuffled: one permutation per
    call, drawn as ``DataLoader(ds, batch_size, shuffle=True, generator=Generator().manual_seed(seed))``
    draws it (the iterator's base seed, then ``randperm``), so the batches are that DataLoader's,
    row for row; the last batch holds the remainder."""
    n = len(ds)
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # DataLoader's base seed, drawn first
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    for start in range(0, n, batch_size):
        i = order[start:start + batch_size]
        yield ds.ids.index_select(0, i), ds.tags.index_select(0, i), ds.labels.index_select(0, i)


def examples_per_s(cfg, data: Path, batch_size: int, steps: int, sizes_override: dict[str, int] | None = None,
                   warmup: int = 3, dim: int = EMBED_DIM, calibration: float = 0.0) -> dict:
    """Training examples/s over ``steps`` steps (after ``warmup``), batching included; tables of
    the config's sizes (or ``sizes_override``), ids reaching rows by ``id % rows``."""
    model, opt, ids, tags, sizes = build(cfg, sizes_override, dim=dim)
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
        loss_fn(model(x, g), y, calibration).backward()
        opt.step()
        n += len(y) if step >= warmup else 0
    dt = time.perf_counter() - t0
    return {"examples_per_s": n / dt, "steps": steps, "batch_size": batch_size,
            "table_rows_total": sum(sizes.values()), "embedding_dim": dim, "threads": torch.get_num_threads()}


def one_epoch(cfg, data: Path, batch_size: int = BATCH, seed: int = 0, dim: int = EMBED_DIM,
              calibration: float = 0.0) -> dict:
    """Trains one epoch over ``data/train``; per-task AUC on ``data/eval`` (eval mode: no
    dropout, BatchNorm's running statistics). One table row per distinct id of each field over
    train and eval (``Vocab``), as MTReclib sizes its table by its data's codes."""
    from torchmetrics.functional.classification import binary_auroc

    ids, tags, _ = seed_layout(cfg)
    train_files, eval_files = sorted((data / "train").glob("*.parquet")), sorted((data / "eval").glob("*.parquet"))
    vocab = Vocab(train_files + eval_files, ids, tags)
    model, opt, ids, tags, sizes = build(cfg, vocab.sizes, seed=seed, dim=dim)
    labels = cfg.schema.label_names
    train = RowDataset(train_files, ids, tags, labels, vocab=vocab)
    t0, n = time.perf_counter(), 0
    model.train()
    for x, g, y in loader(train, batch_size, True, seed):
        if len(y) < 2:  # BatchNorm1d cannot train on a one-row remainder batch
            continue
        opt.zero_grad()
        loss_fn(model(x, g), y, calibration).backward()
        opt.step()
        n += len(y)
    seconds = time.perf_counter() - t0
    model.eval()
    ev = RowDataset(eval_files, ids, tags, labels, vocab=vocab)
    preds, ys = [], []
    with torch.no_grad():
        for x, g, y in loader(ev, 8192, False):
            preds.append(model(x, g))
            ys.append(y)
    p, y = torch.cat(preds), torch.cat(ys)
    auc = {t.tower_name: float(binary_auroc(p[:, i], y[:, i].long())) for i, t in enumerate(cfg.towers)}
    return {"auc": auc, "examples": n, "seconds": round(seconds, 1), "examples_per_s": n / seconds,
            "batch_size": batch_size, "embedding_dim": dim, "calibration": calibration,
            "table_rows_total": sum(sizes.values())}


# ---- the benchmark: the peer beside this trainer ----------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2_000_000, help="rows of the one-epoch set (generated if missing)")
    p.add_argument("--eval-rows", type=int, default=100_000)
    p.add_argument("--data-root", default=str(REPO / "data"))
    p.add_argument("--data", help="an existing generated set (DIR with train/, eval/, _SUCCESS) instead of --rows")
    p.add_argument("--ours-batches", default="4096,1024",
                   help="this trainer's batches per rank for the one-epoch comparison; empty: peer only")
    p.add_argument("--peer-batch", type=int, default=BATCH, help="the peer's batch (MTReclib: 2048)")
    p.add_argument("--peer-embed-dim", type=int, default=EMBED_DIM,
                   help="the peer's embedding width in the one-epoch run (MTReclib: 128); speed runs use the config's")
    p.add_argument("--peer-calibration", type=float, default=0.0,
                   help="weight of the AITM paper's order-calibration term in the peer's loss (MTReclib: none, 0)")
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
    """Peer and this trainer, one after the other in this invocation, at both table sizes; the peer
    at the config's embedding width, so both hold the same table bytes."""
    dim = max(f.embedding_dim for f in cfg.feature_config.features)
    kw = {"dim": dim, "calibration": args.peer_calibration}
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    sp = {"peer_small": examples_per_s(cfg, data, args.peer_batch, args.speed_steps, **kw),
          "ours_small": ours_examples_per_s(data, 5 * args.speed_steps, []),
          "peer_big": examples_per_s(cfg, data, args.peer_batch, max(args.speed_steps // 4, 3), big_sizes, **kw),
          "ours_big": ours_examples_per_s(data, 5 * args.speed_steps, big)}
    wall, cpu1 = time.perf_counter() - t0, cpu_seconds()
    out = {}
    for name, p, o in (("seed_tables", sp["peer_small"], sp["ours_small"]), ("big_tables", sp["peer_big"], sp["ours_big"])):
        out[name] = {"table_rows_total": p["table_rows_total"], "peer_examples_per_s": round(p["examples_per_s"]),
                     "ours_examples_per_s": round(o), "ratio": round(o / p["examples_per_s"], 1)}
    out["machine_cpu_s_other_processes"] = round(cpu1["machine_busy"] - cpu0["machine_busy"] -
                                                 (cpu1["process"] - cpu0["process"]), 1)
    out["peer_embedding_dim"] = dim
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
              "peer": "benchmarks/peer.py: MTReclib's AITM (one shared xavier-uniform table, per-task bottoms "
                      "512-256, AIT, towers 128-64, BatchNorm, dropout 0.2), mean BCE over tasks, Adam over all "
                      "parameters (lr 1e-3, weight_decay 1e-6); one-epoch table: one row per distinct id of train "
                      "and eval; batches sliced from in-memory tensors; one process, 2 threads",
              "ours": "launch/train.py path: 2 gloo ranks x 1 thread, sharded tables, fused table optimizer, "
                      "Parquet reader"}
    if args.speed:
        result["speed"] = speed(args, cfg, data, big, big_sizes)
        print(json.dumps(result["speed"]), file=sys.stderr)
    if args.epoch:
        ours = {f"ours_batch_{b}": quality.one_epoch(None, data, [f"train_config.seed={args.seed}"], batch_size=b)
                for b in [int(b) for b in args.ours_batches.split(",") if b]}
        p = one_epoch(cfg, data, args.peer_batch, seed=args.seed, dim=args.peer_embed_dim,
                      calibration=args.peer_calibration)
        truth = quality.oracle(data)
        labels = {t.tower_name: t.label_name for t in cfg.schema.tasks}
        result["quality"] = {
            "rows": quality.train_rows(data), "data": str(data), "seed": args.seed,
            "oracle": {t: round(truth[l], 4) for t, l in labels.items()},
            f"peer_batch_{args.peer_batch}": {t: round(v, 4) for t, v in p["auc"].items()},
            **{k: {t: round(v, 4) for t, v in r["auc"].items()} for k, r in ours.items()},
            "peer_epoch_examples_per_s": round(p["examples_per_s"]),
            "peer_embedding_dim": args.peer_embed_dim, "peer_calibration": args.peer_calibration,
        }
    print(json.dumps(result, indent=1))
    return result
