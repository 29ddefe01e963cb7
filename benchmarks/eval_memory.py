"""``python -m benchmarks eval_memory``: memory of the eval metrics (``TaskMetrics``) at production
size. Feeds ``--rows`` synthetic rows (split evenly over ``--world-size`` gloo ranks, in chunks of
``--chunk-rows``) through ``TaskMetrics`` with the binned AUC, and, when ``--rows`` is at most
``--exact-max-rows``, again with the exact AUC. Scores are CTR-like: per task logits ~ N(-3, 1.5),
labels drawn from sigmoid(logit). Figures per rank and form: the peak RSS growth over the pass
(``VmHWM`` reset before it through ``/proc/self/clear_refs``, minus the RSS before it), the
seconds of the pass (update and compute), and per task the AUC of each form, their difference and
the binned form's error bound; beside them the machine's load (``os.getloadavg``) before and after.

``--input DIR`` runs the trainer's own eval instead (``aitm_torchrec.train.evaluate``: the eval
reader, the sharded model's forward, ``TaskMetrics``): each rank trains the config for
``--train-steps`` steps on ``DIR`` (no eval), restores that checkpoint into a fresh sharded model,
and evaluates ``DIR`` listed ``--repeat`` times as its eval input (the reader reads the files again
on each listing), so ``--repeat`` x the set's rows pass through, with the binned AUC and, when those
rows are at most ``--exact-max-rows``, again with the exact one. Same figures per rank and form.

    python -m benchmarks eval_memory [--rows 10000000] [--world-size 2] [--exact-max-rows 2000000]
    python -m benchmarks eval_memory --input DIR [--repeat 50] [--config C] [--train-steps 60] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import load_avg

HELP = "eval metrics' peak RSS per rank, binned AUC vs exact, 1e7 synthetic rows"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=10_000_000, help="eval rows over all ranks")
    p.add_argument("--chunk-rows", type=int, default=65536, help="rows per update (one eval batch)")
    p.add_argument("--tasks", type=int, default=2, help="towers")
    p.add_argument("--world-size", type=int, default=2, help="gloo ranks (processes)")
    p.add_argument("--exact-max-rows", type=int, default=2_000_000,
                   help="also run the exact AUC when --rows is at most this")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic scores")
    p.add_argument("--input", help="Parquet set: evaluate it through the trainer's eval instead (see above)")
    p.add_argument("--repeat", type=int, default=1, help="with --input: times the set is listed as eval input")
    p.add_argument("--config", help="with --input: YAML config (default: the seed's)")
    p.add_argument("--train-steps", type=int, default=60, help="with --input: training steps before the eval")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="with --input: config overrides")


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


def _measured(compute) -> dict:
    """``compute()`` (a dict) with, beside it, the peak RSS growth over it (``VmHWM`` reset before
    it through ``/proc/self/clear_refs``, minus the RSS before it) and its seconds; ranks start
    together."""
    import torch.distributed as dist

    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _kib("VmRSS")
    t0 = time.perf_counter()
    out = compute()
    seconds = time.perf_counter() - t0
    peak = _kib("VmHWM")
    return {"peak_rss_growth_mib": round((peak - before) / 1024, 1), "rss_before_mib": round(before / 1024),
            "seconds": round(seconds, 2), **out}


def _pass(form: str, rows: int, args: argparse.Namespace, rank: int) -> dict:
    from aitm_torchrec.metrics import TaskMetrics

    names = [f"t{i}" for i in range(args.tasks)]

    def compute() -> dict:
        m = TaskMetrics(names, auc=form)
        for logits, labels, weights in _chunks(rows, args.chunk_rows, args.tasks, args.seed * 1000 + rank):
            m.update(logits, labels, weights)
        out = m.compute()
        return {"auc": {n: out[n]["auc"] for n in names}, "error_bound": m.error_bound}

    return _measured(compute)


def _model_rank(args: argparse.Namespace, model_dir: str) -> dict:
    """One rank of ``--input``: train, restore into a fresh sharded model, then the trainer's eval
    of ``--input`` x ``--repeat`` once per AUC form."""
    import logging

    from aitm_torchrec import checkpoint
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.config import load_config
    from aitm_torchrec.precision import resolve_for_job
    from aitm_torchrec.train import TrainOptions, build, evaluate, make_reader, restore, run, with_precision

    logging.basicConfig(level=logging.WARNING)
    aitm_dist.quiet_libraries()
    overrides = [*args.overrides, f"train_input_path={args.input}", "eval_input_path=[]", f"model_dir={model_dir}",
                 f"train_config.num_steps={args.train_steps}"]
    cfg = load_config(args.config, overrides)
    env = aitm_dist.setup()
    try:
        run(cfg, env, TrainOptions(resume=False))
        cfg = with_precision(cfg, resolve_for_job(cfg.train_config.mixed_precision, env.device))
        dmp, optimizer, _ = build(cfg, env)
        restore(checkpoint.latest(Path(model_dir) / "checkpoints"), dmp, optimizer, env,
                cfg.data_config.batch_size)
        reader = make_reader(cfg, env, (args.input,) * args.repeat, train=False)
        towers = cfg.schema.tower_names

        def one(form: str) -> dict:
            out = evaluate(dmp, reader, towers, env, auc=form)
            return {"auc": {t: out[t]["auc"] for t in towers}, "error_bound": None}

        lo, hi = reader.rank_rows()
        out = {"rows": hi - lo, "binned": _measured(lambda: one("binned"))}
        if reader.num_rows <= args.exact_max_rows:
            out["exact"] = _measured(lambda: one("exact"))
        return out
    finally:
        aitm_dist.teardown()


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

    load_before = load_avg()
    t0 = time.perf_counter()
    if args.input:
        with tempfile.TemporaryDirectory(prefix="eval_memory_") as model_dir:
            ranks = run_local(_model_rank, args, model_dir, nproc=args.world_size, threads=1)
        setup = {"through": "aitm_torchrec.train.evaluate", "input": args.input, "repeat": args.repeat,
                 "config": args.config or "configs/aitm_taobao.yaml", "overrides": args.overrides,
                 "train_steps": args.train_steps, "rows": sum(r["rows"] for r in ranks.values())}
    else:
        ranks = run_local(_rank, args, nproc=args.world_size, threads=1)
        setup = {"through": "TaskMetrics (synthetic scores)", "rows": args.rows, "tasks": args.tasks,
                 "chunk_rows": args.chunk_rows}
    seconds = time.perf_counter() - t0
    first = ranks[0]
    result = {
        "benchmark": "eval_memory", **setup, "world_size": args.world_size,
        "seconds_incl_start": round(seconds, 1),
        "load_avg_1_5_15_before": load_before,
        "load_avg_1_5_15_after": load_avg(),
        "exact_state_mib_per_rank": round(setup["rows"] * len(first["binned"]["auc"]) * 12 / 2**20, 1),  # gathered
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
