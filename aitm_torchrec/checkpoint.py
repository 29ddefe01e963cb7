"""Checkpoints: torch.distributed.checkpoint (DCP), written atomically, self-verifying, loadable
by other jobs.

Layout: ``<model_dir>/checkpoints/step_<N>/`` holds the DCP files (``.metadata``,
``__<rank>_<i>.distcp``: model incl. sharded tables, fused and dense optimizer state, step) and
``meta.json``, which records every other file of the checkpoint with its size and sha256
(``"files": {name: {"size", "sha256"}}``). A save goes to ``.step_<N>.tmp`` first and is renamed
once every rank has finished, so a crash mid-save never leaves a directory named like a complete
checkpoint; a save that fails on any rank (no space, no permission) raises ``CheckpointError`` on
every rank and removes the temp directory. Loading verifies sizes and checksums before reading;
``latest_verified`` skips damaged checkpoints with a warning. DCP reshards table-wise tables on
load, so another world size (or a scoring job) can read it. Loading never unpickles: non-tensor
entries are read with ``torch.load(weights_only=True)``.

``python -m aitm_torchrec.checkpoint verify DIR`` checks one checkpoint, or every one under a
``checkpoints/`` root (or a model_dir), without loading it; exit status 1 if any is damaged.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import logging
import os
import re
import resource
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from aitm_torchrec import dist as aitm_dist
from aitm_torchrec.files import sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"^__(\d+)_")  # DCP's FileSystemWriter names rank r's files __<r>_<i>.distcp
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that is damaged or could not be written; the message names it and the file."""


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor items load with weights_only=True (no code runs)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    return [(step, p) for step, p in _step_dirs(root) if (p / META).exists()]


def latest(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1][1] if found else None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every ``step_<N>`` directory under ``root``, with or without meta.json, oldest first."""
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(root).iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


# --------------------------------------------------------------------------------------------
# Verification.

def _describe(ckpt: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"size": (ckpt / n).stat().st_size, "sha256": sha256_file(ckpt / n)} for n in names}


def _data_files(ckpt: Path) -> list[str]:
    """The checkpoint's files relative to it, sorted: everything but meta.json."""
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != META)


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} is damaged: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {META} is unreadable ({e})") from None
    files = meta.get("files", {}) if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CheckpointError(f"checkpoint {path} is damaged: {META} is not a checkpoint description "
                              "(expected an object whose \"files\" maps names to {size, sha256})")
    return meta


def verify(path: Path, warn: Callable[[str], Any] = logger.warning) -> None:
    """Checks every file that ``meta.json`` lists: present, of the recorded size, of the recorded
    sha256 (sizes of all first, then checksums: a cut-short file is found without reading the
    rest). Raises CheckpointError naming the checkpoint, the file and what is wrong. A checkpoint
    written before meta.json listed its files passes with a warning through ``warn``."""
    path = Path(path)
    meta = _read_meta(path)
    files = meta.get("files")
    if files is None:
        warn(f"checkpoint {path} cannot be verified: it was written before {META} recorded its files' "
             "sizes and checksums")
        return
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: file {name} is missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"checkpoint {path} is damaged: file {name} is {size} bytes, {META} "
                                  f"records {want['size']} (size mismatch: cut short or overwritten)")
    for name, want in files.items():
        if sha256_file(path / name) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: file {name} does not match the sha256 "
                                  f"in {META} (checksum mismatch: its contents changed)")


def latest_verified(root: Path, warn: Callable[[str], Any] = logger.warning) -> Path | None:
    """The newest checkpoint under ``root`` that verifies, or None. Every newer one that does
    not is reported through ``warn`` (checkpoint, file, what is wrong) and skipped."""
    for _, path in reversed(_step_dirs(root)):
        try:
            verify(path, warn)
            return path
        except CheckpointError as e:
            warn(f"{e}; skipping it and trying the checkpoint before it")
    return None


def agreed_latest(root: Path, warn: Callable[[str], Any] = logger.warning) -> Path | None:
    """``latest_verified`` on rank 0, the same answer on every rank (collective when a process
    group is up). Rank 0 reads each file once; the others wait (within the group's timeout)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return latest_verified(root, warn)
    chooser = (lambda: latest_verified(root, warn)) if dist.get_rank() == 0 else None
    choice = _on_main(chooser, "choosing a checkpoint under", Path(root))
    return None if choice is None else Path(choice)


# --------------------------------------------------------------------------------------------
# Save and load.

def save(root: Path, step: int, state: dict[str, Any], meta: dict[str, Any], is_main: bool, keep: int = 0) -> Path:
    """Saves ``state`` (a DCP state dict) as ``root/step_<step>``; collective over all ranks.
    Each rank checksums the DCP files it wrote; rank 0 writes meta.json with all of them and
    renames the directory. A failure on any rank raises CheckpointError on every rank, naming the
    directory and the OS error; the temp directory is removed and earlier checkpoints stay."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    what = f"saving checkpoint {final.name} into"
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def fresh() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def own_files() -> dict[str, dict[str, Any]]:  # read while still in this host's page cache
        return _describe(tmp, [n for n in _data_files(tmp) if _owner(n, world) == rank])

    def publish(files: dict[str, dict[str, Any]]) -> None:
        write_json_atomic(tmp / META, {**meta, "step": step, "files": files})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    try:
        _on_main(fresh if is_main else None, what, root)
        try:
            dcp.save(state, checkpoint_id=str(tmp))  # collective; DCP reports any rank's failure to all
        except CheckpointException as e:
            causes = _everywhere(lambda: _write_limits(root), what, root)
            causes = sorted({c for c in causes if c})
            raise CheckpointError(f"{what} {root} failed {_first_failure(e)}"
                                  + (f" (probable cause: {'; '.join(causes)})" if causes else "")) from None
        files = {k: v for part in _everywhere(own_files, what, root) for k, v in part.items()}
        _on_main((lambda: publish(files)) if is_main else None, what, root)
    except CheckpointError:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main and keep > 0:
        for _, old in checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, state: dict[str, Any], check: bool = True) -> dict[str, Any]:
    """Loads in place into ``state`` (same structure as saved); returns meta.json. Verifies the
    checkpoint first (``check=False``: the caller already did, e.g. with ``latest_verified``);
    a damaged one raises CheckpointError naming the file."""
    path = Path(path)
    if check:
        verify(path)
    meta = _read_meta(path)
    try:
        dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner())
    except CheckpointException as e:
        raise CheckpointError(f"loading checkpoint {path} failed {_first_failure(e)}") from None
    return meta


def _owner(name: str, world: int) -> int:
    """The rank that wrote (so checksums) a DCP file: r for ``__<r>_*``, rank 0 for the rest."""
    m = _RANK_FILE.match(name)
    return int(m.group(1)) if m and int(m.group(1)) < world else 0


def _first_failure(e: CheckpointException) -> str:
    """Every failing rank's error, OS errors (the cause: no space, no permission) first."""
    failures = sorted(e.failures.items(), key=lambda kv: (not isinstance(kv[1][0], OSError), kv[0]))
    return "; ".join(f"on rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in failures)


def _write_limits(root: Path) -> str:
    """Why a write under ``root`` may have failed here. DCP writes through torch.save's zip
    writer, which turns ENOSPC and EFBIG into "unexpected pos N vs M" and loses the OS error."""
    notes = []
    free = shutil.disk_usage(root).free
    if free < (1 << 20):
        notes.append(f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: {free} bytes free on the filesystem of {root}")
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY:
        notes.append(f"[Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}: files are limited to {soft} bytes on "
                     f"rank {dist.get_rank() if dist.is_initialized() else 0} (RLIMIT_FSIZE, ulimit -f)")
    return "; ".join(notes)


def _everywhere(fn: Callable[[], Any], what: str, root: Path) -> list[Any]:
    """Runs ``fn`` on every rank and returns every rank's result, or raises CheckpointError on
    every rank with the first failure, so no rank waits at a barrier for one that failed."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        mine: tuple[Any, str | None] = (fn(), None)
    except Exception as e:  # reported to every rank, then raised there
        mine = (None, f"{what} {root} failed on rank {rank}: {type(e).__name__}: {e}")
    everyone = aitm_dist.all_gather(mine)
    aitm_dist.raise_first([error for _, error in everyone], CheckpointError)
    return [result for result, _ in everyone]


def _on_main(fn: Callable[[], Any] | None, what: str, root: Path) -> Any:
    """``fn`` on the rank that passes it (rank 0), its result or failure on every rank."""
    return _everywhere(fn or (lambda: None), what, root)[0]


# --------------------------------------------------------------------------------------------
# python -m aitm_torchrec.checkpoint verify DIR

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aitm_torchrec.checkpoint",
                                description="Check checkpoints against their meta.json without loading them.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="one line per checkpoint; exit status 1 if any is damaged")
    v.add_argument("dir", type=Path, help="a checkpoint (step_<N>/), a checkpoints/ root, or a model_dir")
    args = p.parse_args(argv)
    target: Path = args.dir
    if _NAME.match(target.name) or (target / META).exists():
        paths = [target]
    else:
        root = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        paths = [path for _, path in _step_dirs(root)]
    if not paths:
        print(f"{target}: no checkpoint here (no step_<N>/ directory)", file=sys.stderr)
        return 1
    damaged = 0
    for path in paths:
        notes: list[str] = []
        try:
            verify(path, notes.append)
        except CheckpointError as e:
            damaged += 1
            print(f"DAMAGED     {e}")
            continue
        if notes:
            print(f"UNVERIFIED  {path}: written before meta.json listed its files; loads, cannot be checked")
        else:
            files = _read_meta(path)["files"]
            print(f"OK          {path}: {len(files)} files, {sum(f['size'] for f in files.values())} bytes")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
