"""``python -m benchmarks family``: settings judged over the family of synthetic data sets.

Every preset of ``datasets.synthetic.PRESETS`` (or ``--presets``) is generated once under
``--data-root`` (``family_<preset>_<labels>_<rows>``, ``_eval<N>`` added for an eval split other than
200,000 rows); each named setting (``--settings``, a JSON
file ``{name: [key.path=value, ...]}``, default: the config as shipped) trains one epoch on it
per seed (``quality.one_epoch``), and the research-style peer (``peer.one_epoch``) trains beside
them. Runs are kept in ``--out`` as they finish (a rerun skips the runs already there).
``--from FILE:SETTING[=LABEL]`` (repeatable) trains nothing: it reports and plots runs that
earlier commands kept, gathered from several results files under the labels given.

The report, per preset and task: the mean AUC of every setting over the seeds, its distance to
the oracle, the best setting for that preset and task, and each setting's distance to it (its
*regret*); and per setting its worst regret over every preset and task. A default that holds on
data nobody tuned on is the setting whose worst regret is smallest (``choice``), not the one with
the best mean on one set.

    python -m benchmarks family --rows 2000000 --seeds 1,2,3 --settings benchmarks/studies/family.json \\
        --out benchmarks/results/family.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from aitm_torchrec.files import write_text_atomic
from benchmarks.common import REPO, add_overrides, generated, save_figure, split_name
from benchmarks.quality import one_epoch, oracle

HELP = "settings x presets of the synthetic family x seeds, one epoch each; worst-case choice"

PEER = "peer"  # the name the research-style peer's runs carry in the results


EVAL_ROWS = 200_000  # the eval split's rows unless --eval-rows says otherwise


def ensure_preset(root: Path, preset: str, rows: int, eval_rows: int, labels: str) -> Path:
    """The preset's generated set under ``root`` (``common.generated``: made once, refused when
    it holds other row counts); a split other than ``EVAL_ROWS`` gets its own directory."""
    name = split_name(f"family_{preset}_{labels.replace(',', '_')}_{rows}", eval_rows, EVAL_ROWS)
    return generated(Path(root) / name, rows, eval_rows, ["--preset", preset, "--labels", labels, "--files", "4",
                                                         "--row-group-size", "65536"])


def run_key(preset: str, setting: str, seed: int, rows: int) -> str:
    """A run's key in a results file: ``preset@setting@seed@rows``."""
    return f"{preset}@{setting}@{seed}@{rows}"


def report(results: dict[str, dict]) -> dict:
    """Per preset and task: mean AUC per setting, oracle, best setting, regrets; per setting its
    worst regret over the family; the worst-case choice among the settings (the peer excluded)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in results.values():
        runs.setdefault((r["preset"], r["setting"]), []).append(r)
    presets = sorted({p for p, _ in runs})
    settings = sorted({s for _, s in runs if s != PEER})
    table: dict[str, dict] = {}
    worst: dict[str, float] = {s: 0.0 for s in settings}
    for preset in presets:
        mine = {s: rs for (p, s), rs in runs.items() if p == preset}
        tasks = list(next(iter(mine.values()))[0]["auc"])
        truth = next(iter(mine.values()))[0]["oracle"]
        per_task = {}
        for task in tasks:
            means = {s: statistics.fmean(r["auc"][task] for r in rs) for s, rs in mine.items()}
            ours = {s: v for s, v in means.items() if s != PEER}
            best = max(ours, key=ours.get) if ours else None
            per_task[task] = {
                "oracle": truth[task], "best": best,
                "auc": {s: round(v, 4) for s, v in means.items()},
                "to_oracle": {s: round(truth[task] - v, 4) for s, v in means.items()},
                "regret": {s: round(ours[best] - v, 4) for s, v in ours.items()},
                "seeds": {s: len(rs) for s, rs in mine.items()},
            }
            for s, v in ours.items():
                if s in worst:
                    worst[s] = max(worst[s], ours[best] - v)
        table[preset] = per_task
    complete = [s for s in settings if all((p, s) in runs for p in presets)]
    choice = min(complete, key=lambda s: worst[s]) if complete else None
    return {"presets": table, "worst_regret": {s: round(v, 4) for s, v in worst.items()}, "choice": choice}


def markdown(rep: dict) -> str:
    """The report as one Markdown table: preset x task rows, each setting's AUC (regret)."""
    settings = sorted(rep["worst_regret"])
    peer = any(PEER in t["auc"] for p in rep["presets"].values() for t in p.values())
    head = ["preset", "task", "oracle", *settings, *([PEER] if peer else []), "best"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, tasks in rep["presets"].items():
        for task, t in tasks.items():
            cells = [f"{t['auc'][s]:.4f} ({t['regret'][s]:+.4f})" if s in t["auc"] else "" for s in settings]
            lines.append("| " + " | ".join([preset, task, f"{t['oracle']:.4f}", *cells,
                                             *([f"{t['auc'].get(PEER, float('nan')):.4f}"] if peer else []),
                                             str(t["best"])]) + " |")
    lines.append("")
    lines.append("worst regret over the family: " + ", ".join(f"{s} {v:.4f}" for s, v in rep["worst_regret"].items())
                 + f"; choice: {rep['choice']}")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", help="comma-separated presets (default: every one of datasets.synthetic.PRESETS)")
    p.add_argument("--rows", type=int, default=2_000_000, help="training rows of each preset's set (one epoch)")
    p.add_argument("--eval-rows", type=int, default=EVAL_ROWS,
                   help="rows of each preset's eval split (a set with another split gets its own directory)")
    p.add_argument("--labels", default="clk,buy", help="the chain; clk,cart,buy with --config configs/aitm_3step.yaml")
    p.add_argument("--config", default=None, help="YAML config (default: the seed's configs/aitm_taobao.yaml)")
    p.add_argument("--seeds", default="1,2,3", help="training seeds")
    p.add_argument("--settings", help="JSON file {name: [key.path=value, ...]} (default: the config as shipped)")
    p.add_argument("--batch-size", type=int, default=0, help="per rank; 0: the config's")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the research-style peer (benchmarks/peer.py) on every preset and seed")
    p.add_argument("--data-root", default=str(REPO / "data"), help="where the generated sets live")
    p.add_argument("--out", help="results JSON (kept: a rerun skips its runs); OUT.md gets the table")
    p.add_argument("--plot", help="PNG: each setting's (and the peer's) distance to the oracle per preset and task")
    p.add_argument("--from", dest="gather", action="append", default=[], metavar="FILE:SETTING[=LABEL]",
                   help="train nothing: report and plot SETTING's runs kept in results FILE, under LABEL "
                        "(repeatable; LABEL peer marks the peer's runs)")
    add_overrides(p, "config overrides for every run")


def cmd(args: argparse.Namespace) -> dict:
    from datasets.synthetic import PRESETS

    presets = [p for p in (args.presets.split(",") if args.presets else PRESETS) if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"--presets: unknown {', '.join(unknown)}; presets: {', '.join(PRESETS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.gather:
        if args.settings or args.out:
            raise SystemExit("--from reports runs already kept: it takes neither --settings nor --out")
        results, labels = gather(args.gather, presets, seeds, args.rows)
        return _report(results, presets, labels, args, None)
    settings = json.loads(Path(args.settings).read_text()) if args.settings else {"shipped": []}
    out = Path(args.out) if args.out else None
    results = json.loads(out.read_text()) if out and out.exists() else {}

    def keep(key: str, record: dict) -> None:
        results[key] = record
        print(json.dumps({"key": key, "auc": record["auc"], "s": record.get("seconds")}), flush=True)
        if out:  # the hours of runs kept so far are either the last file or this one, never half of it
            write_text_atomic(out, json.dumps(results, indent=1))

    for preset in presets:
        data = ensure_preset(Path(args.data_root), preset, args.rows, args.eval_rows, args.labels)
        for seed in seeds:
            for name, overrides in settings.items():
                key = run_key(preset, name, seed, args.rows)
                if key not in results:
                    r = one_epoch(args.config, data, [*args.overrides, *overrides, f"train_config.seed={seed}"],
                                  batch_size=args.batch_size)
                    keep(key, {**r, "preset": preset, "setting": name, "seed": seed, "overrides": overrides})
            key = run_key(preset, PEER, seed, args.rows)
            if args.peer and key not in results:
                keep(key, {**_peer_epoch(args.config, data, seed), "preset": preset, "setting": PEER, "seed": seed})
    return _report(results, presets, [*settings, *([PEER] if args.peer else [])], args, out)


def _report(results: dict, presets: list[str], shown: list[str], args: argparse.Namespace, out: Path | None) -> dict:
    rep = report(results)
    if out:
        write_text_atomic(out.with_suffix(".md"), markdown(rep))
    if args.plot:
        plot(rep, [p for p in presets if p in rep["presets"]], shown, Path(args.plot),
             f"one epoch of {args.rows:,} rows per preset, seeds {args.seeds}")
    print(markdown(rep))
    return rep


def gather(specs: list[str], presets: list[str], seeds: list[int], rows: int) -> tuple[dict, list[str]]:
    """The runs that ``FILE:SETTING[=LABEL]`` specs name, kept by earlier commands, renamed to
    their labels (the order of the specs; two specs may share a label, as the peer's seeds kept
    in two files do); only the presets, seeds and row count asked for."""
    results: dict[str, dict] = {}
    labels: list[str] = []
    truth: dict[str, tuple[str, dict]] = {}  # preset -> (the first spec, its runs' oracle AUCs to 4 places)
    for spec in specs:
        source, sep, name = spec.rpartition(":")
        setting, _, label = name.partition("=")
        label = label or setting
        if not sep or not source or not setting:
            raise SystemExit(f"--from {spec}: expected FILE:SETTING[=LABEL]")
        path = Path(source)
        if not path.is_file():
            raise SystemExit(f"--from {spec}: no results file {path}")
        try:
            kept = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"--from {spec}: {path} is not JSON ({e})") from None
        if not isinstance(kept, dict) or not all(
                isinstance(r, dict) and {"preset", "setting", "seed", "auc", "oracle"} <= r.keys() for r in kept.values()):
            raise SystemExit(f"--from {spec}: {path} is not a results file of `benchmarks family` "
                             "(runs keyed preset@setting@seed@rows, each with its preset, setting, seed, auc and oracle)")
        found = [r for r in kept.values() if r["setting"] == setting]
        if not found:
            names = sorted({str(r["setting"]) for r in kept.values()})
            raise SystemExit(f"--from {spec}: {path} keeps no runs of {setting!r}; it keeps {', '.join(names)}")
        before = len(results)
        for key, r in kept.items():
            if r["setting"] != setting or r["preset"] not in presets or r["seed"] not in seeds \
                    or key != run_key(r["preset"], setting, r["seed"], rows):
                continue
            oracle_auc = {t: round(v, 4) for t, v in r["oracle"].items()}
            first, first_auc = truth.setdefault(r["preset"], (spec, oracle_auc))
            if oracle_auc != first_auc:
                raise SystemExit(f"--from {spec}: its {r['preset']} runs have another oracle AUC than those of "
                                 f"--from {first}: another data set or eval split")
            mine = run_key(r["preset"], label, r["seed"], rows)
            if mine in results:
                raise SystemExit(f"--from {spec}: {r['preset']} seed {r['seed']} is already in {label!r} "
                                 "from an earlier --from")
            results[mine] = {**r, "setting": label}
        if len(results) == before:
            raise SystemExit(f"--from {spec}: {path} keeps no run of {setting!r} on these presets, seeds "
                             f"{','.join(map(str, seeds))} and {rows} rows")
        if label not in labels:
            labels.append(label)
    if PEER in labels:  # the peer's bars go last, as a run that trains them draws them
        labels = [*[x for x in labels if x != PEER], PEER]
    return results, labels


def plot(rep: dict, presets: list[str], settings: list[str], path: Path, title: str) -> None:
    """Grouped bars: each setting's distance to the oracle AUC per preset, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(rep["presets"][presets[0]])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), sharey=True, squeeze=False)
    width = 0.8 / len(settings)
    for ax, task in zip(axes[0], tasks):
        for i, setting in enumerate(settings):
            gaps = [rep["presets"][p][task]["to_oracle"].get(setting, float("nan")) for p in presets]
            counts = {rep["presets"][p][task]["seeds"].get(setting, 0) for p in presets} - {0}
            runs = f" ({min(counts)}-{max(counts)} seeds)" if len(counts) > 1 else ""
            ax.bar([x + (i - (len(settings) - 1) / 2) * width for x in range(len(presets))], gaps, width,
                   label=setting + runs)
        ax.set_xticks(range(len(presets)), presets, rotation=20)
        ax.set_title(f"{task}: distance to the oracle AUC")
    axes[0][0].set_ylabel("oracle AUC - AUC (lower is better)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(settings), 4), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(settings) / 4) + 0.04, 1, 1))
    save_figure(fig, path)


def _peer_epoch(config: str | None, data: Path, seed: int) -> dict:
    """One epoch of the research-style peer on ``data``, as a record like ``one_epoch``'s."""
    from aitm_torchrec.config import load_config
    from benchmarks import peer

    cfg = load_config(config)
    r = peer.one_epoch(cfg, data, seed=seed)
    truth = oracle(data)
    labels = {t.tower_name: t.label_name for t in cfg.schema.tasks}
    return {"auc": r["auc"], "oracle": {t: truth[labels[t]] for t in labels},
            "gap": {t: truth[labels[t]] - r["auc"][t] for t in labels}, "examples_per_s": r.get("examples_per_s")}
