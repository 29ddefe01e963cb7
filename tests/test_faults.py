"""Faults at the training step: a non-finite loss (stop or skip) and SIGTERM preemption under
TorchX, with real gloo ranks and real torchrun processes."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from aitm_torchrec import checkpoint
from aitm_torchrec.config import load_config
from aitm_torchrec.data import Batch
from aitm_torchrec.dist import DistEnv
from aitm_torchrec.faults import PREEMPTED_EXIT_CODE, diagnose
from aitm_torchrec.train import BatchesHook
from tests.multiprocess import run_ranks, torchx, torchx_background, training_pids
from tests.test_checkpoint import TW, _main_runs

COMMON = [TW, "train_config.log_step_count_steps=1", "eval_input_path=[]"]


def test_diagnose_names_the_tower_whose_logits_or_bce_went_non_finite():
    logits = torch.tensor([[0.5, float("nan")], [1.0, 2.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weights = torch.ones(2)
    nan = torch.tensor(float("nan"))
    assert diagnose(nan, logits, labels, weights, ["ctr", "cvr"]) == "tower cvr: logits non-finite in 1 of 2 rows"
    labels[1, 0] = float("nan")
    text = diagnose(nan, torch.zeros(2, 2), labels, weights, ["ctr", "cvr"])
    assert text == "tower ctr: BCE non-finite in 1 of 2 rows (labels or weights)"
    assert diagnose(torch.tensor(0.3), logits, labels, weights, ["ctr", "cvr"]) == ""


def _nan_labels(at_step: int, tower: int) -> BatchesHook:
    """The batch trained at (1-based) ``at_step`` gets NaN labels for ``tower`` on the last rank."""
    def wrap(batches: Iterator[Batch], start: int, env: DistEnv) -> Iterator[Batch]:
        if env.rank != env.world_size - 1:
            return batches

        def poisoned() -> Iterator[Batch]:
            for step, batch in enumerate(batches, start + 1):
                if step == at_step:
                    labels = batch.labels.clone()
                    labels[:, tower] = float("nan")
                    batch = Batch(batch.dense, batch.sparse, labels, batch.weights)
                yield batch

        return poisoned()

    return wrap


def _runs_with_nan_labels(config_path: str, runs: list[list[str]], at_step: int, tower: int) -> list[dict]:
    """Several training jobs (as ``_main_runs``), each with NaN labels at one step (``_nan_labels``)."""
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.train import run
    from launch.train import parse

    aitm_dist.setup()
    try:
        out = []
        for overrides in runs:
            cfg, opts = parse(["--config", config_path, *overrides])
            with aitm_dist.job() as env:
                out.append(run(cfg, env, opts, wrap_batches=_nan_labels(at_step, tower)).to_dict())
        return out
    finally:
        aitm_dist.teardown()


@pytest.mark.slow
def test_a_nan_loss_stops_training_naming_step_tower_and_last_checkpoint(tiny_config, tmp_path):
    d = tmp_path / "run"
    with pytest.raises(ChildFailedError) as err:  # NaN labels of cvr at step 7 on the last rank (1)
        run_ranks(_runs_with_nan_labels, str(tiny_config), [[*COMMON, f"model_dir={d}", "train_config.num_steps=10",
                                                             "train_config.save_checkpoints_steps=4"]], 7, 1)
    text = str(err.value)
    assert "training stopped at step 7: non-finite loss (rank 1: tower cvr: BCE non-finite in 128 of 128 rows" in text
    assert f"Last good checkpoint: {d / 'checkpoints' / 'step_00000004'}" in text
    assert [s for s, _ in checkpoint.checkpoints(d / "checkpoints")] == [4]


@pytest.mark.slow
def test_nonfinite_policy_skip_counts_the_batch_and_leaves_the_model_untouched(tiny_config, tmp_path):
    # Steps 1-6 then a NaN at step 7 (skipped: no table or dense update), so the model saved at
    # step 7 equals the one saved at step 6; training goes on to step 10.
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*COMMON, "train_config.nonfinite_policy=skip"]
    out = run_ranks(_runs_with_nan_labels, str(tiny_config), [
        [*common, f"model_dir={a}", "train_config.num_steps=6"],
        [*common, f"model_dir={b}", "train_config.num_steps=7"],
        [*common, f"model_dir={b}", "train_config.num_steps=10"],
    ], 7, 0)[0]
    assert out[0]["train"]["skipped_batches"] == 0
    assert out[1]["train"]["skipped_batches"] == 1 and out[2]["train"]["skipped_batches"] == 0
    assert 7 not in dict(out[1]["train"]["loss"])  # a skipped step's loss is not reported
    assert out[2]["train"]["resumed_from_step"] == 7 and out[2]["train"]["steps_this_run"] == 3
    six, seven = (_model_tensors(p) for p in (a / "checkpoints" / "step_00000006", b / "checkpoints" / "step_00000007"))
    assert six.keys() == seven.keys()
    for key in six:
        assert torch.equal(six[key], seven[key]), key


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's model and optimizer state, read without a process group."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(path)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
             if hasattr(m, "size") and (k.startswith("model.") or k.startswith("optim."))}
    checkpoint.load(path, state)
    return state


@pytest.mark.slow
def test_sigterm_saves_at_the_step_reached_and_the_rerun_resumes_exactly(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    root = Path(cfg.model_dir) / "checkpoints"
    args = ["--config", str(tiny_config), *COMMON, "train_config.num_steps=300"]
    with torchx_background("run", "dist.ddp", "-j", "1x2", "launch/train.py", *args, log=tmp_path / "torchx.log") as job:
        deadline = time.time() + 240
        while not (Path(cfg.model_dir) / "tensorboard").exists() and time.time() < deadline and job.proc.poll() is None:
            time.sleep(0.05)
        time.sleep(3)  # some steps in
        agents = training_pids(str(tiny_config), agent=True)
        assert agents and job.proc.poll() is None, "the job never started training"
        for pid in agents:
            os.kill(pid, signal.SIGTERM)
        job.proc.wait(timeout=120)
    output = job.output
    # torchrun forwards SIGTERM to its workers, waits for them (--shutdown-timeout, 30 s), then
    # re-raises the signal as SignalException: the job fails, to be retried by the scheduler.
    assert job.proc.returncode != 0, output[-4000:]
    assert "Received 15 death signal, shutting down workers" in output, output[-4000:]
    assert f"exiting with {PREEMPTED_EXIT_CODE} for the scheduler to retry" in output, output[-4000:]
    saved = [s for s, _ in checkpoint.checkpoints(root)]
    assert len(saved) == 1 and 0 < saved[0] < 300, (saved, output[-4000:])
    stopped = saved[0]
    assert not (Path(cfg.model_dir) / "summary.json").exists()  # it stopped before evaluating

    rerun = torchx("run", "dist.ddp", "-j", "1x2", "launch/train.py", *args,
                   "train_config.num_steps=" + str(stopped + 8))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    resumed = json.loads((Path(cfg.model_dir) / "summary.json").read_text())["train"]
    assert resumed["resumed_from_step"] == stopped and resumed["steps_this_run"] == 8

    whole = run_ranks(_main_runs, str(tiny_config), [[*COMMON, f"model_dir={tmp_path / 'whole'}",
                                                      f"train_config.num_steps={stopped + 8}"]])[0][0]
    expected = dict(whole["train"]["loss"])
    for step, loss in resumed["loss"]:
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    assert sorted(dict(resumed["loss"])) == list(range(stopped + 1, stopped + 9))
