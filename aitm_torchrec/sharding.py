"""Sharding: the planner's topology and per-table constraints from config, the plan, the DMP.

The planner only estimates, so ``plan_for_topology`` plans for any cluster (2 hosts x 8 GPUs)
from a CPU machine; ``shard`` plans collectively for the running job and wraps the train module
in DistributedModelParallel, with the fused embedding optimizer applied in backward. Two table
optimizers: ``train_config.sparse_optimizer`` for the feature tables (and the task tables of
``model_config.task_embeddings``, the ``task_ebc`` collection: the same kernel, sharding and
optimizer route), and the wide tables' own (``TrainConfig.wide_tables_optimizer``) for the
``wide_ebc`` collection of WIDE feature groups.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import CacheParams, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.optim import optimizers as trec_optim
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from aitm_torchrec.config import SHARDING_TYPES_CPU, Config, ConfigError, Optimizer
from aitm_torchrec.dist import DistEnv
from aitm_torchrec.model import WIDE_EBC
from aitm_torchrec.schema import wide_table_name
from aitm_torchrec.table_optim import DENSE_KERNEL_SHARDING_TYPES, dense_kernel_plan, on_dense_kernel
from aitm_torchrec.zch import ZchSharder, zch_plan

GB = 1024**3
CPU_KERNELS = ("dense", "fused")
# The wide tables' sharding types unless sharding_config says (CPU: table_wise alone).
WIDE_SHARDING_TYPES = ("table_wise", "row_wise", "table_row_wise")


def topology(cfg: Config, world_size: int, local_world_size: int, compute_device: str) -> Topology:
    """Planner topology with storage caps from ``sharding_config`` (or the machine's own)."""
    sc = cfg.sharding_config
    if sc.ddr_cap_gb:
        ddr = int(sc.ddr_cap_gb * GB)
    else:
        ddr = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_world_size, 1)
    if sc.hbm_cap_gb:
        hbm = int(sc.hbm_cap_gb * GB)
    elif compute_device == "cuda" and torch.cuda.is_available():
        hbm = torch.cuda.get_device_properties(0).total_memory
    else:
        hbm = 0 if compute_device == "cpu" else 80 * GB
    return Topology(world_size=world_size, local_world_size=local_world_size,
                    compute_device=compute_device, hbm_cap=hbm, ddr_cap=ddr)


def planned_tables(cfg: Config) -> dict[str, tuple[str, Optimizer]]:
    """Planned table name -> (its optimizer's config key, the optimizer): the feature tables
    (zch ones aside: ``zch.zch_plan`` plans them) and the task tables (``task_<tower>_<feature>``)
    take ``sparse_optimizer``, the WIDE groups' tables (``wide_<feature>``) the wide tables' optimizer."""
    tc = cfg.train_config
    out = {f.name: ("train_config.sparse_optimizer", tc.sparse_optimizer) for f in cfg.schema.sparse if not f.is_zch}
    for name in cfg.schema.task_tables:
        out[name] = ("train_config.sparse_optimizer", tc.sparse_optimizer)
    for name in cfg.schema.wide:
        out[wide_table_name(name)] = ("train_config.wide_optimizer", tc.wide_tables_optimizer)
    return out


def constraints(cfg: Config, compute_device: str) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints (tables are named after their feature; wide tables
    ``wide_<feature>``, task tables ``task_<tower>_<feature>``: ``sharding_config.sharding_types`` /
    ``compute_kernels`` apply to them too, and ``sharding_config.tables`` may name them; task
    tables are constrained exactly as feature tables). Unless asked otherwise, a wide table is
    table-wise (or row-wise on CUDA): replicated (data_parallel), it would be trained by the dense
    optimizer instead of its own; split by columns, its 4 columns gain nothing and its
    checkpoint could not move to another world size."""
    sc = cfg.sharding_config
    per_table = dict(sc.tables)
    wide = set(cfg.schema.wide_tables)
    out = {}
    for name, (key, opt) in planned_tables(cfg).items():
        c = per_table.get(name)
        types = list((c and c.sharding_types) or sc.sharding_types)
        if name in wide and not types:
            types = [t for t in WIDE_SHARDING_TYPES if compute_device != "cpu" or t in SHARDING_TYPES_CPU]
        kernels = list((c and c.compute_kernels) or sc.compute_kernels)
        if compute_device == "cpu":
            bad = [t for t in types if t not in SHARDING_TYPES_CPU] + [k for k in kernels if k not in CPU_KERNELS]
            if bad:
                raise ConfigError(f"sharding_config for table {name!r}: {', '.join(bad)} needs CUDA; "
                                  f"on CPU use sharding types {', '.join(SHARDING_TYPES_CPU)} and "
                                  f"kernels {', '.join(CPU_KERNELS)}")
        if on_dense_kernel(opt, compute_device):
            types, kernels = _dense_kernel_constraint(name, types, kernels, key)
        caching = compute_device == "cuda" and (not kernels or "fused_uvm_caching" in kernels)
        if types or kernels or caching:
            out[name] = ParameterConstraints(
                sharding_types=types or None, compute_kernels=kernels or None,
                cache_params=CacheParams(load_factor=sc.cache_load_factor) if caching else None)
    return out


def _dense_kernel_constraint(table: str, types: list[str], kernels: list[str],
                             key: str = "train_config.sparse_optimizer") -> tuple[list[str], list[str]]:
    """Planner constraint of a table that will run on the dense kernel (adam on CPU): planned as
    ``fused`` (TorchRec 1.8's planner allows ``dense`` only data-parallel; ``shard`` rewrites the
    kernel), model-parallel unless data_parallel is asked for by name."""
    if [k for k in kernels if k != "dense"]:
        raise ConfigError(f"sharding_config compute_kernels for table {table!r}: {', '.join(kernels)}; with "
                          f"{key}.name: adam on CPU the table runs on the dense kernel "
                          "(FBGEMM's CPU build has no fused Adam): leave compute_kernels empty or [dense]")
    types = types or list(DENSE_KERNEL_SHARDING_TYPES)
    kernels = ["fused"] + (["dense"] if "data_parallel" in types else [])
    return types, kernels


def planner(cfg: Config, world_size: int, local_world_size: int, compute_device: str) -> EmbeddingShardingPlanner:
    return EmbeddingShardingPlanner(
        topology=topology(cfg, world_size, local_world_size, compute_device),
        batch_size=cfg.data_config.batch_size,
        constraints=constraints(cfg, compute_device),
        debug=False,
    )


def sparse_optimizer(opt: Optimizer, compute_device: str, key: str = "train_config.sparse_optimizer") -> tuple[type, dict]:
    """The fused (in-backward) optimizer class and arguments for the tables (``key``: the
    optimizer's config key, for errors)."""
    kwargs = {"lr": opt.learning_rate}
    if opt.name in ("adam", "partial_rowwise_adam") and compute_device != "cuda":
        raise ConfigError(f"{key}.name: {opt.name} has no fused CPU kernel in FBGEMM"
                          + ("; on CPU adam trains the tables on the dense kernel (shard does it)"
                             if opt.name == "adam" else "; on CPU use adam (dense kernel, torch Adam)"))
    if opt.name in ("adam", "partial_rowwise_adam"):
        cls = trec_optim.Adam if opt.name == "adam" else trec_optim.PartialRowWiseAdam
        return cls, {**kwargs, "eps": opt.eps, "beta1": opt.beta1, "beta2": opt.beta2,
                     "weight_decay": opt.weight_decay}
    if opt.name == "rowwise_adagrad":
        return RowWiseAdagrad, {**kwargs, "eps": opt.eps, "weight_decay": opt.weight_decay}
    if opt.name == "adagrad":
        return torch.optim.Adagrad, {**kwargs, "eps": opt.eps, "weight_decay": opt.weight_decay}
    if opt.name == "sgd":
        return torch.optim.SGD, {**kwargs, "weight_decay": opt.weight_decay}
    raise ConfigError(f"{key}.name: unknown {opt.name!r}")


def sharders() -> list:
    return [EmbeddingBagCollectionSharder(), ZchSharder()]


def plan_model(cfg: Config, module: nn.Module, world_size: int, local_world_size: int, compute_device: str,
               collective: bool = True) -> ShardingPlan:
    """The planner's plan for the EmbeddingBagCollections in ``module`` (collective: every rank
    calls it and gets rank 0's), plus the hand-written row-wise plan of the zch tables (the
    planner finds no sharding type for managed-collision tables on CPU, torchrec issue 2958)."""
    p = planner(cfg, world_size, local_world_size, compute_device)
    plan = (p.collective_plan if collective else p.plan)(module, [EmbeddingBagCollectionSharder()])
    return _with_zch_plan(plan, cfg, module, world_size, local_world_size, compute_device)


def _with_zch_plan(plan: ShardingPlan, cfg: Config, module: nn.Module, world_size: int, local_world_size: int,
                   compute_device: str) -> ShardingPlan:
    for fqn, m in module.named_modules():
        if isinstance(m, ManagedCollisionEmbeddingBagCollection):
            plan.plan.pop(f"{fqn}._embedding_module", None)  # the planner saw a plain EBC there: replaced
            plan.plan[fqn] = zch_plan(m, cfg.schema, world_size, local_world_size, compute_device)
    return plan


def table_modules(cfg: Config, module: nn.Module) -> list[tuple[str, nn.Module, str, Optimizer]]:
    """The table collections in ``module`` as (fqn, module, optimizer key, optimizer): the
    feature tables' EmbeddingBagCollection and managed-collision collection take
    ``sparse_optimizer``, as does the task tables' (``model.TASK_EBC``), the wide tables'
    (``model.WIDE_EBC``) the wide tables' optimizer. The fqns are the sharding plan's (a
    managed-collision collection is planned as itself)."""
    tc = cfg.train_config
    out = []
    for fqn, m in module.named_modules():
        if isinstance(m, ManagedCollisionEmbeddingBagCollection) or (
                isinstance(m, EmbeddingBagCollection) and not fqn.endswith("._embedding_module")):
            if fqn.split(".")[-1] == WIDE_EBC:
                out.append((fqn, m, "train_config.wide_optimizer", tc.wide_tables_optimizer))
            else:
                out.append((fqn, m, "train_config.sparse_optimizer", tc.sparse_optimizer))
    return out


def dense_kernel_modules(cfg: Config, module: nn.Module, compute_device: str) -> list[str]:
    """The fqns of the table collections whose optimizer has no fused kernel here (adam on CPU):
    they run on the dense kernel (``table_optim``). A zch collection cannot: ConfigError."""
    out = []
    for fqn, m, key, opt in table_modules(cfg, module):
        if not on_dense_kernel(opt, compute_device):
            continue
        if isinstance(m, ManagedCollisionEmbeddingBagCollection):
            raise ConfigError(f"{key}.name: {opt.name} on CPU runs the tables on the dense kernel, which zch "
                              f"tables ({', '.join(f.name for f in cfg.schema.zch)}) do not support: use "
                              "rowwise_adagrad, adagrad or sgd")
        out.append(fqn)
    return out


def shard(cfg: Config, train_module: nn.Module, env: DistEnv) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Applies the fused table optimizers in backward (each collection its own: the feature
    tables, zch ones included, the sparse optimizer; the wide tables theirs), plans collectively,
    and returns (DMP, plan). Adam on CPU: no fused optimizer; that collection's model-parallel
    tables go on the dense kernel (trained by ``table_optim.ShardedTableOptimizer``, which
    ``train.build`` adds)."""
    compute_device = env.device.type
    # No fused kernel (adam on CPU): the tables' weights become ordinary parameters (dense
    # kernel), trained by the torch optimizer train.build adds (aitm_torchrec/table_optim.py).
    dense = dense_kernel_modules(cfg, train_module, compute_device)
    for fqn, m, key, opt in table_modules(cfg, train_module):
        if fqn not in dense:
            opt_cls, opt_kwargs = sparse_optimizer(opt, compute_device, key)
            apply_optimizer_in_backward(opt_cls, list(m.parameters()), opt_kwargs)
    plan = plan_model(cfg, train_module, env.world_size, env.local_world_size, compute_device)
    dense_kernel_plan(plan, dense)
    dmp = DistributedModelParallel(module=train_module, device=env.device, plan=plan, sharders=sharders())
    return dmp, plan


def describe(plan: ShardingPlan) -> dict[str, dict]:
    """Table -> {sharding_type, compute_kernel, ranks} for logs, summaries and plan printing."""
    out = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            ranks = sorted({r for r in (ps.ranks or [])}) or sorted(
                {s.placement.rank() for s in (ps.sharding_spec.shards if ps.sharding_spec else [])})
            out[table] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel, "ranks": ranks}
    return out


def plan_for_topology(cfg: Config, hosts: int, procs_per_host: int, compute_device: str) -> dict:
    """Plans the config's tables for a cluster without running it (the planner only estimates).

    Returns {"tables": {table: {sharding_type, compute_kernel, ranks, shards: [[rows, cols], ...],
    hbm_gb, ddr_gb (the planner's estimate over all shards; not for zch tables), wide (a WIDE
    group's table), task (a task table's tower, else None)}}, "ranks": [{"rank", "hbm_gb",
    "ddr_gb", "tables"}...], "topology": {...}}.
    """
    from aitm_torchrec.task import build_train_module

    world = hosts * procs_per_host
    module = build_train_module(cfg, device="meta", dense_device="meta")
    p = planner(cfg, world, procs_per_host, compute_device)
    plan = _with_zch_plan(p.plan(module, [EmbeddingBagCollectionSharder()]), cfg, module, world,
                          procs_per_host, compute_device)
    # as shard does (the estimates below are the fused kernel's)
    dense_kernel_plan(plan, dense_kernel_modules(cfg, module, compute_device))
    per_rank = [{"rank": r, "hbm_gb": 0.0, "ddr_gb": 0.0, "tables": []} for r in range(world)]
    tables: dict[str, dict] = describe(plan)
    for f in cfg.schema.zch:  # row-wise, evenly: no planner estimate
        tables[f.name]["shards"] = [[f.zch_size // world, f.embedding_dim]] * world
    wide = set(cfg.schema.wide_tables)
    task = cfg.schema.task_tables
    for name, t in tables.items():
        t["wide"] = name in wide
        t["task"] = task[name][0] if name in task else None
    for option in p._best_plan or []:  # the planner's own storage estimates (weights, optimizer, buffers)
        if option.name in {f.name for f in cfg.schema.zch}:
            continue
        t = tables[option.name]
        t["shards"] = [list(s.size) for s in option.shards]
        t["hbm_gb"] = sum(s.storage.hbm for s in option.shards) / GB
        t["ddr_gb"] = sum(s.storage.ddr for s in option.shards) / GB
        for shard in option.shards:
            r = per_rank[shard.rank]
            r["hbm_gb"] += shard.storage.hbm / GB
            r["ddr_gb"] += shard.storage.ddr / GB
            r["tables"].append(option.name)
    topo = p._topology
    return {
        "topology": {"hosts": hosts, "procs_per_host": procs_per_host, "world_size": world,
                     "compute_device": compute_device, "hbm_cap_gb": topo.devices[0].storage.hbm / GB,
                     "ddr_cap_gb": topo.devices[0].storage.ddr / GB},
        "tables": tables,
        "ranks": per_rank,
    }
