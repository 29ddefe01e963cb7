"""Faults met at the training step: preemption (SIGTERM) and a diverging (non-finite) loss.

``StepGuard`` holds the job's answer to both; ``GuardedPipeline`` is TorchRec's
``TrainPipelineSparseDist`` with the guard between forward and backward. In the pinned TorchRec
(1.8.0) ``progress()`` runs forward, then ``self._backward(losses)``, then
``self._optimizer_step()``; the fused table optimizer updates the tables *inside* backward. So:

- Once per step, before backward, one MAX all_reduce of two ints agrees across ranks on
  "some rank got SIGTERM" and "some rank's loss is non-finite" (the loss is per rank).
- A non-finite loss skips backward on every rank: neither the tables (fused, in backward) nor the
  dense layers are updated by that batch. ``nonfinite_policy: stop`` then raises
  ``NonFiniteError`` naming the step, the rank, the towers whose logits or BCE went non-finite
  and the last good checkpoint; ``skip`` counts the batch and trains on.
- A finite loss whose dense gradients are non-finite (overflow in backward) can only skip the
  dense optimizer step: the fused table update of that batch already happened in backward and
  cannot be undone. Dense gradients are all-reduced by DDP, so every rank sees the same ones and
  decides the same way without another collective. Tables trained in the optimizer step instead
  (``adam`` on the CPU, ``table_optim``) have per-rank gradients, are skipped with the dense
  step, and the ranks agree on it with one more MAX all_reduce per step.
- SIGTERM (torchrun forwards it to its workers) only sets a flag: every rank finishes the step
  in flight, all stop at the same step, the caller saves a checkpoint and raises ``Preempted``,
  which exits with status 143 (128 + SIGTERM).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from aitm_torchrec import checkpoint

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143: what a shell reports for a SIGTERM'd process


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient under ``nonfinite_policy: stop``."""


class Preempted(SystemExit):
    """Raised after the checkpoint at the agreed stop step is saved; exits with status 143."""

    def __init__(self, step: int, path: Path | None) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.path = step, path


class StepGuard:
    """Per-step agreement across ranks on preemption and non-finite losses (see module doc).
    Installs a SIGTERM handler (main thread only) until ``close()``."""

    def __init__(self, policy: str, towers: list[str], ckpt_root: Path) -> None:
        self.policy, self.towers, self.ckpt_root = policy, towers, Path(ckpt_root)
        self.skipped = 0  # batches whose update was skipped (policy skip)
        self.stop = False  # agreed: some rank got SIGTERM; stop after this step
        self.bad_loss = self.bad_grad = False  # this step's, agreed
        self._signalled = False
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self._signalled:
            logger.warning("SIGTERM: finishing this step, then saving a checkpoint and exiting with %d",
                           PREEMPTED_EXIT_CODE)
        self._signalled = True

    def finish(self, step: int) -> None:
        """After training and its checkpoint: ``close()``, then, if the job was asked to stop,
        raise Preempted (exit status 143) instead of going on to evaluate."""
        self.close()
        if self.stop:
            last = checkpoint.latest(self.ckpt_root)
            logger.warning("preempted: saved %s at step %d; exiting with %d for the scheduler to retry",
                           last, step, PREEMPTED_EXIT_CODE)
            raise Preempted(step, last)

    def close(self) -> None:
        """Restores the previous SIGTERM handler; a SIGTERM that arrived after the last step's
        check is delivered again, now to that handler (by default: exit with 143)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
            if self._signalled and not self.stop:
                os.kill(os.getpid(), signal.SIGTERM)

    def before_backward(self, loss: torch.Tensor) -> bool:
        """Collective, once per step on every rank. Returns True when backward must be skipped."""
        flags = torch.tensor([int(self._signalled), int(not bool(torch.isfinite(loss).all()))],
                             dtype=torch.int64, device=loss.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.stop, self.bad_loss = bool(flags[0]), bool(flags[1])
        self.bad_grad = False
        return self.bad_loss

    def dense_grads_finite(self, optimizer: torch.optim.Optimizer) -> bool:
        """After backward: are the gradients the dense optimizer will apply finite?"""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.bad_grad = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if getattr(optimizer, "rank_local_grads", False) and dist.is_initialized():
            # Tables trained in the optimizer step (adam on the CPU, table_optim.JobOptimizer) have
            # per-rank gradients: agree, so every rank skips or steps alike (and the step counts match).
            flag = torch.tensor([int(self.bad_grad)], dtype=torch.int64, device=grads[0].device if grads else None)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.bad_grad = bool(flag[0])
        return not self.bad_grad

    def after_step(self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                   weights: torch.Tensor) -> bool:
        """After each step (1-based ``step``): True when its update was skipped (policy skip);
        raises NonFiniteError under policy stop. Collective only on a non-finite step, which
        every rank agrees on."""
        if not (self.bad_loss or self.bad_grad):
            return False
        mine = diagnose(loss, logits, labels, weights, self.towers) if self.bad_loss else ""
        found = [mine]
        if dist.is_initialized():
            found = [None] * dist.get_world_size()
            dist.all_gather_object(found, mine)
        where = "; ".join(f"rank {r}: {d}" for r, d in enumerate(found) if d) or \
            "the loss is finite but dense gradients are not (the fused table update of this batch already happened)"
        what = "non-finite loss" if self.bad_loss else "non-finite gradient"
        if self.policy == "skip":
            self.skipped += 1
            logger.warning("step %d: %s (%s); skipped this batch's update (%d skipped so far)",
                           step, what, where, self.skipped)
            return True
        last = checkpoint.latest(self.ckpt_root)
        raise NonFiniteError(
            f"training stopped at step {step}: {what} ({where}). The update of this batch was not "
            f"applied{'' if self.bad_loss else ' to the dense layers'}. Last good checkpoint: "
            f"{last if last is not None else f'none under {self.ckpt_root}'}. Set "
            "train_config.nonfinite_policy=skip to skip such batches instead.")


def diagnose(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
             towers: list[str]) -> str:
    """Which towers made this rank's loss non-finite: B x T logits, B x T labels, B weights.
    Empty if the loss is finite."""
    if bool(torch.isfinite(loss).all()):
        return ""
    parts = []
    for t, name in enumerate(towers):
        bad = int((~torch.isfinite(logits[:, t])).sum())
        if bad:
            parts.append(f"tower {name}: logits non-finite in {bad} of {logits.shape[0]} rows")
            continue
        bce = F.binary_cross_entropy_with_logits(logits[:, t].float(), labels[:, t].float(), reduction="none")
        bad = int((~torch.isfinite(bce * weights)).sum())
        if bad:
            parts.append(f"tower {name}: BCE non-finite in {bad} of {logits.shape[0]} rows (labels or weights)")
    return ", ".join(parts) or f"loss {float(loss)} with finite logits and BCE (a regularisation term)"


class GuardedPipeline(TrainPipelineSparseDist):
    """``TrainPipelineSparseDist`` whose backward and optimizer step ask ``guard`` first."""

    def __init__(self, *args: Any, guard: StepGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def _backward(self, losses: torch.Tensor) -> None:
        if not self.guard.before_backward(losses):
            super()._backward(losses)

    def _optimizer_step(self) -> None:
        if not self.guard.bad_loss and self.guard.dense_grads_finite(self._optimizer):
            super()._optimizer_step()
