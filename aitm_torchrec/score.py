"""Score: offline batch scoring of Parquet with a trained checkpoint, on any world size.

Every input row gives exactly one output row. The input's row groups are laid end to end (file
order, never shuffled) and rank r of W scores the global rows [r*N/W, (r+1)*N/W), cut into parts
of ``rows_per_part`` rows. Part k of rank r is written as ``part-<r>-<k>.parquet`` (five digits
each), so reading the parts in name order gives the input order. Each part holds the reserved
(pass-through) columns with their types, then ``probs_<tower>`` (float32) per tower, and
``logits_<tower>`` when asked. Padding rows (ranks step together through the sharded tables'
all-to-alls) never reach the output.

Crash safety: a part is written under a temporary name and renamed when complete; ``job.json``
records what the output is for (config, checkpoint, inputs with row counts, world size, part
size, columns) before any part is written; ``manifest.json`` (every part with its rows and
sha256, start and end time) and then ``_SUCCESS`` are written last, after every rank finished.
Re-running the same command keeps the complete parts and scores only the rest; a re-run whose
config, checkpoint, inputs, world size or columns differ stops with a message naming what
differs, unless ``overwrite`` (which removes the old output first).

Precision: from a checkpoint, the model's dense layers run under the autocast of
``train_config.mixed_precision`` resolved for this job's device and ranks (``precision``; auto:
bf16 on CUDA with bf16 and on CPUs with AMX, else fp32), as in training; a serving artefact
(``model``) in that precision on the CPU (bf16: the Predictor's packed layers, at every batch
size), unless its Linears are int8 (``serving.serving_precision``; fp32 then). The resolved value
is part of the job's identity (``job.json``, so a resumed job's parts all come from one
precision) and of ``manifest.json``.

``dense_quant="int8"`` (checkpoint only): the sharded model's ``nn.Linear`` layers (the unsharded
MLPs inside DistributedModelParallel) are swapped for dynamically quantized int8 ones
(``export_model.quantize_dense``, FBGEMM, CPU) after the checkpoint's weights are loaded; the
tables stay as trained. It is part of the job's identity: a re-run with another value is another
job. A serving artefact (``model``) runs as it was exported. int8 Linears take fp32 inputs, so with
``dense_quant`` the job scores without autocast whatever the precision setting resolves to.

``metrics``: the label columns are also passed through, and per-task AUC, logloss and
calibration are computed over every output row (from the part files, so a resumed job's
metrics cover all rows), exact across ranks. Towers whose ``metrics_set`` has a gauc also get
``gauc`` and ``gauc_users`` (``aitm_torchrec/gauc.py``): their uid columns are passed through too,
and the GAUC ranks the rows by the float32 probabilities of the parts, the values training's eval
ranks by.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from aitm_torchrec import dist as aitm_dist
from aitm_torchrec import from_checkpoint
from aitm_torchrec.config import Config, to_dict
from aitm_torchrec.data import Batch, ParquetReader
from aitm_torchrec.data.csv_input import csv_format
from aitm_torchrec.data.source import input_columns
from aitm_torchrec.dist import DistEnv
from aitm_torchrec.export_model import DENSE_QUANTS, quantize_dense
from aitm_torchrec.files import atomic_write, sha256_file
from aitm_torchrec.gauc import GaucSpec, GroupAUC, gauc_specs, uid_columns
from aitm_torchrec.metrics import TaskMetrics
from aitm_torchrec.outputs import JobOutput, describe_difference
from aitm_torchrec.precision import Precision, autocast, resolve_for_job, unsupported, with_int8_linears

logger = logging.getLogger(__name__)

OUTPUT_KINDS = ("probs", "logits")


class ScoreError(ValueError):
    """A scoring job that cannot run as asked, with the reason."""


@dataclass(frozen=True)
class ScoreOptions:
    output: Path
    inputs: tuple[str, ...] = ()  # default: the config's eval_input_path
    checkpoint: str | None = None  # default: the newest complete checkpoint under model_dir
    model: str | None = None  # a serving artefact (launch/export.py model) instead of a checkpoint
    threads: int = 0  # with ``model``: torch threads per process (0: torch's default)
    dense_quant: str = "none"  # checkpoint only: "int8" quantizes the Linear layers (export_model.DENSE_QUANTS)
    reserved_columns: tuple[str, ...] = ()  # ("ALL",): every column of the input
    output_kinds: tuple[str, ...] = ("probs",)
    batch_size: int = 0  # 0 -> 4 x data_config.batch_size
    rows_per_part: int = 1_000_000
    metrics: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class Part:
    rank: int
    index: int
    lo: int  # global rows [lo, hi)
    hi: int

    @property
    def name(self) -> str:
        return f"part-{self.rank:05d}-{self.index:05d}.parquet"


def plan_parts(num_rows: int, world_size: int, rows_per_part: int) -> list[Part]:
    """Every rank's parts: rank r's rows [r*N/W, (r+1)*N/W) cut into ``rows_per_part`` pieces."""
    parts = []
    for r in range(world_size):
        lo, hi = r * num_rows // world_size, (r + 1) * num_rows // world_size
        for k, start in enumerate(range(lo, hi, rows_per_part)):
            parts.append(Part(r, k, start, min(start + rows_per_part, hi)))
    return parts


def _identity(path: Path, meta: str, step: int) -> dict:
    """A checkpoint or artefact: path and step, plus its meta file's checksum and time (a model
    re-trained or re-exported at the same path is another model)."""
    return {"path": str(path.resolve()), "step": step, "meta_sha256": sha256_file(path / meta),
            "meta_mtime_ns": (path / meta).stat().st_mtime_ns}


def _job(cfg: Config, opts: ScoreOptions, model: dict, reader: ParquetReader, columns: list[str],
         env: DistEnv, rows_per_part: int, precision: Precision) -> dict:
    """What this output is for; a re-run must match it to resume (as JSON data: tuples are lists)."""
    return json.loads(json.dumps({
        "config": to_dict(cfg),
        "checkpoint": model,
        "inputs": {str(Path(p).resolve()): n for p, n in reader.source.file_rows().items()},
        "rows": reader.num_rows,
        "world_size": env.world_size,
        "rows_per_part": rows_per_part,
        "reserved_columns": columns,
        "output_columns": list(opts.output_kinds),
        "metrics": opts.metrics,
        "mixed_precision": precision.resolved,
        "dense_quant": opts.dense_quant,
    }))


_JOB_NAMES = {"config": "the config", "checkpoint": "the checkpoint", "inputs": "the input files or their rows",
              "rows": "the input rows", "world_size": "the world size", "rows_per_part": "rows_per_part",
              "reserved_columns": "the reserved columns", "output_columns": "the output columns",
              "metrics": "--metrics", "mixed_precision": "the mixed precision", "dense_quant": "--dense-quant"}
_JOB_SHOWN = {"checkpoint": lambda c: f"step {c['step']} at {c['path']}" if c else "none", "world_size": str,
              "mixed_precision": str, "dense_quant": str}


def _job_output(out: Path) -> JobOutput:
    return JobOutput(out, "job.json", "scores of another job",
                     lambda old, new: describe_difference(old, new, _JOB_NAMES, _JOB_SHOWN), ScoreError)


def _part_complete(path: Path, rows: int) -> bool:
    if not path.exists():
        return False
    try:
        return pq.ParquetFile(path).metadata.num_rows == rows
    except (pa.ArrowException, OSError):
        return False


def _batches(reader: ParquetReader, parts: list[Part], steps: int) -> Iterator[tuple[Batch, Part | None]]:
    """This rank's batches of ``parts`` in order, each with its part, then padding batches (part
    None) up to ``steps`` so every rank runs the same number of forward passes."""
    done = 0
    for part in parts:
        with contextlib.closing(reader.range_batches(part.lo, part.hi)) as it:
            for batch in it:
                yield batch, part
                done += 1
    for _ in range(steps - done):
        yield reader.padding_batch(), None


def _write_part(out: Path, part: Part, pieces: list[pa.Table]) -> None:
    """Writes a complete part atomically (temporary name, then rename)."""
    table = pa.concat_tables(pieces)
    if table.num_rows != part.hi - part.lo:
        raise RuntimeError(f"{part.name}: {table.num_rows} rows scored for {part.hi - part.lo} input rows")
    with atomic_write(out / part.name) as tmp:
        pq.write_table(table, tmp)


def _scored_table(batch: Batch, logits: torch.Tensor, towers: Sequence[str], kinds: Sequence[str]) -> pa.Table:
    """The real rows of a batch: pass-through columns, then probs_/logits_ per tower."""
    n = batch.num_real
    logits = logits[:n].float().cpu()
    values = {"probs": torch.sigmoid(logits).numpy(), "logits": logits.numpy()}
    scores = {f"{kind}_{tower}": pa.array(values[kind][:, t].astype(np.float32))
              for kind in kinds for t, tower in enumerate(towers)}
    if batch.passthrough is None:
        return pa.table(scores)
    table = batch.passthrough
    for name, column in scores.items():
        table = table.append_column(name, column)
    return table


def run(cfg: Config, env: DistEnv, opts: ScoreOptions, on_part_written: Callable[[Part], None] | None = None) -> dict:
    """Scores the input with the checkpoint; returns the manifest (on every rank).
    ``on_part_written``: called with each part once it is in place (the crash tests stop a rank
    there)."""
    started = time.time()
    for kind in opts.output_kinds:
        if kind not in OUTPUT_KINDS:
            raise ScoreError(f"--output_columns: {kind!r} is not one of {', '.join(OUTPUT_KINDS)}")
    if opts.dense_quant not in DENSE_QUANTS:
        raise ScoreError(f"--dense-quant: {opts.dense_quant!r} is not one of {', '.join(DENSE_QUANTS)}")
    if opts.dense_quant != "none" and env.device.type != "cpu":
        raise ScoreError(f"--dense-quant {opts.dense_quant} runs on the CPU; this job's device is {env.device}")
    inputs = tuple(opts.inputs) or cfg.eval_input_path
    if not inputs:
        raise ScoreError("no input: pass --input PATH, or set eval_input_path in the config")
    if opts.model:
        from aitm_torchrec.serving import Predictor

        if opts.checkpoint:
            raise ScoreError("--model and --checkpoint exclude each other: score with one model")
        if "logits" in opts.output_kinds:
            raise ScoreError("--output_columns logits needs a checkpoint: a serving artefact outputs probabilities")
        if opts.dense_quant != "none":
            raise ScoreError("--dense-quant applies to a checkpoint: a serving artefact runs as exported "
                             "(launch/export.py model --dense-quant)")
        precision = resolve_for_job(cfg.train_config.mixed_precision, "cpu")  # the artefact runs on the CPU
        if (why := unsupported(precision.resolved, "cpu")) is not None:
            raise ScoreError(why)
        predictor = Predictor(opts.model, threads=opts.threads or None, precision=precision.resolved, bf16_min_rows=1)
        if predictor.precision.resolved != precision.resolved:  # an artefact with int8 Linears
            precision = with_int8_linears(precision, predictor.precision.reason)
        schema, model = predictor.schema, _identity(Path(opts.model), "meta.json", int(predictor.meta.get("step", -1)))
        source_text = f"serving model {opts.model}"
    else:
        ckpt = from_checkpoint.resolve_checkpoint(cfg, opts.checkpoint)
        schema = cfg.schema
        model = _identity(ckpt, "meta.json", int(from_checkpoint.checkpoint_meta(ckpt).get("step", -1)))
        source_text = f"{ckpt} (step {model['step']})"
        precision = resolve_for_job(cfg.train_config.mixed_precision, env.device)
        if opts.dense_quant != "none":
            precision = with_int8_linears(precision, f"--dense-quant {opts.dense_quant} runs in fp32")
        if (why := unsupported(precision.resolved, env.device)) is not None:
            raise ScoreError(why)
    columns = list(opts.reserved_columns)
    csv = csv_format(cfg.data_config)
    if columns == ["ALL"]:
        columns = input_columns(inputs, csv)
    gauc = gauc_specs(cfg.towers) if opts.metrics else ()
    uids = {c: why for c, why in uid_columns(gauc).items() if c not in columns}
    passthrough = columns + [c for c in schema.label_names if opts.metrics and c not in columns]
    passthrough += [c for c in uids if c not in passthrough]
    batch_size = opts.batch_size or 4 * cfg.data_config.batch_size
    reader = ParquetReader(inputs, schema, batch_size, env.rank, env.world_size, shuffle=False,
                           prefetch=cfg.data_config.prefetch_size, labels=opts.metrics,
                           label_chain_policy="keep", passthrough=passthrough, csv=csv, needed_by=uids)
    out = Path(opts.output)
    output = _job_output(out)
    job = _job(cfg, opts, model, reader, columns, env, opts.rows_per_part, precision)
    already_done = output.prepare(job, opts.overwrite, env.is_main)
    parts = plan_parts(reader.num_rows, env.world_size, opts.rows_per_part)
    mine = [p for p in parts if p.rank == env.rank]
    todo = [] if already_done else [p for p in mine if not _part_complete(out / p.name, p.hi - p.lo)]
    my_steps = sum(math.ceil((p.hi - p.lo) / batch_size) for p in todo)
    steps = my_steps
    if env.world_size > 1:
        t = torch.tensor([my_steps], dtype=torch.int64, device=env.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        steps = int(t)
    if env.is_main:
        logger.info("scoring %d rows of %d files with %s on %d ranks: %d of %d parts to do on rank 0; %s",
                    reader.num_rows, len(reader.files), source_text, env.world_size, len(todo), len(mine),
                    precision.describe())

    rows_scored, loop_seconds = 0, 0.0
    if steps:
        if opts.model:
            def forward(batch: Batch) -> torch.Tensor:  # probabilities -> logits for _scored_table
                probs = predictor.predict_batch(batch.dense, batch.sparse)
                p = torch.from_numpy(np.stack([probs[t] for t in schema.tower_names], axis=1)).double()
                return torch.logit(p).float()
        else:
            dmp, _ = from_checkpoint.sharded_model(cfg, env, ckpt)
            quantize_dense(dmp, opts.dense_quant)  # in place, after the weights are loaded

            def forward(batch: Batch) -> torch.Tensor:
                with autocast(env.device.type, precision):
                    return dmp(batch.dense.to(env.device), batch.sparse.to(env.device)).float()
        towers = schema.tower_names
        pieces: list[pa.Table] = []
        bar = tqdm(total=sum(p.hi - p.lo for p in todo), desc="score (rank 0 rows)", unit="row",
                   disable=not env.is_main, unit_scale=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            current: Part | None = None
            for batch, part in itertools.islice(_batches(reader, todo, steps), steps):
                logits = forward(batch)
                if part is None:
                    continue
                if current is not None and part != current:
                    _write_part(out, current, pieces)
                    if on_part_written is not None:
                        on_part_written(current)
                    pieces = []
                current = part
                pieces.append(_scored_table(batch, logits, towers, opts.output_kinds))
                rows_scored += batch.num_real
                bar.update(batch.num_real)
            if current is not None:
                _write_part(out, current, pieces)
                if on_part_written is not None:
                    on_part_written(current)
        loop_seconds = time.perf_counter() - t0
        bar.close()

    # Every rank's parts exist now; rank 0 writes the manifest, then _SUCCESS.
    files = [{"file": p.name, "rank": p.rank, "rows": p.hi - p.lo, "first_row": p.lo, "sha256": sha256_file(out / p.name)}
             for p in mine]
    metrics = _metrics(out, mine, schema.label_names, schema.tower_names, env, cfg.eval_config.auc,
                       gauc) if opts.metrics else None
    all_files = sorted((f for fs in aitm_dist.all_gather(files) for f in fs), key=lambda f: f["file"])
    total_scored = sum(aitm_dist.all_gather(rows_scored))
    slowest = max(aitm_dist.all_gather(loop_seconds))
    manifest = {
        "checkpoint": job["checkpoint"],
        "config_model_dir": cfg.model_dir,
        "inputs": [{"file": p, "rows": n} for p, n in job["inputs"].items()],
        "rows": reader.num_rows,
        "rows_scored_this_run": total_scored,
        # the scoring loop of the slowest rank (read, forward, write; not model build and load)
        "scoring_seconds": round(slowest, 3),
        "world_size": env.world_size,
        "mixed_precision": precision.to_dict(),
        "dense_quant": (predictor.meta.get("dense_quantization", "none") if opts.model else opts.dense_quant),
        "columns": passthrough + [f"{k}_{t}" for k in opts.output_kinds for t in schema.tower_names],
        "towers": [{"tower_name": t.tower_name, "label_name": t.label_name} for t in schema.tasks],
        "parts": all_files,
        "metrics": metrics,
        "started": started,
        "finished": time.time(),
    }
    if sum(f["rows"] for f in all_files) != reader.num_rows:
        raise RuntimeError(f"{out}: parts hold {sum(f['rows'] for f in all_files)} rows for {reader.num_rows} input rows")
    if already_done:  # the recorded manifest, as the job that completed it wrote it
        return output.manifest() if env.is_main else manifest
    output.finish(lambda: manifest, env.is_main)
    return manifest


def _metrics(out: Path, parts: list[Part], labels: list[str], towers: list[str], env: DistEnv,
             auc: str = "auto", gauc: Sequence[GaucSpec] = ()) -> dict:
    """Per-task metrics over every row of every part (this rank's parts, reduced across ranks;
    ``auc``: the config's eval_config.auc; ``gauc``: the towers' GAUCs, from the parts' uid columns)."""
    m = TaskMetrics(towers, env.device, auc)
    groups = GroupAUC(gauc, env.device) if gauc else None
    for p in parts:
        uids = groups.columns if groups is not None else []
        t = pq.read_table(out / p.name, columns=list(dict.fromkeys(labels + [f"probs_{x}" for x in towers] + uids)))
        y = torch.from_numpy(np.stack([t.column(c).to_numpy().astype(np.float32) for c in labels], axis=1))
        probs = np.stack([t.column(f"probs_{x}").to_numpy() for x in towers], axis=1)
        if groups is not None:  # the probabilities as written: the values training's eval ranks by
            groups.update(t.select(uids), torch.from_numpy(probs), y)
        # float32 probabilities back to logits; clipped so a saturated score stays finite in logloss
        clipped = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
        logit = torch.from_numpy(np.log(clipped) - np.log1p(-clipped)).float()
        m.update(logit, y, torch.ones(len(y)))
    out_metrics = m.compute()
    for tower, values in (groups.compute() if groups is not None else {}).items():
        out_metrics[tower].update(values)
    return out_metrics
