"""The TorchX CLI end to end: real torchrun processes under the local_cwd scheduler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from aitm_torchrec.config import load_config

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def torchx(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "torchx"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_explicit_local_cwd_launch_trains_and_writes_summary(tiny_config):
    out = torchx("run", "-s", "local_cwd", "dist.ddp", "-j", "1x2", "--script", "launch/train.py",
                 "--", "--config", str(tiny_config), "train_config.num_steps=20")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((Path(load_config(tiny_config).model_dir) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train"]["steps"] == 20
    assert set(summary["eval"]) == {"ctr", "cvr"}
    assert all(0.0 <= m["auc"] <= 1.0 for m in summary["eval"].values())


def test_users_command_as_typed_uses_local_cwd_and_positional_script(tiny_config):
    # `torchx run dist.ddp -j 2x8 launch/train.py`: no --script, no -s. Render it (16 processes
    # are too many for this machine), then run the same form for real at 1x2.
    dry = torchx("run", "--dryrun", "dist.ddp", "-j", "2x8", "launch/train.py", "--config", "x.yaml")
    assert dry.returncode == 0, dry.stderr[-3000:]
    text = dry.stdout + dry.stderr
    assert "local_cwd" in text
    assert "--nnodes 2 --nproc_per_node 8" in text
    assert "launch/train.py --config x.yaml" in text
    out = torchx("run", "dist.ddp", "-j", "1x2", "launch/train.py", "--config", str(tiny_config),
                 "train_config.num_steps=10")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((Path(load_config(tiny_config).model_dir) / "summary.json").read_text())
    assert summary["train"]["steps"] == 10 and summary["world_size"] == 2


def test_failing_rank_fails_the_job_with_the_reason(tiny_config):
    out = torchx("run", "dist.ddp", "-j", "1x2", "launch/train.py", "--config", str(tiny_config),
                 "train_input_path=/nonexistent/dir")
    assert out.returncode != 0
    assert "matches no Parquet file" in out.stdout + out.stderr
