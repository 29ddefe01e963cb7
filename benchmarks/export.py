"""``python -m benchmarks export``: table export (``launch/export.py embeddings``) of a checkpoint
with one huge table. Trains the seed config 2 steps on ``--world-size`` gloo ranks with
``adgroup_id`` grown to ``--table-rows`` rows (table-wise, so one rank holds the whole table: the
checkpoint stores it as one chunk), then exports every table on ``--world-size`` ranks. Figures:
rows/s over the export (all ranks' rows / the slowest rank's seconds, process start and imports
not included), and per rank the peak RSS (``VmHWM``), the RSS before the export started
(interpreter + torch + TorchRec), the rows it wrote, and beside them the huge table's size (the
shard one training rank held) and one window (``--chunk-rows`` x dim).

    python -m benchmarks export [--table-rows 10000000] [--chunk-rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, add_generated_set, add_overrides, generated_set

HELP = "table export rows/s and peak RSS per rank, one 10M-row table"


def add_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--config", help="YAML config (default: the seed's)")
    e.add_argument("--table-rows", type=int, default=10_000_000, help="rows of the grown adgroup_id table")
    e.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows per part (the export's window)")
    add_generated_set(e, 20_000, "rows of the generated training set", row_group_size=8192, files=False)
    e.add_argument("--world-size", type=int, default=2, help="training and export processes")
    add_overrides(e)


def _train_job(config: str | None, overrides: list[str]) -> None:
    from launch.train import main as train_main

    train_main(["--config", config, *overrides] if config else overrides)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _export_rank(argv: list[str]) -> dict:
    import aitm_torchrec.table_export  # noqa: F401  (imports before the baseline)
    from launch.export import main as export_main

    before = _proc_status_kib("VmRSS")
    result = export_main(["embeddings", *argv])
    return {**result, "rss_before_export_mib": before / 1024, "peak_rss_mib": _proc_status_kib("VmHWM") / 1024}


def cmd(args: argparse.Namespace) -> dict:
    from aitm_torchrec.config import load_config
    from aitm_torchrec.dist import run_local

    data = Path(args.data or REPO / "data" / f"bench_taobao_int64_{args.rows}")
    train = generated_set(data, args.rows, False, args.row_group_size, 2)
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    overrides = list(args.overrides) + [
        f"train_input_path=[{train}]", "eval_input_path=[]", f"model_dir={work / 'run'}",
        "train_config.num_steps=2", "train_config.log_step_count_steps=1", "data_config.batch_size=1024",
        f"feature_config.features.1.hash_bucket_size={args.table_rows}", "sharding_config.sharding_types=[table_wise]"]
    try:
        t0 = time.perf_counter()
        run_local(_train_job, args.config, overrides, nproc=args.world_size, threads=1)
        train_s = time.perf_counter() - t0
        cfg = load_config(args.config, overrides)
        big = cfg.schema.sparse[1]
        argv = ["--output", str(work / "export"), "--chunk-rows", str(args.chunk_rows), *overrides]
        if args.config:
            argv = ["--config", args.config, *argv]
        ranks = run_local(_export_rank, argv, nproc=args.world_size, threads=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = sum(r["rows_read"] for r in ranks.values())
    seconds = max(r["seconds"] for r in ranks.values())
    table_mib = big.num_embeddings * big.embedding_dim * 4 / 2**20
    result = {
        "benchmark": "export",
        "table": {"name": big.name, "rows": big.num_embeddings, "dim": big.embedding_dim, "mib": round(table_mib, 1)},
        "rows_total": rows, "world_size": args.world_size, "chunk_rows": args.chunk_rows,
        "window_mib": round(args.chunk_rows * big.embedding_dim * 4 / 2**20, 1),
        "train_seconds_incl_start": round(train_s, 1),
        "export_seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
        "ranks": {rank: {"rows": r["rows_read"], "parts": r["parts_written"], "seconds": round(r["seconds"], 2),
                         "rss_before_export_mib": round(r["rss_before_export_mib"]),
                         "peak_rss_mib": round(r["peak_rss_mib"]),
                         "peak_minus_before_mib": round(r["peak_rss_mib"] - r["rss_before_export_mib"])}
                  for rank, r in sorted(ranks.items())},
        "goal": "peak RSS below the shard size (the huge table, held whole by one training rank) + 256 MiB",
    }
    print(json.dumps(result, indent=2))
    return result

