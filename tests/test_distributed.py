"""Two real gloo processes: the plan shards the tables, training learns, outputs are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aitm_torchrec import dist as aitm_dist
from aitm_torchrec.config import load_config
from tests.multiprocess import run_ranks


def _train_and_inspect(config_path: str, overrides: list[str]) -> dict:
    import itertools

    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from aitm_torchrec.train import build, stream, train_reader

    cfg = load_config(config_path, overrides)
    env = aitm_dist.setup()
    dmp, optimizer, plan = build(cfg, env)
    local_rows = {}
    for key, value in dmp.state_dict().items():
        if "embedding_bags" in key and hasattr(value, "local_shards"):
            table = key.split(".")[-2]
            local_rows[table] = sum(s.tensor.shape[0] for s in value.local_shards())
    reader = train_reader(cfg, env)
    source = stream(reader, 0)
    batches = itertools.islice(source, cfg.train_config.num_steps)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)
    losses = [float(pipeline.progress(batches)[0]) for _ in range(cfg.train_config.num_steps)]
    source.close()
    aitm_dist.teardown()
    return {"rank": env.rank, "plan": plan, "local_rows": local_rows, "losses": losses}


@pytest.mark.slow
def test_table_wise_plan_shards_tables_and_loss_falls(tiny_config):
    cfg = load_config(tiny_config)
    results = run_ranks(_train_and_inspect, str(tiny_config),
                        ["sharding_config.sharding_types=[table_wise]", "train_config.num_steps=60"])
    plan = results[0]["plan"]
    assert plan == results[1]["plan"]
    sizes = {f.name: f.num_embeddings for f in cfg.feature_config.features}
    owners = {t: p["ranks"] for t, p in plan.items()}
    assert all(p["sharding_type"] == "table_wise" for p in plan.values())
    assert all(len(r) == 1 for r in owners.values())
    assert {r[0] for r in owners.values()} == {0, 1}, "both ranks must hold tables"
    for rank in (0, 1):
        held = results[rank]["local_rows"]
        mine = {t for t, r in owners.items() if r[0] == rank}
        # a rank holds every row of its own tables and nothing of the others'
        assert {t for t, n in held.items() if n > 0} == mine
        assert all(held[t] == sizes[t] for t in mine)
    for rank in (0, 1):
        losses = results[rank]["losses"]
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        assert last < 0.8 * first, f"rank {rank}: loss did not fall ({first:.4f} -> {last:.4f})"


def _first_dense_steps(config_path: str, runs: list[list[str]]) -> list[dict]:
    """Per run (a fresh build in the same process group): the dense gradients' norm at the first
    step and the norm of the step the dense parameters took."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from aitm_torchrec.train import build, dense_grad_norm, stream, train_reader

    env = aitm_dist.setup()
    out = []
    for overrides in runs:
        cfg = load_config(config_path, overrides)
        dmp, optimizer, _ = build(cfg, env)
        dense = list(optimizer.optimizers[-1][1].params.values())
        before = [p.detach().clone() for p in dense]
        source = stream(train_reader(cfg, env), 0)
        TrainPipelineSparseDist(dmp, optimizer, env.device).progress(source)  # one optimizer step
        source.close()
        moved = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach() - b)
                                                      for p, b in zip(dense, before)]))
        out.append({"norm": dense_grad_norm(optimizer), "moved": float(moved)})
    aitm_dist.teardown()
    return out


@pytest.mark.slow
def test_gradient_clipping_bounds_the_dense_step_alike_on_every_rank(tiny_config):
    """With SGD at rate 1 a dense step is minus the (clipped) gradient: unclipped it is as long as
    the tracked norm, clipped it is the clipping norm, and both ranks agree (DDP averaged the
    gradients before the norm was taken)."""
    sgd = ["train_config.dense_optimizer.name=sgd", "train_config.dense_optimizer.learning_rate=1.0"]
    results = run_ranks(_first_dense_steps, str(tiny_config),
                        [sgd, sgd + ["train_config.gradient_clipping_by_norm=0.001"]])
    (free, clipped), other = results[0], results[1]
    assert free["norm"] > 0.01
    assert free["moved"] == pytest.approx(free["norm"], rel=1e-4)
    assert clipped["norm"] == pytest.approx(free["norm"], rel=1e-5)  # tracked before clipping
    assert clipped["moved"] == pytest.approx(0.001, rel=1e-3)
    for mine, theirs in zip(results[0], other):
        assert mine == pytest.approx(theirs, rel=1e-5)


def _run_main(config_path: str) -> dict:
    from launch.train import main

    return main(["--config", config_path, "train_config.num_steps=30"])


@pytest.mark.slow
def test_train_entry_point_writes_summary_and_checkpoint(tiny_config):
    results = run_ranks(_run_main, str(tiny_config))
    cfg = load_config(tiny_config)
    summary = json.loads((Path(cfg.model_dir) / "summary.json").read_text())
    assert summary == json.loads(json.dumps(results[0]))  # the file is what rank 0 computed
    assert summary["world_size"] == 2
    assert summary["train"]["steps"] == 30
    assert summary["train"]["examples"] == 30 * 2 * cfg.data_config.batch_size
    assert summary["train"]["examples_per_s"] > 0
    for tower in ("ctr", "cvr"):
        m = summary["eval"][tower]
        assert 0.5 < m["auc"] <= 1.0 and m["logloss"] > 0
        assert m == results[1]["eval"][tower], "every rank computes the same whole-eval metrics"
    ckpt = Path(cfg.model_dir) / "checkpoints" / "step_00000030"
    assert (ckpt / "meta.json").exists() and (ckpt / ".metadata").exists()
    assert not list((Path(cfg.model_dir) / "checkpoints").glob(".*.tmp"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(Path(cfg.model_dir) / "tensorboard"))
    board.Reload()
    norms = board.Scalars("train/dense_grad_norm")  # one per log step (tiny_config logs every step)
    assert [e.step for e in norms] == list(range(1, 31)) and all(e.value > 0 for e in norms)
