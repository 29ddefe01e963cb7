"""``python -m benchmarks score``: batch scoring (``launch/score.py``) examples/s beside the
trainer's examples/s of the same config, in the same ranks. Each of ``--world-size`` gloo ranks
trains the config for ``--steps`` steps (``launch/train.py``) on the generated set of ``data``, then
scores that whole set from the checkpoint in the same process group. Scoring examples/s: rows
written / the slowest rank's scoring loop (read, forward, write Parquet; model build and
checkpoint load excluded). Once at the seed's table sizes and, unless ``--no-big-tables``, with
the large id tables grown so all tables hold ``--big-table-rows`` rows. Goal: scoring at least 3x
the training rate. ``--dense-quant int8`` scores with int8 Linear layers (``launch/score.py
--dense-quant``); ``both`` scores the set twice from the same checkpoint, fp32 then int8 Linears
(``*_dense_int8`` entries beside the fp32 ones, the int8 / fp32 examples/s ratio, and each run's
per-task AUC over the scored set, ``--metrics``, computed after the timed loop).

    python -m benchmarks score [--rows 400000] [--steps 60] [--no-big-tables] [--dense-quant none|int8|both]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import (
    REPO,
    add_generated_set,
    add_overrides,
    add_ranks,
    big_table_overrides,
    generated_set,
    launch_ranks,
    load_avg,
    table_rows,
)

HELP = "batch scoring examples/s beside training examples/s, same ranks"


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--config", help="YAML config (default: the seed's)")
    add_generated_set(c, 400_000, "rows of the generated data set (scored whole)")
    c.add_argument("--steps", type=int, default=60, help="training steps before scoring")
    c.add_argument("--dense-quant", choices=("none", "int8", "both"), default="none",
                   help="Linear layers when scoring: fp32, int8, or both (fp32 first)")
    add_ranks(c, big_tables_help="also with the large tables grown to --big-table-rows rows in all")
    add_overrides(c)


def _score_rank(config: str | None, overrides: list[str], score_args: list[list[str]]) -> dict:
    """One rank (a spawned process): ``launch/train.py``, then ``launch/score.py`` of the same
    config and checkpoint once per entry of ``score_args``, in one process group."""
    import logging

    from aitm_torchrec import dist as aitm_dist
    from launch.score import main as score_main
    from launch.train import main as train_main

    logging.basicConfig(level=logging.WARNING)
    aitm_dist.setup()
    try:
        config_args = ["--config", config] if config else []
        summary = train_main([*config_args, "--no-resume", *overrides])
        manifests = [score_main([*config_args, *a, *overrides]) for a in score_args]
    finally:
        aitm_dist.teardown()
    return {"train": summary["train"], "score": manifests}


def cmd(args: argparse.Namespace) -> dict:
    """Scoring examples/s beside training examples/s of the same config, in the same ranks."""
    from aitm_torchrec.config import load_config

    data = Path(args.data or REPO / "data" / f"bench_taobao_int64_{args.rows}")
    train = generated_set(data, args.rows, False, args.row_group_size, args.files)
    results = {}
    load_before = load_avg()
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
        dense = {"none": ["none"], "int8": ["int8"], "both": ["none", "int8"]}[args.dense_quant]
        score_args = [["--input", str(train), "--output", str(work / f"scores_{d}"), "--reserved_columns", "clk",
                       "--dense-quant", d, *(["--metrics"] if len(dense) == 2 else [])] for d in dense]
        try:
            out = launch_ranks(_score_rank, (args.config, overrides, score_args), args.world_size,
                                args.threads_per_rank)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        train_ex_s = out["train"]["examples_per_s"]
        results[label] = {
            "table_rows_total": table_rows(cfg),
            "train_batch_size": cfg.data_config.batch_size, "train_steps": out["train"]["steps_this_run"],
            "train_examples_per_s": round(train_ex_s), "score_batch_size": 4 * cfg.data_config.batch_size,
        }
        for d, manifest in zip(dense, out["score"]):
            score_ex_s = manifest["rows_scored_this_run"] / manifest["scoring_seconds"]
            tail = "" if d == "none" else "_dense_int8"
            results[label].update({
                f"score_rows{tail}": manifest["rows_scored_this_run"],
                f"score_seconds{tail}": manifest["scoring_seconds"],
                f"score_examples_per_s{tail}": round(score_ex_s),
                f"score_over_train{tail}": round(score_ex_s / train_ex_s, 2) if train_ex_s else None,
            })
            if manifest.get("metrics"):
                results[label][f"auc{tail}"] = {t: round(m["auc"], 5) for t, m in manifest["metrics"].items()}
        if len(dense) == 2:
            r = results[label]
            r["dense_int8_over_fp32"] = round(r["score_examples_per_s_dense_int8"] / r["score_examples_per_s"], 3)
    result = {"benchmark": "score", "config": str(args.config or "configs/aitm_taobao.yaml"), "data": str(train),
              "world_size": args.world_size, "threads_per_rank": args.threads_per_rank, **results,
              "goal_score_over_train": 3.0,
              "load_avg_1_5_15_before": load_before, "load_avg_1_5_15_after": load_avg(),
              "measured": "scoring: rows written / the slowest rank's scoring loop (read, forward, write "
                          "Parquet; model build and checkpoint load excluded); training: the trainer's "
                          "examples/s in the same ranks just before"}
    print(json.dumps(result, indent=2))
    return result

