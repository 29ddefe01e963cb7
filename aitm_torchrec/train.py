"""Train: build, shard, train with TorchRec's sparse-dist pipeline, evaluate, checkpoint, summarise.

One function, ``run(cfg, env)``, used by ``launch/train.py`` and the tests. Outputs go under
``cfg.model_dir``: ``checkpoints/step_<N>/`` (DCP), ``summary.json`` and ``tensorboard/``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from aitm_torchrec import checkpoint
from aitm_torchrec.config import Config, Optimizer, to_dict
from aitm_torchrec.data import Batch, ParquetReader
from aitm_torchrec.dist import DistEnv
from aitm_torchrec.metrics import TaskMetrics
from aitm_torchrec.sharding import describe, shard
from aitm_torchrec.task import build_train_module

logger = logging.getLogger(__name__)


def dense_optimizer(dmp: DistributedModelParallel, opt: Optimizer) -> KeyedOptimizerWrapper:
    """The dense side's optimizer over every parameter not handled in backward by a fused one."""
    cls = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[opt.name]
    kwargs = {"lr": opt.learning_rate, "weight_decay": opt.weight_decay}
    if opt.name != "sgd":
        kwargs["eps"] = opt.eps
    return KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                 lambda params: cls(params, **kwargs))


def build(cfg: Config, env: DistEnv) -> tuple[DistributedModelParallel, CombinedOptimizer, dict]:
    """Model on meta -> planned, sharded DMP with fused table optimizer + dense optimizer."""
    torch.manual_seed(cfg.train_config.seed)
    module = build_train_module(cfg, device="meta", dense_device=env.device)
    dmp, plan = shard(cfg, module, module.model.ebc, env)
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_optimizer(dmp, cfg.train_config.dense_optimizer)])
    return dmp, optimizer, describe(plan)


def train_reader(cfg: Config, env: DistEnv) -> ParquetReader:
    dc = cfg.data_config
    return ParquetReader(cfg.train_input_path, cfg.feature_config.features, [t.label_name for t in cfg.towers],
                         dc.batch_size, env.rank, env.world_size, dc.shuffle, cfg.train_config.seed,
                         dc.shuffle_buffer_size, dc.prefetch_size)


def eval_reader(cfg: Config, env: DistEnv) -> ParquetReader:
    dc = cfg.data_config
    return ParquetReader(cfg.eval_input_path, cfg.feature_config.features, [t.label_name for t in cfg.towers],
                         dc.eval_batch_size or dc.batch_size, env.rank, env.world_size, False, 0, 0,
                         dc.prefetch_size)


def stream(reader: ParquetReader, start_step: int) -> Iterator[Batch]:
    """Endless batches over epochs, starting at global step ``start_step`` (the data position)."""
    epoch, skip = divmod(start_step, reader.steps_per_epoch)
    while True:
        yield from itertools.islice(reader.epoch(epoch), skip, None)
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def evaluate(dmp: torch.nn.Module, reader: ParquetReader, tower_names: list[str], env: DistEnv,
             max_steps: int = 0) -> dict[str, dict[str, float]]:
    """Whole-eval per-task metrics, identical on every rank."""
    was_training = dmp.training
    dmp.eval()
    metrics = TaskMetrics(tower_names, env.device)
    steps = min(max_steps, reader.steps_per_epoch) if max_steps else reader.steps_per_epoch
    with contextlib.closing(reader.epoch(0)) as batches:
        for batch in tqdm(itertools.islice(batches, steps), total=steps, desc="eval",
                          disable=not env.is_main, leave=False):
            _, (_, logits, labels, weights) = dmp(batch.to(env.device))
            metrics.update(logits, labels, weights)
    dmp.train(was_training)
    return metrics.compute()


def _global_sum(value: float, env: DistEnv) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t.item())


def run(cfg: Config, env: DistEnv, resume: bool = True) -> dict:
    """Trains ``train_config.num_steps`` steps (resuming from the latest checkpoint), evaluates,
    and writes ``summary.json``. Returns the summary on every rank."""
    model_dir = Path(cfg.model_dir)
    ckpt_root = model_dir / "checkpoints"
    dmp, optimizer, plan = build(cfg, env)
    if env.is_main:
        logger.info("sharding plan: %s", plan)
    tc = cfg.train_config
    start = 0
    if resume and (path := checkpoint.latest(ckpt_root)) is not None:
        optimizer.init_state()  # state is lazy; DCP loads in place
        state = _state(dmp, optimizer, 0)
        meta = checkpoint.load(path, state)
        dmp.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        start = int(state["train"]["step"])
        logger.info("resumed from %s at step %d (saved by world size %s)", path, start, meta.get("world_size"))

    reader = train_reader(cfg, env)
    source = stream(reader, start)
    batches = itertools.islice(source, max(tc.num_steps - start, 0))
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device, execute_all_batches=True)
    writer = SummaryWriter(str(model_dir / "tensorboard")) if env.is_main else None
    bar = tqdm(total=tc.num_steps, initial=start, desc="train", disable=not env.is_main, unit="step")
    examples, last_loss, losses = 0.0, float("nan"), []
    t0 = time.perf_counter()
    step = start
    for step in range(start + 1, tc.num_steps + 1):
        loss, _, _, weights = pipeline.progress(batches)
        examples += float(weights.sum())
        if step % max(tc.log_step_count_steps, 1) == 0 or step == tc.num_steps:
            last_loss = float(loss)
            losses.append((step, last_loss))
            rate = examples * env.world_size / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{last_loss:.4f}", ex_s=f"{rate:,.0f}")
            if writer:
                writer.add_scalar("train/loss", last_loss, step)
                writer.add_scalar("train/examples_per_s", rate, step)
        bar.update(1)
        if tc.save_checkpoints_steps and step % tc.save_checkpoints_steps == 0 and step < tc.num_steps:
            checkpoint.save(ckpt_root, step, _state(dmp, optimizer, step), _meta(cfg, env, plan), env.is_main)
    elapsed = time.perf_counter() - t0
    source.close()  # stops the prefetch thread
    bar.close()
    pipeline.detach()
    trained = max(tc.num_steps - start, 0)
    total_examples = _global_sum(examples, env)
    if trained:
        checkpoint.save(ckpt_root, tc.num_steps, _state(dmp, optimizer, tc.num_steps), _meta(cfg, env, plan), env.is_main)

    eval_metrics = evaluate(dmp, eval_reader(cfg, env), [t.tower_name for t in cfg.towers], env,
                            cfg.eval_config.num_steps) if cfg.eval_input_path else {}
    summary = {
        "eval": eval_metrics,
        "train": {
            "steps": tc.num_steps,
            "steps_this_run": trained,
            "resumed_from_step": start,
            "examples": int(total_examples),
            "examples_per_s": total_examples / elapsed if trained and elapsed > 0 else 0.0,
            "seconds": elapsed,
            "loss": losses,
        },
        "world_size": env.world_size,
        "device": env.device.type,
        "towers": [{"tower_name": t.tower_name, "label_name": t.label_name} for t in cfg.towers],
        "plan": plan,
    }
    if env.is_main:
        for tower, m in eval_metrics.items():
            for k, v in m.items():
                if writer and math.isfinite(v):
                    writer.add_scalar(f"eval/{tower}/{k}", v, tc.num_steps)
        checkpoint.write_json_atomic(model_dir / "summary.json", summary)
        writer.close()
    return summary


def _state(dmp: torch.nn.Module, optimizer: CombinedOptimizer, step: int) -> dict:
    return {"model": dmp.state_dict(), "optim": optimizer.state_dict(),
            "train": {"step": torch.tensor(step, dtype=torch.int64)}}


def _meta(cfg: Config, env: DistEnv, plan: dict) -> dict:
    return {"world_size": env.world_size, "plan": plan, "config": to_dict(cfg)}
