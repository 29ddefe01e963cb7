"""Export a trained model: ``python launch/export.py embeddings|model --output DIR [...]``.

- ``embeddings``: stream the embedding tables to Parquet (or npy), each rank its own windows
  (``aitm_torchrec/table_export/``); launchable under torchrun / TorchX like training.
- ``model``: a TorchScript serving model with quantized tables, ``schema.json`` and ``meta.json``
  (``aitm_torchrec/export_model.py``); one process.

Each subcommand's flags become a typed options object for its library ``run``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from aitm_torchrec import dist as aitm_dist
from aitm_torchrec import table_export
from aitm_torchrec.config import Config, load_config
from aitm_torchrec.export_model import DENSE_QUANTS, QUANT_DTYPES, ModelExportOptions
from aitm_torchrec.export_model import run as export_model
from aitm_torchrec.table_export import ExportOptions


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a trained model's tables or a serving model.")
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("embeddings", help="embedding tables -> Parquet (or npy), streamed per shard",
                       description="embedding tables -> Parquet (or npy), streamed per shard")
    e.add_argument("--output", required=True, help="output directory")
    e.add_argument("--config", help="YAML config (default: configs/aitm_taobao.yaml)")
    e.add_argument("--checkpoint", help="checkpoint directory (default: newest under model_dir/checkpoints)")
    e.add_argument("--tables", type=_names, default=(), help="comma-separated tables (default: all)")
    e.add_argument("--ids-from", action="append", default=[], metavar="TABLE=PATH:COLUMN",
                   help="raw ids for TABLE from a Parquet file/glob/dir's COLUMN: export one row per distinct id")
    e.add_argument("--format", choices=("parquet", "npy"), default="parquet")
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    e.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows per part file (the memory bound)")
    e.add_argument("--overwrite", action="store_true", help="replace an export of another checkpoint/config")
    e.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    m = sub.add_parser("model", help="TorchScript serving model with quantized tables",
                       description="TorchScript serving model with quantized tables")
    m.add_argument("--output", required=True, help="directory to write (replaced atomically)")
    m.add_argument("--config", help="YAML config (default: the seed's configs/aitm_taobao.yaml)")
    m.add_argument("--checkpoint", help="checkpoints/step_<N> directory (default: the newest under model_dir)")
    m.add_argument("--quant", choices=list(QUANT_DTYPES), default="int8", help="table weights (default int8)")
    m.add_argument("--dense-quant", choices=list(DENSE_QUANTS), default="none",
                   help="Linear layers: int8 = dynamic quantization, FBGEMM, CPU (default none: fp32)")
    m.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return p


def embeddings_options(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(output=Path(args.output), checkpoint=args.checkpoint, tables=args.tables,
                         ids_from=tuple(args.ids_from), format=args.format, dtype=args.dtype,
                         chunk_rows=args.chunk_rows, overwrite=args.overwrite)


def model_options(args: argparse.Namespace) -> ModelExportOptions:
    return ModelExportOptions(output=Path(args.output), checkpoint=args.checkpoint, quant=args.quant,
                              dense_quant=args.dense_quant)


def parse(argv: list[str] | None) -> tuple[str, Config, ExportOptions | ModelExportOptions]:
    """(subcommand, config, options) from the command line."""
    args = parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    return args.what, cfg, (embeddings_options if args.what == "embeddings" else model_options)(args)


@record
def main(argv: list[str] | None = None) -> dict:
    what, cfg, opts = parse(argv)
    if what == "model":
        result = export_model(cfg, opts)
        print(json.dumps(result, indent=2, sort_keys=True))
        return result
    with aitm_dist.job() as env:
        result = table_export.run(cfg, env, opts)
    if env.is_main:
        print(json.dumps({k: result[k] for k in ("output", "parts_written", "parts_skipped", "rows_per_s")}))
    return result


if __name__ == "__main__":
    main()
