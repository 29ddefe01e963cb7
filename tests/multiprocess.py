"""The one place tests start processes: N real gloo ranks (TorchElastic's launcher, a local c10d
rendezvous) running a function, and the TorchX CLI."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
import unittest.mock
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aitm_torchrec.dist import run_local

# Ranks fork from multiprocessing's fork server, which imports these once for the whole test
# session: a rank then starts in well under a second instead of importing torch and TorchRec
# afresh (several seconds per process, most of the suite's time before). The fork server itself
# never runs a test; each rank is still its own process with its own process group.
multiprocessing.set_forkserver_preload(["torch", "torchrec", "aitm_torchrec.train", "aitm_torchrec.score",
                                        "launch.train", "launch.score", "launch.export"])


def run_ranks(fn: Callable[..., Any], *args: Any, nproc: int = 2) -> dict[int, Any]:
    """Calls ``fn(*args)`` in ``nproc`` new processes (forked from the fork server) with one thread
    each; returns {rank: return value}. See ``aitm_torchrec.dist.run_local``.

    The ranks are gloo ranks on the CPU on any machine. Where CUDA is visible they start as fresh
    interpreters (spawn) with ``CUDA_VISIBLE_DEVICES`` empty: a process forked from one that has
    touched CUDA cannot use it, and two ranks cannot share one GPU under NCCL."""
    if not torch.cuda.is_available():
        return run_local(fn, *args, nproc=nproc, threads=1, start_method="forkserver")
    with unittest.mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": ""}):  # what the spawned ranks inherit
        return run_local(fn, *args, nproc=nproc, threads=1, start_method="spawn")


REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _torchx_env() -> dict[str, str]:
    """This venv's bin first on PATH (torchrun), one thread per worker."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


def torchx(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs the TorchX CLI of this venv from the repository root (one thread per worker)."""
    return subprocess.run([str(BIN / "torchx"), *args], cwd=REPO, env=_torchx_env(), capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class BackgroundJob:
    """A TorchX CLI run in the background: ``proc`` while it runs, ``output`` (its log) after."""

    proc: subprocess.Popen
    output: str = ""


@contextlib.contextmanager
def torchx_background(*args: str, log: Path) -> Iterator[BackgroundJob]:
    """Starts the TorchX CLI in the background, stdout and stderr to ``log``; on leaving, kills
    it if still running and reads the log into ``job.output``."""
    with open(log, "w+") as f:
        job = BackgroundJob(subprocess.Popen([str(BIN / "torchx"), *args], cwd=REPO, env=_torchx_env(),
                                             stdout=f, stderr=subprocess.STDOUT, text=True))
        try:
            yield job
        finally:
            if job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()
            f.seek(0)
            job.output = f.read()


def training_pids(marker: str, agent: bool = False, local_rank: int | None = None) -> list[int]:
    """torchrun agents (``agent``) or training workers (of ``local_rank``, if given) of
    ``launch/train.py`` whose command line contains ``marker`` (the TorchX CLI itself excluded)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (proc / "environ").read_bytes().split(b"\0") if local_rank is not None else []
        except OSError:
            continue
        if marker not in cmd or "launch/train.py" not in cmd or "torchx" in cmd or ("torchrun" in cmd) != agent:
            continue
        if local_rank is None or f"LOCAL_RANK={local_rank}".encode() in env:
            pids.append(int(proc.name))
    return pids
