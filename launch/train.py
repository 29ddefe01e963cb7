"""Train AITM: ``python launch/train.py [--config FILE] [key.path=value ...]``.

Run it under torchrun or TorchX for several processes (see docs/training.md), e.g.
``torchx run dist.ddp -j 1x2 launch/train.py`` from the repository root. Without ``--config`` it
trains the seed's example, ``configs/aitm_taobao.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os

from torch.distributed.elastic.multiprocessing.errors import record

from aitm_torchrec import dist as aitm_dist
from aitm_torchrec.config import Config, load_config
from aitm_torchrec.train import TrainOptions, run


def parse(argv: list[str] | None) -> tuple[Config, TrainOptions]:
    """The config (with overrides) and the options, from the command line."""
    p = argparse.ArgumentParser(description="Train an AITM model from a YAML config.")
    p.add_argument("--config", help="YAML config (default: configs/aitm_taobao.yaml)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in model_dir")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides), TrainOptions(resume=not args.no_resume)


@record
def main(argv: list[str] | None = None) -> dict:
    cfg, opts = parse(argv)
    with aitm_dist.job() as env:
        summary = run(cfg, env, opts).to_dict()
    if env.is_main:
        train = {k: summary["train"][k]
                 for k in ("steps", "resumed_from_step", "steps_this_run", "examples", "examples_per_s")}
        brief = {"eval": summary["eval"], "train": train, "world_size": summary["world_size"],
                 "summary": os.path.join(cfg.model_dir, "summary.json")}
        print(json.dumps(brief, indent=2))
    return summary


if __name__ == "__main__":
    main()
