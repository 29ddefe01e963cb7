"""Table export: a training checkpoint's embedding tables -> Parquet (or npy), streamed, any world size.

The package in stages: ``storage`` (where the checkpoint stores each table, and reading a row
window of it), ``ids`` (raw ids -> rows by the training rule, for ``--ids-from``), ``plan``
(options, the tables, and which rank writes which window), ``writer`` (one part file, its
sidecar, the manifest) and ``job`` (``run``: the collective job).

``python launch/export.py embeddings --output DIR [--config FILE] [--checkpoint DIR] [--tables T,...]
[--ids-from TABLE=PATH:COLUMN ...] [--format parquet|npy] [--dtype float32|float16] [key.path=value ...]``

How it reads: straight from the DCP checkpoint's stored chunks, never through a model. The
checkpoint metadata lists, per table, the chunks each training rank saved (table-wise: one chunk;
column-wise / table-column-wise: column slices; row-wise / table-row-wise: row slices;
data-parallel: one copy) with their ``offsets`` and ``sizes`` and where their bytes lie. Each
table is cut into row windows of ``--chunk-rows`` rows; window ``g`` (counted over all tables) is
exported by rank ``g mod world_size``. A window is filled from every stored chunk that overlaps it
(row offsets and column offsets alike, so column slices are stitched back per row window), by
reading just those rows' bytes, then written as one part file. So a rank holds one window
(``chunk_rows x dim``) plus Parquet's buffers, whatever the table size or the training plan, and
nothing is gathered anywhere. The export job needs no sharding plan of its own.

Layout (``DIR``):
- ``<table>/part-<rank>-<k>.parquet``: window ``k`` of the table (rows [k*chunk_rows, ...)),
  written by ``rank``; columns ``row`` int64 and ``embedding`` fixed_size_list<float32|float16>[dim].
  Tables given ``--ids-from``: the same windows, but one output row per distinct raw id whose row
  falls in the window, with columns ``id`` (int64 or string), ``row``, ``embedding``, sorted by row.
  ``--format npy``: ``part-<rank>-<k>.npy``, the window's rows x dim matrix (row = row_start + i).
  zch tables (stored under ``ZCH_TABLE_KEY``; parquet only): a ``key`` column after ``row``, the
  zch key each row holds (null: none), from the module's key -> row map (``read_zch_map``, read
  whole by every rank). With ``--ids-from``: ``id``, ``row``, ``key`` (the id's zch key),
  ``default_row`` (the id is not held: it reads the default row it read in training,
  ``zch.default_rows`` for the checkpoint's world size), ``embedding``.
  Wide tables of WIDE feature groups (``wide_<feature>``, stored under ``WIDE_TABLE_KEY``): the
  feature's rows and id rule, ``embedding`` of T columns (column t joins tower t's logit; the
  stored table is ``Schema.wide_dim`` wide, the columns past T are never read); ``--ids-from``
  takes them like their feature's table.
  Task tables of ``model_config.task_embeddings`` (``task_<tower>_<feature>``, stored under
  ``TASK_TABLE_KEY``): the feature's rows and id rule, ``embedding`` of ``task_embedding_dim``
  columns; the manifest names the tower each belongs to; ``--ids-from`` takes them too.
- ``<table>/_part-<rank>-<k>.json``: the part's sidecar (rows, bytes, sha256), written after the
  part was renamed into place: a part with its sidecar is complete.
- ``_export.json``: what this export is (checkpoint, step, schema hash, tables, format, dtype,
  windows, id sources); a re-run with anything different stops unless ``--overwrite``
  (``outputs.JobOutput``, the protocol scoring shares).
- ``schema.json``, ``manifest.json`` and, last, ``_SUCCESS`` (rank 0, after every rank finished).
"""

from aitm_torchrec.table_export.job import run
from aitm_torchrec.table_export.plan import ExportOptions
from aitm_torchrec.table_export.storage import TABLE_KEY, TASK_TABLE_KEY, WIDE_TABLE_KEY, ExportError, table_chunks

__all__ = ["TABLE_KEY", "TASK_TABLE_KEY", "WIDE_TABLE_KEY", "ExportError", "ExportOptions", "run", "table_chunks"]
