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

``export``: table export (``launch/export.py embeddings``) of a checkpoint with one huge table.
Trains the seed config 2 steps on ``--world-size`` gloo ranks with ``adgroup_id`` grown to
``--table-rows`` rows (table-wise, so one rank holds the whole table: the checkpoint stores it as
one chunk), then exports every table on ``--world-size`` ranks. Figures: rows/s over the export
(all ranks' rows / the slowest rank's seconds, process start and imports not included), and per
rank the peak RSS (``VmHWM``), the RSS before the export started (interpreter + torch +
TorchRec), the rows it wrote, and beside them the huge table's size (the shard one training rank
held) and one window (``--chunk-rows`` x dim).

    python launch/bench.py export [--table-rows 10000000] [--chunk-rows 1000000]
``serve``: the serving artefact (``launch/export.py model``) of a config (default the seed's, real
table sizes) trained for ``--train-steps`` steps on one gloo process (a real checkpoint, weights
barely trained: latency and size do not depend on them), exported once per quantization
(none/fp32, int8, fp16, int4). In this process with ``torch.set_num_threads(1)`` and pyarrow on
one thread: latency p50/p99 of batches of 1, 64 and 512 candidates, (a) the scripted model on
pre-built input dicts and (b) end to end, raw Arrow rows through ``Predictor.predict_arrow`` (id
hashing, normalisation, model); candidates/s of (a) and (b) at each batch size (= B / mean
latency); artefact sizes in bytes and as a fraction of fp32; probabilities' mean/max absolute
difference from the fp32 artefact on 4096 eval rows. Rows: the synthetic eval set of ``data``
(``--string-ids`` for string ids and "|"-joined tags). Goals: p99 < 10 ms at 512 candidates on
one core; int8 at most 30% of the fp32 size.

    python launch/bench.py serve [--iters 200] [--string-ids] [--train-steps 2]
``zch``: the large id features (user_id, adgroup_id) of synthetic data with ``--vocab`` distinct
ids each (default 1M, ``datasets/synthetic.py --large-vocab``) trained two ways on
``--world-size`` gloo ranks, one after the other: hashed into ``--table-size`` rows, and as zch
tables of the same size (``--policy``, ``--eviction-interval``). Per way: training
``examples_per_s`` (as ``train``), eval AUC and logloss; and the zch / hashed rate (goal 0.8).

    python launch/bench.py zch [--rows 400000] [--vocab 1000000] [--table-size 20000] [--steps 200]

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

    from aitm_torchrec.dist import quiet_libraries

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
        source, fmt = _ensure_csv(train, list(dict.fromkeys(cfg.schema.label_names + cfg.schema.feature_columns)))

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
    from aitm_torchrec.dist import quiet_libraries
    from aitm_torchrec.train import run, train_reader

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
    rest = _table_rows(cfg) - sum(feats[i].num_embeddings for i in large)
    each = math.ceil(max(total_rows - rest, 0) / len(large))
    return [f"feature_config.features.{i}.hash_bucket_size={each}" for i in large]


def _table_rows(cfg) -> int:
    """Rows of all embedding tables of a config."""
    return sum(f.num_embeddings for f in cfg.schema.sparse)


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
        "table_rows_total": _table_rows(cfg),
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
            "table_rows_total": _table_rows(big_cfg),
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


def _train_job(config: str | None, overrides: list[str]) -> None:
    from launch.train import main as train_main

    train_main(["--config", config, *overrides] if config else overrides)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _export_rank(argv: list[str]) -> dict:
    import aitm_torchrec.export_embeddings  # noqa: F401  (imports before the baseline)
    from launch.export import main as export_main

    before = _proc_status_kib("VmRSS")
    result = export_main(["embeddings", *argv])
    return {**result, "rss_before_export_mib": before / 1024, "peak_rss_mib": _proc_status_kib("VmHWM") / 1024}


def cmd_export(args: argparse.Namespace) -> dict:
    from aitm_torchrec.config import load_config
    from aitm_torchrec.dist import run_local

    data = Path(args.data or REPO / "data" / f"bench_taobao_int64_{args.rows}")
    train = _ensure_data(data, args.rows, False, args.row_group_size, 2)
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


def _score_rank(config: str | None, overrides: list[str], score_args: list[str]) -> dict:
    """One rank (a spawned process): ``launch/train.py``, then ``launch/score.py`` of the same
    config and checkpoint, in one process group."""
    import logging

    from aitm_torchrec import dist as aitm_dist
    from launch.score import main as score_main
    from launch.train import main as train_main

    logging.basicConfig(level=logging.WARNING)
    aitm_dist.setup()
    try:
        config_args = ["--config", config] if config else []
        summary = train_main([*config_args, "--no-resume", *overrides])
        manifest = score_main([*config_args, *score_args, *overrides])
    finally:
        aitm_dist.teardown()
    return {"train": summary["train"], "score": manifest}


def cmd_score(args: argparse.Namespace) -> dict:
    """Scoring examples/s beside training examples/s of the same config, in the same ranks."""
    from aitm_torchrec.config import load_config

    data = Path(args.data or REPO / "data" / f"bench_taobao_int64_{args.rows}")
    train = _ensure_data(data, args.rows, False, args.row_group_size, args.files)
    results = {}
    for label, grow in (("small_tables", []), ("big_tables", None)):
        if grow is None and not args.big_tables:
            continue
        work = Path(tempfile.mkdtemp(prefix="bench_score_"))
        overrides = list(args.overrides) + [
            f"train_input_path=[{train}]", "eval_input_path=[]", f"model_dir={work / 'run'}",
            f"train_config.num_steps={args.steps}", f"train_config.log_step_count_steps={args.steps}"]
        if grow is None:
            overrides += big_table_overrides(load_config(args.config, overrides), args.big_table_rows)
        cfg = load_config(args.config, overrides)
        score_args = ["--input", str(train), "--output", str(work / "scores"), "--reserved_columns", "clk"]
        try:
            out = _launch_ranks(_score_rank, (args.config, overrides, score_args), args.world_size,
                                args.threads_per_rank)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        train_ex_s = out["train"]["examples_per_s"]
        score_ex_s = out["score"]["rows_scored_this_run"] / out["score"]["scoring_seconds"]
        results[label] = {
            "table_rows_total": _table_rows(cfg),
            "train_batch_size": cfg.data_config.batch_size, "train_steps": out["train"]["steps_this_run"],
            "train_examples_per_s": round(train_ex_s),
            "score_rows": out["score"]["rows_scored_this_run"], "score_batch_size": 4 * cfg.data_config.batch_size,
            "score_seconds": out["score"]["scoring_seconds"], "score_examples_per_s": round(score_ex_s),
            "score_over_train": round(score_ex_s / train_ex_s, 2) if train_ex_s else None,
        }
    result = {"benchmark": "score", "config": str(args.config or "configs/aitm_taobao.yaml"), "data": str(train),
              "world_size": args.world_size, "threads_per_rank": args.threads_per_rank, **results,
              "goal_score_over_train": 3.0,
              "measured": "scoring: rows written / the slowest rank's scoring loop (read, forward, write "
                          "Parquet; model build and checkpoint load excluded); training: the trainer's "
                          "examples/s in the same ranks just before"}
    print(json.dumps(result, indent=2))
    return result


def _train_one(config: str | None, overrides: list[str]) -> dict:
    """``launch/train.py`` in a spawned single-rank process (a checkpoint for ``serve``)."""
    from launch.train import main as train_main

    return train_main((["--config", config] if config else []) + overrides)


def _latency_ms(fn, iters: int, warmup: int = 10) -> dict:
    """p50/p99/mean milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` calls."""
    import numpy as np

    for _ in range(warmup):
        fn()
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3),
            "mean": round(float(ms.mean()), 3)}


def cmd_serve(args: argparse.Namespace) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from aitm_torchrec.dist import quiet_libraries, run_local
    from launch.export import main as export_main

    quiet_libraries()
    kind = "string" if args.string_ids else "int64"
    data = Path(args.data or REPO / "data" / f"bench_serve_{kind}")
    train = _ensure_data(data, 20_000, args.string_ids, 4096, 1)
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        overrides = [f"train_input_path=[{train}]", "eval_input_path=[]", f"model_dir={work / 'run'}",
                     f"train_config.num_steps={args.train_steps}", *args.overrides]
        run_local(_train_one, args.config, overrides, nproc=1, threads=1)
        sizes, exports = {}, {}
        for q in ("none", "int8", "fp16", "int4"):
            out = work / q
            export_main(["model", "--output", str(out), "--quant", q, *(["--config", args.config] if args.config else []),
                         *overrides])
            sizes[q] = (out / "scripted_model.pt").stat().st_size
            exports[q] = out
        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        torch.set_num_threads(1)
        from aitm_torchrec.serving import Predictor

        rows = pq.read_table(data / "eval").slice(0, 4096)
        result = {"benchmark": "serve", "config": str(args.config or "configs/aitm_taobao.yaml"), "ids": kind,
                  "torch_threads": torch.get_num_threads(), "iters": args.iters,
                  "sizes_bytes": sizes, "size_vs_fp32": {q: round(n / sizes["none"], 3) for q, n in sizes.items()},
                  "goal": {"p99_ms_at_512": 10, "int8_size_vs_fp32": 0.3}, "quant": {}}
        reference = None
        for q, path in exports.items():
            p = Predictor(path, threads=1)
            probs = p.predict_arrow(rows)
            if reference is None:
                reference = probs
            diff = np.concatenate([np.abs(probs[t] - reference[t]) for t in p.tower_names])
            entry = {"mean_abs_diff_vs_fp32": float(diff.mean()), "max_abs_diff_vs_fp32": float(diff.max())}
            for b in (1, 64, 512):
                batch = rows.slice(0, b)
                inputs = p.inputs_from_arrow(batch)
                model = _latency_ms(lambda: p.predict_inputs(inputs), args.iters)  # noqa: B023
                e2e = _latency_ms(lambda: p.predict_arrow(batch), args.iters)  # noqa: B023
                entry[f"batch_{b}"] = {"model_ms": model, "end_to_end_ms": e2e,
                                       "model_candidates_per_s": round(b / model["mean"] * 1e3),
                                       "end_to_end_candidates_per_s": round(b / e2e["mean"] * 1e3)}
            result["quant"][q] = entry
        result["cpu_load_1min"] = os.getloadavg()[0]
        result["cores"] = os.cpu_count()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


# ---- zch: managed-collision tables vs hashing (issue 14) -----------------------------------

def train_rank(config: str | None, overrides: list[str]) -> dict:
    """One rank (a spawned process) of a benchmark's training run: ``train.run`` from scratch,
    evaluation included; returns the summary (used by ``zch`` and ``launch/quality.py``)."""
    import logging

    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.config import load_config
    from aitm_torchrec.dist import quiet_libraries
    from aitm_torchrec.train import run

    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()
    cfg = load_config(config, overrides)
    env = aitm_dist.setup()
    try:
        return run(cfg, env, resume=False).to_dict()
    finally:
        aitm_dist.teardown()


def zch_table_overrides(cfg, table_size: int, zch: bool, eviction_interval: int, policy: str) -> list[str]:
    """The large id features (``synthetic.LARGE_ID_FEATURES``) as hashed tables of ``table_size``
    rows, or as zch tables of the same size."""
    from datasets.synthetic import LARGE_ID_FEATURES

    out = []
    for i, f in enumerate(cfg.feature_config.features):
        if f.column in LARGE_ID_FEATURES:
            if zch:
                out += [f"feature_config.features.{i}.hash_bucket_size=0",
                        f"feature_config.features.{i}.zch={{zch_size: {table_size}, "
                        f"eviction_interval: {eviction_interval}, eviction_policy: {policy}}}"]
            else:
                out.append(f"feature_config.features.{i}.hash_bucket_size={table_size}")
    return out


def cmd_zch(args: argparse.Namespace) -> dict:
    """Training examples/s and eval AUC with the large id features hashed vs as zch tables, same
    table sizes, same data, one after the other in this invocation."""
    from aitm_torchrec.config import load_config

    data = Path(args.data or REPO / "data" / f"bench_zch_{args.rows}_v{args.vocab}")
    if not (data / "_SUCCESS").exists():
        from datasets import synthetic

        synthetic.main(["--out", str(data), "--rows", str(args.rows), "--eval-rows", str(args.eval_rows),
                        "--files", "2", "--row-group-size", "65536", "--large-vocab", str(args.vocab)])
    base = [f"train_input_path=[{data / 'train'}]", f"eval_input_path=[{data / 'eval'}]",
            f"train_config.num_steps={args.steps}", "train_config.save_checkpoints_steps=0",
            f"train_config.log_step_count_steps={args.steps}", f"data_config.batch_size={args.batch_size}"]
    cfg = load_config(args.config, list(args.overrides) + base)
    result = {"benchmark": "zch", "data": str(data), "train_rows": args.rows, "distinct_ids_per_large_feature":
              args.vocab, "table_rows_per_large_feature": args.table_size, "world_size": args.world_size,
              "batch_size": args.batch_size, "steps": args.steps, "eviction_interval": args.eviction_interval,
              "eviction_policy": args.policy}
    ways = [("hashed", False), ("zch", True)]
    for name, zch in (ways[::-1] if args.zch_first else ways):
        model_dir = Path(tempfile.mkdtemp(prefix=f"bench_zch_{name}_"))
        extra = zch_table_overrides(cfg, args.table_size, zch, args.eviction_interval, args.policy)
        try:
            summary = _launch_ranks(train_rank, (args.config, list(args.overrides) + base + extra +
                                                [f"model_dir={model_dir}"]), args.world_size, args.threads_per_rank)
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
        result[name] = {"examples_per_s": round(summary["train"]["examples_per_s"]),
                        "seconds": round(summary["train"]["seconds"], 2),
                        "eval_auc": {t: round(m["auc"], 4) for t, m in summary["eval"].items()},
                        "eval_logloss": {t: round(m["logloss"], 4) for t, m in summary["eval"].items()}}
    result["zch_over_hashed_examples_per_s"] = round(result["zch"]["examples_per_s"] /
                                                     result["hashed"]["examples_per_s"], 3)
    result["goal_zch_over_hashed"] = 0.8
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


def _add_generated_set(p: argparse.ArgumentParser, rows: int, rows_help: str, row_group_size: int = 65536,
                       files: bool = True) -> None:
    """The generated Parquet set a benchmark reads (data, train, export, score)."""
    p.add_argument("--rows", type=int, default=rows, help=rows_help)
    p.add_argument("--data", help="data directory (default data/bench_taobao_int64_<rows>; generated if missing)")
    p.add_argument("--row-group-size", type=int, default=row_group_size)
    if files:
        p.add_argument("--files", type=int, default=4)


def _add_ranks(p: argparse.ArgumentParser, world_help: str | None = None, big_tables_help: str | None = None) -> None:
    """Spawned gloo ranks (and, with ``big_tables_help``, the grown-tables second run)."""
    p.add_argument("--world-size", type=int, default=2, help=world_help)
    p.add_argument("--threads-per-rank", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    if big_tables_help:
        p.add_argument("--big-tables", action=argparse.BooleanOptionalAction, default=True, help=big_tables_help)
        p.add_argument("--big-table-rows", type=int, default=14_000_000)


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
    _add_generated_set(t, 1_000_000, "rows of the generated set")
    t.add_argument("--steps", type=int, default=300, help="training steps per run")
    t.add_argument("--batch-size", type=int, default=0, help="per rank; 0: the config's data_config.batch_size")
    _add_ranks(t, "training processes", "also train with the large tables grown to --big-table-rows rows in all")
    t.add_argument("--bare-steps", type=int, default=100,
                   help="steps of the bare pipeline on pre-read batches after the run; 0: skip")
    t.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("export", help="table export rows/s and peak RSS per rank, one 10M-row table")
    e.add_argument("--config", help="YAML config (default: the seed's)")
    e.add_argument("--table-rows", type=int, default=10_000_000, help="rows of the grown adgroup_id table")
    e.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows per part (the export's window)")
    _add_generated_set(e, 20_000, "rows of the generated training set", row_group_size=8192, files=False)
    e.add_argument("--world-size", type=int, default=2, help="training and export processes")
    e.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    e.set_defaults(fn=cmd_export)
    c = sub.add_parser("score", help="batch scoring examples/s beside training examples/s, same ranks")
    c.add_argument("--config", help="YAML config (default: the seed's)")
    _add_generated_set(c, 400_000, "rows of the generated data set (scored whole)")
    c.add_argument("--steps", type=int, default=60, help="training steps before scoring")
    _add_ranks(c, big_tables_help="also with the large tables grown to --big-table-rows rows in all")
    c.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    c.set_defaults(fn=cmd_score)
    s = sub.add_parser("serve", help="serving artefact latency, throughput and size per quantization")
    s.add_argument("--config", help="YAML config (default: the seed's, real table sizes)")
    s.add_argument("--data", help="data directory (default data/bench_serve_<ids>; generated if missing)")
    s.add_argument("--string-ids", action="store_true", help="string ids and '|'-joined tags")
    s.add_argument("--train-steps", type=int, default=2, help="training steps before the export")
    s.add_argument("--iters", type=int, default=200, help="timed calls per batch size")
    s.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    s.set_defaults(fn=cmd_serve)
    z = sub.add_parser("zch", help="examples/s and AUC: large id features hashed vs as zch tables")
    z.add_argument("--config", help="YAML config (default: the seed's)")
    z.add_argument("--rows", type=int, default=400_000, help="training rows of the generated set")
    z.add_argument("--eval-rows", type=int, default=50_000)
    z.add_argument("--vocab", type=int, default=1_000_000, help="distinct user_id / adgroup_id ids")
    z.add_argument("--table-size", type=int, default=20_000, help="rows of each large table, both ways")
    z.add_argument("--data", help="data directory (default data/bench_zch_<rows>_v<vocab>; generated if missing)")
    z.add_argument("--steps", type=int, default=200)
    z.add_argument("--batch-size", type=int, default=1024, help="per rank")
    z.add_argument("--eviction-interval", type=int, default=20)
    z.add_argument("--policy", default="lfu", choices=["lfu", "lru", "distance_lfu"])
    _add_ranks(z)
    z.add_argument("--zch-first", action="store_true", help="run the zch way first (order effects)")
    z.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    z.set_defaults(fn=cmd_zch)
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
