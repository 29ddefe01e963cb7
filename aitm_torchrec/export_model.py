"""Serving export: a trained checkpoint -> a self-contained TorchScript model with quantized tables.

    python launch/export.py model --output DIR [--config FILE] [--checkpoint DIR]
                                  [--quant none|int8|fp16|int4] [--dense-quant none|int8]
                                  [key.path=value ...]

``run(cfg, ModelExportOptions)``. Input: a training checkpoint of any world size
(``from_checkpoint.resolve_checkpoint``; read whole into this one process by
``from_checkpoint.local_model``, no process group). Output, written into a temporary directory
beside ``DIR`` and renamed into place (``outputs.publish_dir``), so ``DIR`` is never half-written:

- ``DIR/scripted_model.pt``: ``ServingModel`` around the model, its EmbeddingBagCollections
  (the wide and the task tables' too) swapped for TorchRec's quantized ones (``quantize_inference_model``;
  ``none`` keeps fp32 tables), each MLP's Linear -> BatchNorm pair folded into one Linear
  (``serving_dense.fold_batch_norms``), its ``nn.Linear`` layers dynamically quantized to int8 with ``dense_quant="int8"``
  (``quantize_dense``), or with ``none`` kept fp32 as ``serving_dense.ServingLinear`` layers (the
  cross networks as ``ServingCrossNet``), which the Predictor packs for bf16 GEMMs where its
  precision is bf16; fx-traced (``torchrec.fx.symbolic_trace``) and TorchScripted.
  forward(inputs: Dict[str, Tensor]) -> Dict[str, Tensor]:
    inputs  ``<feature>.values`` (int64 table rows, after the schema's id rule; zch features:
            the ids' zch keys, ``features.zch_keys``) and
            ``<feature>.lengths`` (B int64 bag sizes) per sparse feature, ``dense`` (B x D
            float32, normalised; D may be 0);
    outputs ``probs_<tower>`` (B float32 probabilities) per tower.
  zch tables (``ZchLookup``): each trained key -> row map is two sorted int64 tensors in the
  scripted code, looked up with ``torch.searchsorted``; keys it does not hold read the default
  row they read in training (``zch.trained_default_rows`` for the checkpoint's world size); the
  table itself is a plain EmbeddingBagCollection, quantized like the others.
  Loading it needs fbgemm_gpu's operators registered (``import fbgemm_gpu``), nothing else of
  TorchRec or this project; ``aitm_torchrec.serving.Predictor`` does that and the id rules.
- ``DIR/schema.json``: the schema (features, id rules, dense layout, towers; ``Schema.save``).
- ``DIR/meta.json``: checkpoint path and step, quantization (tables) and dense_quantization
  (Linear layers), mixed_precision (the config's ``train_config.mixed_precision`` as written,
  e.g. ``auto``: the Predictor resolves it on the machine that loads the artefact), sizes in
  bytes, versions, input and output names, and a self-check: the loaded artefact against the
  checkpoint's eager fp32 model on a random batch (max absolute difference of the probabilities).

A TorchScript file is code: load only artefacts you trust (ones this project wrote).
"""

# No ``from __future__ import annotations`` here: TorchScript compiles ``ServingModel.forward``
# and needs its annotations as types, not strings.

import copy
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchrec
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from aitm_torchrec.config import Config
from aitm_torchrec.from_checkpoint import checkpoint_meta, local_model, resolve_checkpoint
from aitm_torchrec.outputs import publish_dir
from aitm_torchrec.schema import Schema
from aitm_torchrec.serving import META_FILE, MODEL_FILE, SCHEMA_FILE, input_names, output_names
from aitm_torchrec.serving_dense import ServingLinear, fold_batch_norms, serving_layers

ARTEFACT_VERSION = 1

# --quant -> the table weight dtype of quantize_inference_model (None: fp32 tables, no swap).
# TorchRec pads quantized rows to 16 bytes (GPU vector loads): a 16-dim int8 row (16 bytes + 4 of
# fp16 scale and bias) would take 32 bytes, as much as fp16. fbgemm's CPU kernels take 4-byte
# alignment: 20 bytes. Measured in docs/serving.md.
ROW_ALIGNMENT = 4

QUANT_DTYPES = {"none": None, "int8": torch.qint8, "fp16": torch.float16, "int4": torch.quint4x2}

# --dense-quant: the Linear layers' weights. int8: PyTorch dynamic quantization (weights int8 per
# output channel, activations quantized per batch at run time, FBGEMM kernels, fp32 out).
DENSE_QUANTS = ("none", "int8")


def quantize_dense(model: nn.Module, dense_quant: str = "int8") -> nn.Module:
    """Swaps every ``nn.Linear`` under ``model`` (in place; returned) for a dynamically quantized
    one (``torch.ao.nn.quantized.dynamic.Linear``, qint8 weights per output channel, FBGEMM
    engine); ``"none"`` leaves ``model`` as it is. Nothing else is touched: tables (plain,
    quantized or sharded by DistributedModelParallel), BatchNorm and activations stay as they
    are, so a DMP-wrapped model's unsharded MLPs are quantized where they sit. Sets the
    process's quantized engine to ``fbgemm`` (x86 CPUs; FBGEMM picks its kernels for the CPU's
    instruction set). CPU only: the quantized Linear has no CUDA kernel."""
    if dense_quant not in DENSE_QUANTS:
        raise ValueError(f"dense quantization {dense_quant!r} is not one of {', '.join(DENSE_QUANTS)}")
    if dense_quant == "none":
        return model
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise RuntimeError("int8 dense layers need PyTorch's fbgemm quantized engine (x86 CPUs); this "
                           f"build has {torch.backends.quantized.supported_engines}")
    torch.backends.quantized.engine = "fbgemm"
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                if child.weight.device.type != "cpu":
                    raise ValueError(f"int8 dense layers run on the CPU; {name} is on {child.weight.device}")
                child.qconfig = per_channel_dynamic_qconfig
                setattr(parent, name, DynamicLinear.from_float(child))
    return model


@torch.fx.wrap
def zch_remap(features: KeyedJaggedTensor, names: list[str], sorted_keys: list[torch.Tensor],
              rows: list[torch.Tensor], zch_sizes: list[int], world_size: int) -> KeyedJaggedTensor:
    """The zch features of ``features`` with their keys replaced by table rows: the row holding
    the key (``sorted_keys[i]`` ascending, ``rows[i]`` aligned), else the default row the key
    read in training on ``world_size`` ranks. Scriptable; the same rule as ``zch.lookup_rows``."""
    values: list[torch.Tensor] = []
    lengths: list[torch.Tensor] = []
    block = 9223372036854775806 // world_size + 1  # ceil(ZCH_KEY_SPACE / W), ZCH_KEY_SPACE = 2^63 - 1, in int64
    for i in range(len(names)):
        jt = features[names[i]]
        keys = jt.values()
        at = torch.searchsorted(sorted_keys[i][:-1], keys)
        held = sorted_keys[i][at] == keys
        shard = torch.clamp(torch.div(keys, block, rounding_mode="floor"), max=world_size - 1)
        values.append(torch.where(held, rows[i][at], (shard + 1) * (zch_sizes[i] // world_size) - 1))
        lengths.append(jt.lengths())
    return KeyedJaggedTensor(keys=names, values=torch.cat(values), lengths=torch.cat(lengths),
                             stride=features.stride())


class ZchLookup(nn.Module):
    """A trained ``ManagedCollisionEmbeddingBagCollection`` for serving: its key -> row maps as
    plain sorted tensors (``zch_remap``: ``torch.searchsorted``) in front of its plain
    EmbeddingBagCollection, which ``quantize_inference_model`` quantizes like the other tables.
    forward(KJT) -> (pooled KeyedTensor, remapped KJT), as the MC-EBC returns in eval mode."""

    def __init__(self, mc_ebc: nn.Module, world_size: int) -> None:
        super().__init__()
        self.ebc = mc_ebc._embedding_module
        modules = mc_ebc._managed_collision_collection._managed_collision_modules
        configs = self.ebc.embedding_bag_configs()
        self.names = [c.feature_names[0] for c in configs]
        self.zch_sizes = [int(modules[c.name]._zch_size) for c in configs]
        self.world_size = int(world_size)
        self.keys_names, self.rows_names = [], []
        for i, c in enumerate(configs):
            m = modules[c.name]
            order = torch.argsort(m._mch_sorted_raw_ids, stable=True)
            self.register_buffer(f"keys_{i}", m._mch_sorted_raw_ids[order].clone())
            self.register_buffer(f"rows_{i}", m._mch_remapped_ids_mapping[order].clone())

    def forward(self, features: KeyedJaggedTensor) -> tuple[typing.Any, KeyedJaggedTensor]:
        n = len(self.names)
        remapped = zch_remap(features, self.names, [getattr(self, f"keys_{i}") for i in range(n)],
                             [getattr(self, f"rows_{i}") for i in range(n)], self.zch_sizes, self.world_size)
        return self.ebc(remapped), remapped


class ServingModel(nn.Module):
    """Dict of input tensors -> probabilities per tower, around a (traced) ``MultiTaskModel``.

    forward(inputs) -> {``probs_<tower>``: B float32}; see the module docstring for the inputs.
    The KeyedJaggedTensor is built here, inside the scripted code, so callers pass plain tensors.
    """

    def __init__(self, model: nn.Module, keys: list[str], towers: list[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = list(keys)
        self.value_names = [k + ".values" for k in keys]
        self.length_names = [k + ".lengths" for k in keys]
        self.output_names = ["probs_" + t for t in towers]

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dense = inputs["dense"]
        sparse = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.cat([inputs[n] for n in self.value_names]),
            lengths=torch.cat([inputs[n] for n in self.length_names]),
            stride=dense.size(0),
        )
        # .float(): under a caller's bf16 autocast (Predictor) the logits are bf16; the
        # probabilities stay float32 either way
        probs = torch.sigmoid(self.model(dense, sparse).float())
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.output_names):
            out[name] = probs[:, i]
        return out


def script_model(model: nn.Module, schema: Schema, quant: str = "int8",
                 row_alignment: int = ROW_ALIGNMENT, zch_world_size: int = 1,
                 dense_quant: str = "none") -> torch.jit.ScriptModule:
    """An eval-mode ``MultiTaskModel`` -> the scripted ``ServingModel`` (``model`` is not changed).
    ``row_alignment``: bytes each quantized table row is padded to. ``zch_world_size``: ranks of
    the training run (where unheld zch keys' default rows are; see ``ZchLookup``).
    ``dense_quant``: the Linear layers (``quantize_dense``), quantized on the eager copy before
    tracing (the dynamic quantized Linear is a leaf of the trace and scripts as it is); with
    ``none`` they and the cross networks become ``serving_dense`` layers (fp32 as exported; bf16
    GEMMs on packed weights once the Predictor packs them)."""
    if quant not in QUANT_DTYPES:
        raise ValueError(f"quantization {quant!r} is not one of {', '.join(QUANT_DTYPES)}")
    if dense_quant not in DENSE_QUANTS:
        raise ValueError(f"dense quantization {dense_quant!r} is not one of {', '.join(DENSE_QUANTS)}")
    model = copy.deepcopy(model).eval()
    fold_batch_norms(model)  # Linear -> BatchNorm as one Linear, before either dense form
    quantize_dense(model, dense_quant)
    if dense_quant == "none":  # int8 Linears stay as they are: they run fp32 only
        serving_layers(model)
    if getattr(model, "mc_ebc", None) is not None:
        model.mc_ebc = ZchLookup(model.mc_ebc, zch_world_size)
    dtype = QUANT_DTYPES[quant]
    if dtype is not None:
        from torchrec.inference.modules import quantize_inference_model
        from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

        quant_prep_customize_row_alignment(model, [EmbeddingBagCollection], row_alignment)
        model = quantize_inference_model(model, quantization_dtype=dtype)
    # Tracing a quantized model breaks the traced module in eager mode: trace a copy.
    # a ServingLinear branches on its packing and the batch size: a leaf of the trace, scripted as it is
    traced = torchrec.fx.symbolic_trace(copy.deepcopy(model), leaf_modules=[ServingLinear.__name__])
    # model.py uses `from __future__ import annotations`, so the graph carries annotations as
    # strings, which TorchScript rejects: resolve the inputs' types, drop the others.
    hints = typing.get_type_hints(type(model).forward)
    for node in traced.graph.nodes:
        node.type = hints.get(node.target) if node.op == "placeholder" else None
    traced.recompile()
    return torch.jit.script(ServingModel(traced, schema.keys, schema.tower_names).eval())


def example_inputs(schema: Schema, batch_size: int, seed: int = 0, max_bag: int = 3) -> dict[str, torch.Tensor]:
    """A random input dict of ``batch_size`` rows (rows in range, bags of 0..max_bag ids)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for f in schema.sparse:
        hi = 2 if f.feature_type == "IdFeature" else max_bag + 1
        lengths = rng.integers(0, hi, batch_size)
        inputs[f"{f.name}.values"] = torch.from_numpy(rng.integers(0, f.num_embeddings, int(lengths.sum())))
        inputs[f"{f.name}.lengths"] = torch.from_numpy(lengths.astype(np.int64))
    inputs["dense"] = torch.from_numpy(rng.standard_normal((batch_size, schema.dense_dim), dtype=np.float32))
    return inputs


def eager_probs(model: nn.Module, schema: Schema, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """B x T probabilities of an eager ``MultiTaskModel`` on a serving input dict."""
    dense = inputs["dense"]
    kjt = KeyedJaggedTensor(keys=schema.keys, values=torch.cat([inputs[f"{k}.values"] for k in schema.keys]),
                            lengths=torch.cat([inputs[f"{k}.lengths"] for k in schema.keys]), stride=dense.size(0))
    with torch.no_grad():
        return torch.sigmoid(model(dense, kjt))


def export(model: nn.Module, schema: Schema, output: Path, quant: str = "int8", meta: dict | None = None,
           dense_quant: str = "none") -> dict:
    """Writes the artefact of an eval-mode ``MultiTaskModel`` to ``output`` atomically; returns
    meta.json's contents. ``meta``: extra entries (checkpoint path and step)."""
    def build(tmp: Path) -> dict:
        scripted = script_model(model, schema, quant, zch_world_size=int((meta or {}).get("trained_world_size") or 1),
                                dense_quant=dense_quant)
        torch.jit.save(scripted, str(tmp / MODEL_FILE))
        schema.save(tmp / SCHEMA_FILE)
        check = _self_check(model, schema, tmp / MODEL_FILE)
        info = {
            "artefact_version": ARTEFACT_VERSION,
            **(meta or {}),
            "quantization": quant,
            "dense_quantization": dense_quant,
            "inputs": input_names(schema),
            "outputs": output_names(schema),
            "sizes_bytes": {
                MODEL_FILE: (tmp / MODEL_FILE).stat().st_size,
                SCHEMA_FILE: (tmp / SCHEMA_FILE).stat().st_size,
                "tables_fp32": sum(4 * f.num_embeddings * f.embedding_dim for f in schema.sparse),
                "wide_tables_fp32": sum(4 * f.num_embeddings * schema.wide_dim for f in schema.wide_tables.values()),
                "task_tables_fp32": sum(4 * f.num_embeddings * schema.task_embedding_dim
                                        for _, f in schema.task_tables.values()),
                "dense_params_fp32": sum(4 * p.numel() for n, p in model.named_parameters() if "ebc." not in n),
            },
            "versions": {"torch": torch.__version__, "torchrec": _version("torchrec"),
                         "fbgemm_gpu": _fbgemm_version()},
            "self_check": check,
        }
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        return info

    return publish_dir(build, Path(output), META_FILE, "serving model")


def _self_check(model: nn.Module, schema: Schema, path: Path, batch_size: int = 64) -> dict:
    """The saved file, loaded back, against the eager (unquantized) model on a random batch."""
    inputs = example_inputs(schema, batch_size)
    expected = eager_probs(model, schema, inputs)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        got = loaded(inputs)
    diff = max(float((got[n] - expected[:, i]).abs().max()) for i, n in enumerate(output_names(schema)))
    return {"rows": batch_size, "max_abs_diff_vs_checkpoint_model": diff}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _fbgemm_version() -> str:
    import fbgemm_gpu

    return getattr(fbgemm_gpu, "__version__", None) or _version("fbgemm_gpu-cpu")


@dataclass(frozen=True)
class ModelExportOptions:
    """``launch/export.py model``'s flags."""

    output: Path
    checkpoint: str | None = None  # default: the newest complete checkpoint under model_dir
    quant: str = "int8"  # table weights: one of QUANT_DTYPES
    dense_quant: str = "none"  # Linear layers: one of DENSE_QUANTS (int8: dynamic quantization)


def run(cfg: Config, opts: ModelExportOptions) -> dict:
    """Exports the checkpoint's model; returns meta.json's contents plus ``output``."""
    if opts.quant not in QUANT_DTYPES or opts.dense_quant not in DENSE_QUANTS:
        raise ValueError(f"quantization {opts.quant!r} / dense quantization {opts.dense_quant!r}: tables take "
                         f"{', '.join(QUANT_DTYPES)}; Linear layers {', '.join(DENSE_QUANTS)}")
    path = resolve_checkpoint(cfg, opts.checkpoint)
    ckpt = checkpoint_meta(path)
    model = local_model(cfg, path)
    info = export(model, cfg.schema, Path(opts.output), opts.quant,
                  {"checkpoint": str(path.resolve()), "step": ckpt.get("step"),
                   "trained_world_size": ckpt.get("world_size"),
                   "mixed_precision": cfg.train_config.mixed_precision}, opts.dense_quant)
    return {"output": str(Path(opts.output).resolve()), **info}
