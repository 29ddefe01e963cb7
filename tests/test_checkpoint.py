"""Checkpoints: exact resume, resume on other world sizes, atomic saves, retention, self-verification
(damaged checkpoints skipped or refused), saves that fail (full disk, one rank's write)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from aitm_torchrec import checkpoint
from aitm_torchrec.config import LearningRateSchedule
from aitm_torchrec.train import lr_multiplier
from tests.multiprocess import run_ranks

TW = "sharding_config.sharding_types=[table_wise]"


def _main_runs(config_path: str, runs: list[list[str]]) -> list[dict]:
    """Several training jobs, one after the other, in the same processes and process group."""
    from aitm_torchrec import dist as aitm_dist
    from launch.train import main

    aitm_dist.setup()
    try:
        return [main(["--config", config_path, *overrides]) for overrides in runs]
    finally:
        aitm_dist.teardown()


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = [TW, "train_config.log_step_count_steps=1", "eval_input_path=[]"]
    out = run_ranks(_main_runs, str(tiny_config), [
        [*common, f"model_dir={a}", "train_config.num_steps=24"],
        [*common, f"model_dir={b}", "train_config.num_steps=12"],
        [*common, f"model_dir={b}", "train_config.num_steps=24"],
    ])[0]
    whole, first, second = (dict(r["train"]["loss"]) for r in out)
    assert out[2]["train"]["resumed_from_step"] == 12 and out[2]["train"]["steps_this_run"] == 12
    assert sorted(second) == list(range(13, 25))
    for step in range(1, 13):
        assert first[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7)
    for step in range(13, 25):
        assert second[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6), f"step {step}"


@pytest.mark.slow
def test_resume_on_one_and_four_ranks_reshards_tables(tiny_config, tmp_path):
    d = str(tmp_path / "run")
    saved = run_ranks(_main_runs, str(tiny_config), [[TW, f"model_dir={d}", "train_config.num_steps=10"]])[0][0]
    # Same step count: nothing to train, so eval scores exactly the saved model on the new world size.
    for nproc in (1, 4):
        again = run_ranks(_main_runs, str(tiny_config), [[TW, f"model_dir={d}", "train_config.num_steps=10"]],
                          nproc=nproc)[0][0]
        assert again["world_size"] == nproc and again["train"]["resumed_from_step"] == 10
        for tower, m in saved["eval"].items():
            assert again["eval"][tower]["auc"] == pytest.approx(m["auc"], abs=1e-6)
            assert again["eval"][tower]["logloss"] == pytest.approx(m["logloss"], rel=1e-5)
    more = run_ranks(_main_runs, str(tiny_config), [[TW, f"model_dir={d}", "train_config.num_steps=16"]],
                     nproc=1)[0][0]
    assert more["train"]["resumed_from_step"] == 10 and more["train"]["steps_this_run"] == 6


def _crash_mid_save(root: str) -> None:
    import os

    from aitm_torchrec import dist as aitm_dist

    env = aitm_dist.setup()
    state = {"w": torch.arange(10.0) + env.rank}
    checkpoint.save(Path(root), 1, state, {"ok": True}, env.is_main)
    if env.rank == 1:
        os._exit(3)  # dies inside the second save, before the rename
    checkpoint.save(Path(root), 2, state, {"ok": True}, env.is_main)


@pytest.mark.slow
def test_a_crash_mid_save_leaves_no_checkpoint_that_looks_complete(tmp_path):
    with pytest.raises(ChildFailedError):
        run_ranks(_crash_mid_save, str(tmp_path))
    assert [step for step, _ in checkpoint.checkpoints(tmp_path)] == [1]
    assert checkpoint.latest(tmp_path).name == "step_00000001"


@pytest.mark.slow
def test_keep_last_n_checkpoints(tiny_config, tmp_path):
    d = tmp_path / "run"
    run_ranks(_main_runs, str(tiny_config), [[f"model_dir={d}", "train_config.num_steps=8",
                                             "train_config.save_checkpoints_steps=2",
                                             "train_config.keep_checkpoint_max=2", "eval_input_path=[]"]])
    assert [s for s, _ in checkpoint.checkpoints(d / "checkpoints")] == [6, 8]
    meta = json.loads((d / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["world_size"] == 2


def test_lr_schedule_shapes():
    warm = LearningRateSchedule(warmup_steps=10, warmup_start_ratio=0.1)
    assert lr_multiplier(0, warm, 100) == pytest.approx(0.1)
    assert lr_multiplier(5, warm, 100) == pytest.approx(0.55)
    assert lr_multiplier(10, warm, 100) == 1.0 and lr_multiplier(99, warm, 100) == 1.0
    lin = LearningRateSchedule(warmup_steps=10, decay="linear", min_ratio=0.2)
    assert lr_multiplier(10, lin, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, lin, 110) == pytest.approx(0.6)
    assert lr_multiplier(110, lin, 110) == pytest.approx(0.2)
    cos = LearningRateSchedule(decay="cosine", decay_steps=100)
    assert lr_multiplier(50, cos, 1000) == pytest.approx(0.5)
    assert lr_multiplier(100, cos, 1000) == pytest.approx(0.0)
    exp = LearningRateSchedule(decay="exponential", decay_steps=10, decay_rate=0.5)
    assert lr_multiplier(20, exp, 1000) == pytest.approx(0.25)


# --------------------------------------------------------------------------------------------
# Self-verifying checkpoints: a real small DCP checkpoint, damaged in the ways production meets.

def _small_checkpoints(root: Path) -> list[Path]:
    """Two single-process DCP checkpoints (steps 1 and 2) of a few tensors under ``root``."""
    state = {"w": torch.arange(2000.0), "b": torch.ones(3, 4), "step": torch.tensor(7)}
    return [checkpoint.save(root, step, state, {"note": "test"}, is_main=True) for step in (1, 2)]


def _truncate(ckpt: Path) -> str:
    f = ckpt / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-100])
    return "file __0_0.distcp is"


def _remove(ckpt: Path) -> str:
    (ckpt / "__0_0.distcp").unlink()
    return "file __0_0.distcp is missing"


def _flip_a_byte(ckpt: Path) -> str:
    f = ckpt / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return "file __0_0.distcp does not match the sha256 in meta.json (checksum mismatch"


def _corrupt_meta(ckpt: Path) -> str:
    (ckpt / "meta.json").write_text('{"step": 2, "files": {')
    return "meta.json is unreadable"


DAMAGE = {"truncated shard": _truncate, "missing shard": _remove, "flipped byte": _flip_a_byte,
          "corrupted meta.json": _corrupt_meta}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_checkpoint_is_named_and_the_one_before_is_used(tmp_path, damage):
    one, two = _small_checkpoints(tmp_path)
    checkpoint.verify(two)
    problem = damage(two)
    with pytest.raises(checkpoint.CheckpointError, match="is damaged") as err:
        checkpoint.verify(two)
    assert str(err.value).startswith(f"checkpoint {two} is damaged: ") and problem in str(err.value)
    warnings: list[str] = []
    assert checkpoint.latest_verified(tmp_path, warn=warnings.append) == one
    assert len(warnings) == 1 and str(two) in warnings[0] and problem in warnings[0]
    # An explicit checkpoint (scoring, export) stops with the same sentence instead.
    state = {"w": torch.zeros(2000), "b": torch.zeros(3, 4), "step": torch.tensor(0)}
    with pytest.raises(checkpoint.CheckpointError, match="is damaged"):
        checkpoint.load(two, state)
    assert checkpoint.load(one, state)["step"] == 1 and state["w"][5] == 5.0


def test_size_mismatch_is_reported_with_both_sizes(tmp_path):
    _, two = _small_checkpoints(tmp_path)
    size = (two / "__0_0.distcp").stat().st_size
    _truncate(two)
    with pytest.raises(checkpoint.CheckpointError, match=f"is {size - 100} bytes, meta.json records {size} "
                                                         r"\(size mismatch"):
        checkpoint.verify(two)


def test_a_checkpoint_from_before_file_lists_loads_with_a_warning(tmp_path):
    _, two = _small_checkpoints(tmp_path)
    meta = json.loads((two / "meta.json").read_text())
    del meta["files"]
    (two / "meta.json").write_text(json.dumps(meta))
    warnings: list[str] = []
    checkpoint.verify(two, warn=warnings.append)
    assert warnings == [f"checkpoint {two} cannot be verified: it was written before meta.json recorded its "
                        "files' sizes and checksums"]
    assert checkpoint.latest_verified(tmp_path, warn=warnings.append) == two
    state = {"w": torch.zeros(2000), "b": torch.zeros(3, 4), "step": torch.tensor(0)}
    assert checkpoint.load(two, state)["step"] == 2 and int(state["step"]) == 7


def test_verify_command_prints_a_line_per_checkpoint_and_fails_on_damage(tmp_path, capsys):
    one, two = _small_checkpoints(tmp_path / "checkpoints")
    assert checkpoint.main(["verify", str(tmp_path)]) == 0  # a model_dir: its checkpoints/
    assert checkpoint.main(["verify", str(one)]) == 0
    _remove(two)
    assert checkpoint.main(["verify", str(tmp_path / "checkpoints")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["OK", "OK", "OK", "OK", "DAMAGED"]
    assert lines[-1] == f"DAMAGED     checkpoint {two} is damaged: file __0_0.distcp is missing"
    assert checkpoint.main(["verify", str(tmp_path / "nothing")]) == 1


@pytest.mark.slow
def test_verify_runs_as_a_module(tmp_path):
    import subprocess
    import sys

    _, two = _small_checkpoints(tmp_path)
    _corrupt_meta(two)
    out = subprocess.run([sys.executable, "-m", "aitm_torchrec.checkpoint", "verify", str(tmp_path)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines()[0].startswith("OK ")
    assert out.stdout.splitlines()[1].startswith(f"DAMAGED     checkpoint {two} is damaged: meta.json is unreadable")


@pytest.mark.slow
def test_training_skips_a_damaged_newest_checkpoint_and_resumes_from_the_one_before(tiny_config, tmp_path):
    import shutil

    first = tmp_path / "first"
    common = [TW, "eval_input_path=[]", "train_config.save_checkpoints_steps=4", "train_config.num_steps=8"]
    run_ranks(_main_runs, str(tiny_config), [[*common, f"model_dir={first}"]])
    assert [s for s, _ in checkpoint.checkpoints(first / "checkpoints")] == [4, 8]
    dirs = {}
    for name, damage in [("truncated", lambda c: _truncate_file(c / "__1_0.distcp")),
                         ("missing", lambda c: (c / "__0_0.distcp").unlink()),
                         ("meta", _corrupt_meta)]:
        dirs[name] = tmp_path / name
        shutil.copytree(first, dirs[name])
        damage(dirs[name] / "checkpoints" / "step_00000008")
    out = run_ranks(_main_runs, str(tiny_config), [[*common, f"model_dir={d}"] for d in dirs.values()])[0]
    for name, summary in zip(dirs, out):
        assert summary["train"]["resumed_from_step"] == 4 and summary["train"]["steps_this_run"] == 4, name
        checkpoint.verify(dirs[name] / "checkpoints" / "step_00000008")  # written again, whole


def _truncate_file(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


# --------------------------------------------------------------------------------------------
# A save that fails: full disk, a write that fails on one rank.

def _save_until_it_fails(root: str, limit_ranks: list[int]) -> str:
    """Saves a small checkpoint, then a larger one that cannot be written (full tmpfs under
    ``root``, or RLIMIT_FSIZE on ``limit_ranks``); returns this rank's CheckpointError."""
    import resource
    import signal

    from aitm_torchrec import dist as aitm_dist

    env = aitm_dist.setup()
    checkpoint.save(Path(root), 1, {"w": torch.arange(1000.0) + env.rank}, {"ok": True}, env.is_main)
    if env.rank in limit_ranks:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        # A key per rank: DCP writes a replicated tensor on rank 0 only.
        checkpoint.save(Path(root), 2, {f"w{env.rank}": torch.zeros(1 << 20)}, {"ok": True}, env.is_main)
    except checkpoint.CheckpointError as e:
        return str(e)
    finally:
        aitm_dist.teardown()
    return "saved"


def _assert_failed_cleanly(root: Path, messages: dict[int, str], os_error: str) -> None:
    for rank, text in messages.items():
        assert text.startswith(f"saving checkpoint step_00000002 into {root} failed on rank "), (rank, text)
        assert os_error in text, (rank, text)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]  # no step_2, no .step_2.tmp
    state = {"w": torch.zeros(1000)}
    checkpoint.load(root / "step_00000001", state)
    assert torch.equal(state["w"], torch.arange(1000.0))


@pytest.mark.slow
def test_a_full_disk_fails_the_save_on_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True, text=True).returncode == 0
    try:
        # A 1 MiB tmpfs holds the first checkpoint, not the second (4 MiB per rank). Where mounting
        # is not allowed, RLIMIT_FSIZE on both ranks stands in (EFBIG instead of ENOSPC).
        messages = run_ranks(_save_until_it_fails, str(disk), [] if mounted else [0, 1])
        _assert_failed_cleanly(disk, messages, "probable cause: [Errno 28] No space left on device" if mounted
                               else "probable cause: [Errno 27] File too large")
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_a_write_failing_on_one_rank_stops_every_rank_with_the_reason(tmp_path):
    messages = run_ranks(_save_until_it_fails, str(tmp_path), [1])
    _assert_failed_cleanly(tmp_path, messages, "[Errno 27] File too large: files are limited to 65536 bytes on rank 1")
