"""Run a function on N real gloo processes (TorchElastic's launcher, a local c10d rendezvous)."""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable

from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def run_ranks(fn: Callable[..., Any], *args: Any, nproc: int = 2) -> dict[int, Any]:
    """Calls ``fn(*args)`` in ``nproc`` spawned processes; returns {rank: return value}.

    ``fn`` must be a module-level function (it is pickled into each process). A failure on any
    rank stops all of them and raises ChildFailedError with the rank's traceback.
    """
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
        start_method="spawn",
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return elastic_launch(config, entrypoint=fn)(*args)
