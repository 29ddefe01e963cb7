"""A trained model for jobs that do not train: which checkpoint, and the model's weights only.

Scoring, table export and the serving export read training checkpoints through these functions:
``resolve_checkpoint`` (an explicit directory, or the newest complete one under ``model_dir``),
``sharded_model`` (the model planned and sharded for *this* job's world size, tables resharded
by DCP on load) and ``local_model`` (one process, no process group, tables in memory). Only the
model's tensors are read: no optimizer state, no training position. zch tables send ids they do
not hold to the default row those ids read in training (the checkpoint's world size), whatever
the job's world size (``zch.use_trained_defaults``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel

from aitm_torchrec import checkpoint
from aitm_torchrec.config import Config
from aitm_torchrec.dist import DistEnv
from aitm_torchrec.model import MultiTaskModel
from aitm_torchrec.registry import build_model
from aitm_torchrec.sharding import describe, plan_model, sharders
from aitm_torchrec.zch import use_trained_defaults

# Training checkpoints hold the train wrapper's state under "model"; the model is its ``model``.
_PREFIX = "model."


class CheckpointNotFound(FileNotFoundError):
    """No usable checkpoint, with the directory in the message."""


def resolve_checkpoint(cfg: Config, path: str | Path | None = None) -> Path:
    """``path`` if given, else the newest complete checkpoint under ``<model_dir>/checkpoints``;
    verified (sizes and checksums of every file) before anything reads it. A damaged checkpoint
    stops the job with ``checkpoint.CheckpointError`` naming the checkpoint and the file: a job
    that does not train never falls back to an older model silently."""
    if path:
        p = Path(path)
        if not (p / "meta.json").exists():
            raise CheckpointNotFound(f"{p}: not a complete checkpoint (no meta.json); pass a "
                                     "checkpoints/step_<N> directory written by training")
    else:
        root = Path(cfg.model_dir) / "checkpoints"
        p = checkpoint.latest(root)
        if p is None:
            raise CheckpointNotFound(f"{root}: no complete checkpoint (train first, or pass --checkpoint DIR)")
    checkpoint.verify(p)
    return p


def checkpoint_meta(path: Path) -> dict:
    """``meta.json`` of a checkpoint: step, world size, plan, config."""
    return json.loads((Path(path) / "meta.json").read_text())


def load_model_weights(model: nn.Module, path: Path) -> dict:
    """Loads the model tensors of training checkpoint ``path`` (verified by ``resolve_checkpoint``)
    into ``model`` (a MultiTaskModel, sharded by DMP or not) in place; tables are resharded to
    ``model``'s plan. Returns meta.json."""
    own = model.state_dict()
    state = {"model": {_PREFIX + k: v for k, v in own.items()}}
    meta = checkpoint.load(path, state, check=False)
    model.load_state_dict({k: state["model"][_PREFIX + k] for k in own})
    return meta


def sharded_model(cfg: Config, env: DistEnv, path: Path) -> tuple[DistributedModelParallel, dict]:
    """The config's model planned for this job's ranks, sharded, with the checkpoint's weights,
    in eval mode. Collective: every rank calls it. Returns (DMP, plan description)."""
    model = build_model(cfg, device="meta", dense_device=env.device)
    plan = plan_model(cfg, model, env.world_size, env.local_world_size, env.device.type)
    dmp = DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=sharders())
    _trained_defaults(dmp, cfg, load_model_weights(dmp, path))
    dmp.eval()
    return dmp, describe(plan)


def local_model(cfg: Config, path: Path) -> MultiTaskModel:
    """The config's model on the CPU in this process (no process group), with the checkpoint's
    weights, in eval mode. Tables are read whole: for serving exports, not for huge tables."""
    torch.manual_seed(0)  # weights are overwritten; a fixed init keeps runs reproducible anyway
    model = build_model(cfg, device="cpu")
    _trained_defaults(model, cfg, load_model_weights(model, path))
    return model.eval()


def _trained_defaults(model: nn.Module, cfg: Config, meta: dict) -> None:
    """zch tables: unheld ids read the default row they read in training (the checkpoint's world
    size), so scores do not depend on this job's world size (``zch.use_trained_defaults``)."""
    if cfg.schema.zch:
        use_trained_defaults(model, cfg.schema, int(meta.get("world_size") or 1))
