"""Checkpoints: exact resume, resume on other world sizes, atomic saves, retention."""

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
