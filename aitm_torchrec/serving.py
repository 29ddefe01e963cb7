"""Serving: raw rows -> probabilities per tower, with an exported model and nothing of training.

``Predictor(DIR)`` loads what ``python launch/export.py model --output DIR`` wrote
(``aitm_torchrec/export_model.py``): ``scripted_model.pt`` (TorchScript) and ``schema.json``. It
turns raw rows (an Arrow table or record batch, or a list of dicts) into the model's input
tensors with the training id rules and normalisers (``features.bag_column`` / ``raw_column``,
the functions the Parquet reader uses), runs the model and returns {tower: B float32 numpy}.
The dense layers run in the precision the artefact records (the exporting config's
``train_config.mixed_precision``, default ``auto``), resolved on the machine that loads it: bf16
on a CPU with AMX for batches of at least ``BF16_MIN_ROWS`` rows, fp32 elsewhere
(``serving_precision``; ``Predictor(precision=...)`` overrides). bf16 runs on the artefact's
``ServingLinear`` layers with weights packed once at load (``pack_bf16``, ``serving_dense``), or
under bf16 autocast for an artefact without them.

    from aitm_torchrec.serving import Predictor

    p = Predictor("exports/aitm_int8", threads=1)
    p.predict_rows([{"user_id": "u42", "tag_brand_list": [3, 7], "tag_category_list": "a|b", ...}])
    # -> {"ctr": array([0.031], dtype=float32), "cvr": array([0.0042], dtype=float32)}

Imports: numpy, pyarrow, torch, ``fbgemm_gpu`` (its operators must be registered before the
TorchScript file loads: the KeyedJaggedTensor code and the quantized table lookups call them) and
this project's torch-free ``schema`` / ``features``, and its ``precision``. Not TorchRec, not the
trainer, no process group.

A TorchScript file is code that runs when it is loaded and called: load only artefacts you trust
(ones you exported), as with any ``torch.jit.load``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fbgemm_gpu  # noqa: F401  registers torch.ops.fbgemm.*, which the scripted model calls
import numpy as np
import pyarrow as pa
import torch

from aitm_torchrec.features import DataError, Source, bag_column, mix64, raw_column
from aitm_torchrec.precision import CPUINFO, Precision, autocast, resolve, unsupported, with_int8_linears
from aitm_torchrec.schema import Schema

MODEL_FILE = "scripted_model.pt"
SCHEMA_FILE = "schema.json"
META_FILE = "meta.json"

# Smallest batch the Predictor runs in bf16 when its precision resolves to bf16: below it oneDNN's
# bf16 GEMMs and the casts around them cost as much as fp32 or more (the seed model on one thread
# of an AMX CPU ties near 100 rows; docs/serving.md, "Precision").
BF16_MIN_ROWS = 128

# serving_dense.ServingLinear's class name (that module imports TorchRec; this one does not)
PACKABLE_LINEAR = "ServingLinear"


def input_names(schema: Schema) -> list[str]:
    """The serving model's input tensors: ``<feature>.values`` and ``<feature>.lengths`` per sparse
    feature (int64), then ``dense`` (B x D float32)."""
    return [f"{k}.{part}" for k in schema.keys for part in ("values", "lengths")] + ["dense"]


def output_names(schema: Schema) -> list[str]:
    """The serving model's outputs, ``probs_<tower>`` (B float32) per tower, in tower order."""
    return [f"probs_{t}" for t in schema.tower_names]


def pack_bf16(model: torch.jit.ScriptModule, min_rows: int) -> int:
    """Packs every ``ServingLinear`` of a loaded artefact (``serving_dense``) for bf16 GEMMs on
    batches of at least ``min_rows`` rows; returns how many. 0: an artefact exported without them
    (int8 Linears, or an older export), or a oneDNN without bf16; nothing is packed then."""
    if min_rows < 1:
        raise ValueError(f"min_rows must be at least 1, got {min_rows}")
    if not _packing_available():
        return 0
    layers = [m for m in model.modules() if getattr(m, "original_name", None) == PACKABLE_LINEAR]
    for m in layers:
        m.pack_bf16(min_rows)
    return len(layers)


def _packing_available() -> bool:
    """oneDNN has bf16 here and this torch has the two (private) operators the packed layers call:
    a build without them serves through autocast instead of failing at load."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and all(
            hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class ArtefactError(FileNotFoundError):
    """An export directory that cannot be served, with the path in the message."""


def serving_precision(meta: Mapping[str, Any], requested: str | None = None,
                      cpuinfo: str | Path = CPUINFO) -> Precision:
    """The precision an artefact's dense layers run in on this machine: ``requested`` (auto, none,
    bf16) or, when None, the ``mixed_precision`` its meta.json records (the exporting config's
    ``train_config.mixed_precision``; ``none`` for artefacts that record none), resolved for the
    CPU as training resolves it (``precision.resolve``: auto is bf16 on a CPU with AMX). int8
    Linears (``dense_quantization`` int8) take fp32 inputs: such an artefact runs in fp32. fp16
    needs CUDA and the artefact runs on the CPU: ValueError."""
    precision = resolve(requested or str(meta.get("mixed_precision") or "none"), "cpu", cpuinfo)
    if (why := unsupported(precision.resolved, "cpu")) is not None:
        raise ValueError(why)
    dense = meta.get("dense_quantization", "none")
    if dense != "none":
        return with_int8_linears(precision, f"int8 Linears (dense_quantization {dense}) take fp32 inputs")
    return precision


class Predictor:
    """An exported serving model and its schema, callable on raw rows.

    Args:
        path: the directory ``launch/export.py model --output`` wrote.
        threads: ``torch.set_num_threads(threads)`` (process-wide) when given; None leaves it.
        precision: the dense layers' precision, ``auto``, ``none`` (fp32) or ``bf16``; None: what
            the artefact records (``serving_precision``). bf16 runs the Linear and cross layers as
            bf16 GEMMs (packed weights, or autocast for an artefact without ``ServingLinear``s);
            tables and probabilities stay as they are, float32 out.
        bf16_min_rows: with bf16, batches of fewer rows run in fp32 (faster there). A row's
            probability then depends on the batch it came in by up to bf16's rounding; pass
            ``precision="none"`` where every call must give the same bits.

    Attributes: ``schema`` (``Schema``), ``tower_names`` (output order), ``columns`` (the input
    columns the features read), ``meta`` (meta.json: checkpoint, step, quantization, versions),
    ``precision`` (``precision.Precision``: asked, resolved, why), ``packed_layers`` (how many
    ``ServingLinear`` layers run bf16 GEMMs on packed weights; 0: fp32, or bf16 autocast). Call
    ``model`` through the Predictor: with packed layers it must not run under ``torch.autocast``.
    """

    def __init__(self, path: str | Path, threads: int | None = None, precision: str | None = None,
                 bf16_min_rows: int = BF16_MIN_ROWS) -> None:
        self.path = Path(path)
        for name in (MODEL_FILE, SCHEMA_FILE, META_FILE):
            if not (self.path / name).is_file():
                raise ArtefactError(f"{self.path}: no {name}; pass a directory written by "
                                    "`python launch/export.py model --output DIR`")
        self.meta: dict[str, Any] = json.loads((self.path / META_FILE).read_text())
        self.schema = Schema.load(self.path / SCHEMA_FILE)
        expected = output_names(self.schema)
        if self.meta.get("outputs") != expected:
            raise ArtefactError(f"{self.path}: meta.json lists outputs {self.meta.get('outputs')} but "
                                f"schema.json's towers give {expected}; the files are from different exports")
        if threads is not None:
            torch.set_num_threads(threads)
        self.precision = serving_precision(self.meta, precision)
        self.bf16_min_rows = bf16_min_rows
        self.model = torch.jit.load(str(self.path / MODEL_FILE), map_location="cpu")
        self.model.eval()
        # bf16 on packed weights where the artefact has ServingLinears; autocast otherwise
        self.packed_layers = pack_bf16(self.model, bf16_min_rows) if self.precision.resolved == "bf16" else 0
        self._int_ids = _IntIds(self.schema)
        self._columns = self.schema.feature_columns  # read on every call: computed once

    @property
    def tower_names(self) -> list[str]:
        return self.schema.tower_names

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    # ---- raw rows -> input tensors --------------------------------------------------------------

    def inputs_from_arrow(self, table: pa.Table | pa.RecordBatch, where: str = "input rows") -> dict[str, torch.Tensor]:
        """B raw rows -> the model's input dict (see ``input_names``), by the training id rules
        and normalisers. DataError naming the column for a missing or bad column.

        Vectorised per column, and across columns for the common case: the single-id integer
        columns of hashed or bucketed IdFeatures (``_IntIds``) are read into one K x B array,
        hashed in one pass and handed out as row views; the other columns (strings, tags,
        dictionary-encoded, zch, raw values) go through ``features.bag_column`` / ``raw_column``
        one column at a time. Same tensors as the per-column functions give (tested)."""
        src = Source(where)
        names = set(table.column_names)
        for col in self._columns:
            if col not in names:
                raise DataError(f"{where}: missing column {col!r} (the model reads {', '.join(self._columns)})")
        columns = {col: _typed(table.column(col)) for col in self._columns}
        inputs: dict[str, torch.Tensor] = {}
        grouped = self._int_ids.inputs(columns, table.num_rows, src)
        for f in self.schema.sparse:
            if f.name in grouped:
                inputs[f"{f.name}.values"], inputs[f"{f.name}.lengths"] = grouped[f.name]
                continue
            lengths, rows = bag_column(f, columns[f.column], src)
            inputs[f"{f.name}.values"] = _tensor(rows)
            inputs[f"{f.name}.lengths"] = _tensor(lengths)
        parts = [raw_column(f, columns[f.column], src) for f in self.schema.dense]
        dense = np.concatenate(parts, axis=1) if parts else np.zeros((table.num_rows, 0), np.float32)
        inputs["dense"] = _tensor(dense)
        return inputs

    def table_from_rows(self, rows: Sequence[Mapping[str, Any]], where: str = "input rows") -> pa.Table:
        """A list of dicts (raw ids, strings included; tags as lists or separator strings; raw
        values; None for nulls) -> an Arrow table of the model's columns. A key missing from some
        dicts is a null there; a column missing from every dict is an error."""
        columns = {}
        for col in self._columns:
            values = [r.get(col) for r in rows]
            if rows and not any(col in r for r in rows):
                raise DataError(f"{where}: missing column {col!r} (the model reads {', '.join(self._columns)})")
            try:
                columns[col] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                raise DataError(f"{where}: column {col!r} has values Arrow cannot put in one column "
                                f"(mixed types?): {e}") from None
        return pa.table(columns) if columns else pa.table({"_": pa.nulls(len(rows))})

    # ---- prediction ---------------------------------------------------------------------------

    def predict_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Model input dict -> {tower: B float32 probabilities}; in bf16 for batches of at least
        ``bf16_min_rows`` rows when ``precision`` is bf16: on the packed layers, or (an artefact
        without them) under bf16 autocast."""
        # packed weights choose per batch themselves, and must not meet TorchScript's autocast
        bf16 = (self.precision.resolved == "bf16" and not self.packed_layers
                and inputs["dense"].size(0) >= self.bf16_min_rows)
        # not inference_mode: its tensors break later autograd in the caller
        with torch.no_grad(), autocast("cpu", self.precision if bf16 else "none"):
            out = self.model(dict(inputs))
        return {t: out[f"probs_{t}"].numpy() for t in self.tower_names}

    def predict_batch(self, dense: torch.Tensor, sparse: Any) -> dict[str, np.ndarray]:
        """An already-converted batch (``dense`` B x D, ``sparse`` a KeyedJaggedTensor with the
        schema's keys, e.g. a ``ParquetReader`` ``Batch``'s) -> {tower: B float32 probabilities}.
        Padding rows are scored too; slice them off."""
        jagged = sparse.to_dict()  # duck-typed: no TorchRec import here
        inputs = {"dense": dense}
        for k in self.schema.keys:
            inputs[f"{k}.values"] = jagged[k].values()
            inputs[f"{k}.lengths"] = jagged[k].lengths()
        return self.predict_inputs(inputs)

    def predict_arrow(self, table: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
        """B raw rows (columns named as in the training data) -> {tower: B float32 probabilities},
        in row order. Extra columns are ignored."""
        if table.num_rows == 0:
            return {t: np.zeros(0, np.float32) for t in self.tower_names}
        return self.predict_inputs(self.inputs_from_arrow(table))

    def predict_rows(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """A list of raw rows (dicts) -> {tower: B float32 probabilities}, in row order."""
        return self.predict_arrow(self.table_from_rows(rows))


class _IntIds:
    """The single-id, integer-column IdFeatures with ``hash_bucket_size`` or ``num_buckets`` (not
    zch), converted together: K columns -> one K x B int64 array, one ``mix64`` and one modulo
    (per-feature bucket counts broadcast) for the hashed ones, one range check for the bucketed
    ones. The rules are ``features.ids_to_rows``'; a null id is an empty bag, as in
    ``bag_column``. Columns of another type (strings, dictionary-encoded, lists, floats) are left
    to ``bag_column``, which also words their errors."""

    def __init__(self, schema: Schema) -> None:
        self.features = [f for f in schema.sparse
                         if f.feature_type == "IdFeature" and not f.zch_size and (f.hash_bucket_size or f.num_buckets)]
        self.buckets = np.array([f.hash_bucket_size for f in self.features], np.uint64)[:, None]
        self.limits = np.array([f.num_buckets for f in self.features], np.int64)[:, None]
        self.hashed = np.array([bool(f.hash_bucket_size) for f in self.features])

    def inputs(self, columns: Mapping[str, pa.ChunkedArray | pa.Array], rows: int,
               src: Source) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{feature: (values, lengths) tensors} for the features whose column is integer-typed."""
        # chunked or not: null_count, is_valid, fill_null and to_numpy read either
        arrays = [(f, columns[f.column]) for f in self.features if pa.types.is_integer(columns[f.column].type)]
        if not arrays:
            return {}
        which = [self.features.index(f) for f, _ in arrays] if len(arrays) < len(self.features) else None
        ids = np.empty((len(arrays), rows), np.int64)
        valid = None
        for k, (_, arr) in enumerate(arrays):
            if arr.null_count:
                if valid is None:
                    valid = np.ones((len(arrays), rows), bool)
                valid[k] = arr.is_valid().to_numpy(zero_copy_only=False)
                arr = arr.fill_null(0)  # 0 is in every range; the null's slot is dropped below
            ids[k] = arr.to_numpy(zero_copy_only=False)  # any integer type, wrapping like astype(int64)
        limits, buckets, hashed = (self.limits, self.buckets, self.hashed) if which is None else (
            self.limits[which], self.buckets[which], self.hashed[which])
        if not hashed.all():
            b = np.flatnonzero(~hashed)
            bad = (ids[b] < 0) | (ids[b] >= limits[b])
            if bad.any():
                i = int(np.flatnonzero(bad.any(axis=1))[0])
                f, row = arrays[b[i]][0], ids[b[i]]
                raise DataError(f"{src.path}: column {f.column!r} has {int(bad[i].sum())} ids outside "
                                f"[0, num_buckets={f.num_buckets}), e.g. {int(row[bad[i]][0])}; "
                                "use hash_bucket_size for raw ids")
        if hashed.any():
            h = np.flatnonzero(hashed) if not hashed.all() else slice(None)
            ids[h] = (mix64(ids[h].view(np.uint64)) % buckets[h]).view(np.int64)
        # unbind: K row views in one call (indexing a tensor K times costs more than the rest at 1 row)
        values = torch.from_numpy(ids).unbind(0)
        if valid is None:
            lengths = torch.ones(ids.shape, dtype=torch.int64).unbind(0)
            return {f.name: (values[k], lengths[k]) for k, (f, _) in enumerate(arrays)}
        lengths = torch.from_numpy(valid.astype(np.int64)).unbind(0)
        return {f.name: (values[k] if valid[k].all() else torch.from_numpy(ids[k][valid[k]]), lengths[k])
                for k, (f, _) in enumerate(arrays)}


def _typed(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """An all-null column (Arrow type ``null``, e.g. from dicts whose values are all None) as
    int64 nulls: empty bags, or 0.0 raw values, as in training."""
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.int64())
    return column


def _tensor(a: np.ndarray) -> torch.Tensor:
    """numpy -> tensor without copying when the array is writable and contiguous."""
    return torch.from_numpy(np.require(a, requirements=("C", "W")))
