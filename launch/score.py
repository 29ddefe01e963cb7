"""Batch scoring: ``python launch/score.py --output DIR [--config FILE] [--checkpoint DIR] [--input PATH ...]``.

Scores Parquet with a trained checkpoint on any world size (one process, torchrun, or
``torchx run dist.ddp -j 1x2 launch/score.py --config F --output DIR``), exactly once per input
row, resumable after a crash. See ``aitm_torchrec/score.py`` and docs/scoring.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from aitm_torchrec import dist as aitm_dist
from aitm_torchrec.config import Config, load_config
from aitm_torchrec.export_model import DENSE_QUANTS
from aitm_torchrec.score import ScoreOptions, run


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def parse(argv: list[str] | None) -> tuple[Config, ScoreOptions]:
    """The config (with overrides) and the options, from the command line."""
    p = argparse.ArgumentParser(description="Score Parquet rows with a trained AITM checkpoint.")
    p.add_argument("--output", required=True, help="output directory (parts, manifest.json, _SUCCESS)")
    p.add_argument("--config", help="YAML config the checkpoint was trained with (default: configs/aitm_taobao.yaml)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the newest complete one under model_dir)")
    p.add_argument("--model", help="a serving artefact (launch/export.py model) to score with instead of a checkpoint")
    p.add_argument("--threads", type=int, default=0, help="with --model: torch threads per process (default: torch's)")
    p.add_argument("--dense-quant", choices=list(DENSE_QUANTS), default="none",
                   help="from a checkpoint: int8 = dynamically quantized Linear layers, CPU (default none: fp32)")
    p.add_argument("--input", nargs="+", default=[], help="Parquet files, globs or directories (default: eval_input_path)")
    p.add_argument("--reserved_columns", type=_columns, default=(),
                   help="input columns copied to the output beside the scores, comma-separated, or ALL")
    p.add_argument("--output_columns", type=_columns, default=("probs",),
                   help="score columns per tower: probs and/or logits (default: probs)")
    p.add_argument("--batch_size", type=int, default=0, help="rows per batch (default: 4 x data_config.batch_size)")
    p.add_argument("--rows_per_part", type=int, default=1_000_000, help="rows per output part (default: 1000000)")
    p.add_argument("--metrics", action="store_true", help="labels present: also compute per-task AUC, logloss, calibration")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory of another job")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = p.parse_args(argv)
    if args.rows_per_part < 1 or args.batch_size < 0:
        p.error("--rows_per_part must be >= 1 and --batch_size >= 0")
    opts = ScoreOptions(output=Path(args.output), inputs=tuple(args.input), checkpoint=args.checkpoint,
                        model=args.model, threads=args.threads, dense_quant=args.dense_quant,
                        reserved_columns=args.reserved_columns, output_kinds=args.output_columns,
                        batch_size=args.batch_size, rows_per_part=args.rows_per_part, metrics=args.metrics,
                        overwrite=args.overwrite)
    return load_config(args.config, args.overrides), opts


@record
def main(argv: list[str] | None = None) -> dict:
    cfg, opts = parse(argv)
    with aitm_dist.job() as env:
        manifest = run(cfg, env, opts)
    if env.is_main:
        brief = {k: manifest[k] for k in ("rows", "rows_scored_this_run", "world_size", "checkpoint", "metrics")}
        brief["output"] = str(opts.output)
        print(json.dumps(brief, indent=2))
    return manifest


if __name__ == "__main__":
    main()
