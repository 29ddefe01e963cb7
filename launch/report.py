"""Print a run's results: ``python -m launch.report runs/<name>/summary.json``.

Per-task AUC / logloss / calibration (and GAUC where configured) on the eval set, training examples/s, world size; and, when
the data directory has the synthetic generator's ``_SUCCESS``, the oracle AUC beside each task.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("summary", help="summary.json written by launch/train.py")
    p.add_argument("--oracle", help="_SUCCESS file of a synthetic data set (default: data/taobao_synth/_SUCCESS)",
                   default="data/taobao_synth/_SUCCESS")
    p.add_argument("--scores", help="a batch-scoring output directory (launch/score.py --metrics) to report too")
    args = p.parse_args(argv)
    path = Path(args.summary)
    if not path.exists():
        raise SystemExit(f"{path}: no summary (did training finish?)")
    s = json.loads(path.read_text())
    oracle_path = Path(args.oracle)
    oracle = json.loads(oracle_path.read_text()).get("oracle_eval_auc", {}) if oracle_path.exists() else {}
    labels = {t["tower_name"]: t["label_name"] for t in s.get("towers", [])}
    gauc = any("gauc" in m for m in s["eval"].values())
    print(f"{'task':<10}{'AUC':>8}{'logloss':>10}{'calib':>8}{'oracle AUC':>12}" + (f"{'GAUC':>8}" if gauc else ""))
    for tower, m in s["eval"].items():
        o = oracle.get(labels.get(tower, ""), float("nan"))
        print(f"{tower:<10}{m['auc']:>8.4f}{m['logloss']:>10.4f}{m['calibration']:>8.3f}{o:>12.4f}"
              + (f"{m.get('gauc', float('nan')):>8.4f}" if gauc else ""))
    t = s["train"]
    print(f"train: {t['steps']} steps, {t['examples']:,} examples, {t['examples_per_s']:,.0f} examples/s "
          f"on world size {s['world_size']} ({s.get('device', '?')})")
    if args.scores:
        manifest_path = Path(args.scores) / "manifest.json"
        if not manifest_path.exists():
            raise SystemExit(f"{manifest_path}: no manifest (did scoring finish?)")
        m = json.loads(manifest_path.read_text())
        aucs = ", ".join(f"{tower} AUC {v['auc']:.4f}" + (f" GAUC {v['gauc']:.4f}" if "gauc" in v else "")
                         for tower, v in (m.get("metrics") or {}).items())
        print(f"scores: {m['rows']:,} rows in {len(m['parts'])} parts under {args.scores} "
              f"(checkpoint step {m['checkpoint']['step']}){'; from the scores: ' + aucs if aucs else ''}")


if __name__ == "__main__":
    main()
