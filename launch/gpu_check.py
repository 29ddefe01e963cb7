"""GPU check: the CUDA-only paths on one GPU, as one short script. Skips cleanly without CUDA.

    python launch/gpu_check.py [--steps 20] [--out DIR]

On a CUDA machine it runs, in one process on cuda:0 with NCCL:
  1. the planner for this GPU with row_wise / table_row_wise constraints and one table forced to
     fused_uvm_caching (UVM with an HBM cache);
  2. DistributedModelParallel sharding with that plan;
  3. a few training steps through TrainPipelineSparseDist (which uses CUDA streams for the
     host-to-device copy and the input all-to-all), with bf16 autocast for the dense layers and
     a fused Adam embedding optimizer (CUDA-only);
  4. an eval pass and a DCP checkpoint;
  5. (unless --no-jobs) every job's entry point, in this process, on the best config
     (configs/aitm_taobao_best.yaml) with user_id as a zch table, GAUC on both towers and partial
     rowwise Adam on the tables (CUDA-only): training, scoring with --metrics, table export, the
     serving export (int8) and scoring with that artefact; then the seed's EasyRec config
     (tests/fixtures/easyrec/aitm_seed_taobao.config) as written, on the same rows as EasyRec CSV:
     its one Adam optimizer runs FBGEMM's fused Adam on the tables on CUDA.
It prints one JSON object with the plan, losses, examples/s and pass/fail of each stage. Without
CUDA it prints {"skipped": "..."} and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
EASYREC_SEED = REPO / "tests" / "fixtures" / "easyrec" / "aitm_seed_taobao.config"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Run the CUDA-only code paths on one GPU.")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", help="working directory (default: a temporary one)")
    p.add_argument("--rows", type=int, default=200000, help="synthetic training rows")
    p.add_argument("--no-jobs", action="store_true", help="skip stage 5 (every job on the best config, the EasyRec config)")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="run the same stages on the CPU with CPU sharding (gloo, table_wise, rowwise_adagrad): "
                        "catches set-up bugs of this script without a GPU")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_rehearsal:
        result = {"skipped": "no CUDA device: nccl, row_wise, UVM caching and pipeline streams not run"}
        print(json.dumps(result))
        return result

    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.config import load_config
    from aitm_torchrec.train import TrainOptions, run
    from datasets import synthetic

    work = Path(args.out or tempfile.mkdtemp(prefix="aitm_gpu_check_"))
    data = work / "data"
    if not (data / "_SUCCESS").exists():
        synthetic.main(["--out", str(data), "--rows", str(args.rows), "--eval-rows", str(max(args.rows // 10, 1000))])
    overrides = [
        f"train_input_path={data / 'train'}", f"eval_input_path={data / 'eval'}", f"model_dir={work / 'run'}",
        f"train_config.num_steps={args.steps}", "train_config.log_step_count_steps=5",
        "train_config.mixed_precision=bf16", "eval_config.num_steps=5",
    ]
    if args.cpu_rehearsal:
        overrides += ["data_config.batch_size=256", "sharding_config.sharding_types=[table_wise]"]
    else:
        overrides += [
            "train_config.sparse_optimizer.name=adam", "train_config.sparse_optimizer.learning_rate=0.001",
            "sharding_config.sharding_types=[row_wise, table_row_wise, data_parallel]",
            "sharding_config.tables={user_id: {sharding_types: [row_wise], compute_kernels: [fused_uvm_caching]}}",
        ]
    cfg = load_config(None, overrides)
    env = aitm_dist.setup()
    result: dict = {"device": torch.cuda.get_device_name(0) if env.device.type == "cuda" else "cpu", "backend": env.backend,
                    "torch": torch.__version__, "cuda": torch.version.cuda}
    t0 = time.perf_counter()
    try:
        summary = run(cfg, env, TrainOptions(resume=False)).to_dict()
        result.update(ok=True, plan=summary["plan"], loss=summary["train"]["loss"],
                      examples_per_s=summary["train"]["examples_per_s"], eval=summary["eval"],
                      checkpoint=str(Path(cfg.model_dir) / "checkpoints"))
        if not args.cpu_rehearsal:
            assert summary["plan"]["user_id"]["compute_kernel"] == "fused_uvm_caching"
            assert env.backend == "nccl"
    except Exception as e:  # report, then fail the script
        result.update(ok=False, error=f"{type(e).__name__}: {e}")
    if not args.no_jobs:
        optimizer = "rowwise_adagrad" if args.cpu_rehearsal else "partial_rowwise_adam"
        result["jobs"] = jobs(work, data, args.steps, optimizer)
        result["ok"] = result["ok"] and all(stage["ok"] for stage in result["jobs"].values())
    aitm_dist.teardown()
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        raise SystemExit(1)
    return result


def jobs_config(work: Path, data: Path) -> Path:
    """The best config on ``data`` with user_id as a zch table and GAUC on every tower, written
    to ``work``/jobs.yaml."""
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "aitm_taobao_best.yaml").read_text())
    for f in raw["feature_config"]["features"]:
        if f["input_names"] == ["user_id"]:
            f.pop("hash_bucket_size")
            f["zch"] = {"zch_size": 400000, "eviction_interval": 20}
    for tower in raw["model_config"]["model_params"]["task_towers"]:
        tower["metrics_set"] = [{"auc": {}}, {"gauc": {"uid_field": "user_id"}}]
    raw.update(train_input_path=str(data / "train"), eval_input_path=str(data / "eval"), model_dir=str(work / "jobs"))
    path = work / "jobs.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def easyrec_csv(config: Path, data: Path, work: Path) -> list[str]:
    """``data``'s Parquet splits written as EasyRec CSV (the config's input_fields order) under
    ``work``; the overrides that point ``config`` at them and at ``work``/run."""
    import pyarrow.parquet as pq

    from aitm_torchrec.config import load_config
    from aitm_torchrec.data import csv_input

    columns = [f.input_name for f in load_config(str(config)).data_config.input_fields]
    for split in ("train", "eval"):
        csv_input.write_table(pq.read_table(data / split).select(columns), work / f"{split}.csv")
    return [f"train_input_path={work / 'train.csv'}", f"eval_input_path={work / 'eval.csv'}",
            f"model_dir={work / 'run'}"]


def jobs(work: Path, data: Path, steps: int, optimizer: str) -> dict:
    """Stage 5: every job's entry point on ``jobs_config``, in this process and its process group;
    each stage's pass/fail and headline numbers."""
    from launch import export as export_cli
    from launch import score as score_cli
    from launch import train as train_cli

    config = str(jobs_config(work, data))
    out = work / "jobs"
    stages = {
        "train": lambda: train_cli.main(["--config", config, "--no-resume", f"train_config.num_steps={steps}",
                                         f"train_config.sparse_optimizer.name={optimizer}",
                                         "train_config.sparse_optimizer.learning_rate=0.001",
                                         "eval_config.num_steps=10"]),
        "score": lambda: score_cli.main(["--config", config, "--output", str(out / "scores"), "--metrics",
                                         "--overwrite"]),
        "tables": lambda: export_cli.main(["embeddings", "--config", config, "--output", str(out / "tables"),
                                           "--tables", "user_id,adgroup_id", "--overwrite"]),
        "serving": lambda: export_cli.main(["model", "--config", config, "--output", str(out / "serving"),
                                            "--quant", "int8"]),
        "score_serving": lambda: score_cli.main(["--config", config, "--model", str(out / "serving"), "--output",
                                                 str(out / "scores_serving"), "--metrics", "--overwrite"]),
        "easyrec": lambda: train_cli.main(["--config", str(EASYREC_SEED), "--no-resume",
                                           *easyrec_csv(EASYREC_SEED, data, work / "easyrec"),
                                           f"train_config.num_steps={steps}", "eval_config.num_steps=10"]),
    }
    brief = {
        "train": lambda r: {"eval": r["eval"], "examples_per_s": r["train"]["examples_per_s"],
                            "user_id": r["plan"]["user_id"]},
        "score": lambda r: {"metrics": r["metrics"]},
        "tables": lambda r: {"rows_per_s": r["rows_per_s"]},
        "serving": lambda r: {"self_check": r["self_check"]},
        "score_serving": lambda r: {"metrics": r["metrics"]},
        "easyrec": lambda r: {"eval": r["eval"], "examples_per_s": r["train"]["examples_per_s"],
                              "kernels": sorted({t["compute_kernel"] for t in r["plan"].values()})},
    }
    results: dict = {}
    for name, stage in stages.items():
        try:
            with contextlib.redirect_stdout(sys.stderr):  # this script's stdout is its one report
                results[name] = {"ok": True, **brief[name](stage())}
        except (Exception, SystemExit) as e:  # argparse and @record exit with SystemExit: a failed stage
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return results


if __name__ == "__main__":
    main()
