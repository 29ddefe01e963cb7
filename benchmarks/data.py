"""``python -m benchmarks data``: rows/s from Parquet to ready ``Batch``es (KJT + dense + labels)
for a config's schema (default ``configs/aitm_taobao.yaml``, the seed's Taobao schema), in this one
process with the conversion on the calling thread (no prefetch thread, pyarrow single-threaded),
so ``rows_per_s_per_core`` = rows / CPU seconds of the process. Beside it, the training
examples/s of the same config in one process (``TrainPipelineSparseDist`` on pre-read batches,
so data loading is not in it) and the ratio. Generates a synthetic Parquet set
(``datasets/synthetic.py``) under ``--data`` if missing, with int64 ids or, with
``--string-ids``, string ids and "|"-joined tags.

    python -m benchmarks data [--rows 1000000] [--string-ids] [--train-steps 30]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from benchmarks.common import REPO, add_overrides, generated_set, pipeline_examples_per_s

HELP = "Parquet -> KJT batches rows/s, beside training examples/s"


def add_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("--config", help="YAML config whose features/labels to read (default: the seed's)")
    d.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated set")
    d.add_argument("--string-ids", action="store_true", help="string ids and '|'-joined tags")
    d.add_argument("--data", help="data directory (default data/bench_taobao_<ids>_<rows>; generated if missing)")
    d.add_argument("--batch-size", type=int, default=0, help="0: the config's data_config.batch_size")
    d.add_argument("--row-group-size", type=int, default=65536)
    d.add_argument("--files", type=int, default=4)
    d.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True)
    d.add_argument("--csv", action="store_true", help="read the same rows as EasyRec CSV (data/csv_input.py)")
    d.add_argument("--repeats", type=int, default=2, help="timed epochs; the fastest is reported")
    d.add_argument("--train-steps", type=int, default=30, help="timed training steps; 0: skip training")
    add_overrides(d)


def _ensure_csv(train: Path, columns: list[str]):
    """The Parquet rows of ``train`` as one EasyRec CSV file beside it (header-less, ``columns`` in
    order); returns (path, csv_input.CsvFormat)."""
    import pyarrow.parquet as pq

    from aitm_torchrec.data import csv_input

    table = pq.read_table(train, columns=columns)
    names = {"int8": "INT32", "int32": "INT32", "int64": "INT64", "string": "STRING", "large_string": "STRING",
             "float": "FLOAT", "double": "DOUBLE", "bool": "BOOL"}
    fmt = csv_input.CsvFormat(csv_input.schema([(f.name, names[str(f.type)]) for f in table.schema]))
    path = train.parent / "train_csv" / "part-00000.csv"
    if not path.exists():
        csv_input.write_table(table, path)
    return path, fmt


def _read_epoch(reader) -> tuple[int, int, float, float]:
    """(batches, real rows, wall s, process CPU s) of one epoch read on this thread."""
    wall, cpu = time.perf_counter(), time.process_time()
    batches = rows = 0
    for batch in reader.epoch(0):
        batches += 1
        rows += int(batch.weights.sum())
    return batches, rows, time.perf_counter() - wall, time.process_time() - cpu


def _train_examples_per_s(cfg, batches: list, steps: int, warmup: int = 5) -> float:
    """Single-process training throughput on pre-read batches (data loading excluded)."""
    from aitm_torchrec import dist as aitm_dist

    env = aitm_dist.setup()
    try:
        return pipeline_examples_per_s(cfg, env, batches, steps, warmup)
    finally:
        aitm_dist.teardown()


def cmd(args: argparse.Namespace) -> dict:
    import pyarrow as pa

    from aitm_torchrec.dist import quiet_libraries

    quiet_libraries()
    threads = pa.cpu_count(), pa.io_thread_count()
    pa.set_cpu_count(1)  # one core: the per-core number is what it says
    pa.set_io_thread_count(1)
    try:
        return _data(args)
    finally:
        pa.set_cpu_count(threads[0])
        pa.set_io_thread_count(threads[1])


def _data(args: argparse.Namespace) -> dict:
    from aitm_torchrec.config import load_config
    from aitm_torchrec.data import ParquetReader

    cfg = load_config(args.config, args.overrides)
    kind = "string" if args.string_ids else "int64"
    data = Path(args.data or REPO / "data" / f"bench_taobao_{kind}_{args.rows}")
    train = generated_set(data, args.rows, args.string_ids, args.row_group_size, args.files)
    batch_size = args.batch_size or cfg.data_config.batch_size

    source, fmt = train, None
    if args.csv:  # the same rows as EasyRec CSV, read by csv_input through the same reader
        source, fmt = _ensure_csv(train, list(dict.fromkeys(cfg.schema.label_names + cfg.schema.feature_columns)))

    def reader(**kw) -> ParquetReader:
        return ParquetReader([str(source)], cfg.schema, batch_size, shuffle=args.shuffle, seed=1, prefetch=0,
                             csv=fmt, **kw)

    _read_epoch(reader())  # warm: imports, page cache, hash tables
    runs = [_read_epoch(reader()) for _ in range(args.repeats)]
    batches, rows, wall, cpu = min(runs, key=lambda r: r[3])
    result = {
        "benchmark": "data",
        "config": str(args.config or "configs/aitm_taobao.yaml"),
        "data": str(source),
        "format": "csv" if args.csv else "parquet",
        "ids": kind,
        "rows": rows,
        "batch_size": batch_size,
        "shuffle": args.shuffle,
        "batches": batches,
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "rows_per_s": round(rows / wall),
        "rows_per_s_per_core": round(rows / cpu),
        "goal_rows_per_s_per_core": 1_000_000,
    }
    if args.train_steps:
        sample = list(itertools.islice(reader().epoch(0), 16))
        ex_s = _train_examples_per_s(cfg, sample, args.train_steps)
        result["train_examples_per_s"] = round(ex_s)
        result["train_threads"] = int(__import__("torch").get_num_threads())
        result["data_over_train"] = round(result["rows_per_s_per_core"] / ex_s, 1)
        result["goal_data_over_train"] = 10
    print(json.dumps(result, indent=2))
    return result

