"""Adam on the tables where FBGEMM has no fused kernel (the CPU build): tables on TorchRec's
``dense`` compute kernel, trained by a torch optimizer, checkpointed as sharded state.

FBGEMM 1.8.0's CPU TBE runs only exact (rowwise) Adagrad, exact SGD and EMA-in-place rowwise
Adagrad; Adam, partial rowwise Adam and LAMB assert "not supported in CPU mode". TorchRec's
``dense`` kernel keeps a sharded table as one flat parameter with an ordinary gradient (every
row, every step) and registers each table's local rows as ``embedding_bags.<t>.weight`` (a view
with a consistent ``.grad``), so a torch optimizer can train it. TorchRec 1.8's planner refuses
``dense`` outside ``data_parallel`` ("DENSE kernel requires DATA_PARALLEL sharding"), so the
tables are planned with the ``fused`` kernel (same sharding types and placement on CPU) and the
plan's kernel is rewritten to ``dense`` before sharding (``dense_kernel_plan``).

``ShardedTableOptimizer`` holds the torch optimizer over this rank's table shards and writes its
state as ShardedTensors laid out like the tables' weights, so DCP saves every rank's rows and
reshards them on load (another world size), like the fused optimizers' state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from aitm_torchrec.config import ConfigError, Optimizer

DENSE = "dense"
# Sharding types a dense-kernel table may take on the CPU (row-wise is CUDA-only in TorchRec).
DENSE_KERNEL_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise")
# Sparse optimizers trained by a torch optimizer on the dense kernel when FBGEMM has no CPU kernel.
TORCH_TABLE_OPTIMIZERS = ("adam",)


def on_dense_kernel(opt: Optimizer, compute_device: str) -> bool:
    """Whether the tables go on the dense kernel with a torch optimizer (else FBGEMM's fused one)."""
    return opt.name in TORCH_TABLE_OPTIMIZERS and compute_device != "cuda"


def torch_optimizer(opt: Optimizer) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """The torch optimizer for dense-kernel tables: torch Adam (weight decay as L2 added to the gradient)."""
    if opt.name != "adam":
        raise ConfigError(f"train_config.sparse_optimizer.name: {opt.name!r} has no dense-kernel form")
    kwargs = {"lr": opt.learning_rate, "betas": (opt.beta1, opt.beta2), "eps": opt.eps,
              "weight_decay": opt.weight_decay, "fused": True}
    return lambda params: torch.optim.Adam(params, **kwargs)


def dense_kernel_plan(plan: ShardingPlan, modules: Iterable[str]) -> list[str]:
    """Rewrites every model-parallel table of the plan's ``modules`` (fqns; the feature tables'
    collection, the wide tables', or both: each has its own optimizer) to the dense kernel;
    returns the tables rewritten. data_parallel tables already run dense."""
    modules = set(modules)
    tables = []
    for fqn, module_plan in plan.plan.items():
        if fqn not in modules:
            continue
        for table, ps in module_plan.items():
            if ps.sharding_type != ShardingType.DATA_PARALLEL.value:
                ps.compute_kernel = DENSE
                tables.append(table)
    return tables


class ShardedTableOptimizer(KeyedOptimizer):
    """A torch optimizer over the local shards of dense-kernel tables, keyed like the model's
    state dict. ``tables``: key -> (the parameter ``named_parameters`` gives, the weight's
    ShardedTensor from ``state_dict``) for every such table, on every rank (a rank without rows
    of a table has an empty placeholder parameter and a ShardedTensor without local shards).
    TorchRec's parameter of a table covers all of its shards on this rank (column-wise shards of
    one table in one TBE are contiguous); each shard's state is the matching view of the
    parameter's state.

    state_dict: {"state": {key: {<moment>: ShardedTensor like the weight, "step": scalar}}}.
    The step is this optimizer's own count (the same on every rank: every rank steps each
    training step), so the scalar DCP stores once is right for every table.
    """

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, tables: dict[str, tuple[nn.Parameter, ShardedTensor]],
                 make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
        self._layout = {}
        self._views: dict[str, list[tuple[int, torch.Size]]] = {}  # key -> (offset, shape) per local shard
        local: dict[str, nn.Parameter] = {}
        for key, (param, weight) in tables.items():
            shards = weight.local_shards()
            if shards:
                self._views[key] = [_view_in(key, param, s.tensor) for s in shards]
                local[key] = param
            self._layout[key] = (weight.metadata(), [s.metadata for s in shards], weight._process_group)
        self._optimizer = make(list(local.values())) if local else None
        self._steps = 0
        super().__init__(params=local, state=self._optimizer.state if self._optimizer else {},
                         param_groups=self._optimizer.param_groups if self._optimizer else [])

    @property
    def table_keys(self) -> frozenset[str]:
        """Every table this optimizer answers for, local rows or not (its placeholders included)."""
        return frozenset(self._layout)

    def step(self, closure: Any = None) -> None:
        if self._optimizer is not None:
            self._optimizer.step()
        self._steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=set_to_none)

    def init_state(self, sparse_grad_parameter_names: set[str] | None = None) -> None:
        """Creates the lazy state (zero gradients, one step), without counting a step."""
        for param in self.params.values():
            param.grad = torch.zeros_like(param)
        if self._optimizer is not None:
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)

    def _shard_moments(self, key: str) -> dict[str, list[torch.Tensor]]:
        """This rank's state of one table, one view per local shard (zeros before the first step)."""
        param = self.params.get(key)
        if param is None:
            return {name: [] for name in self.MOMENTS}
        state = self._optimizer.state.get(param) or {}
        out = {}
        for name in self.MOMENTS:
            flat = (state[name] if name in state else torch.zeros_like(param)).view(-1)
            out[name] = [flat[off:off + shape.numel()].view(shape) for off, shape in self._views[key]]
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {}
        for key, (meta, shard_metas, pg) in self._layout.items():
            moments = self._shard_moments(key)
            entry: dict[str, Any] = {}
            for name in self.MOMENTS:
                shards = [Shard(t, m) for t, m in zip(moments[name], shard_metas)]
                entry[name] = ShardedTensor._init_from_local_shards_and_global_metadata(
                    shards, sharded_tensor_metadata=meta, process_group=pg)
            entry["step"] = torch.tensor(float(self._steps))
            state[key] = entry
        return {"state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict of this layout (DCP reshards a checkpoint into ``state_dict()``'s
        ShardedTensors, which are views of the live state: the copies below are then no-ops)."""
        state = state_dict["state"]
        missing = sorted(set(self._layout) - set(state))
        if missing:
            raise ValueError(f"table optimizer state has no entry for {', '.join(missing)}")
        steps = {int(state[key]["step"]) for key in self._layout}
        if len(steps) > 1:
            raise ValueError(f"table optimizer state has different step counts {sorted(steps)}")
        self._steps = steps.pop() if steps else 0
        for key, param in self.params.items():
            own = self._shard_moments(key)
            for name in self.MOMENTS:
                for mine, loaded in zip(own[name], state[key][name].local_shards()):
                    if mine.data_ptr() != loaded.tensor.data_ptr():
                        mine.copy_(loaded.tensor)
            self._optimizer.state[param]["step"] = torch.tensor(float(self._steps), dtype=torch.float32,
                                                                device=param.device)


def _view_in(key: str, param: torch.Tensor, shard: torch.Tensor) -> tuple[int, torch.Size]:
    """Where a local shard's rows lie in the table's parameter (both views of one TBE buffer)."""
    off, rem = divmod(shard.data_ptr() - param.data_ptr(), param.element_size())
    if rem or off < 0 or off + shard.numel() > param.numel() or not shard.is_contiguous():
        raise ConfigError(f"sharding_config: a shard of table {key!r} is not inside the parameter TorchRec's "
                          "dense kernel trains; train_config.sparse_optimizer.name: adam on CPU supports "
                          "table_wise and column_wise tables")
    return off, shard.shape


class JobOptimizer(CombinedOptimizer):
    """A CombinedOptimizer whose state dict is its parts' own state dicts, merged (the generic one
    reads every part's raw per-parameter state, which would drop ShardedTableOptimizer's sharded
    layout). Keys and values are otherwise the same as CombinedOptimizer's."""

    rank_local_grads = True  # its tables' gradients differ per rank (faults.StepGuard agrees on them)

    def state_dict(self) -> dict[str, Any]:
        state = {}
        for opt_key, opt in self._optims:
            for key, value in opt.state_dict()["state"].items():
                state[self.prepend_opt_key(key, opt_key)] = value
        return {"state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict["state"]
        for opt_key, opt in self._optims:
            keys = [self.prepend_opt_key(k, opt_key) for k in opt.state_dict()["state"]]
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(f"optimizer state has no entry for {', '.join(missing)}")
            opt.load_state_dict({"state": {k[len(opt_key) + 1:] if opt_key else k: state[k] for k in keys}})
