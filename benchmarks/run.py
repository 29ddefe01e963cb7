"""Benchmarks, each a subcommand printing one JSON object: ``python -m benchmarks SUBCOMMAND ...``
(or ``python benchmarks/run.py SUBCOMMAND ...`` with the project installed).

One module per subject, each with ``HELP``, ``add_arguments(parser)`` and ``cmd(args)``:

- ``data``: Parquet -> ready batches rows/s per core, beside training examples/s (``data.py``);
- ``train``: the whole trainer on gloo ranks against the dense GEMM roofline (``train.py``,
  ``roofline.py``);
- ``export``: table export rows/s and peak RSS per rank, one huge table (``export.py``);
- ``score``: batch scoring examples/s beside training examples/s (``score.py``);
- ``serve``: serving artefact latency, throughput and size per quantization (``serve.py``);
- ``zch``: large id features hashed vs as zch tables (``zch.py``);
- ``quality``: one-epoch AUC of every model against the synthetic data's oracle (``quality.py``);
- ``peer``: a plain PyTorch AITM beside this trainer (``peer.py``);
- ``all``: the benchmarks above into one folder, JSON, Markdown and PNG (``all.py``);
- ``study``: named config settings x seeds, one epoch each (``study.py``);
- ``family``: settings x the synthetic family's presets x seeds, and the worst-case choice (``family.py``);
- ``eval_memory``: the eval metrics' peak RSS per rank, binned AUC beside exact (``eval_memory.py``);
- ``true_form``: what one pass of the generator's own model reaches (``true_form.py``).

Benchmarks, not tests: they print numbers and assert nothing.
"""

from __future__ import annotations

import argparse

from benchmarks import all as all_benchmarks
from benchmarks import data, eval_memory, export, family, peer, quality, score, serve, study, train, true_form, zch

# The benchmarks ``all`` may run, in the order of ``--help``; another benchmark plugs in with one
# line here (and one in ``all.PLAN``).
BENCHMARKS = {"data": data, "train": train, "export": export, "score": score, "serve": serve, "zch": zch,
              "quality": quality, "peer": peer}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="Benchmarks that print JSON.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, module in BENCHMARKS.items():
        s = sub.add_parser(name, help=module.HELP)
        module.add_arguments(s)
        s.set_defaults(fn=module.cmd)
    a = sub.add_parser("all", help=all_benchmarks.HELP)
    all_benchmarks.add_arguments(a)
    a.set_defaults(fn=lambda args: all_benchmarks.cmd(args, set(BENCHMARKS), main))
    s = sub.add_parser("study", help=study.HELP)
    study.add_arguments(s)
    s.set_defaults(fn=study.cmd)
    f = sub.add_parser("family", help=family.HELP)
    family.add_arguments(f)
    f.set_defaults(fn=family.cmd)
    e = sub.add_parser("eval_memory", help=eval_memory.HELP)
    eval_memory.add_arguments(e)
    e.set_defaults(fn=eval_memory.cmd)
    t = sub.add_parser("true_form", help=true_form.HELP, description=true_form.DESCRIPTION)
    true_form.add_arguments(t)
    t.set_defaults(fn=true_form.cmd)
    return p


def main(argv: list[str] | None = None):
    args = parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    main()
