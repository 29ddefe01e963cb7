"""What several benchmarks share: the generated Parquet set, spawned gloo ranks, the bare training
pipeline, CPU accounting, grown tables and the command-line helpers for these.

The bottom of the package: it imports nothing from ``benchmarks``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def save_figure(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written under a temporary name, then renamed; then closed."""
    import matplotlib.pyplot as plt

    from aitm_torchrec.files import atomic_write

    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def generated(path: Path, train_rows: int, eval_rows: int, flags: list[str], any_rows: bool = False) -> Path:
    """The set ``datasets.synthetic`` makes at ``path`` with these row counts and ``flags``, made
    once (its ``_SUCCESS``, written last, marks it whole). A set found there whose ``_SUCCESS``
    records other row counts is refused, naming the path: reusing it would judge on a split
    nobody asked for. ``any_rows``: a set found is used as it is (the speed benchmarks, which
    train on whatever set ``--data`` names and report its rows)."""
    done = Path(path) / "_SUCCESS"
    if not done.exists():
        from datasets import synthetic

        synthetic.main(["--out", str(path), "--rows", str(train_rows), "--eval-rows", str(eval_rows), *flags])
    if any_rows:  # a Spark or Hadoop job's empty _SUCCESS included
        return Path(path)
    try:
        made = json.loads(done.read_text())
        rows = (made["train_rows"], made["eval_rows"])
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{done}: records no row counts (not a set datasets.synthetic made); move it away or pick "
                         "another data directory") from None
    if rows != (train_rows, eval_rows):
        raise ValueError(f"{done}: the set holds {rows[0]} training and {rows[1]} eval rows, not the {train_rows} "
                         f"and {eval_rows} asked for; move it away or pick another data directory")
    return Path(path)


def split_name(name: str, eval_rows: int, default: int) -> str:
    """A generated set's directory name: ``name``, with ``_eval<N>`` appended for an eval split
    other than the benchmark's ``default`` (sets made with the default keep their plain names)."""
    return name if eval_rows == default else f"{name}_eval{eval_rows}"


def generated_set(path: Path, rows: int, string_ids: bool, row_group_size: int, files: int) -> Path:
    """The speed benchmarks' set (made with a 1,000-row eval split; one found is used as it is):
    its training split's directory."""
    flags = ["--files", str(files), "--row-group-size", str(row_group_size)]
    return generated(path, rows, 1000, flags + (["--string-ids"] if string_ids else []), any_rows=True) / "train"


def load_avg() -> list[float]:
    """The machine's load average over 1, 5 and 15 minutes (``os.getloadavg``), rounded."""
    return [round(v, 2) for v in os.getloadavg()]


def launch_ranks(fn, args: tuple, nproc: int, threads: int) -> dict:
    """``fn(*args)`` on ``nproc`` local gloo processes; returns rank 0's value."""
    from aitm_torchrec.dist import run_local

    return run_local(fn, *args, nproc=nproc, threads=threads)[0]


def train_rank(config: str | None, overrides: list[str]) -> dict:
    """One rank (a spawned process) of a benchmark's training run: ``train.run`` from scratch,
    evaluation included; returns the summary (used by ``zch`` and ``quality``)."""
    import logging

    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.config import load_config
    from aitm_torchrec.dist import quiet_libraries
    from aitm_torchrec.train import TrainOptions, run

    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()
    cfg = load_config(config, overrides)
    env = aitm_dist.setup()
    try:
        return run(cfg, env, TrainOptions(resume=False)).to_dict()
    finally:
        aitm_dist.teardown()


def pipeline_examples_per_s(cfg, env, batches: list, steps: int, warmup: int = 5) -> float:
    """Examples/s of all ranks of a fresh DMP + ``TrainPipelineSparseDist`` cycling over
    pre-read batches: no reader, metrics, logging or LR schedule."""
    import torch
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from aitm_torchrec.train import build

    dmp, optimizer = build(cfg, env)[:2]
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)
    source = itertools.cycle(batches)
    for _ in range(warmup):
        pipeline.progress(source)
    if env.world_size > 1:
        dist.barrier()
    t0 = time.perf_counter()
    examples = 0.0
    for _ in range(steps):
        _, _, _, weights = pipeline.progress(source)
        examples += float(weights.sum())
    elapsed = time.perf_counter() - t0
    del pipeline, dmp, optimizer
    if env.world_size == 1:
        return examples / elapsed
    total = torch.tensor([examples, elapsed], dtype=torch.float64, device=env.device)
    dist.all_reduce(total)  # elapsed: the ranks' mean
    return float(total[0] / (total[1] / env.world_size))


def cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process (all threads) and of the whole machine (busy and steal),
    from getrusage and /proc/stat."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {"process": ru.ru_utime + ru.ru_stime, "machine_busy": 0.0, "machine_steal": 0.0}
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        out["machine_busy"] = (sum(fields[:3]) + sum(fields[5:7])) / tick  # user nice system irq softirq
        out["machine_steal"] = (fields[7] if len(fields) > 7 else 0.0) / tick
    except (OSError, ValueError):
        pass
    return out


def big_table_overrides(cfg, total_rows: int) -> list[str]:
    """Overrides growing the large hashed tables (hash_bucket_size >= 100000) equally so all
    tables hold at least ``total_rows`` rows."""
    feats = cfg.feature_config.features
    large = [i for i, f in enumerate(feats) if (f.hash_bucket_size or 0) >= 100_000]
    if not large:
        raise ValueError("--big-tables needs features with hash_bucket_size >= 100000 to grow")
    rest = table_rows(cfg) - sum(feats[i].num_embeddings for i in large)
    each = math.ceil(max(total_rows - rest, 0) / len(large))
    return [f"feature_config.features.{i}.hash_bucket_size={each}" for i in large]


def table_rows(cfg) -> int:
    """Rows of all embedding tables of a config."""
    return sum(f.num_embeddings for f in cfg.schema.sparse)


def add_generated_set(p: argparse.ArgumentParser, rows: int, rows_help: str, row_group_size: int = 65536,
                       files: bool = True) -> None:
    """The generated Parquet set a benchmark reads (data, train, export, score)."""
    p.add_argument("--rows", type=int, default=rows, help=rows_help)
    p.add_argument("--data", help="data directory (default data/bench_taobao_int64_<rows>; generated if missing)")
    p.add_argument("--row-group-size", type=int, default=row_group_size)
    if files:
        p.add_argument("--files", type=int, default=4)


def add_ranks(p: argparse.ArgumentParser, world_help: str | None = None, big_tables_help: str | None = None) -> None:
    """Spawned gloo ranks (and, with ``big_tables_help``, the grown-tables second run)."""
    p.add_argument("--world-size", type=int, default=2, help=world_help)
    p.add_argument("--threads-per-rank", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    if big_tables_help:
        p.add_argument("--big-tables", action=argparse.BooleanOptionalAction, default=True, help=big_tables_help)
        p.add_argument("--big-table-rows", type=int, default=14_000_000)


def add_overrides(p: argparse.ArgumentParser, text: str = "config overrides") -> None:
    """The trailing ``key.path=value`` config overrides."""
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help=text)
