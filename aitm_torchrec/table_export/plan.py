"""The export's plan, which every rank computes the same: the options checked, the tables with
their stored chunks (and id sources), and the row windows each rank writes.

Each table is cut into windows of ``chunk_rows`` rows; window ``g`` (counted over all tables) is
written by rank ``g mod world_size``. So a rank holds one window plus Parquet's buffers, whatever
the table size or the training plan, and nothing is gathered anywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aitm_torchrec.config import Config
from aitm_torchrec.from_checkpoint import checkpoint_meta, resolve_checkpoint
from aitm_torchrec.schema import SparseFeature, wide_table_name
from aitm_torchrec.table_export.ids import Ids, parse_ids_from, read_ids
from aitm_torchrec.table_export.storage import Chunk, ExportError, ZchMap, read_window, read_zch_map, table_chunks

FORMATS = ("parquet", "npy")
DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ExportOptions:
    """``launch/export.py embeddings``' flags."""

    output: Path
    checkpoint: str | None = None  # default: the newest complete checkpoint under model_dir
    tables: tuple[str, ...] = ()  # default: every table
    ids_from: tuple[str, ...] = ()  # TABLE=PATH:COLUMN items
    format: str = "parquet"  # parquet | npy
    dtype: str = "float32"  # float32 | float16
    chunk_rows: int = 1_000_000  # rows per part file: the memory bound
    overwrite: bool = False  # replace an export of another checkpoint/config


@dataclass
class Table:
    """A table to export: a feature's own, or (``logit_columns``) the feature's wide table, whose
    stored rows are ``stored_dim`` wide and whose first T columns (one per tower) are exported, or
    (``tower``) one of the feature's task tables, ``task_table``, ``stored_dim`` wide."""

    feature: SparseFeature
    dtype: np.dtype  # as stored
    chunks: list[Chunk]
    ids: Ids | None = None
    zch: ZchMap | None = None
    logit_columns: tuple[str, ...] = ()  # a wide table: the towers whose logits its columns join
    stored_dim: int = 0  # a wide table: its stored width (Schema.wide_dim); a task table: its width
    tower: str = ""  # a task table: the tower (task) it belongs to
    task_table: str = ""  # a task table: its name (task_<tower>_<feature>)

    @property
    def name(self) -> str:
        if self.task_table:
            return self.task_table
        return wide_table_name(self.feature.name) if self.logit_columns else self.feature.name

    @property
    def rows(self) -> int:
        return self.feature.num_embeddings

    @property
    def dim(self) -> int:
        return len(self.logit_columns) or self.stored_dim or self.feature.embedding_dim

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop), (stop - start) x dim (a wide table's first T stored columns)."""
        if not self.logit_columns:
            return read_window(self.chunks, self.dtype, self.dim, start, stop)
        return np.ascontiguousarray(read_window(self.chunks, self.dtype, self.stored_dim, start, stop)[:, :self.dim])


@dataclass(frozen=True)
class Window:
    index: int  # over all tables: its writer is index mod world_size
    table: str
    k: int  # within the table
    start: int
    stop: int


def windows(tables: list[Table], chunk_rows: int) -> list[Window]:
    out = []
    for t in tables:
        for k, start in enumerate(range(0, t.rows, chunk_rows)):
            out.append(Window(len(out), t.name, k, start, min(start + chunk_rows, t.rows)))
    return out




def prepare(opts: ExportOptions, cfg: Config) -> tuple[list[Table], dict[str, Any]]:
    """Checks every argument and reads the id sources; returns the tables and the export's
    identity (what ``_export.json`` records). Raises ExportError before any output is written."""
    if opts.chunk_rows <= 0:
        raise ExportError(f"--chunk-rows must be positive, got {opts.chunk_rows}")
    schema = cfg.schema
    # table name -> the feature whose ids it reads: the features' tables, the wide tables, the task tables
    features = {f.name: f for f in schema.sparse} | schema.wide_tables | {
        name: f for name, (_, f) in schema.task_tables.items()}
    names = list(features)
    if opts.tables:
        names = list(opts.tables)
        unknown = [t for t in names if t not in features]
        if unknown:
            raise ExportError(f"--tables: unknown table(s) {', '.join(unknown)}; tables: {', '.join(features)}")
    ids_from = parse_ids_from(opts.ids_from, features)
    not_exported = [t for t in ids_from if t not in names]
    if not_exported:
        raise ExportError(f"--ids-from names table(s) {', '.join(not_exported)} that --tables leaves out")
    if ids_from and opts.format != "parquet":
        raise ExportError("--ids-from writes (id, row, embedding) rows: it needs --format parquet")
    zch_npy = [t for t in names if features[t].is_zch]
    if zch_npy and opts.format != "parquet":
        raise ExportError(f"zch table(s) {', '.join(zch_npy)} need --format parquet (their rows carry a key "
                          "column); leave them out with --tables for npy")
    path = resolve_checkpoint(cfg, opts.checkpoint).resolve()
    meta = checkpoint_meta(path)
    step = meta.get("step")
    tables = []
    for name in names:
        if name in schema.wide_tables:
            dtype, chunks = table_chunks(path, features[name], schema.wide_dim)
            tables.append(Table(features[name], dtype, chunks, logit_columns=tuple(schema.tower_names),
                                stored_dim=schema.wide_dim))
            continue
        if name in schema.task_tables:
            dtype, chunks = table_chunks(path, features[name], task_table=name, task_dim=schema.task_embedding_dim)
            tables.append(Table(features[name], dtype, chunks, stored_dim=schema.task_embedding_dim,
                                tower=schema.task_tables[name][0], task_table=name))
            continue
        dtype, chunks = table_chunks(path, features[name])
        tables.append(Table(features[name], dtype, chunks))
        if features[name].is_zch:
            tables[-1].zch = read_zch_map(path, features[name], int(meta.get("world_size") or 1))
    for t in tables:
        if t.name in ids_from:
            t.ids = read_ids(t.feature, *ids_from[t.name], zch=t.zch)
    identity = {
        "checkpoint": str(path), "step": step,
        "schema_sha256": hashlib.sha256(cfg.schema.to_json().encode()).hexdigest(),
        "tables": names, "format": opts.format, "dtype": opts.dtype, "chunk_rows": opts.chunk_rows,
        "ids_from": {t: f"{p}:{c}" for t, (p, c) in sorted(ids_from.items())},
    }
    return tables, identity


