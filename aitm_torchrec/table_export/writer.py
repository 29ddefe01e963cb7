"""Writing the export: one part file per window (atomically), its sidecar, and the manifest.

A part with its sidecar (``_part-<rank>-<k>.json``: rows, bytes, sha256, written after the part
was renamed into place) is complete; a re-run skips it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aitm_torchrec.files import atomic_write, sha256_file, write_json_atomic
from aitm_torchrec.schema import ID_HASH
from aitm_torchrec.table_export.plan import Table, Window
from aitm_torchrec.table_export.storage import ExportError
from aitm_torchrec.zch import EMPTY_KEY, default_rows

PARQUET_BATCH_ROWS = 65536  # rows per Parquet write (and row group): bounds the writer's buffers


def _embedding_array(values: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def write_window(table_dir: Path, table: Table, w: Window, rank: int, fmt: str, dtype: str) -> Path:
    """Reads window ``w`` of ``table``, writes it as ``rank``'s part (then its sidecar) under
    ``table_dir``; returns the part's path."""
    values = table.read(w.start, w.stop).astype(dtype, copy=False)
    name = f"part-{rank:05d}-{w.k:05d}.{'npy' if fmt == 'npy' else 'parquet'}"
    n = write_part(table_dir / name, table, w, values, fmt)
    del values
    write_json_atomic(table_dir / f"_part-{rank:05d}-{w.k:05d}.json", {
        "file": name, "rows": n, "row_start": w.start, "row_stop": w.stop,
        "bytes": (table_dir / name).stat().st_size, "sha256": sha256_file(table_dir / name)})
    return table_dir / name


def write_part(path: Path, table: Table, w: Window, values: np.ndarray, fmt: str) -> int:
    """Writes one part atomically (temporary name, then rename); returns its output rows."""
    if fmt == "npy":
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.save(f, values)
        return len(values)
    ids = table.ids
    extra: dict[str, pa.Array] = {}  # columns between row and embedding
    if ids is not None:
        lo, hi = np.searchsorted(ids.rows, [w.start, w.stop])
        rows = ids.rows[lo:hi]
        first = {"id": ids.ids[lo:hi]}
        values = values[rows - w.start]
        if ids.keys is not None:
            extra = {"key": pa.array(ids.keys[lo:hi]), "default_row": pa.array(ids.default[lo:hi])}
    else:
        rows = np.arange(w.start, w.stop, dtype=np.int64)
        first = {}
        if table.zch is not None:
            extra = {"key": table.zch.row_keys(w.start, w.stop)}
    columns = {**first, "row": pa.array(rows), **extra}
    schema = pa.schema([(name, a.type) for name, a in columns.items()]).append(
        pa.field("embedding", pa.list_(pa.from_numpy_dtype(values.dtype), values.shape[1])))
    with atomic_write(path) as tmp, pq.ParquetWriter(tmp, schema, compression="none", use_dictionary=False) as writer:
        for a in range(0, max(len(rows), 1), PARQUET_BATCH_ROWS):
            b = a + PARQUET_BATCH_ROWS
            arrays = [c[a:b] for c in columns.values()] + [_embedding_array(values[a:b])]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
    return len(rows)


def done_part(table_dir: Path, k: int) -> dict | None:
    """The sidecar of window ``k``'s complete part (any writer rank), or None."""
    for side in sorted(table_dir.glob(f"_part-*-{k:05d}.json")):
        info = json.loads(side.read_text())
        part = table_dir / info["file"]
        if part.exists() and part.stat().st_size == info["bytes"]:
            return info
    return None


def manifest(out: Path, tables: list[Table], identity: dict, world_size: int) -> dict:
    """manifest.json of a finished export: every table's parts (rows, bytes, sha256) and layout.
    The format, dtype and window size come from ``identity`` (``_export.json``'s contents)."""
    fmt, dtype, chunk_rows = identity["format"], identity["dtype"], identity["chunk_rows"]
    entries = {}
    for w_table in tables:
        d = out / w_table.name
        files = []
        for k in range((w_table.rows + chunk_rows - 1) // chunk_rows):
            info = done_part(d, k)
            if info is None:
                raise ExportError(f"{d}: part {k} is missing after every rank finished")
            files.append({"path": f"{w_table.name}/{info['file']}", **{x: info[x] for x in (
                "rows", "row_start", "row_stop", "bytes", "sha256")}})
        f = w_table.feature
        entries[w_table.name] = {
            "features": [f.name], "column": f.column, "feature_type": f.feature_type, "separator": f.separator,
            "rows": w_table.rows, "dim": w_table.dim, "dtype": dtype, "stored_dtype": str(w_table.dtype),
            "id_rule": f.id_rule, "ids": w_table.ids.summary() if w_table.ids is not None else None,
            "columns": _columns(w_table) if fmt == "parquet" else None,
            "wide": None if not w_table.logit_columns else {
                "logit_columns": list(w_table.logit_columns), "stored_dim": w_table.stored_dim},
            "task": {"tower": w_table.tower} if w_table.tower else None,
            "zch": None if w_table.zch is None else {
                "held_rows": int((w_table.zch.sorted_keys != EMPTY_KEY).sum()),
                "trained_world_size": w_table.zch.world_size,
                "default_rows": default_rows(w_table.zch.zch_size, w_table.zch.world_size)},
            "rows_written": sum(x["rows"] for x in files), "files": files,
        }
    return {"version": 1, "format": fmt, "dtype": dtype, "chunk_rows": chunk_rows,
            "checkpoint": {"path": identity["checkpoint"], "step": identity["step"]},
            "schema": "schema.json", "schema_sha256": identity["schema_sha256"], "id_hash": dict(ID_HASH),
            "world_size": world_size, "tables": entries}


def _columns(t: Table) -> list[str]:
    if t.ids is not None:
        return ["id", "row"] + (["key", "default_row"] if t.zch is not None else []) + ["embedding"]
    return ["row"] + (["key"] if t.zch is not None else []) + ["embedding"]


