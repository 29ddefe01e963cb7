"""``python -m benchmarks all --out benchmarks/results``: every benchmark, one after another, into
one folder.

``PLAN`` is the table of subcommands with the arguments ``all`` gives each; a subcommand that
this checkout's ``python -m benchmarks`` does not have is skipped, so a new benchmark plugs in with
one line. Each result goes to ``OUT/<name>.json``; ``OUT/results.md``
gathers the Markdown tables, ``OUT/quality.png`` and ``OUT/speed.png`` the plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from aitm_torchrec.files import write_text_atomic
from benchmarks import quality
from benchmarks.common import save_figure

# name -> arguments for ``python -m benchmarks NAME`` (``{out}``: the output folder, ``{quick}``: --quick).
PLAN: list[tuple[str, list[str], list[str]]] = [
    # (subcommand, arguments, arguments with --quick)
    ("train", ["--steps", "150"], ["--steps", "30", "--bare-steps", "20", "--no-big-tables"]),
    ("peer", [], ["--rows", "100000", "--speed-steps", "4", "--big-table-rows", "2000000"]),
    ("data", [], ["--rows", "200000", "--train-steps", "5"]),
    ("quality", ["--out", "{out}/quality", "--headline-rows", "2000000"],
     ["--out", "{out}/quality", "--rows", "20000", "--eval-rows", "5000", "--seeds", "1",
      "--models", "AITM,AITM 3-step", "--sequential-dependence", "0"]),
    ("score", [], ["--rows", "20000", "--steps", "3", "--no-big-tables"]),
    ("export", [], ["--table-rows", "200000", "--chunk-rows", "50000"]),
    ("serve", [], ["--iters", "10"]),
    ("zch", [], ["--rows", "20000", "--eval-rows", "5000", "--vocab", "50000", "--table-size", "2000",
                 "--steps", "10"]),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--only", help="comma-separated subcommands (default: all that exist)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, not the figures")
    p.add_argument("--render-only", action="store_true",
                   help="run nothing: rebuild results.md and speed.png from the OUT/<name>.json already there")


def machine() -> dict:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.is_available()}


HELP = "every benchmark above; JSON, Markdown and PNG under --out"


def cmd(args: argparse.Namespace, available, run) -> dict:
    """Runs the ``PLAN`` entries named in ``available`` (and ``--only``) through ``run(argv) -> dict``
    (``benchmarks.run.main``)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    results: dict[str, dict] = {"machine": machine(), "command": " ".join(["python -m benchmarks"] + sys.argv[1:])}
    for name, argv, quick in PLAN:
        if name not in available or (only and name not in only):
            continue
        if args.render_only:
            if (out / f"{name}.json").exists():
                results[name] = json.loads((out / f"{name}.json").read_text())
            continue
        argv = [a.format(out=out) for a in (quick if args.quick else argv)]
        t0 = time.perf_counter()
        print(f"== benchmarks {name} {' '.join(argv)}", file=sys.stderr, flush=True)
        results[name] = run([name, *argv])
        write_text_atomic(out / f"{name}.json", json.dumps(results[name], indent=1) + "\n")
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    write_text_atomic(out / "results.md", markdown(results))
    if "peer" in results or "train" in results:
        speed_plot(results, out / "speed.png")
    write_text_atomic(out / "all.json", json.dumps({k: v for k, v in results.items()}, indent=1) + "\n")
    return results


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Benchmarks\n\n`{results['command']}` on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
             f"torch {m['torch']}, CUDA {m['cuda']}.\n"]
    if t := results.get("train"):
        lines += ["## train\n", "| batch per rank | examples/s | roofline | ratio | bare pipeline ratio | big tables / small |",
                  "|---|---|---|---|---|---|",
                  f"| {t['batch_size']} | {t['examples_per_s']:,} | {t['roofline_examples_per_s']:,} | "
                  f"{t['ratio_to_roofline']} | {t.get('bare_pipeline', {}).get('ratio_to_roofline', '-')} | "
                  f"{t.get('big_tables', {}).get('ratio_to_small_tables', '-')} |", "",
                  f"CPU taken by other processes during the run: {t['cpu_during_run']['other_processes_cpu_s']} s "
                  f"of {t['cpu_during_run']['wall_s']} s wall x {t['cpu_during_run']['cores']} cores.", ""]
        runs = [("seed tables", t)] + ([("big tables", t["big_tables"])] if "big_tables" in t else [])
        if all("memory" in r for _, r in runs):
            lines += ["| tables | rows in all | examples/s | rank | peak RSS GiB | its shards GiB (weights + rowwise state) |",
                      "|---|---|---|---|---|---|"]
            for name, r in runs:
                for m in r["memory"]:
                    lines.append(f"| {name} | {r['table_rows_total']:,} | {r['examples_per_s']:,} | {m['rank']} | "
                                 f"{m['peak_rss_gib']} | {m['shards_gib']} |")
            lines.append("")
    if (p := results.get("peer")) and "speed" in p:
        s = p["speed"]
        lines += ["## peer (plain PyTorch AITM)\n", "| tables | rows in all | peer examples/s | ours examples/s | ours / peer |",
                  "|---|---|---|---|---|"]
        for k in ("seed_tables", "big_tables"):
            lines.append(f"| {k} | {s[k]['table_rows_total']:,} | {s[k]['peer_examples_per_s']:,} | "
                         f"{s[k]['ours_examples_per_s']:,} | {s[k]['ratio']} |")
    if p and (q := p.get("quality")):
        lines += ["", f"One epoch over {q['rows']:,} rows, seed {q['seed']}, AUC per task:\n",
                  "| run | " + " | ".join(q["oracle"]) + " |", "|---|" + "---|" * len(q["oracle"])]
        for k, v in q.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | " + " | ".join(f"{v[t]:.4f}" for t in q["oracle"]) + " |")
    lines.append("")
    if d := results.get("data"):
        lines += ["## data\n", f"{d['rows_per_s_per_core']:,} rows/s per core ({d['format']}, {d['ids']} ids); "
                  f"training {d.get('train_examples_per_s', '-')} examples/s; ratio {d.get('data_over_train', '-')}\n"]
    if q := results.get("quality"):
        lines += ["## quality\n", quality.markdown(q["summary"])]
        if h := q.get("headline"):
            lines += [f"Headline, {h['rows']:,} rows:\n", quality.markdown(h["summary"])]
    for name in results:
        if name not in ("machine", "command", "train", "peer", "data", "quality"):
            lines += [f"## {name}\n", "```json", json.dumps(results[name], indent=1)[:4000], "```", ""]
    return "\n".join(lines) + "\n"


def speed_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float]] = []
    if (p := results.get("peer")) and "speed" in p:
        s = p["speed"]
        bars += [("peer\nseed tables", s["seed_tables"]["peer_examples_per_s"]),
                 ("ours\nseed tables", s["seed_tables"]["ours_examples_per_s"]),
                 (f"peer\n{s['big_tables']['table_rows_total'] / 1e6:.0f}M rows", s["big_tables"]["peer_examples_per_s"]),
                 (f"ours\n{s['big_tables']['table_rows_total'] / 1e6:.0f}M rows", s["big_tables"]["ours_examples_per_s"])]
    if t := results.get("train"):
        bars += [("trainer\n(bench train)", t["examples_per_s"]), ("dense\nroofline", t["roofline_examples_per_s"])]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color="#4c72b0")
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("training examples/s")
    ax.set_yscale("log")
    ax.set_title("training speed, same machine, same invocation per pair", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    save_figure(fig, path)
