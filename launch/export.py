"""Export a trained model: ``python launch/export.py embeddings|model --output DIR [...]``.

- ``embeddings``: stream the embedding tables to Parquet, each rank its own shards
  (``aitm_torchrec/export_embeddings.py``); launchable under torchrun / TorchX like training.
- ``model``: a TorchScript serving model with quantized tables, ``schema.json`` and ``meta.json``
  (``aitm_torchrec/export_model.py``); one process.

Each subcommand's module provides ``add_arguments(parser)`` and ``main(args) -> dict``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from torch.distributed.elastic.multiprocessing.errors import record

SUBCOMMANDS = {
    "embeddings": ("aitm_torchrec.export_embeddings", "embedding tables -> Parquet (or npy), streamed per shard"),
    "model": ("aitm_torchrec.export_model", "TorchScript serving model with quantized tables"),
}


@record
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Export a trained model's tables or a serving model.")
    sub = p.add_subparsers(dest="what", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the chosen subcommand's module (and its dependencies)
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(parser)
    args = p.parse_args(argv)
    return modules[args.what].main(args)


if __name__ == "__main__":
    main()
