"""``python launch/bench.py peer``: this trainer beside a plain PyTorch AITM (``launch/peer.py``).

Speed, measured in the same invocation one after the other (so both see the same machine): the
peer's training examples/s (one process, all cores, DataLoader included) and this trainer's (2
gloo ranks x 1 thread through ``train.run`` from Parquet, eval off), at the seed's table sizes
and with the large tables grown to ``--big-table-rows`` rows in all; their ratios.
Quality: both trained for one epoch over the same ``--rows``-row set (the peer at its batch of
2048, this trainer at each of ``--ours-batches`` per rank), per-task
AUC and the oracle's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from launch import quality
from launch.quality import REPO


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2_000_000, help="rows of the one-epoch set (generated if missing)")
    p.add_argument("--eval-rows", type=int, default=100_000)
    p.add_argument("--data-root", default=str(REPO / "data"))
    p.add_argument("--data", help="an existing generated set (DIR with train/, eval/, _SUCCESS) instead of --rows")
    p.add_argument("--ours-batches", default="4096,1024",
                   help="this trainer's batches per rank for the one-epoch comparison; empty: peer only")
    p.add_argument("--peer-batch", type=int, default=2048)
    p.add_argument("--speed-steps", type=int, default=20, help="timed peer steps (this trainer: 5x as many)")
    p.add_argument("--big-table-rows", type=int, default=14_000_000)
    p.add_argument("--no-epoch", dest="epoch", action="store_false", help="speed only")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="one-epoch quality only")
    p.add_argument("--seed", type=int, default=1)


def _ours_rank(config: str | None, overrides: list[str]) -> float:
    return quality._rank(config, overrides)["train"]["examples_per_s"]


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
    """Peer and this trainer, one after the other in this invocation, at both table sizes."""
    from launch import peer
    from launch.bench import _cpu_seconds

    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    sp = {"peer_small": peer.examples_per_s(cfg, data, args.peer_batch, args.speed_steps),
          "ours_small": ours_examples_per_s(data, 5 * args.speed_steps, []),
          "peer_big": peer.examples_per_s(cfg, data, args.peer_batch, max(args.speed_steps // 4, 3), big_sizes),
          "ours_big": ours_examples_per_s(data, 5 * args.speed_steps, big)}
    wall, cpu1 = time.perf_counter() - t0, _cpu_seconds()
    out = {}
    for name, p, o in (("seed_tables", sp["peer_small"], sp["ours_small"]), ("big_tables", sp["peer_big"], sp["ours_big"])):
        out[name] = {"table_rows_total": p["table_rows_total"], "peer_examples_per_s": round(p["examples_per_s"]),
                     "ours_examples_per_s": round(o), "ratio": round(o / p["examples_per_s"], 1)}
    out["machine_cpu_s_other_processes"] = round(cpu1["machine_busy"] - cpu0["machine_busy"] -
                                                 (cpu1["process"] - cpu0["process"]), 1)
    out["wall_s"] = round(wall, 1)
    return out


def cmd(args: argparse.Namespace) -> dict:
    import torch

    from aitm_torchrec.config import load_config
    from launch import peer
    from launch.bench import big_table_overrides

    torch.set_num_threads(2)
    cfg = load_config(None)
    data = Path(args.data) if args.data else quality.ensure_data(Path(args.data_root), args.rows, args.eval_rows,
                                                                 "clk,buy")
    big = big_table_overrides(cfg, args.big_table_rows)
    big_sizes = {cfg.feature_config.features[int(o.split(".")[2])].column: int(o.split("=")[1]) for o in big}
    result = {"benchmark": "peer",
              "peer": "launch/peer.py: nn.Embedding per field, dense Adam over all parameters (lr 1e-3), per-row "
                      "Dataset + DataLoader, one process, 2 threads",
              "ours": "launch/train.py path: 2 gloo ranks x 1 thread, sharded tables, fused table optimizer, "
                      "Parquet reader"}
    if args.speed:
        result["speed"] = speed(args, cfg, data, big, big_sizes)
        print(json.dumps(result["speed"]), file=sys.stderr)
    if args.epoch:
        ours = {f"ours_batch_{b}": quality.one_epoch(None, data, [f"train_config.seed={args.seed}"], batch_size=b)
                for b in [int(b) for b in args.ours_batches.split(",") if b]}
        p = peer.one_epoch(cfg, data, args.peer_batch, seed=args.seed)
        truth = quality.oracle(data)
        labels = {t.tower_name: t.label_name for t in cfg.schema.tasks}
        result["quality"] = {
            "rows": quality.train_rows(data), "data": str(data), "seed": args.seed,
            "oracle": {t: round(truth[l], 4) for t, l in labels.items()},
            f"peer_batch_{args.peer_batch}": {t: round(v, 4) for t, v in p["auc"].items()},
            **{k: {t: round(v, 4) for t, v in r["auc"].items()} for k, r in ours.items()},
            "peer_epoch_examples_per_s": round(p["examples_per_s"]),
        }
    print(json.dumps(result, indent=1))
    return result
