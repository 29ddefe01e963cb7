"""The one place that sets up the process group and device.

CUDA present: nccl and ``cuda:LOCAL_RANK``. Otherwise gloo and the CPU. Under torchrun (or TorchX,
which runs torchrun) the rendezvous comes from the environment; a plain ``python launch/train.py``
runs as a world of one on a free local port.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(backend: str | None = None, timeout_s: float = 600) -> DistEnv:
    """Initialises the default process group (once) and picks the device."""
    if "RANK" not in os.environ:  # not launched by torchrun: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda and backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        device=device,
        backend=backend,
    )


def teardown() -> None:
    if dist.is_initialized():
        # Collect the job's sharded modules and pipelines (reference cycles) while the process
        # group they hold is still valid, not during interpreter shutdown.
        gc.collect()
        dist.destroy_process_group()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a
    process group or in a world of one. Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank. Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Every rank waits here for the others; nothing without a process group. Collective."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def raise_first(errors: Sequence[str | None], error: Callable[[str], BaseException]) -> None:
    """Raises ``error(message)`` for the lowest rank's message among ``errors`` (one per rank,
    None where that rank is fine); nothing when every entry is None."""
    first = next((e for e in errors if e), None)
    if first:
        raise error(first)


def agree(message: str | None, error: Callable[[str], BaseException]) -> None:
    """Collective, once on every rank: when any rank passes a message (its reason to stop), every
    rank raises ``error`` with the lowest such rank's message, so no rank goes on to wait in a
    collective for a rank that gave up."""
    raise_first(all_gather(message), error)


def quiet_libraries() -> None:
    """TorchRec/FBGEMM log and warn per table at start-up; keep their errors, drop the chatter."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    for name in ("torchrec", "fbgemm_gpu", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Some TorchRec modules log through the root logger; keep only their errors.
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.levelno >= logging.ERROR or "/torchrec/" not in r.pathname)


@contextlib.contextmanager
def job() -> Iterator[DistEnv]:
    """One job run from an entry point (train, score, export): the process group and device
    (``setup``), rank-aware logging (INFO on rank 0, warnings elsewhere), quiet libraries; the
    group is torn down afterwards unless the caller had already set it up (a test or benchmark
    running several jobs in one set of processes keeps it: destroying and re-creating the default
    group on the same store can hang)."""
    owns_group = not dist.is_initialized()
    env = setup()
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"[rank{env.rank}] %(asctime)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        yield env
    finally:
        if owns_group:
            teardown()


def run_local(fn: Callable[..., Any], *args: Any, nproc: int = 2, threads: int = 1,
              start_method: str = "spawn") -> dict[int, Any]:
    """Calls ``fn(*args)`` in ``nproc`` new processes on this host (TorchElastic's launcher,
    a local c10d rendezvous, ``OMP_NUM_THREADS=threads`` as torchrun sets it); returns
    {rank: return value}. ``fn`` must be module-level (it is pickled into each process). A failure
    on any rank stops all of them and raises ChildFailedError with that rank's traceback.
    ``start_method``: ``spawn`` (a fresh interpreter per rank) or ``forkserver`` (forked from
    multiprocessing's fork server, which imports what ``multiprocessing.set_forkserver_preload``
    names once: the tests' launcher, so ranks start without importing torch again)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1, start_method=start_method)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        return elastic_launch(config, entrypoint=fn)(*args)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
