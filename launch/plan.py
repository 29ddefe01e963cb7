"""Print the sharding plan and per-rank memory for any topology, without running anything.

    python launch/plan.py [--config FILE] --hosts 2 --procs-per-host 8 --device cuda [--hbm-gb 141]
                          [--ddr-gb 512] [--json] [key.path=value ...]

TorchRec's planner only estimates, so a CPU machine can plan a 2-host x 8-GPU job. Storage caps
come from ``--hbm-gb`` / ``--ddr-gb`` (per rank), else ``sharding_config.hbm_cap_gb`` /
``ddr_cap_gb``, else this machine's. Exits non-zero with the planner's reason when nothing fits.
Prints each table (the WIDE groups' ``wide_<feature>`` tables and the task tables
``task_<tower>_<feature>`` of ``model_config.task_embeddings`` among them) with its sharding and the
planner's memory estimate over all its shards, the wide and the task tables' totals, and each
rank's memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings

from aitm_torchrec.config import load_config
from aitm_torchrec.sharding import plan_for_topology

MB_PER_GB = 1024


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Plan table sharding for a topology, without running it.")
    p.add_argument("--config", help="YAML config (default: configs/aitm_taobao.yaml)")
    p.add_argument("--hosts", type=int, default=1)
    p.add_argument("--procs-per-host", type=int, default=2, help="GPUs (or CPU processes) per host")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--hbm-gb", type=float, help="HBM per rank (default: sharding_config.hbm_cap_gb, else 80)")
    p.add_argument("--ddr-gb", type=float, help="host memory per rank (default: sharding_config.ddr_cap_gb, else this host's / procs)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    overrides = list(args.overrides)
    if args.hbm_gb is not None:
        overrides.append(f"sharding_config.hbm_cap_gb={args.hbm_gb}")
    if args.ddr_gb is not None:
        overrides.append(f"sharding_config.ddr_cap_gb={args.ddr_gb}")
    cfg = load_config(args.config, overrides)
    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    try:
        result = plan_for_topology(cfg, args.hosts, args.procs_per_host, args.device)
    except Exception as e:  # the planner's PlannerError says which tables do not fit
        raise SystemExit(f"no plan for {args.hosts} x {args.procs_per_host} {args.device}: {e}") from None
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    t = result["topology"]
    print(f"plan for {t['hosts']} host(s) x {t['procs_per_host']} {t['compute_device']} = {t['world_size']} ranks "
          f"(caps per rank: HBM {t['hbm_cap_gb']:.1f} GB, DDR {t['ddr_cap_gb']:.1f} GB)")
    w = max([24] + [len(n) + 2 for n in result["tables"]])  # task tables' names run long
    print(f"{'table':<{w}}{'sharding':<20}{'kernel':<20}{'HBM MB':>10}{'DDR MB':>10}  ranks")
    for name, tp in sorted(result["tables"].items()):
        ranks = tp["ranks"]
        shown = ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"
        memory = f"{tp['hbm_gb'] * MB_PER_GB:>10.1f}{tp['ddr_gb'] * MB_PER_GB:>10.1f}" if "hbm_gb" in tp \
            else f"{'-':>10}{'-':>10}"  # zch tables: no planner estimate
        print(f"{name:<{w}}{tp['sharding_type']:<20}{tp['compute_kernel']:<20}{memory}  {shown}")
    for kind, label in (("wide", "wide tables (WIDE feature groups)"), ("task", "task tables (task_embeddings)")):
        some = [tp for tp in result["tables"].values() if tp.get(kind)]
        if some:
            hbm, ddr = (sum(t.get(k, 0.0) for t in some) * MB_PER_GB for k in ("hbm_gb", "ddr_gb"))
            print(f"{label}: {len(some)}, HBM {hbm:.1f} MB, DDR {ddr:.1f} MB in all")
    print(f"{'rank':<6}{'HBM GB':>10}{'DDR GB':>10}  tables")
    for r in result["ranks"]:
        print(f"{r['rank']:<6}{r['hbm_gb']:>10.3f}{r['ddr_gb']:>10.3f}  {len(r['tables'])}")
    return result


if __name__ == "__main__":
    main()
