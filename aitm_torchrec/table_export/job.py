"""The export job: every rank checks the same plan, writes its windows, and rank 0 the manifest."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from aitm_torchrec import dist as aitm_dist
from aitm_torchrec.config import Config
from aitm_torchrec.dist import DistEnv
from aitm_torchrec.features import DataError
from aitm_torchrec.outputs import JobOutput, describe_difference
from aitm_torchrec.table_export.plan import ExportOptions, prepare, windows
from aitm_torchrec.table_export.storage import ExportError
from aitm_torchrec.table_export.writer import done_part, manifest, write_window


def _job_output(out: Path) -> JobOutput:
    return JobOutput(out, "_export.json", "an export of another checkpoint/config",
                     lambda old, new: describe_difference(old, new, shown={k: repr for k in new}), ExportError)


def run(cfg: Config, env: DistEnv, opts: ExportOptions,
        on_part_written: Callable[[Path], None] | None = None) -> dict:
    """Exports the tables; collective over every rank. Returns this rank's counts and speed.
    ``on_part_written``: called with each part's path once it and its sidecar are in place (the
    crash tests stop a rank there)."""
    out = Path(opts.output)
    message, tables, identity = None, [], {}
    try:
        tables, identity = prepare(opts, cfg)
    except (ExportError, DataError, FileNotFoundError) as e:
        message = str(e)
    aitm_dist.agree(message, ExportError)  # bad arguments stop every rank before any output
    output = _job_output(out)
    output.prepare(identity, opts.overwrite, env.is_main)
    if env.is_main:
        cfg.schema.save(out / "schema.json")
        for t in tables:
            (out / t.name).mkdir(parents=True, exist_ok=True)
    aitm_dist.barrier()

    by_name = {t.name: t for t in tables}
    mine = [w for w in windows(tables, opts.chunk_rows) if w.index % env.world_size == env.rank]
    written = skipped = rows_out = 0
    t0 = time.perf_counter()
    bar = tqdm(total=sum(w.stop - w.start for w in mine), unit="row", unit_scale=True,
               desc=f"export (rank 0 of {env.world_size})", disable=not env.is_main)
    for w in mine:
        table_dir = out / w.table
        if done_part(table_dir, w.k) is None:
            path = write_window(table_dir, by_name[w.table], w, env.rank, opts.format, opts.dtype)
            written += 1
            rows_out += w.stop - w.start
            if on_part_written is not None:
                on_part_written(path)
        else:
            skipped += 1
        bar.update(w.stop - w.start)
    bar.close()
    seconds = time.perf_counter() - t0
    output.finish(lambda: manifest(out, tables, identity, env.world_size), env.is_main)
    return {"output": str(out), "rank": env.rank, "world_size": env.world_size, "parts_written": written,
            "parts_skipped": skipped, "rows_read": rows_out, "seconds": seconds,
            "rows_per_s": rows_out / seconds if seconds > 0 else 0.0,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
