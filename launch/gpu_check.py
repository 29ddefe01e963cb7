"""GPU check: the CUDA-only paths on one GPU, as one short script. Skips cleanly without CUDA.

    python launch/gpu_check.py [--steps 20] [--out DIR]

On a CUDA machine it runs, in one process on cuda:0 with NCCL:
  1. the planner for this GPU with row_wise / table_row_wise constraints and one table forced to
     fused_uvm_caching (UVM with an HBM cache);
  2. DistributedModelParallel sharding with that plan;
  3. a few training steps through TrainPipelineSparseDist (which uses CUDA streams for the
     host-to-device copy and the input all-to-all), with bf16 autocast for the dense layers and
     a fused Adam embedding optimizer (CUDA-only);
  4. an eval pass and a DCP checkpoint.
It prints one JSON object with the plan, losses, examples/s and pass/fail of each stage. Without
CUDA it prints {"skipped": "..."} and exits 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Run the CUDA-only code paths on one GPU.")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", help="working directory (default: a temporary one)")
    p.add_argument("--rows", type=int, default=200000, help="synthetic training rows")
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
    finally:
        aitm_dist.teardown()
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
