"""train_config.mixed_precision: auto resolved per device (CUDA bf16, CPU AMX, else fp32), the
explicit values as written, the config default and validation, and the resolved value in
summary.json."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from aitm_torchrec.config import ConfigError, TrainConfig, load_config
from aitm_torchrec.precision import CPUINFO, Precision, cpu_flags, resolve, unsupported

# The first processor's lines of /proc/cpuinfo on a CPU with AMX (abridged) and on one with
# AVX-512 BF16 but no AMX.
AMX_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
"""
NO_AMX_CPUINFO = AMX_CPUINFO.replace(" amx_bf16", "").replace(" amx_tile", "").replace(" amx_int8", "")


def _this_machine_has_amx() -> bool | None:
    """Read here, independently of the code under test: None without /proc/cpuinfo."""
    if not CPUINFO.exists():
        return None
    flags = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return {"amx_bf16", "amx_tile"} <= flags


def test_auto_on_this_machines_cpu_follows_its_amx_flags():
    got = resolve("auto", "cpu")
    amx = _this_machine_has_amx()
    if amx:
        assert got == Precision("auto", "bf16", "CPU with AMX")
    elif amx is False:
        assert got == Precision("auto", "none", "CPU without AMX")
    else:
        assert got.resolved == "none" and "CPU flags unknown" in got.reason
    assert got.describe() == f"mixed precision: auto -> {got.resolved} ({got.reason})"


def test_auto_on_a_cpu_with_amx_is_bf16_given_as_text_or_path(tmp_path):
    assert resolve("auto", "cpu", AMX_CPUINFO) == Precision("auto", "bf16", "CPU with AMX")
    path = tmp_path / "cpuinfo"
    path.write_text(AMX_CPUINFO * 2)  # one block per processor
    assert resolve("auto", torch.device("cpu"), path).resolved == "bf16"
    assert cpu_flags(path) >= {"amx_bf16", "amx_tile", "avx512_bf16"}


def test_auto_on_a_cpu_without_amx_or_without_cpuinfo_is_fp32(tmp_path):
    assert resolve("auto", "cpu", NO_AMX_CPUINFO) == Precision("auto", "none", "CPU without AMX")
    only_one = AMX_CPUINFO.replace(" amx_tile", "")  # both flags are needed
    assert resolve("auto", "cpu", only_one).resolved == "none"
    missing = resolve("auto", "cpu", tmp_path / "no_cpuinfo")
    assert missing.resolved == "none" and "no_cpuinfo" in missing.reason
    assert resolve("auto", "cpu", "").resolved == "none"
    assert resolve("auto", "meta") == Precision("auto", "none", "meta device")


def test_auto_on_cuda_follows_bf16_support_given():
    assert resolve("auto", "cuda", cuda_bf16=True) == Precision("auto", "bf16", "CUDA device with bf16")
    assert resolve("auto", "cuda", cuda_bf16=False) == Precision("auto", "none", "CUDA device without bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_this_cuda_device_asks_torch():
    want = "bf16" if torch.cuda.is_bf16_supported() else "none"
    assert resolve("auto", torch.device("cuda", 0)).resolved == want


@pytest.mark.parametrize("value", ["none", "bf16", "fp16"])
def test_explicit_values_are_taken_as_written(value):
    got = resolve(value, "cpu", AMX_CPUINFO)
    assert got == Precision(value, value, "set in the config")
    assert resolve(value, "cpu", NO_AMX_CPUINFO) == got
    assert got.dtype == {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[value]


def test_fp16_on_the_cpu_is_refused_by_training_naming_the_key(tiny_config):
    from aitm_torchrec.dist import DistEnv
    from aitm_torchrec.train import build

    assert unsupported("fp16", "cpu") == "train_config.mixed_precision: fp16 needs CUDA; use bf16 or none on the CPU"
    assert unsupported("fp16", torch.device("cuda", 0)) is None
    assert all(unsupported(v, "cpu") is None for v in ("none", "bf16"))
    cfg = load_config(str(tiny_config), ["train_config.mixed_precision=fp16"])
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        build(cfg, env)  # refused before any table is planned or any collective runs


def test_config_default_is_auto_and_unknown_values_name_the_key():
    assert TrainConfig().mixed_precision == "auto"
    assert load_config(None).train_config.mixed_precision == "auto"
    assert load_config(None, ["train_config.mixed_precision=none"]).train_config.mixed_precision == "none"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train_config.mixed_precision=fp32"])
    assert "train_config.mixed_precision" in str(e.value) and "auto" in str(e.value)


def _train(config: str, overrides: list[str]) -> dict:
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.train import TrainOptions, run

    env = aitm_dist.setup()
    try:
        return run(load_config(config, overrides), env, TrainOptions(resume=False)).to_dict()
    finally:
        aitm_dist.teardown()


def _agree(cpuinfos: list[str]) -> dict:
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.precision import resolve_for_job

    env = aitm_dist.setup()
    try:
        return dataclasses.asdict(resolve_for_job("auto", env.device, cpuinfos[env.rank]))
    finally:
        aitm_dist.teardown()


def test_ranks_agree_on_bf16_only_when_every_rank_has_it():
    from tests.multiprocess import run_ranks

    same = run_ranks(_agree, [AMX_CPUINFO, AMX_CPUINFO])
    assert same[0] == same[1] == {"requested": "auto", "resolved": "bf16", "reason": "CPU with AMX"}
    mixed = run_ranks(_agree, [AMX_CPUINFO, NO_AMX_CPUINFO])
    assert mixed[0] == mixed[1] == {"requested": "auto", "resolved": "none",
                                    "reason": "ranks differ, rank 1: CPU without AMX"}


def test_summary_records_what_auto_resolved_to(tiny_config, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="aitm_torchrec.train")
    model_dir = tmp_path / "auto"
    summary = _train(str(tiny_config), ["train_config.mixed_precision=auto", "train_config.num_steps=3",
                                        "eval_config.num_steps=1", f"model_dir={model_dir}"])
    want = dataclasses.asdict(resolve("auto", "cpu"))
    assert summary["mixed_precision"] == want
    assert json.loads(Path(model_dir / "summary.json").read_text())["mixed_precision"] == want
    assert f"mixed precision: auto -> {want['resolved']} ({want['reason']})" in caplog.text
