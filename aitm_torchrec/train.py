"""Train: build, shard, train with TorchRec's sparse-dist pipeline, evaluate, checkpoint, summarise.

One function, ``run(cfg, env)``, used by ``launch/train.py`` and the tests. Outputs go under
``cfg.model_dir``: ``checkpoints/step_<N>/`` (DCP), ``summary.json`` and ``tensorboard/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.utils.tensorboard import SummaryWriter
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from aitm_torchrec import checkpoint, faults
from aitm_torchrec.config import Config, ConfigError, LearningRateSchedule, Optimizer, scaled_learning_rates, to_dict
from aitm_torchrec.data import Batch, ParquetReader
from aitm_torchrec.data.csv_input import csv_format
from aitm_torchrec.dist import DistEnv
from aitm_torchrec.files import write_json_atomic
from aitm_torchrec.gauc import GaucSpec, GroupAUC, gauc_specs, uid_columns
from aitm_torchrec.metrics import TaskMetrics
from aitm_torchrec.model import WIDE_EBC
from aitm_torchrec.precision import Precision, resolve_for_job, unsupported
from aitm_torchrec.sharding import describe, shard
from aitm_torchrec.table_optim import JobOptimizer, ShardedTableOptimizer, on_dense_kernel, torch_optimizer
from aitm_torchrec.task import build_train_module

logger = logging.getLogger(__name__)


def dense_optimizer(dmp: DistributedModelParallel, opt: Optimizer, clip_norm: float = 0.0,
                    exclude: frozenset[str] = frozenset()) -> GradientClippingOptimizer:
    """The dense side's optimizer over every parameter not handled in backward by a fused one
    (nor, ``exclude``, by the tables' own torch optimizer), inside TorchRec's clipping wrapper:
    ``clip_norm`` > 0 scales the gradients to that global L2 norm at most before each step, and
    the norm is tracked either way (``dense_grad_norm``). These parameters are replicated and DDP
    has averaged their gradients, so every rank computes the same norm."""
    cls = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[opt.name]
    # fused: one kernel per step for all parameters (CPU and CUDA); ~3x less optimizer time here.
    kwargs = {"lr": opt.learning_rate, "weight_decay": opt.weight_decay, "fused": True}
    if opt.name != "sgd":
        kwargs["eps"] = opt.eps
    if opt.name == "adam":
        kwargs["betas"] = (opt.beta1, opt.beta2)
    params = {k: p for k, p in in_backward_optimizer_filter(dmp.named_parameters()) if k not in exclude}
    inner = KeyedOptimizerWrapper(params, lambda params: cls(params, **kwargs))
    return GradientClippingOptimizer(inner, GradientClipping.NORM if clip_norm else GradientClipping.NONE,
                                     max_gradient=clip_norm, track_grad_norm=True)


def dense_grad_norm(optimizer: CombinedOptimizer) -> float | None:
    """The global L2 norm of the dense gradients, before clipping, at the last step the dense
    optimizer applied (None before the first)."""
    for _, opt in optimizer.optimizers:
        if isinstance(opt, GradientClippingOptimizer) and opt.last_total_grad_norm is not None:
            return float(opt.last_total_grad_norm)
    return None


def table_optimizer(dmp: DistributedModelParallel, opt: Optimizer, wide: bool = False) -> ShardedTableOptimizer:
    """The torch optimizer of the tables on the dense kernel (adam on CPU): every model-parallel
    table weight (``...embedding_bags.<t>.weight``, a ShardedTensor in the state dict) of the
    feature tables (the task tables' among them: the sparse optimizer trains both), or (``wide``)
    of the wide tables (``...wide_ebc.``)."""
    state = dmp.state_dict()
    tables = {k: (p, state[k]) for k, p in dmp.named_parameters()
              if ".embedding_bags." in k and isinstance(state.get(k), ShardedTensor)
              and (f".{WIDE_EBC}." in k) == wide}
    return ShardedTableOptimizer(tables, torch_optimizer(opt))


def build(cfg: Config, env: DistEnv) -> tuple[DistributedModelParallel, CombinedOptimizer, dict]:
    """Model on meta -> planned, sharded DMP with fused table optimizer + dense optimizer.
    ``train_config.mixed_precision`` auto is resolved for ``env.device`` by ``build_train_module``
    (``run`` passes the value its ranks agreed on)."""
    if (why := unsupported(cfg.train_config.mixed_precision, env.device)) is not None:
        raise ConfigError(why)
    torch.manual_seed(cfg.train_config.seed)
    cfg = scaled_learning_rates(cfg, env.world_size)  # train_config.learning_rate_scaling
    module = build_train_module(cfg, device="meta", dense_device=env.device)
    dmp, plan = shard(cfg, module, env)
    tc = cfg.train_config
    # Tables on the dense kernel (adam on CPU) get a torch optimizer per collection: the feature
    # tables at the sparse optimizer's settings, the wide tables at theirs.
    sides = [(False, tc.sparse_optimizer)] + ([(True, tc.wide_tables_optimizer)] if cfg.schema.wide else [])
    tables = [table_optimizer(dmp, opt, wide) for wide, opt in sides if on_dense_kernel(opt, env.device.type)]
    exclude = frozenset().union(*(t.table_keys for t in tables))  # empty without such tables
    dense = dense_optimizer(dmp, tc.dense_optimizer, tc.gradient_clipping_by_norm, exclude)
    parts = [dmp.fused_optimizer, *tables, dense]
    optimizer = JobOptimizer(parts) if tables else CombinedOptimizer(parts)
    return dmp, optimizer, describe(plan)


def make_reader(cfg: Config, env: DistEnv, paths: tuple[str, ...], train: bool) -> ParquetReader:
    """The config's Parquet reader for this rank: shuffled for training, in file order for eval.
    Label-chain checks follow the towers' relations (a later step needs its relation steps).
    Eval batches also carry the raw uid columns of the towers' gauc metrics (``Batch.passthrough``)."""
    dc = cfg.data_config
    uids = {} if train else uid_columns(gauc_specs(cfg.towers))
    return ParquetReader(
        paths, cfg.schema, dc.batch_size if train else (dc.eval_batch_size or dc.batch_size),
        env.rank, env.world_size, shuffle=dc.shuffle and train, seed=cfg.train_config.seed if train else 0,
        buffer_rows=dc.shuffle_buffer_size, prefetch=dc.prefetch_size, label_chain_policy=dc.label_chain_policy,
        csv=csv_format(dc), passthrough=list(uids), needed_by=uids,
    )


def train_reader(cfg: Config, env: DistEnv) -> ParquetReader:
    return make_reader(cfg, env, cfg.train_input_path, train=True)


def eval_reader(cfg: Config, env: DistEnv) -> ParquetReader:
    return make_reader(cfg, env, cfg.eval_input_path, train=False)


def stream(reader: ParquetReader, epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
    """Endless batches over epochs, starting ``skip`` batches into ``epoch`` (the data position).
    Closing it closes the current epoch's prefetch thread too, explicitly (``yield from`` an
    islice passes no close on; only reference counting would)."""
    while True:
        with contextlib.closing(reader.epoch(epoch)) as batches:
            yield from itertools.islice(batches, skip, None)
        epoch, skip = epoch + 1, 0


def lr_multiplier(step: int, s: LearningRateSchedule, num_steps: int) -> float:
    """Learning-rate factor for 0-based ``step``: linear warmup, then constant/linear/cosine/
    exponential decay with a floor of ``min_ratio``."""
    if step < s.warmup_steps:
        return s.warmup_start_ratio + (1.0 - s.warmup_start_ratio) * step / s.warmup_steps
    t = step - s.warmup_steps
    if s.decay == "constant":
        return 1.0
    if s.decay == "exponential":
        return max(s.min_ratio, s.decay_rate ** (t / s.decay_steps))
    frac = min(t / (s.decay_steps or max(num_steps - s.warmup_steps, 1)), 1.0)
    shape = 1.0 - frac if s.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return s.min_ratio + (1.0 - s.min_ratio) * shape


@dataclass
class Position:
    """Where training stands: global step, and the data position (epoch, batches into it) of
    this world size and batch size."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0

    def advance(self, steps_per_epoch: int) -> None:
        self.step += 1
        self.epoch_step += 1
        if self.epoch_step == steps_per_epoch:
            self.epoch, self.epoch_step = self.epoch + 1, 0

    def state(self, env: DistEnv, batch_size: int) -> dict[str, torch.Tensor]:
        values = {"step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
                  "world_size": env.world_size, "batch_size": batch_size}
        return {k: torch.tensor(v, dtype=torch.int64) for k, v in values.items()}

    @classmethod
    def restore(cls, state: dict[str, torch.Tensor], env: DistEnv, batch_size: int) -> Position:
        """Same world and batch size: exactly where it stopped. Otherwise the same share of the
        same epoch (rows are dealt to ranks differently, so up to one batch per rank may repeat
        or be skipped)."""
        v = {k: int(t) for k, t in state.items()}
        pos = cls(v["step"], v["epoch"], v["epoch_step"])
        if (v["world_size"], v["batch_size"]) != (env.world_size, batch_size):
            rows = v["epoch_step"] * v["world_size"] * v["batch_size"]
            pos.epoch_step = rows // (env.world_size * batch_size)
        return pos


@torch.no_grad()
def evaluate(dmp: torch.nn.Module, reader: ParquetReader, tower_names: list[str], env: DistEnv,
             max_steps: int = 0, auc: str = "auto", gauc: Sequence[GaucSpec] = ()) -> dict[str, dict[str, float]]:
    """Whole-eval per-task metrics, identical on every rank (``auc``: eval_config.auc; ``gauc``:
    the towers' GAUCs, from the uid columns the reader passes through)."""
    was_training = dmp.training
    dmp.eval()
    metrics = TaskMetrics(tower_names, env.device, auc)
    groups = GroupAUC(gauc, env.device) if gauc else None
    steps = min(max_steps, reader.steps_per_epoch) if max_steps else reader.steps_per_epoch
    with contextlib.closing(reader.epoch(0)) as batches:
        for batch in tqdm(itertools.islice(batches, steps), total=steps, desc="eval",
                          disable=not env.is_main, leave=False):
            _, (_, logits, labels, weights) = dmp(batch.to(env.device))
            metrics.update(logits, labels, weights)
            if groups is not None and batch.passthrough is not None:  # real rows first, padding after
                n = batch.passthrough.num_rows
                groups.update(batch.passthrough, torch.sigmoid(logits[:n].float()), labels[:n])
    dmp.train(was_training)
    out = metrics.compute()
    for tower, values in (groups.compute() if groups is not None else {}).items():
        out[tower].update(values)
    return out


def _global_sum(value: float, env: DistEnv) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t.item())


def restore(path: Path, dmp: DistributedModelParallel, optimizer: CombinedOptimizer, env: DistEnv,
            batch_size: int, check: bool = True) -> Position:
    """Loads a checkpoint in place (resharding tables if the plan differs) and returns the position.
    ``check=False``: the caller verified it already (``checkpoint.agreed_latest``)."""
    optimizer.init_state()  # optimizer state is lazy; DCP loads into existing tensors
    state = _state(dmp, optimizer, Position().state(env, batch_size))
    meta = checkpoint.load(path, state, check=check)
    dmp.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    pos = Position.restore(state["train"], env, batch_size)
    logger.info("resumed from %s at step %d (saved by world size %s, now %d)", path, pos.step,
                meta.get("world_size"), env.world_size)
    return pos


@dataclass
class TrainResult:
    """What a training run did and reached; ``to_dict`` is ``summary.json``.

    eval: whole-eval metrics per tower ({} without eval input); eval_history: periodic evals
    ({"step", tower: metrics}); loss: (step, loss) at every log step; window: the last log
    interval's training metrics; examples_per_s: real rows of all ranks per second, the first
    step (start-up) excluded; mixed_precision: what train_config.mixed_precision resolved to on
    these ranks (requested, resolved, reason).
    """

    steps: int
    steps_this_run: int
    resumed_from_step: int
    examples: int
    examples_per_s: float
    seconds: float
    loss: list[tuple[int, float]]
    window: dict
    skipped_batches: int  # batches skipped by train_config.nonfinite_policy: skip
    eval: dict
    eval_history: list[dict]
    world_size: int
    device: str
    towers: list[dict[str, str]]
    plan: dict
    mixed_precision: dict  # Precision.to_dict()

    def to_dict(self) -> dict:
        train_keys = ("steps", "steps_this_run", "resumed_from_step", "examples", "examples_per_s", "seconds",
                      "loss", "window", "skipped_batches")
        return {
            "eval": self.eval,
            "eval_history": self.eval_history,
            "train": {k: getattr(self, k) for k in train_keys},
            "world_size": self.world_size,
            "device": self.device,
            "mixed_precision": self.mixed_precision,
            "towers": self.towers,
            "plan": self.plan,
        }


class _Loop:
    """The training loop's state and its named steps: one train step, window logging,
    periodic eval, periodic save. ``run`` strings them together."""

    def __init__(self, cfg: Config, env: DistEnv, dmp: DistributedModelParallel, optimizer: CombinedOptimizer,
                 plan: dict, evaluator: ParquetReader | None, pos: Position) -> None:
        self.cfg, self.env, self.dmp, self.optimizer, self.plan = cfg, env, dmp, optimizer, plan
        self.evaluator, self.pos, self.start = evaluator, pos, pos.step
        self.towers = cfg.schema.tower_names
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        model_dir = Path(cfg.model_dir)
        self.ckpt_root = model_dir / "checkpoints"
        self.writer = SummaryWriter(str(model_dir / "tensorboard")) if env.is_main else None
        self.window: list[tuple[torch.Tensor, ...]] = []  # this log interval's (logits, labels, weights)
        self.window_metrics: dict = {}
        self.losses: list[tuple[int, float]] = []
        self.history: list[dict] = []
        self.examples = self.timed = 0.0
        self.saved_at = -1
        self.t0 = time.perf_counter()  # restarted after the first step: examples/s excludes start-up

    def train_step(self, pipeline: TrainPipelineSparseDist, batches: Iterator[Batch], steps_per_epoch: int,
                   guard: faults.StepGuard) -> tuple[torch.Tensor, bool]:
        """One step; returns (loss, skipped: the batch was dropped by nonfinite_policy skip)."""
        tc = self.cfg.train_config
        factor = lr_multiplier(self.pos.step, tc.learning_rate_schedule, tc.num_steps)
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * factor  # fused tables pick it up at zero_grad/step
        loss, logits, labels, weights = pipeline.progress(batches)
        self.pos.advance(steps_per_epoch)
        skipped = guard.after_step(self.pos.step, loss, logits, labels, weights)  # policy stop: raises
        rows = float(weights.sum())
        self.examples += rows
        if self.pos.step == self.start + 1:
            self.t0 = time.perf_counter()
        else:
            self.timed += rows
        if not skipped:
            self.window.append((logits, labels, weights))
        return loss, skipped

    def rate(self) -> float:
        return self.timed * self.env.world_size / max(time.perf_counter() - self.t0, 1e-9)

    def log_window(self, loss: torch.Tensor, bar: tqdm) -> None:
        """At log steps: the loss, and the interval's metrics (a collective: every rank logs)."""
        tc, step = self.cfg.train_config, self.pos.step
        if step % max(tc.log_step_count_steps, 1) and step != tc.num_steps:
            return
        self.losses.append((step, float(loss)))
        self.window_metrics = _window_metrics(self.towers, self.window, self.env, self.cfg.eval_config.auc)
        self.window = []
        rate = self.rate()
        bar.set_postfix(loss=f"{float(loss):.4f}", ex_s=f"{rate:,.0f}")
        if self.writer:
            self.writer.add_scalar("train/loss", float(loss), step)
            self.writer.add_scalar("train/examples_per_s", rate, step)
            self.writer.add_scalar("train/lr_multiplier",
                                   lr_multiplier(step - 1, tc.learning_rate_schedule, tc.num_steps), step)
            if (norm := dense_grad_norm(self.optimizer)) is not None:
                self.writer.add_scalar("train/dense_grad_norm", norm, step)
            _scalars(self.writer, "train_window", self.window_metrics, step)

    def periodic_eval(self, pipeline: TrainPipelineSparseDist) -> None:
        every, step = self.cfg.eval_config.every_steps, self.pos.step
        if not (self.evaluator and every and step % every == 0 and step < self.cfg.train_config.num_steps):
            return
        pipeline.detach()  # eval calls the model directly; in-flight batches stay queued
        ec = self.cfg.eval_config
        self.history.append({"step": step, **evaluate(self.dmp, self.evaluator, self.towers, self.env,
                                                      ec.num_steps, ec.auc, gauc_specs(self.cfg.towers))})
        if self.writer:
            _scalars(self.writer, "eval", self.history[-1], step)

    def save(self) -> None:
        """A checkpoint at the current step (once: a periodic save and the final one may coincide)."""
        if self.saved_at == self.pos.step:
            return
        bs = self.cfg.data_config.batch_size
        checkpoint.save(self.ckpt_root, self.pos.step,
                        _state(self.dmp, self.optimizer, self.pos.state(self.env, bs)),
                        _meta(self.cfg, self.env, self.plan), self.env.is_main,
                        self.cfg.train_config.keep_checkpoint_max)
        self.saved_at = self.pos.step

    def periodic_save(self) -> None:
        every, step = self.cfg.train_config.save_checkpoints_steps, self.pos.step
        if every and step % every == 0 and step < self.cfg.train_config.num_steps:
            self.save()


@dataclass(frozen=True)
class TrainOptions:
    """``launch/train.py``'s flags (the config says everything else)."""

    resume: bool = True  # start from the newest complete checkpoint under model_dir


BatchesHook = Callable[[Iterator[Batch], int, DistEnv], Iterator[Batch]]


def run(cfg: Config, env: DistEnv, opts: TrainOptions = TrainOptions(),
        wrap_batches: BatchesHook | None = None) -> TrainResult:
    """Trains to ``train_config.num_steps`` (resuming from the latest complete checkpoint unless
    ``opts.resume`` is off), evaluates, and writes ``summary.json``. Returns the result on every
    rank. ``wrap_batches(batches, first_step, env)``: the training batches as the loop takes them
    (the fault tests poison one there); ``first_step`` is the 0-based step of the first one."""
    tc, bs = cfg.train_config, cfg.data_config.batch_size
    # Readers first: bad paths or schemas fail on every rank before any collective starts.
    reader = train_reader(cfg, env)
    evaluator = eval_reader(cfg, env) if cfg.eval_input_path else None
    precision = resolve_for_job(tc.mixed_precision, env.device)
    if env.is_main:
        logger.info("%s", precision.describe())
    dmp, optimizer, plan = build(with_precision(cfg, precision), env)
    if env.is_main:
        logger.info("sharding plan: %s", plan)
    pos = Position()
    # The newest checkpoint that verifies (damaged newer ones are skipped with a warning).
    if opts.resume and (path := checkpoint.agreed_latest(Path(cfg.model_dir) / "checkpoints")) is not None:
        pos = restore(path, dmp, optimizer, env, bs, check=False)
    loop = _Loop(cfg, env, dmp, optimizer, plan, evaluator, pos)

    spe = reader.steps_per_epoch
    source = stream(reader, pos.epoch, pos.epoch_step)
    batches = itertools.islice(source, max(tc.num_steps - loop.start, 0))
    if wrap_batches is not None:
        batches = wrap_batches(batches, loop.start, env)
    # SIGTERM and non-finite losses: every rank agrees once per step, before backward.
    guard = faults.StepGuard(tc.nonfinite_policy, loop.towers, loop.ckpt_root)
    pipeline = faults.GuardedPipeline(dmp, optimizer, env.device, execute_all_batches=True, guard=guard)
    bar = tqdm(total=tc.num_steps, initial=loop.start, desc="train", disable=not env.is_main, unit="step")
    while pos.step < tc.num_steps:
        loss, skipped = loop.train_step(pipeline, batches, spe, guard)
        if not skipped:
            loop.log_window(loss, bar)
        bar.update(1)
        loop.periodic_eval(pipeline)
        loop.periodic_save()
        if guard.stop:  # SIGTERM on some rank: every rank stops after this same step
            break
    elapsed = time.perf_counter() - loop.t0
    source.close()  # stops the prefetch thread
    bar.close()
    pipeline.detach()
    trained = pos.step - loop.start
    total_examples, timed_examples = _global_sum(loop.examples, env), _global_sum(loop.timed, env)
    if trained:
        loop.save()
    guard.finish(pos.step)  # SIGTERM: raises Preempted (exit status 143) after this save

    ec = cfg.eval_config
    eval_metrics = evaluate(dmp, evaluator, loop.towers, env, ec.num_steps, ec.auc,
                            gauc_specs(cfg.towers)) if evaluator else {}
    result = TrainResult(
        steps=tc.num_steps, steps_this_run=trained, resumed_from_step=loop.start, examples=int(total_examples),
        examples_per_s=timed_examples / elapsed if trained > 1 and elapsed > 0 else 0.0, seconds=elapsed,
        loss=loop.losses, window=loop.window_metrics, skipped_batches=guard.skipped, eval=eval_metrics,
        eval_history=loop.history, world_size=env.world_size, device=env.device.type,
        towers=[{"tower_name": t.tower_name, "label_name": t.label_name} for t in cfg.schema.tasks], plan=plan,
        mixed_precision=precision.to_dict())
    if env.is_main:
        _scalars(loop.writer, "eval", eval_metrics, tc.num_steps)
        write_json_atomic(Path(cfg.model_dir) / "summary.json", result.to_dict())
        loop.writer.close()
    return result


def with_precision(cfg: Config, precision: Precision) -> Config:
    """``cfg`` with ``train_config.mixed_precision`` set to the resolved value."""
    return dataclasses.replace(cfg, train_config=dataclasses.replace(cfg.train_config,
                                                                     mixed_precision=precision.resolved))


def _window_metrics(towers: list[str], window: list[tuple[torch.Tensor, ...]], env: DistEnv,
                    auc: str = "auto") -> dict:
    """Metrics of one log interval's training batches over all ranks (one update per interval,
    not per step)."""
    metrics = TaskMetrics(towers, env.device, auc)
    metrics.update(*(torch.cat(parts) for parts in zip(*window)))
    return metrics.compute()


def _scalars(writer: SummaryWriter, prefix: str, metrics: dict, step: int) -> None:
    for tower, values in metrics.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if math.isfinite(v):
                    writer.add_scalar(f"{prefix}/{tower}/{k}", v, step)


def _state(dmp: torch.nn.Module, optimizer: CombinedOptimizer, train: dict[str, torch.Tensor]) -> dict:
    return {"model": dmp.state_dict(), "optim": optimizer.state_dict(), "train": train}


def _meta(cfg: Config, env: DistEnv, plan: dict) -> dict:
    return {"world_size": env.world_size, "plan": plan, "config": to_dict(cfg)}
