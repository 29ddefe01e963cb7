"""``python -m benchmarks zch``: the large id features (user_id, adgroup_id) of synthetic data with
``--vocab`` distinct ids each (default 1M, ``datasets/synthetic.py --large-vocab``) trained two ways
on ``--world-size`` gloo ranks, one after the other: hashed into ``--table-size`` rows, and as zch
tables of the same size (``--policy``, ``--eviction-interval``). Per way: training
``examples_per_s`` (as ``train``), eval AUC and logloss; and the zch / hashed rate (goal 0.8).

    python -m benchmarks zch [--rows 400000] [--vocab 1000000] [--table-size 20000] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import REPO, add_overrides, add_ranks, generated, launch_ranks, split_name, train_rank

HELP = "examples/s and AUC: large id features hashed vs as zch tables"
EVAL_ROWS = 50_000  # the eval split's rows unless --eval-rows says otherwise


def add_arguments(z: argparse.ArgumentParser) -> None:
    z.add_argument("--config", help="YAML config (default: the seed's)")
    z.add_argument("--rows", type=int, default=400_000, help="training rows of the generated set")
    z.add_argument("--eval-rows", type=int, default=EVAL_ROWS)
    z.add_argument("--vocab", type=int, default=1_000_000, help="distinct user_id / adgroup_id ids")
    z.add_argument("--table-size", type=int, default=20_000, help="rows of each large table, both ways")
    z.add_argument("--data", help="data directory (default data/bench_zch_<rows>_v<vocab>, _eval<N> appended for a "
                                  "non-default --eval-rows; generated if missing; a set there with other row counts "
                                  "is refused)")
    z.add_argument("--steps", type=int, default=200)
    z.add_argument("--batch-size", type=int, default=1024, help="per rank")
    z.add_argument("--eviction-interval", type=int, default=20)
    z.add_argument("--policy", default="lfu", choices=["lfu", "lru", "distance_lfu"])
    add_ranks(z)
    z.add_argument("--zch-first", action="store_true", help="run the zch way first (order effects)")
    add_overrides(z)


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


def cmd(args: argparse.Namespace) -> dict:
    """Training examples/s and eval AUC with the large id features hashed vs as zch tables, same
    table sizes, same data, one after the other in this invocation."""
    from aitm_torchrec.config import load_config

    data = Path(args.data or REPO / "data" / split_name(f"bench_zch_{args.rows}_v{args.vocab}", args.eval_rows,
                                                        EVAL_ROWS))
    generated(data, args.rows, args.eval_rows, ["--files", "2", "--row-group-size", "65536", "--large-vocab",
                                                str(args.vocab)])
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
            summary = launch_ranks(train_rank, (args.config, list(args.overrides) + base + extra +
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
