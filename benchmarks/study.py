"""``python -m benchmarks study``: named config settings x seeds, one epoch each on one generated
set, through ``quality.one_epoch``; a JSON line per run as it finishes, and with ``--out`` every
run's record in one JSON file (kept: a rerun skips the runs already there). The settings file is
``{name: [key.path=value, ...]}``; the studies under ``benchmarks/studies/`` are such files with
their results.

    python -m benchmarks study --data data/q2m --seeds 1,2,3 --settings benchmarks/studies/tags_mean.json \
        --out benchmarks/studies/tags_mean.results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aitm_torchrec.files import write_text_atomic
from benchmarks.quality import one_epoch

HELP = "named override sets x seeds, one epoch each"

# The settings run without --settings: the config as it is.
STUDY: dict[str, list[str]] = {
    "seed": [],
}


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", default=None)
    s.add_argument("--data", default="data/q2m")
    s.add_argument("--seeds", default="1,2,3")
    s.add_argument("--batch-size", type=int, default=0)
    s.add_argument("--settings", help="JSON file {name: [overrides]} (default: STUDY)")
    s.add_argument("--only", help="comma-separated setting names")
    s.add_argument("--out")


def cmd(args: argparse.Namespace) -> dict:
    """Named override sets x seeds on one data set; JSON lines as they finish, a summary at the end."""
    settings = json.loads(Path(args.settings).read_text()) if args.settings else STUDY
    if args.only:
        settings = {k: v for k, v in settings.items() if k in args.only.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out) if args.out else None
    results = json.loads(out.read_text()) if out and out.exists() else {}
    for name, overrides in settings.items():
        for seed in seeds:
            key = f"{name}@{seed}@{args.batch_size}@{Path(args.data).name}"
            if key in results:
                continue
            r = one_epoch(args.config, Path(args.data), overrides + [f"train_config.seed={seed}"],
                          batch_size=args.batch_size)
            r.update(setting=name, seed=seed, overrides=overrides)
            results[key] = r
            print(json.dumps({"key": key, "auc": r["auc"], "gap": r["gap"], "s": r["seconds"]}), flush=True)
            if out:
                write_text_atomic(out, json.dumps(results, indent=1))
    return results

