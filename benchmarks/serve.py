"""``python -m benchmarks serve``: the serving artefact (``launch/export.py model``) of a config
(default the seed's, real table sizes) trained for ``--train-steps`` steps on one gloo process (a
real checkpoint, weights barely trained: latency and size do not depend on them), exported once
per quantization (none/fp32, int8, fp16, int4). In this process with
``torch.set_num_threads(1)`` and pyarrow on one thread: latency p50/p99 of batches of 1, 64,
128 and 512 candidates, (a) the scripted model on pre-built input dicts and (b) end to end, raw Arrow rows
through ``Predictor.predict_arrow`` (id hashing, normalisation, model); candidates/s of (a) and
(b) at each batch size (= B / mean latency); artefact sizes in bytes and as a fraction of fp32;
probabilities' mean/max absolute difference from the fp32 artefact on 4096 eval rows. Rows: the
synthetic eval set of ``data`` (``--string-ids`` for string ids and "|"-joined tags). Goals, end
to end on one core: at 512 candidates p50 at most 4 ms and p99 at most 8 ms, at 1 candidate p99 at
most 2 ms; int8 at most 30% of the fp32 size. ``--quants`` picks the
table quantizations (the fp32 export is always made: the reference); ``--dense-quant int8`` exports with int8 Linear layers (``launch/export.py
model --dense-quant``), ``both`` each table quantization twice (keys ``<quant>`` and
``<quant>+dense_int8``), for the dense layers' speed and accuracy beside fp32 ones. The
Predictor runs in the precision each artefact records (the config's
``train_config.mixed_precision``, ``auto`` by default: bf16 on a CPU with AMX for batches of 128+
rows, on the Linears' packed weights) or ``--precision``; each entry says which ("precision",
"packed_bf16_layers"). With several precisions (``--precision auto,none``) every export runs in
each, keyed ``<export> <precision>``: the bf16 / fp32 ratio inside one run. "diff vs fp32" is
against the fp32-table export in that precision.

    python -m benchmarks serve [--iters 200] [--string-ids] [--train-steps 2] [--quants none,int8]
                               [--dense-quant none|int8|both] [--precision auto|none|bf16[,...]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, add_overrides, generated_set

HELP = "serving artefact latency, throughput and size per quantization"
BATCHES = (1, 64, 128, 512)  # candidates per call
PRECISIONS = ("auto", "none", "bf16")


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", help="YAML config (default: the seed's, real table sizes)")
    s.add_argument("--data", help="data directory (default data/bench_serve_<ids>; generated if missing)")
    s.add_argument("--string-ids", action="store_true", help="string ids and '|'-joined tags")
    s.add_argument("--train-steps", type=int, default=2, help="training steps before the export")
    s.add_argument("--iters", type=int, default=200, help="timed calls per batch size")
    s.add_argument("--quants", default="none,int8,fp16,int4",
                   help="table quantizations to export, comma-separated (none, the fp32 reference, always)")
    s.add_argument("--dense-quant", choices=("none", "int8", "both"), default="none",
                   help="Linear layers of the exports: fp32, int8, or each export both ways")
    s.add_argument("--precision", type=_precisions, default=None,
                   help="the Predictor's precision, auto, none or bf16, or several comma-separated: each "
                        "export measured in each (default: what the artefact records, the config's "
                        "train_config.mixed_precision; auto: bf16 on a CPU with AMX)")
    add_overrides(s)


def _precisions(text: str) -> list[str]:
    """``--precision``'s value, auto, none or bf16, one or several comma-separated -> the list."""
    values = [x.strip() for x in text.split(",")]
    for x in values:
        if x not in PRECISIONS:
            raise argparse.ArgumentTypeError(f"precision {x!r} is not one of {', '.join(PRECISIONS)}")
    return values


def _train_one(config: str | None, overrides: list[str]) -> dict:
    """``launch/train.py`` in a spawned single-rank process (a checkpoint for ``serve``)."""
    from launch.train import main as train_main

    return train_main((["--config", config] if config else []) + overrides)


def _latency_ms(fn, iters: int, warmup: int = 10) -> dict:
    """p50/p99/mean milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` calls."""
    import numpy as np

    for _ in range(warmup):
        fn()
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3),
            "mean": round(float(ms.mean()), 3)}


def cmd(args: argparse.Namespace) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from aitm_torchrec.dist import quiet_libraries, run_local
    from launch.export import main as export_main

    quiet_libraries()
    kind = "string" if args.string_ids else "int64"
    data = Path(args.data or REPO / "data" / f"bench_serve_{kind}")
    train = generated_set(data, 20_000, args.string_ids, 4096, 1)
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        overrides = [f"train_input_path=[{train}]", "eval_input_path=[]", f"model_dir={work / 'run'}",
                     f"train_config.num_steps={args.train_steps}", *args.overrides]
        run_local(_train_one, args.config, overrides, nproc=1, threads=1)
        sizes, exports = {}, {}
        dense = {"none": ["none"], "int8": ["int8"], "both": ["none", "int8"]}[args.dense_quant]
        quants = ["none"] + [q for q in (q.strip() for q in args.quants.split(",")) if q and q != "none"]
        for q in quants:  # "none" (fp32 tables and Linears) first: the reference
            for d in (["none", *dense] if q == "none" else dense):
                key = q if d == "none" else f"{q}+dense_int8"
                if key in exports:
                    continue
                out = work / key
                export_main(["model", "--output", str(out), "--quant", q, "--dense-quant", d,
                             *(["--config", args.config] if args.config else []), *overrides])
                sizes[key] = (out / "scripted_model.pt").stat().st_size
                exports[key] = out
        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        torch.set_num_threads(1)
        from aitm_torchrec.serving import Predictor

        rows = pq.read_table(data / "eval").slice(0, 4096)
        result = {"benchmark": "serve", "config": str(args.config or "configs/aitm_taobao.yaml"), "ids": kind,
                  "torch_threads": torch.get_num_threads(), "iters": args.iters,
                  "sizes_bytes": sizes, "size_vs_fp32": {q: round(n / sizes["none"], 3) for q, n in sizes.items()},
                  "goal": {"end_to_end_p50_ms_at_512": 4, "end_to_end_p99_ms_at_512": 8,
                           "end_to_end_p99_ms_at_1": 2, "int8_size_vs_fp32": 0.3}, "quant": {}}
        precisions = args.precision or [None]  # None: what each artefact records
        reference: dict = {}  # per precision: the fp32-table export's probabilities
        for (q, path), precision in ((e, x) for x in precisions for e in exports.items()):
            p = Predictor(path, threads=1, precision=precision)
            probs = p.predict_arrow(rows)
            ref = reference.setdefault(precision, probs)
            diff = np.concatenate([np.abs(probs[t] - ref[t]) for t in p.tower_names])
            entry = {"precision": p.precision.describe() + f", batches of {p.bf16_min_rows}+ rows",
                     "packed_bf16_layers": p.packed_layers,
                     "mean_abs_diff_vs_fp32": float(diff.mean()), "max_abs_diff_vs_fp32": float(diff.max())}
            for b in BATCHES:
                batch = rows.slice(0, b)
                inputs = p.inputs_from_arrow(batch)
                model = _latency_ms(lambda: p.predict_inputs(inputs), args.iters)  # noqa: B023
                e2e = _latency_ms(lambda: p.predict_arrow(batch), args.iters)  # noqa: B023
                entry[f"batch_{b}"] = {"model_ms": model, "end_to_end_ms": e2e,
                                       "model_candidates_per_s": round(b / model["mean"] * 1e3),
                                       "end_to_end_candidates_per_s": round(b / e2e["mean"] * 1e3)}
            result["quant"][q if len(precisions) == 1 else f"{q} {precision}"] = entry
        result["cpu_load_1min"] = os.getloadavg()[0]
        result["cores"] = os.cpu_count()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result
