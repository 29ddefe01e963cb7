"""``python -m benchmarks train``: the whole trainer against the machine's dense-compute roofline.
Runs a config (default the seed's) on ``--world-size`` real gloo processes (TorchElastic, ``OMP_NUM_THREADS`` =
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
  once per candidate, heads) and every kernel of a ``backbone.cross`` network, at 2*in*out
  multiply-adds forward, x3 for forward + the two backward GEMMs (input and weight gradients;
  every layer needs both, since gradients flow to the embeddings). Not counted: biases,
  activations, batch norm, dropout, AIT scores and softmax, the loss, embedding lookups and their
  fused update, the dense optimizer. The rows of each layer
  come from a forward hook on one B-row ``predict``, so a layer run on B x C candidates counts C.
  ``flops_breakdown``: the same per top-level module group.
- ``gemm_flops_per_s``: fp32 ``torch.mm`` measured in the same run, inside the training ranks
  themselves (same threads, both ranks at once after a barrier, before and after training; the
  faster is used), on exactly the model's GEMMs (forward x @ W^T, backward dY @ W and dY^T @ x at
  the real batch size): sum over ranks of FLOPs / seconds of the fastest of several passes.
- ``roofline_examples_per_s`` = gemm_flops_per_s / flops_per_example: the examples/s if the ranks
  did nothing but the model's GEMMs. ``ratio_to_roofline`` = examples_per_s / roofline (goal 0.6).
- ``mixed_precision``: what ``train_config.mixed_precision`` resolved to in the ranks
  (``requested``, ``resolved``, ``reason``; the default auto is bf16 on CPUs with AMX).
  ``roofline_in_use``: the same roofline for the precision the run trained in: ``precision``
  (fp32, bf16), its ``gemm_flops_per_s`` (``torch.mm`` in that dtype on the same shapes, measured
  the same way; for fp32 the figures above), ``roofline_examples_per_s`` and
  ``ratio_to_roofline``.
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
- ``precision_ab`` (``--alternate-fp32 N``): after the runs above, N pairs of runs at the seed's
  table sizes, each pair fp32 (``train_config.mixed_precision=none``) then the config's own
  precision (the default, auto: bf16 on CPUs with AMX), alternating so both see the same machine;
  each run's examples/s and resolved precision, and the ratio of the summed examples/s (the config's
  precision over fp32).
- ``config_ab`` (``--alternate-config FILE``): then ``--alternate-pairs`` pairs of runs at the
  seed's table sizes on the same data, ``--config`` then FILE (e.g. the seed config against
  ``configs/aitm_taobao_best.yaml``): each run's examples/s, and ``ratio_to_config``, FILE's
  summed examples/s over ``--config``'s.

    python -m benchmarks train [--steps 300] [--batch-size 0] [--no-big-tables] [--bare-steps 100] [--alternate-fp32 0]
                               [--alternate-config FILE [--alternate-pairs 2]]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    REPO,
    add_generated_set,
    add_overrides,
    add_ranks,
    big_table_overrides,
    cpu_seconds,
    generated_set,
    launch_ranks,
    load_avg,
    pipeline_examples_per_s,
    table_rows,
)
from benchmarks.roofline import linear_gemms, training_flops, world_gemm_flops_per_s

HELP = "2-rank training examples/s from Parquet vs the GEMM roofline"


def add_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--config", help="YAML config (default: the seed's)")
    add_generated_set(t, 1_000_000, "rows of the generated set")
    t.add_argument("--steps", type=int, default=300, help="training steps per run")
    t.add_argument("--batch-size", type=int, default=0, help="per rank; 0: the config's data_config.batch_size")
    add_ranks(t, "training processes", "also train with the large tables grown to --big-table-rows rows in all")
    t.add_argument("--bare-steps", type=int, default=100,
                   help="steps of the bare pipeline on pre-read batches after the run; 0: skip")
    t.add_argument("--alternate-fp32", type=int, default=0, metavar="N",
                   help="then N pairs of runs alternating fp32 and the config's precision; 0: skip")
    t.add_argument("--alternate-config", metavar="FILE",
                   help="then --alternate-pairs pairs of runs alternating --config and FILE (same data, steps, overrides)")
    t.add_argument("--alternate-pairs", type=int, default=2, metavar="N", help="pairs of runs for --alternate-config")
    add_overrides(t)


def _train_rank(config: str | None, overrides: list[str], bare_steps: int) -> dict:
    """One training rank (a spawned process): GEMM roofline, ``train.run``, GEMM roofline again,
    then (``bare_steps`` > 0) a bare pipeline on pre-read batches of the same reader."""
    import logging

    import torch
    import torch.distributed as dist

    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.config import load_config
    from aitm_torchrec.dist import quiet_libraries
    from aitm_torchrec.precision import resolve_for_job
    from aitm_torchrec.train import TrainOptions, run, train_reader

    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()
    cfg = load_config(config, overrides)
    env = aitm_dist.setup()
    try:
        gemms = linear_gemms(cfg, cfg.data_config.batch_size)
        # the precision run() resolves to, measured as the trainer will run it
        dtype = resolve_for_job(cfg.train_config.mixed_precision, env.device).dtype
        before = world_gemm_flops_per_s(gemms, device=env.device)
        before_in_use = world_gemm_flops_per_s(gemms, dtype, env.device) if dtype else before
        dist.barrier()
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        summary = run(cfg, env, TrainOptions(resume=False)).to_dict()
        wall, cpu1 = time.perf_counter() - wall0, cpu_seconds()
        ranks_cpu = torch.tensor([cpu1["process"] - cpu0["process"]], dtype=torch.float64, device=env.device)
        dist.all_reduce(ranks_cpu)
        after = world_gemm_flops_per_s(gemms, device=env.device)
        after_in_use = world_gemm_flops_per_s(gemms, dtype, env.device) if dtype else after
        bare = None
        if bare_steps:
            reader = train_reader(cfg, env)
            batches = list(itertools.islice(reader.epoch(0), 16))
            bare = pipeline_examples_per_s(cfg, env, batches, bare_steps)
        rss = [None] * env.world_size  # every rank's peak RSS (GiB), gathered to all
        dist.all_gather_object(rss, _peak_rss_gib())
    finally:
        aitm_dist.teardown()
    busy = cpu1["machine_busy"] - cpu0["machine_busy"]
    return {"train": {k: summary["train"][k] for k in ("steps_this_run", "examples", "examples_per_s", "seconds")},
            "memory": rank_memory(cfg, summary["plan"], rss),
            "threads": torch.get_num_threads(), "gemm_before": before, "gemm_after": after, "bare": bare,
            "mixed_precision": summary["mixed_precision"],
            "gemm_in_use_before": before_in_use, "gemm_in_use_after": after_in_use,
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


def _roofline_in_use(run: dict, flops: float, ex_s: float) -> dict:
    """The roofline of the precision the run trained in (``mixed_precision.resolved``)."""
    gemm = max(run["gemm_in_use_before"], run["gemm_in_use_after"])
    return {"precision": {"none": "fp32"}.get(run["mixed_precision"]["resolved"], run["mixed_precision"]["resolved"]),
            "gemm_flops_per_s": round(gemm),
            "gemm_flops_per_s_before_after": [round(run["gemm_in_use_before"]), round(run["gemm_in_use_after"])],
            "roofline_examples_per_s": round(gemm / flops),
            "ratio_to_roofline": round(ex_s / (gemm / flops), 3)}


def cmd(args: argparse.Namespace) -> dict:
    from aitm_torchrec.config import load_config

    data = Path(args.data or REPO / "data" / f"bench_taobao_int64_{args.rows}")
    train = generated_set(data, args.rows, False, args.row_group_size, args.files)
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

    def one(extra: list[str], bare_steps: int = 0, config: str | None = args.config) -> dict:
        try:
            return launch_ranks(_train_rank, (config, overrides + extra, bare_steps),
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
        "table_rows_total": table_rows(cfg),
        "flops_per_example": round(flops),
        "flops_breakdown": {k: round(v) for k, v in groups.items()},
        "flops_counted": "nn.Linear and cross-network kernels only (incl. AIT h1/h2/h3 per candidate, "
                         "transfer, heads): 2*rows*in*out x 3 (forward, input grad, weight grad); no biases, "
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
        "mixed_precision": small["mixed_precision"],
        "roofline_in_use": _roofline_in_use(small, flops, ex_s),
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
            "table_rows_total": table_rows(big_cfg),
            "overrides": extra,
            "examples_per_s": round(big_ex_s),
            "seconds": round(big["train"]["seconds"], 2),
            "ratio_to_roofline": round(big_ex_s / roofline, 3),
            "ratio_to_small_tables": round(big_ex_s / ex_s, 3),
            "ratio_to_roofline_in_use": round(big_ex_s / result["roofline_in_use"]["roofline_examples_per_s"], 3),
            "gemm_flops_per_s_before_after": [round(big["gemm_before"]), round(big["gemm_after"])],
            "cpu_during_run": big["cpu"],
            "memory": big["memory"],
        }
    if args.alternate_fp32:
        ab = _alternate(lambda: one(["train_config.mixed_precision=none"]), lambda: one([]), args.alternate_fp32)
        result["precision_ab"] = {"what": "pairs of runs at the seed's table sizes, fp32 then the config's precision",
                                  "precision": ab["runs"][1]["resolved"], "runs": ab["runs"],
                                  "ratio_to_fp32": ab["ratio"], **ab["load"]}
    if args.alternate_config:
        ab = _alternate(lambda: one([]), lambda: one([], config=args.alternate_config), args.alternate_pairs)
        result["config_ab"] = {"what": "pairs of runs on the same data, --config then --alternate-config",
                               "configs": [result["config"], args.alternate_config], "runs": ab["runs"],
                               "ratio_to_config": ab["ratio"], **ab["load"]}
    print(json.dumps(result, indent=2))
    return result


def _alternate(first, second, pairs: int) -> dict:
    """``pairs`` x (``first()``, ``second()``), alternating so both see the same machine: each
    run's examples/s and resolved precision, and the ratio of the second's summed examples/s to
    the first's."""
    runs, load_before = [], load_avg()
    for _ in range(pairs):
        for run in (first, second):
            r = run()
            runs.append({"resolved": r["mixed_precision"]["resolved"], "examples_per_s": round(r["train"]["examples_per_s"]),
                         "other_processes_cpu_s": r["cpu"]["other_processes_cpu_s"]})
    ratio = sum(r["examples_per_s"] for r in runs[1::2]) / sum(r["examples_per_s"] for r in runs[0::2])
    return {"runs": runs, "ratio": round(ratio, 3),
            "load": {"load_avg_1_5_15_before": load_before, "load_avg_1_5_15_after": load_avg()}}
