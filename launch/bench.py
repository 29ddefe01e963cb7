"""Benchmarks, each a subcommand printing one JSON object: ``python launch/bench.py SUBCOMMAND ...``.

``data``: rows/s from Parquet to ready ``Batch``es (KJT + dense + labels) for a config's schema
(default ``configs/aitm_taobao.yaml``, the seed's Taobao schema), in this one process with the
conversion on the calling thread (no prefetch thread, pyarrow single-threaded), so
``rows_per_s_per_core`` = rows / CPU seconds of the process. Beside it, the training
examples/s of the same config in one process (``TrainPipelineSparseDist`` on pre-read batches,
so data loading is not in it) and the ratio. Generates a synthetic Parquet set
(``datasets/synthetic.py``) under ``--data`` if missing, with int64 ids or, with
``--string-ids``, string ids and "|"-joined tags.

    python launch/bench.py data [--rows 1000000] [--string-ids] [--train-steps 30]

``train``: the whole trainer against the machine's dense-compute roofline. Runs a config (default
the seed's) on ``--world-size`` real gloo processes (TorchElastic, ``OMP_NUM_THREADS`` =
``--threads-per-rank``, default 2 ranks x 1 thread on this 2-core machine) through
``aitm_torchrec.train.run`` exactly as ``launch/train.py`` does: Parquet reader with its prefetch
thread, ``TrainPipelineSparseDist``, fused table optimizer, window metrics, logging; eval off
(``eval_input_path=[]``). Data: the synthetic set of ``data`` (generated under ``--data`` if
missing). Figures:

- ``examples_per_s``: ``summary["train"]["examples_per_s"]``, real rows of all ranks per second
  over the training loop from the end of its first step (process start, model build, the pipeline
  fill and first row-group read of step 1, and the final checkpoint not included).
- ``flops_per_example``: training FLOPs of one example counted from the layer shapes: every
  ``nn.Linear`` of the built model (backbone, towers, transfer layers, the AIT projections h1/h2/h3
  once per candidate, heads) at 2*in*out multiply-adds forward, x3 for forward + the two backward
  GEMMs (input and weight gradients; every layer needs both, since gradients flow to the
  embeddings). Not counted: biases, activations, batch norm, dropout, AIT scores and softmax, the
  loss, embedding lookups and their fused update, the dense optimizer. The rows of each layer
  come from a forward hook on one B-row ``predict``, so a layer run on B x C candidates counts C.
  ``flops_breakdown``: the same per top-level module group.
- ``gemm_flops_per_s``: fp32 ``torch.mm`` measured in the same run, inside the training ranks
  themselves (same threads, both ranks at once after a barrier, before and after training; the
  faster is used), on exactly the model's GEMMs (forward x @ W^T, backward dY @ W and dY^T @ x at
  the real batch size): sum over ranks of FLOPs / seconds of the fastest of several passes.
- ``roofline_examples_per_s`` = gemm_flops_per_s / flops_per_example: the examples/s if the ranks
  did nothing but the model's GEMMs. ``ratio_to_roofline`` = examples_per_s / roofline (goal 0.6).
- ``cpu_during_run``: wall and CPU seconds of ``run()`` (model build and final checkpoint
  included): the ranks' own (all threads), everything else on the machine (the launcher, other
  users; near 0 means nothing competed for the cores), and VM steal. A low ratio with large
  ``other_processes_cpu_s`` is a disturbed run, not a slow trainer.
- ``bare_pipeline``: in the same ranks after ``run()``, a fresh DMP + ``TrainPipelineSparseDist``
  cycling 16 pre-read batches (no reader, metrics, logging, LR schedule; ``--bare-steps``, 0 to
  skip): its examples/s, ratio to the roofline, and the trainer's examples/s over it (the cost of
  the whole system beyond TorchRec and the model).
- ``big_tables``: the same run with the large id tables (hash_bucket_size >= 100000) grown so
  all tables hold at least ``--big-table-rows`` rows (default 14M): examples/s, ratio to the
  roofline and to the small-table figure (the fused row-wise optimizer touches only looked-up
  rows, so it should stay near 1).

    python launch/bench.py train [--steps 300] [--batch-size 0] [--no-big-tables] [--bare-steps 100]

A benchmark, not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


def _ensure_data(path: Path, rows: int, string_ids: bool, row_group_size: int, files: int) -> Path:
    if not (path / "_SUCCESS").exists():
        from datasets import synthetic

        args = ["--out", str(path), "--rows", str(rows), "--eval-rows", "1000", "--files", str(files),
                "--row-group-size", str(row_group_size)]
        synthetic.main(args + (["--string-ids"] if string_ids else []))
    return path / "train"


def _ensure_csv(train: Path, columns: list[str]):
    """The Parquet rows of ``train`` as one EasyRec CSV file beside it (header-less, ``columns`` in
    order); returns (path, csv_input.CsvFormat)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from aitm_torchrec import csv_input

    table = pq.read_table(train, columns=columns)
    names = {"int8": "INT32", "int32": "INT32", "int64": "INT64", "string": "STRING", "large_string": "STRING",
             "float": "FLOAT", "double": "DOUBLE", "bool": "BOOL"}
    fmt = csv_input.CsvFormat(csv_input.schema([(f.name, names[str(f.type)]) for f in table.schema]))
    path = train.parent / "train_csv" / "part-00000.csv"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        pacsv.write_csv(table, path.with_suffix(".tmp"), pacsv.WriteOptions(include_header=False))
        path.with_suffix(".tmp").rename(path)
    return path, fmt


def _read_epoch(reader) -> tuple[int, int, float, float]:
    """(batches, real rows, wall s, process CPU s) of one epoch read on this thread."""
    wall, cpu = time.perf_counter(), time.process_time()
    batches = rows = 0
    for batch in reader.epoch(0):
        batches += 1
        rows += int(batch.weights.sum())
    return batches, rows, time.perf_counter() - wall, time.process_time() - cpu


def _train_examples_per_s(cfg, batches: list, steps: int, warmup: int = 5) -> float:
    """Single-process training throughput on pre-read batches (data loading excluded)."""
    from aitm_torchrec import dist as aitm_dist

    env = aitm_dist.setup()
    try:
        return _pipeline_examples_per_s(cfg, env, batches, steps, warmup)
    finally:
        aitm_dist.teardown()


def _pipeline_examples_per_s(cfg, env, batches: list, steps: int, warmup: int = 5) -> float:
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
    total = torch.tensor([examples, elapsed], dtype=torch.float64)
    dist.all_reduce(total)  # elapsed: the ranks' mean
    return float(total[0] / (total[1] / env.world_size))


def cmd_data(args: argparse.Namespace) -> dict:
    import pyarrow as pa

    from launch.train import quiet_libraries

    quiet_libraries()
    threads = pa.cpu_count(), pa.io_thread_count()
    pa.set_cpu_count(1)  # one core: the per-core number is what it says
    pa.set_io_thread_count(1)
    try:
        return _data(args)
    finally:
        pa.set_cpu_count(threads[0])
        pa.set_io_thread_count(threads[1])


def _data(args: argparse.Namespace) -> dict:
    from aitm_torchrec.config import load_config
    from aitm_torchrec.data import ParquetReader

    cfg = load_config(args.config, args.overrides)
    kind = "string" if args.string_ids else "int64"
    data = Path(args.data or REPO / "data" / f"bench_taobao_{kind}_{args.rows}")
    train = _ensure_data(data, args.rows, args.string_ids, args.row_group_size, args.files)
    batch_size = args.batch_size or cfg.data_config.batch_size

    source, fmt = train, None
    if args.csv:  # the same rows as EasyRec CSV, read by csv_input through the same reader
        labels = [t.label_name for t in cfg.towers]
        source, fmt = _ensure_csv(train, list(dict.fromkeys(labels + [f.column for f in cfg.feature_config.features])))

    def reader(**kw) -> ParquetReader:
        return ParquetReader([str(source)], cfg.schema, batch_size, shuffle=args.shuffle, seed=1, prefetch=0,
                             csv=fmt, **kw)

    _read_epoch(reader())  # warm: imports, page cache, hash tables
    runs = [_read_epoch(reader()) for _ in range(args.repeats)]
    batches, rows, wall, cpu = min(runs, key=lambda r: r[3])
    result = {
        "benchmark": "data",
        "config": str(args.config or "configs/aitm_taobao.yaml"),
        "data": str(source),
        "format": "csv" if args.csv else "parquet",
        "ids": kind,
        "rows": rows,
        "batch_size": batch_size,
        "shuffle": args.shuffle,
        "batches": batches,
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "rows_per_s": round(rows / wall),
        "rows_per_s_per_core": round(rows / cpu),
        "goal_rows_per_s_per_core": 1_000_000,
    }
    if args.train_steps:
        sample = list(itertools.islice(reader().epoch(0), 16))
        ex_s = _train_examples_per_s(cfg, sample, args.train_steps)
        result["train_examples_per_s"] = round(ex_s)
        result["train_threads"] = int(__import__("torch").get_num_threads())
        result["data_over_train"] = round(result["rows_per_s_per_core"] / ex_s, 1)
        result["goal_data_over_train"] = 10
    print(json.dumps(result, indent=2))
    return result


def linear_gemms(cfg, batch_size: int) -> list[tuple[str, int, int, int]]:
    """(layer name, rows, in, out) of every ``nn.Linear`` in one forward of ``batch_size`` rows.

    Rows come from a forward hook on ``predict`` of the config's model (tables on ``meta``, dense
    layers on the CPU), so a layer applied to B x C inputs (AIT projections) has B*C rows.
    """
    import torch
    from torch import nn

    from aitm_torchrec.task import build_model

    model = build_model(cfg, device="meta", dense_device="cpu")
    found: list[tuple[str, int, int, int]] = []
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, name=name: found.append(
            (name, inp[0].numel() // mod.in_features, mod.in_features, mod.out_features)))
        for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model.predict(torch.zeros(batch_size, model.input_dim))
    for h in hooks:
        h.remove()
    return found


def training_flops(gemms: list[tuple[str, int, int, int]], batch_size: int) -> tuple[float, dict[str, float]]:
    """(training FLOPs per example, the same per top-level module group): 3 GEMMs (forward,
    input gradient, weight gradient) of 2*rows*in*out FLOPs per Linear, divided by the batch."""
    groups: dict[str, float] = {}
    for name, rows, k, n in gemms:
        group = name.split(".")[0]
        groups[group] = groups.get(group, 0.0) + 3 * 2 * rows * k * n / batch_size
    return sum(groups.values()), groups


def gemm_seconds(gemms: list[tuple[str, int, int, int]], passes: int = 5, inner: int = 5) -> tuple[float, float]:
    """(FLOPs, seconds) of one pass of the model's fp32 GEMMs on this thread count: for each
    Linear, forward x @ W^T (rows x in x out), input gradient dY @ W and weight gradient dY^T @ x,
    each timed as the fastest of ``passes`` runs of ``inner`` calls."""
    import torch

    flops = seconds = 0.0
    for _, rows, k, n in gemms:
        x, w, dy = torch.randn(rows, k), torch.randn(n, k), torch.randn(rows, n)
        for a, b in ((x, w.t()), (dy, w), (dy.t(), x)):
            out = torch.empty(a.shape[0], b.shape[1])
            torch.mm(a, b, out=out)  # warm: MKL picks its kernel
            best = math.inf
            for _ in range(passes):
                t0 = time.perf_counter()
                for _ in range(inner):
                    torch.mm(a, b, out=out)
                best = min(best, (time.perf_counter() - t0) / inner)
            flops += 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
            seconds += best
    return flops, seconds


def _world_gemm_flops_per_s(gemms) -> float:
    """Sum over ranks of this GEMM mix's FLOP/s, all ranks measuring at once."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    flops, seconds = gemm_seconds(gemms)
    rate = torch.tensor([flops / seconds], dtype=torch.float64)
    dist.all_reduce(rate)
    return float(rate)


def _cpu_seconds() -> dict[str, float]:
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


def _train_rank(config: str | None, overrides: list[str], bare_steps: int) -> dict:
    """One training rank (a spawned process): GEMM roofline, ``train.run``, GEMM roofline again,
    then (``bare_steps`` > 0) a bare pipeline on pre-read batches of the same reader."""
    import logging

    import torch
    import torch.distributed as dist

    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.config import load_config
    from aitm_torchrec.train import run, train_reader
    from launch.train import quiet_libraries

    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()
    cfg = load_config(config, overrides)
    env = aitm_dist.setup()
    try:
        gemms = linear_gemms(cfg, cfg.data_config.batch_size)
        before = _world_gemm_flops_per_s(gemms)
        dist.barrier()
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        summary = run(cfg, env, resume=False).to_dict()
        wall, cpu1 = time.perf_counter() - wall0, _cpu_seconds()
        ranks_cpu = torch.tensor([cpu1["process"] - cpu0["process"]], dtype=torch.float64)
        dist.all_reduce(ranks_cpu)
        after = _world_gemm_flops_per_s(gemms)
        bare = None
        if bare_steps:
            reader = train_reader(cfg, env)
            batches = list(itertools.islice(reader.epoch(0), 16))
            bare = _pipeline_examples_per_s(cfg, env, batches, bare_steps)
        rss = [None] * env.world_size  # every rank's peak RSS (GiB), gathered to all
        dist.all_gather_object(rss, _peak_rss_gib())
    finally:
        aitm_dist.teardown()
    busy = cpu1["machine_busy"] - cpu0["machine_busy"]
    return {"train": {k: summary["train"][k] for k in ("steps_this_run", "examples", "examples_per_s", "seconds")},
            "memory": rank_memory(cfg, summary["plan"], rss),
            "threads": torch.get_num_threads(), "gemm_before": before, "gemm_after": after, "bare": bare,
            "cpu": {"wall_s": round(wall, 2), "ranks_cpu_s": round(float(ranks_cpu), 2),
                    "other_processes_cpu_s": round(busy - float(ranks_cpu), 2),
                    "steal_s": round(cpu1["machine_steal"] - cpu0["machine_steal"], 2),
                    "cores": os.cpu_count()}}


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def rank_memory(cfg, plan: dict, rss: list[float]) -> list[dict]:
    """Per rank: peak RSS beside the size of its table shards (fp32 weights + one fp32
    rowwise-Adagrad accumulator per row; data-parallel tables on every rank), from the plan."""
    feats = {f.name: f for f in cfg.feature_config.features}
    out = [{"rank": r, "peak_rss_gib": round(v, 2), "shards_gib": 0.0} for r, v in enumerate(rss)]
    for table, p in plan.items():
        f = feats[table]
        size = f.num_embeddings * (f.embedding_dim + 1) * 4 / 1024**3
        ranks = p["ranks"] or list(range(len(rss)))
        share = size if p["sharding_type"] == "data_parallel" else size / len(ranks)
        for r in ranks:
            out[r]["shards_gib"] = round(out[r]["shards_gib"] + share, 3)
    return out


def _launch_ranks(fn, args: tuple, nproc: int, threads: int) -> dict:
    """``fn(*args)`` on ``nproc`` local gloo processes; returns rank 0's value."""
    from aitm_torchrec.dist import run_local

    return run_local(fn, *args, nproc=nproc, threads=threads)[0]


def big_table_overrides(cfg, total_rows: int) -> list[str]:
    """Overrides growing the large hashed tables (hash_bucket_size >= 100000) equally so all
    tables hold at least ``total_rows`` rows."""
    feats = cfg.feature_config.features
    large = [i for i, f in enumerate(feats) if (f.hash_bucket_size or 0) >= 100_000]
    if not large:
        raise ValueError("--big-tables needs features with hash_bucket_size >= 100000 to grow")
    rest = sum(_table_rows(f) for i, f in enumerate(feats) if i not in large)
    each = math.ceil(max(total_rows - rest, 0) / len(large))
    return [f"feature_config.features.{i}.hash_bucket_size={each}" for i in large]


def _table_rows(f) -> int:
    return 0 if f.feature_type == "RawFeature" else f.num_embeddings


def cmd_train(args: argparse.Namespace) -> dict:
    from aitm_torchrec.config import load_config

    data = Path(args.data or REPO / "data" / f"bench_taobao_int64_{args.rows}")
    train = _ensure_data(data, args.rows, False, args.row_group_size, args.files)
    model_dir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    base = [f"train_input_path=[{train}]", "eval_input_path=[]", f"model_dir={model_dir}",
            f"train_config.num_steps={args.steps}", "train_config.save_checkpoints_steps=0",
            f"train_config.log_step_count_steps={args.steps}"]
    if args.batch_size:
        base.append(f"data_config.batch_size={args.batch_size}")
    overrides = list(args.overrides) + base
    cfg = load_config(args.config, overrides)
    batch_size = cfg.data_config.batch_size
    gemms = linear_gemms(cfg, batch_size)
    flops, groups = training_flops(gemms, batch_size)

    def one(extra: list[str], bare_steps: int = 0) -> dict:
        try:
            return _launch_ranks(_train_rank, (args.config, overrides + extra, bare_steps),
                                 args.world_size, args.threads_per_rank)
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)

    small = one([], args.bare_steps)
    gemm = max(small["gemm_before"], small["gemm_after"])
    roofline = gemm / flops
    ex_s = small["train"]["examples_per_s"]
    result = {
        "benchmark": "train",
        "config": str(args.config or "configs/aitm_taobao.yaml"),
        "data": str(train),
        "world_size": args.world_size,
        "threads_per_rank": small["threads"],
        "batch_size": batch_size,
        "steps": small["train"]["steps_this_run"],
        "examples": small["train"]["examples"],
        "seconds": round(small["train"]["seconds"], 2),
        "examples_per_s": round(ex_s),
        "table_rows_total": sum(_table_rows(f) for f in cfg.feature_config.features),
        "flops_per_example": round(flops),
        "flops_breakdown": {k: round(v) for k, v in groups.items()},
        "flops_counted": "nn.Linear only (incl. AIT h1/h2/h3 per candidate, transfer, heads): "
                         "2*rows*in*out x 3 (forward, input grad, weight grad); no biases, "
                         "activations, softmax, loss, embeddings, optimizers",
        "gemm_flops_per_s": round(gemm),
        "gemm_flops_per_s_before_after": [round(small["gemm_before"]), round(small["gemm_after"])],
        "gemm_measured": f"fp32 torch.mm on the model's forward and backward GEMM shapes at batch "
                         f"{batch_size}, inside the {args.world_size} training ranks at once "
                         f"({small['threads']} thread(s) each), summed over ranks; fastest of 5 "
                         f"passes per GEMM; the faster of before/after training is used",
        "roofline_examples_per_s": round(roofline),
        "ratio_to_roofline": round(ex_s / roofline, 3),
        "goal_ratio_to_roofline": 0.6,
        "cpu_during_run": small["cpu"],
        "memory": small["memory"],
    }
    if small["bare"]:
        result["bare_pipeline"] = {
            "what": "same ranks after run(): fresh DMP + TrainPipelineSparseDist cycling 16 pre-read "
                    "batches; no reader, metrics, logging, LR schedule",
            "steps": args.bare_steps,
            "examples_per_s": round(small["bare"]),
            "ratio_to_roofline": round(small["bare"] / roofline, 3),
            "trainer_over_bare": round(ex_s / small["bare"], 3),
        }
    if args.big_tables:
        extra = big_table_overrides(cfg, args.big_table_rows)
        big_cfg = load_config(args.config, overrides + extra)
        big = one(extra)
        big_ex_s = big["train"]["examples_per_s"]
        result["big_tables"] = {
            "table_rows_total": sum(_table_rows(f) for f in big_cfg.feature_config.features),
            "overrides": extra,
            "examples_per_s": round(big_ex_s),
            "seconds": round(big["train"]["seconds"], 2),
            "ratio_to_roofline": round(big_ex_s / roofline, 3),
            "ratio_to_small_tables": round(big_ex_s / ex_s, 3),
            "gemm_flops_per_s_before_after": [round(big["gemm_before"]), round(big["gemm_after"])],
            "cpu_during_run": big["cpu"],
            "memory": big["memory"],
        }
    print(json.dumps(result, indent=2))
    return result


def cmd_quality(args: argparse.Namespace) -> dict:
    from launch import quality

    return quality.cmd(args)


def cmd_peer(args: argparse.Namespace) -> dict:
    from launch import peer_bench

    return peer_bench.cmd(args)


def cmd_all(args: argparse.Namespace) -> dict:
    from launch import bench_all

    return bench_all.cmd(args, SUBCOMMANDS)


# name -> (handler, help, adds its arguments). ``all`` runs these in order (those that exist);
# another benchmark plugs in with one line here.
SUBCOMMANDS: dict[str, tuple] = {}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Benchmarks that print JSON.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="Parquet -> KJT batches rows/s, beside training examples/s")
    d.add_argument("--config", help="YAML config whose features/labels to read (default: the seed's)")
    d.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated set")
    d.add_argument("--string-ids", action="store_true", help="string ids and '|'-joined tags")
    d.add_argument("--data", help="data directory (default data/bench_taobao_<ids>_<rows>; generated if missing)")
    d.add_argument("--batch-size", type=int, default=0, help="0: the config's data_config.batch_size")
    d.add_argument("--row-group-size", type=int, default=65536)
    d.add_argument("--files", type=int, default=4)
    d.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True)
    d.add_argument("--csv", action="store_true", help="read the same rows as EasyRec CSV (csv_input.py)")
    d.add_argument("--repeats", type=int, default=2, help="timed epochs; the fastest is reported")
    d.add_argument("--train-steps", type=int, default=30, help="timed training steps; 0: skip training")
    d.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    d.set_defaults(fn=cmd_data)
    t = sub.add_parser("train", help="2-rank training examples/s from Parquet vs the GEMM roofline")
    t.add_argument("--config", help="YAML config (default: the seed's)")
    t.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated set")
    t.add_argument("--data", help="data directory (default data/bench_taobao_int64_<rows>; generated if missing)")
    t.add_argument("--row-group-size", type=int, default=65536)
    t.add_argument("--files", type=int, default=4)
    t.add_argument("--steps", type=int, default=300, help="training steps per run")
    t.add_argument("--batch-size", type=int, default=0, help="per rank; 0: the config's data_config.batch_size")
    t.add_argument("--world-size", type=int, default=2, help="training processes")
    t.add_argument("--threads-per-rank", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    t.add_argument("--big-tables", action=argparse.BooleanOptionalAction, default=True,
                   help="also train with the large tables grown to --big-table-rows rows in all")
    t.add_argument("--big-table-rows", type=int, default=14_000_000)
    t.add_argument("--bare-steps", type=int, default=100,
                   help="steps of the bare pipeline on pre-read batches after the run; 0: skip")
    t.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    t.set_defaults(fn=cmd_train)
    from launch import bench_all, peer_bench, quality

    q = sub.add_parser("quality", help="one-epoch AUC of every model vs the oracle, seeds, JSON/MD/PNG")
    quality.add_arguments(q)
    q.set_defaults(fn=cmd_quality)
    pe = sub.add_parser("peer", help="a plain PyTorch AITM (research-code style) beside this trainer")
    peer_bench.add_arguments(pe)
    pe.set_defaults(fn=cmd_peer)
    a = sub.add_parser("all", help="every benchmark above; JSON, Markdown and PNG under --out")
    bench_all.add_arguments(a)
    a.set_defaults(fn=cmd_all)
    SUBCOMMANDS.update({name: sp for name, sp in sub.choices.items() if name != "all"})
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    main()
