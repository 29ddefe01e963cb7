"""Train AITM: ``python launch/train.py [--config FILE] [key.path=value ...]``.

Run it under torchrun or TorchX for several processes (see README), e.g.
``torchx run dist.ddp -j 1x2 launch/train.py`` from the repository root. Without ``--config`` it
trains the seed's example, ``configs/aitm_taobao.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

# Runs as a script under torchrun: make the repository importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from aitm_torchrec import dist as aitm_dist  # noqa: E402
from aitm_torchrec.config import load_config  # noqa: E402
from aitm_torchrec.train import run  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train an AITM model from a YAML config.")
    p.add_argument("--config", help="YAML config (default: configs/aitm_taobao.yaml)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in model_dir")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return p.parse_args(argv)


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


@record
def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    cfg = load_config(args.config, args.overrides)
    # A caller that already set up the process group (a test running several jobs in one set of
    # processes) keeps it: destroying and re-creating the default group on the same store can hang.
    owns_group = not torch.distributed.is_initialized()
    env = aitm_dist.setup()
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"[rank{env.rank}] %(asctime)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        summary = run(cfg, env, resume=not args.no_resume).to_dict()
    finally:
        if owns_group:
            aitm_dist.teardown()
    if env.is_main:
        brief = {"eval": summary["eval"], "train": {k: summary["train"][k] for k in ("steps", "examples", "examples_per_s")},
                 "world_size": summary["world_size"], "summary": os.path.join(cfg.model_dir, "summary.json")}
        print(json.dumps(brief, indent=2))
    return summary


if __name__ == "__main__":
    main()
