"""``python -m benchmarks quality``: one-epoch quality of this project's models against the
synthetic data's oracle.

``one_epoch(config, data, overrides, nproc)`` trains a config for exactly one pass over
``data/train`` on ``nproc`` local gloo ranks through ``aitm_torchrec.train.run`` (the real
trainer: sharded tables, fused table optimizer, TrainPipelineSparseDist), evaluates on
``data/eval`` and returns per-task AUC beside the oracle AUC that ``datasets/synthetic.py``
recorded in ``data/_SUCCESS``. The ``quality`` subcommand runs ``GRID`` (every model) x seeds
through it and writes OUT.json, OUT.md and OUT.png; ``benchmarks/study.py`` runs named settings
through it.

    python -m benchmarks quality [--rows 500000] [--seeds 1,2,3] [--headline-rows 2000000]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aitm_torchrec.files import write_text_atomic
from benchmarks.common import REPO, generated, save_figure, split_name, train_rank

HELP = "one-epoch AUC of every model vs the oracle, seeds, JSON/MD/PNG"
EVAL_ROWS = 100_000  # the eval split's rows unless --eval-rows says otherwise


def oracle(data: Path) -> dict[str, float]:
    """The oracle eval AUC per label, as the generator recorded it."""
    return json.loads((Path(data) / "_SUCCESS").read_text())["oracle_eval_auc"]


def train_rows(data: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted((Path(data) / "train").glob("*.parquet")))


def one_epoch(config: str | None, data: Path, overrides: list[str] = (), nproc: int = 2,
              threads: int = 1, batch_size: int = 0) -> dict:
    """Trains ``config`` for one epoch over ``data/train`` on ``nproc`` ranks; returns
    {"auc": {tower: auc}, "oracle": {tower: auc}, "gap": {tower: oracle - auc}, "steps",
    "examples_per_s", "seconds"}. ``overrides`` are applied before the data/epoch settings."""
    from aitm_torchrec.config import load_config
    from aitm_torchrec.dist import run_local

    data = Path(data)
    model_dir = Path(tempfile.mkdtemp(prefix="quality_"))
    base = list(overrides) + [f"train_input_path=[{data / 'train'}]", f"eval_input_path=[{data / 'eval'}]",
                              f"model_dir={model_dir}", "train_config.save_checkpoints_steps=0"]
    if batch_size:
        base.append(f"data_config.batch_size={batch_size}")
    cfg = load_config(config, base)
    bs = cfg.data_config.batch_size
    steps = math.ceil(math.ceil(train_rows(data) / nproc) / bs)
    base += [f"train_config.num_steps={steps}", f"train_config.log_step_count_steps={steps}"]
    t0 = time.perf_counter()
    try:
        summary = run_local(train_rank, config, base, nproc=nproc, threads=threads)[0]
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    truth = oracle(data)
    labels = {t.tower_name: t.label_name for t in cfg.schema.tasks}
    auc = {t: summary["eval"][t]["auc"] for t in labels}
    return {"auc": auc, "oracle": {t: truth[labels[t]] for t in labels},
            "gap": {t: truth[labels[t]] - auc[t] for t in labels},
            "steps": steps, "batch_size": bs, "world_size": nproc,
            "examples_per_s": summary["train"]["examples_per_s"], "seconds": round(time.perf_counter() - t0, 1)}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, population standard deviation)."""
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


# name -> (config, overrides, data kind): every model on the same tables and budget.
GRID: dict[str, tuple[str, list[str], str]] = {
    "AITM": ("configs/aitm_taobao.yaml", [], "2step"),
    "AITM no calibrator": ("configs/aitm_taobao.yaml",
                           ["model_config.model_params.task_towers.1.losses=[{loss_type: CLASSIFICATION}]"], "2step"),
    "AITM cross attention": ("configs/aitm_taobao.yaml", ["model_config.model_params.ait_attention=cross"], "2step"),
    "ESMM": ("configs/esmm_taobao.yaml", [], "2step"),
    "MMoE": ("configs/mmoe_taobao.yaml", [], "2step"),
    "SharedBottom": ("configs/shared_bottom_taobao.yaml", [], "2step"),
    "DBMTL": ("configs/dbmtl_taobao.yaml", [], "2step"),
    "PLE": ("configs/ple_taobao.yaml", [], "2step"),
    "AITM 3-step": ("configs/aitm_3step.yaml", [], "3step"),
}
# Models also run on the sequentially dependent data (--sequential-dependence), where a later
# step is carried by the earlier step's hidden state.
SEQUENTIAL = ["AITM", "ESMM", "MMoE", "SharedBottom", "DBMTL"]


def ensure_data(root: Path, rows: int, eval_rows: int, labels: str, dependence: float = 0.0, seed: int = 0) -> Path:
    """The generated set of these labels, rows, dependence and seed under ``root``
    (``common.generated``); a split other than ``EVAL_ROWS`` gets its own directory."""
    name = split_name(f"quality_{labels.replace(',', '_')}_{rows}_d{dependence:g}_s{seed}", eval_rows, EVAL_ROWS)
    return generated(Path(root) / name, rows, eval_rows, ["--labels", labels, "--files", "2", "--row-group-size",
                                                         "65536", "--seed", str(seed), "--sequential-dependence",
                                                         str(dependence)])


def grid(rows: int, eval_rows: int, seeds: list[int], data_root: Path, dependence: float,
         names: list[str] | None = None, overrides: list[str] = (), nproc: int = 2, batch_size: int = 0,
         log=print, sequential_models: list[str] | None = None) -> list[dict]:
    """Every grid entry x seed, one epoch each; one record per run."""
    sets = {"2step": ensure_data(data_root, rows, eval_rows, "clk,buy"),
            "3step": ensure_data(data_root, rows, eval_rows, "clk,cart,buy")}
    if dependence:
        sets["2step_seq"] = ensure_data(data_root, rows, eval_rows, "clk,buy", dependence)
    runs = [(n, *GRID[n]) for n in (names or GRID)]
    if dependence:
        runs += [(n, GRID[n][0], GRID[n][1], "2step_seq") for n in (sequential_models or SEQUENTIAL)
                 if not names or n in names]
    records = []
    for name, config, extra, kind in runs:
        for seed in seeds:
            r = one_epoch(str(REPO / config), sets[kind], list(overrides) + extra + [f"train_config.seed={seed}"],
                          nproc=nproc, batch_size=batch_size)
            r.update(model=name, data=kind, seed=seed)
            records.append(r)
            log(json.dumps({k: r[k] for k in ("model", "data", "seed", "auc", "oracle", "gap", "seconds")}))
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per (model, data): per task mean and spread of AUC and of the gap to the oracle."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        rows.setdefault((r["model"], r["data"]), []).append(r)
    out = []
    for (model, data), rs in rows.items():
        tasks = list(rs[0]["auc"])
        entry = {"model": model, "data": data, "seeds": [r["seed"] for r in rs], "tasks": {}}
        for t in tasks:
            auc, sd = mean_spread([r["auc"][t] for r in rs])
            gap, gsd = mean_spread([r["gap"][t] for r in rs])
            entry["tasks"][t] = {"auc": round(auc, 4), "auc_std": round(sd, 4), "gap": round(gap, 4),
                                 "gap_std": round(gsd, 4), "oracle": round(rs[0]["oracle"][t], 4)}
        out.append(entry)
    return out


DATA_NAMES = {"2step": "clk→buy", "3step": "clk→cart→buy", "2step_seq": "clk→buy, sequential"}


def markdown(summary: list[dict]) -> str:
    lines = ["| model | data | seeds | per task AUC (mean ± std) | distance to oracle AUC |", "|---|---|---|---|---|"]
    for e in summary:
        aucs = ", ".join(f"{t} {v['auc']:.4f} ± {v['auc_std']:.4f}" for t, v in e["tasks"].items())
        gaps = ", ".join(f"{t} {v['gap']:.4f}" for t, v in e["tasks"].items())
        lines.append(f"| {e['model']} | {DATA_NAMES.get(e['data'], e['data'])} | {len(e['seeds'])} | {aucs} | {gaps} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str) -> None:
    """Distance to the oracle AUC per model and task (bars: mean over seeds, whiskers: std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    labels = [f"{e['model']}\n{DATA_NAMES.get(e['data'], e['data'])}" for e in summary]
    width = 0.27
    for i, e in enumerate(summary):
        tasks = list(e["tasks"].items())
        for j, (t, v) in enumerate(tasks):
            x = i + (j - (len(tasks) - 1) / 2) * width
            ax.bar(x, v["gap"], width * 0.95, yerr=v["gap_std"], capsize=2,
                   color=["#4c72b0", "#dd8452", "#55a868"][min(j, 2)], label=f"step {j + 1}" if i == 0 or
                   (j == 2 and not any(len(s["tasks"]) > 2 for s in summary[:i])) else None)
            ax.text(x, v["gap"], t, ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(summary)), labels, fontsize=7)
    ax.set_ylabel("oracle AUC − AUC (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--rows", type=int, default=500_000, help="training rows of each generated set (one epoch)")
    q.add_argument("--eval-rows", type=int, default=EVAL_ROWS)
    q.add_argument("--seeds", default="1,2,3", help="training seeds (init and data order)")
    q.add_argument("--models", help=f"comma-separated subset of: {', '.join(GRID)}")
    q.add_argument("--sequential-dependence", type=float, default=0.7,
                   help="also run the main models on data with this dependence; 0: skip")
    q.add_argument("--sequential-models", default=",".join(SEQUENTIAL), help="models run on the sequential set")
    q.add_argument("--batch-size", type=int, default=0, help="per rank; 0: the configs' (4096)")
    q.add_argument("--world-size", type=int, default=2)
    q.add_argument("--data-root", default=str(REPO / "data"), help="where generated sets live")
    q.add_argument("--headline-rows", type=int, default=0,
                   help="also train the seed config (AITM) for one epoch over this many rows (e.g. 2000000)")
    q.add_argument("--out", default="benchmarks/results/quality", help="writes OUT.json, OUT.md and OUT.png")
    q.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides for every run")


def cmd(args: argparse.Namespace) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.models.split(",") if args.models else None
    bad = [n for n in names or [] if n not in GRID]
    if bad:
        raise SystemExit(f"unknown --models {bad}; choose from {list(GRID)}")
    t0 = time.perf_counter()
    records = grid(args.rows, args.eval_rows, seeds, Path(args.data_root), args.sequential_dependence, names,
                   args.overrides, args.world_size, args.batch_size, log=lambda m: print(m, file=sys.stderr),
                   sequential_models=args.sequential_models.split(","))
    summary = summarize(records)
    result = {"benchmark": "quality", "rows": args.rows, "eval_rows": args.eval_rows, "seeds": seeds,
              "world_size": args.world_size, "sequential_dependence": args.sequential_dependence,
              "overrides": list(args.overrides), "summary": summary, "runs": records}
    if args.headline_rows:
        data = ensure_data(Path(args.data_root), args.headline_rows, args.eval_rows, "clk,buy")
        head = [one_epoch(str(REPO / GRID["AITM"][0]), data, list(args.overrides) + [f"train_config.seed={s}"],
                          nproc=args.world_size, batch_size=args.batch_size) for s in seeds]
        for s, h in zip(seeds, head):
            h.update(model="AITM", data="2step", seed=s)
        result["headline"] = {"rows": args.headline_rows, "summary": summarize(head), "runs": head}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    write_text_atomic(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    md = (f"One epoch over {args.rows:,} rows per set, batch {records[0]['batch_size']} per rank x "
          f"{args.world_size} ranks, seeds {args.seeds}; sequential set: --sequential-dependence "
          f"{args.sequential_dependence:g}.\n\n" + markdown(summary))
    if args.headline_rows:
        md += f"\nHeadline, one epoch over {args.headline_rows:,} rows:\n\n" + markdown(result["headline"]["summary"])
    write_text_atomic(out.with_suffix(".md"), md)
    plot(summary, out.with_suffix(".png"), f"distance to the oracle AUC after one epoch ({args.rows:,} rows, "
         f"{len(seeds)} seeds, mean ± std)")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return result
