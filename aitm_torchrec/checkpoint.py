"""Checkpoints: torch.distributed.checkpoint (DCP), written atomically, loadable by other jobs.

Layout: ``<model_dir>/checkpoints/step_<N>/`` holds the DCP files (model incl. sharded tables,
fused and dense optimizer state, step) and ``meta.json``. A save goes to ``.step_<N>.tmp`` first
and is renamed once every rank has finished, so a crash mid-save never leaves a directory named
like a complete checkpoint. DCP reshards table-wise tables on load, so another world size (or a
scoring job) can read it. Loading never unpickles: non-tensor entries are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

_NAME = re.compile(r"^step_(\d+)$")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor items load with weights_only=True (no code runs)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "meta.json").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1][1] if found else None


def save(root: Path, step: int, state: dict[str, Any], meta: dict[str, Any], is_main: bool, keep: int = 0) -> Path:
    """Saves ``state`` (a DCP state dict) as ``root/step_<step>``; collective over all ranks."""
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if is_main:
        write_json_atomic(tmp / "meta.json", {**meta, "step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep > 0:
            for _, old in checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Loads in place into ``state`` (same structure as saved); returns meta.json."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no meta.json)")
    dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner())
    return json.loads(meta_path.read_text())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
