"""The one place tests start processes: N real gloo ranks (TorchElastic's launcher, a local c10d
rendezvous) running a function, and the TorchX CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aitm_torchrec.dist import run_local


def run_ranks(fn: Callable[..., Any], *args: Any, nproc: int = 2) -> dict[int, Any]:
    """Calls ``fn(*args)`` in ``nproc`` spawned processes with one thread each; returns
    {rank: return value}. See ``aitm_torchrec.dist.run_local``."""
    return run_local(fn, *args, nproc=nproc, threads=1)


REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def torchx(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs the TorchX CLI of this venv from the repository root (one thread per worker)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "torchx"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
