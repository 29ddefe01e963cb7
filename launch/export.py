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
from pathlib import Path

# Runs as a script under torchrun: make the repository importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

SUBCOMMANDS = {
    "embeddings": ("aitm_torchrec.export_embeddings", "embedding tables -> Parquet (or npy), streamed per shard"),
    "model": ("aitm_torchrec.export_model", "TorchScript serving model with quantized tables"),
}


@record
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Export a trained model's tables or a serving model.")
    sub = p.add_subparsers(dest="what", required=True)
    # Only the chosen subcommand's module is imported: each is heavy, and may be absent.
    chosen = next((a for a in (sys.argv[1:] if argv is None else argv) if a in SUBCOMMANDS), None)
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
    args = p.parse_args(argv)
    return module.main(args)


if __name__ == "__main__":
    main()
