"""Run a function on N real gloo processes (TorchElastic's launcher, a local c10d rendezvous)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aitm_torchrec.dist import run_local


def run_ranks(fn: Callable[..., Any], *args: Any, nproc: int = 2) -> dict[int, Any]:
    """Calls ``fn(*args)`` in ``nproc`` spawned processes with one thread each; returns
    {rank: return value}. See ``aitm_torchrec.dist.run_local``."""
    return run_local(fn, *args, nproc=nproc, threads=1)
