"""Mixed precision of the dense layers: ``train_config.mixed_precision`` resolved for a device.

``auto`` (the default) takes bf16 where the hardware runs it faster than fp32 and fp32 elsewhere:

- a CUDA device that supports bf16 (``torch.cuda.is_bf16_supported()``): ``bf16``;
- a CPU with AMX (``amx_bf16`` and ``amx_tile`` among the flags of ``/proc/cpuinfo``): ``bf16``;
  oneDNN runs bf16 GEMMs on the AMX tiles. Without AMX (AVX-512 BF16 alone included) bf16
  autocast is slower than fp32: the casts around every layer cost more than the GEMMs gain;
- anything else, or no ``/proc/cpuinfo`` to read: ``none`` (fp32).

``none``, ``bf16`` and ``fp16`` are taken as written (fp16 needs CUDA: training and scoring
refuse it on the CPU with ``unsupported``'s message). ``resolve`` decides for one device;
``resolve_for_job`` makes every rank of a job agree (bf16 only where every rank resolved bf16).
Training, scoring and ``python -m benchmarks train`` all go through them; the serving
``Predictor`` resolves the precision its artefact records with ``resolve`` on the machine that
loads it (``serving.serving_precision``; docs/serving.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
AMX_FLAGS = ("amx_bf16", "amx_tile")
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """What the config asked (``requested``), what runs (``resolved``: none, bf16 or fp16), and why."""

    requested: str
    resolved: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None: fp32, no autocast."""
        return AUTOCAST_DTYPES[self.resolved]

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def describe(self) -> str:
        """``mixed precision: auto -> none (CPU without AMX)``."""
        return f"mixed precision: {self.requested} -> {self.resolved} ({self.reason})"


def cpu_flags(cpuinfo: str | Path = CPUINFO) -> frozenset[str] | None:
    """The CPU flags in ``cpuinfo``: a path to read (``/proc/cpuinfo``) or its text. None when the
    path does not exist or the text has no ``flags`` line."""
    if isinstance(cpuinfo, Path):
        try:
            cpuinfo = cpuinfo.read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return None


def resolve(requested: str, device: torch.device | str, cpuinfo: str | Path = CPUINFO,
            cuda_bf16: bool | None = None) -> Precision:
    """``requested`` (auto, none, bf16, fp16) for a job whose dense layers run on ``device``.

    ``cpuinfo``: where the CPU's flags come from (a path, or the text itself); ``cuda_bf16``:
    whether the CUDA device supports bf16 (None: ask ``torch.cuda.is_bf16_supported()``)."""
    if requested != "auto":
        if requested not in AUTOCAST_DTYPES:
            raise ValueError(f"mixed precision {requested!r} is not one of auto, {', '.join(AUTOCAST_DTYPES)}")
        return Precision(requested, requested, "set in the config")
    kind = torch.device(device).type
    if kind == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        return Precision("auto", "bf16", "CUDA device with bf16") if cuda_bf16 else \
            Precision("auto", "none", "CUDA device without bf16")
    if kind == "cpu":
        flags = cpu_flags(cpuinfo)
        if flags is None:
            return Precision("auto", "none", f"CPU flags unknown: no flags in {cpuinfo}"
                             if isinstance(cpuinfo, Path) else "CPU flags unknown")
        if all(f in flags for f in AMX_FLAGS):
            return Precision("auto", "bf16", "CPU with AMX")
        return Precision("auto", "none", "CPU without AMX")
    return Precision("auto", "none", f"{kind} device")


def unsupported(resolved: str, device: torch.device | str) -> str | None:
    """Why a job's dense layers cannot run in ``resolved`` on ``device`` (the error message that
    names the key), or None: fp16 autocast needs CUDA."""
    if resolved == "fp16" and torch.device(device).type != "cuda":
        return "train_config.mixed_precision: fp16 needs CUDA; use bf16 or none on the CPU"
    return None


def with_int8_linears(precision: Precision, why: str) -> Precision:
    """``precision`` for dense layers whose Linears are int8 (dynamic quantization): they take fp32
    inputs, so anything but fp32 becomes fp32, the reason ``why``; fp32 stays as it is."""
    if precision.resolved == "none":
        return precision
    return Precision(precision.requested, "none", why)


def resolve_for_job(requested: str, device: torch.device | str, cpuinfo: str | Path = CPUINFO) -> Precision:
    """``resolve`` on every rank (``cpuinfo`` as there), agreed: bf16 only when every rank
    resolved bf16 (ranks on different hardware run the same precision). Collective when
    ``requested`` is auto."""
    from aitm_torchrec import dist as aitm_dist

    mine = resolve(requested, device, cpuinfo)
    if requested != "auto":
        return mine
    every = aitm_dist.all_gather(mine)
    if all(p.resolved == mine.resolved for p in every):
        return mine
    odd = [f"rank {r}: {p.reason}" for r, p in enumerate(every) if p.resolved != "bf16"]
    return Precision("auto", "none", "ranks differ, " + "; ".join(odd))


def autocast(device_type: str, precision: Precision | str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (a ``Precision`` or none/bf16/fp16)."""
    resolved = precision.resolved if isinstance(precision, Precision) else precision
    dtype = AUTOCAST_DTYPES[resolved]
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)
