"""``python -m benchmarks eval_memory``: memory of the eval metrics (``TaskMetrics``) at production
size. Feeds ``--rows`` synthetic rows (split evenly over ``--world-size`` gloo ranks, in chunks of
``--chunk-rows``) through ``TaskMetrics`` with the binned AUC, and, when ``--rows`` is at most
``--exact-max-rows``, again with the exact AUC. Scores are CTR-like: per task logits ~ N(-3, 1.5),
labels drawn from sigmoid(logit). Figures per rank and form: the peak RSS growth over the pass
(``VmHWM`` reset before it through ``/proc/self/clear_refs``, minus the RSS before it), the
seconds of the pass (update and compute), and per task the AUC of each form, their difference and
the binned form's error bound; beside them the machine's load (``os.getloadavg``) before and after.

    python -m benchmarks eval_memory [--rows 10000000] [--world-size 2] [--exact-max-rows 2000000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HELP = "eval metrics' peak RSS per rank, binned AUC vs exact, 1e7 synthetic rows"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=10_000_000, help="eval rows over all ranks")
    p.add_argument("--chunk-rows", type=int, default=65536, help="rows per update (one eval batch)")
    p.add_argument("--tasks", type=int, default=2, help="towers")
    p.add_argument("--world-size", type=int, default=2, help="gloo ranks (processes)")
    p.add_argument("--exact-max-rows", type=int, default=2_000_000,
                   help="also run the exact AUC when --rows is at most this")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic scores")


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _chunks(rows: int, chunk: int, tasks: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        logits = torch.randn(n, tasks, generator=g) * 1.5 - 3.0
        labels = (torch.rand(n, tasks, generator=g) < torch.sigmoid(logits)).float()
        yield logits, labels, torch.ones(n)


def _pass(form: str, rows: int, args: argparse.Namespace, rank: int) -> dict:
    import torch.distributed as dist

    from aitm_torchrec.metrics import TaskMetrics

    names = [f"t{i}" for i in range(args.tasks)]
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _kib("VmRSS")
    t0 = time.perf_counter()
    m = TaskMetrics(names, auc=form)
    for logits, labels, weights in _chunks(rows, args.chunk_rows, args.tasks, args.seed * 1000 + rank):
        m.update(logits, labels, weights)
    out = m.compute()
    seconds = time.perf_counter() - t0
    peak = _kib("VmHWM")
    return {"peak_rss_growth_mib": round((peak - before) / 1024, 1), "rss_before_mib": round(before / 1024),
            "seconds": round(seconds, 2), "auc": {n: out[n]["auc"] for n in names}, "error_bound": m.error_bound}


def _rank(args: argparse.Namespace) -> dict:
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.metrics import TaskMetrics

    env = aitm_dist.setup()
    share = args.rows // env.world_size + (env.rank < args.rows % env.world_size)
    TaskMetrics(["warm"], auc="binned").compute()  # imports and first allocations outside the figures
    out = {"rows": share, "binned": _pass("binned", share, args, env.rank)}
    if args.rows <= args.exact_max_rows:
        out["exact"] = _pass("exact", share, args, env.rank)
    aitm_dist.teardown()
    return out


def cmd(args: argparse.Namespace) -> dict:
    from aitm_torchrec.dist import run_local

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    ranks = run_local(_rank, args, nproc=args.world_size, threads=1)
    seconds = time.perf_counter() - t0
    first = ranks[0]
    result = {
        "benchmark": "eval_memory",
        "rows": args.rows, "world_size": args.world_size, "tasks": args.tasks, "chunk_rows": args.chunk_rows,
        "seconds_incl_start": round(seconds, 1),
        "load_avg_1_5_15_before": [round(v, 2) for v in load_before],
        "load_avg_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
        "exact_state_mib_per_rank": round(args.rows * args.tasks * 12 / 2**20, 1),  # every row, gathered
        "ranks": {rank: {"rows": r["rows"], **{form: {k: v for k, v in r[form].items() if k not in ("auc", "error_bound")}
                                               for form in ("binned", "exact") if form in r}}
                  for rank, r in sorted(ranks.items())},
        "auc": {"binned": first["binned"]["auc"], "binned_error_bound": first["binned"]["error_bound"]},
    }
    if "exact" in first:
        result["auc"]["exact"] = first["exact"]["auc"]
        result["auc"]["binned_minus_exact"] = {t: first["binned"]["auc"][t] - first["exact"]["auc"][t]
                                               for t in first["binned"]["auc"]}
    print(json.dumps(result, indent=2))
    return result
