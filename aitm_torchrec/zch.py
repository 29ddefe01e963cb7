"""Managed-collision (ZCH) tables: ids with rows of their own in a fixed-size table, with eviction.

A sparse feature configured with ``zch`` (instead of ``hash_bucket_size``) gets a table in the
model's second table module, ``mc_ebc``: TorchRec's ``ManagedCollisionEmbeddingBagCollection``
with one ``MCHManagedCollisionModule`` per zch table. The reader feeds such a feature its ids'
zch keys (``features.zch_keys``: mixed raw ids in [0, 2^63 - 1)); the module remaps each key it
holds to its row and every other key to the default row. Both table modules read the same KJT,
so the train pipeline pipelines both.

Sharding (``zch_plan``): always row-wise, ``zch_size / world_size`` rows per rank. Keys are routed
to ranks by value range (rank r holds keys in [r, r + 1) * (2^63 - 1) / W), which is why they are
mixed first. Each rank's last row is its default row: keys that rank does not hold (never seen,
not admitted yet, or evicted) read it, in training and scoring. The planner cannot plan these
tables on CPU (torchrec issue 2958), so the plan is written here.

Eviction: every ``eviction_interval`` training steps each rank's module ranks the keys seen since
the last eviction against the held ones (lfu / lru / distance_lfu) and replaces the losers. A
replaced row is re-initialised (uniform in +-sqrt(1 / zch_size), as new tables are, from a
generator seeded by table and step, so resumed runs repeat it) and its optimizer state zeroed.
TorchRec does that with ``fbgemm::reset_weight_momentum``, which has no CPU kernel in FBGEMM 1.8:
``ZchSharder`` does it in Python on CPU and leaves CUDA to TorchRec.

State: the key -> row map (``_mch_sorted_raw_ids``, ``_mch_remapped_ids_mapping``) and the
policy's counters (``_mch_counts`` / ``_mch_last_access_iter``) are module buffers, sharded like
the table, so DCP checkpoints and reshards them with it; ``_current_iter_tensor`` (the step
counter) is replicated. Not saved: the keys seen since the last eviction (a plain attribute of the
TorchRec module), so a run resumed from a checkpoint taken between evictions forgets them.

``zch_rows`` gives each held key and its row, for table export.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchrec.distributed.mc_embeddingbag import (
    ManagedCollisionEmbeddingBagCollectionSharder,
    ShardedManagedCollisionEmbeddingBagCollection,
)
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
from torchrec.distributed.types import EmbeddingModuleShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor

from aitm_torchrec.config import ConfigError
from aitm_torchrec.features import ZCH_KEY_SPACE
from aitm_torchrec.schema import Schema, SparseFeature

EMPTY_KEY = torch.iinfo(torch.int64).max  # an empty slot's key in the module's map


def eviction_policy(f: SparseFeature) -> MCHEvictionPolicy:
    if f.eviction_policy == "lfu":
        return LFU_EvictionPolicy()
    if f.eviction_policy == "lru":
        return LRU_EvictionPolicy(decay_exponent=f.decay_exponent)
    if f.eviction_policy == "distance_lfu":
        return DistanceLFU_EvictionPolicy(decay_exponent=f.decay_exponent)
    raise ConfigError(f"feature {f.name!r}: unknown zch.eviction_policy {f.eviction_policy!r}; "
                   "allowed: lfu, lru, distance_lfu")


def build_mc_ebc(schema: Schema, device: torch.device | str,
                 configs: list | None = None) -> ManagedCollisionEmbeddingBagCollection | None:
    """The schema's zch tables as one managed-collision EBC (None when there are none);
    ``configs``: their EmbeddingBagConfigs when not the schema's own (e.g. a custom init)."""
    if not schema.zch:
        return None
    device = torch.device(device)
    configs = configs if configs is not None else schema.embedding_bag_configs(zch=True)
    modules = {f.name: MCHManagedCollisionModule(zch_size=f.zch_size, device=device,
                                                 eviction_policy=eviction_policy(f),
                                                 eviction_interval=f.eviction_interval, name=f.name)
               for f in schema.zch}
    return ManagedCollisionEmbeddingBagCollection(
        EmbeddingBagCollection(tables=configs, device=device),
        ManagedCollisionCollection(modules, configs),
        allow_in_place_embed_weight_update=True,
    )


class _ShardedZch(ShardedManagedCollisionEmbeddingBagCollection):
    """TorchRec's sharded MC-EBC, with eviction that works on CPU and repeats on resume."""

    def _evict(self, evictions_per_table: dict[str, torch.Tensor | None]) -> None:
        if self._device.type != "cpu":
            return super()._evict(evictions_per_table)
        for table, rows in evictions_per_table.items():  # rows: this shard's local row indices
            if rows is None or rows.numel() == 0:
                continue
            tbe, index = self._table_to_tbe_and_index[table]
            index = int(index)
            config = self._embedding_module._table_name_to_config[table]
            step = self._managed_collision_collection._managed_collision_modules[table]._current_iter
            gen = torch.Generator().manual_seed(zlib.crc32(table.encode()) * 1_000_003 + step)
            bound = math.sqrt(1.0 / config.num_embeddings)
            with torch.no_grad():
                weights = tbe.split_embedding_weights()[index]  # views of the TBE's storage
                weights[rows] = torch.empty(rows.numel(), weights.shape[1]).uniform_(-bound, bound, generator=gen)
                for state in tbe.get_optimizer_state()[index].values():
                    state[rows] = 0


class ZchSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """Shards ``ManagedCollisionEmbeddingBagCollection`` into ``_ShardedZch``."""

    def shard(self, module: ManagedCollisionEmbeddingBagCollection, params: dict, env: Any,
              device: torch.device | None = None, module_fqn: str | None = None) -> _ShardedZch:
        return _ShardedZch(module, params, ebc_sharder=self._e_sharder, mc_sharder=self._mc_sharder,
                           env=env, device=device or torch.device("cuda"))


def zch_plan(mc_ebc: ManagedCollisionEmbeddingBagCollection, schema: Schema, world_size: int,
             local_world_size: int, device_type: str) -> EmbeddingModuleShardingPlan:
    """Row-wise plan of every zch table over ``world_size`` ranks, fused kernel. ConfigError when a
    table's ``zch_size`` does not split evenly (the key ranges and default rows assume it)."""
    for f in schema.zch:
        if f.zch_size % world_size or f.zch_size // world_size < 2:
            raise ConfigError(f"feature {f.name!r}: zch.zch_size {f.zch_size} must split evenly over the "
                           f"{world_size} ranks, at least 2 rows each (a multiple of {world_size}, "
                           f">= {2 * world_size})")
    return construct_module_sharding_plan(
        mc_ebc, {f.name: row_wise(compute_kernel="fused") for f in schema.zch}, sharder=ZchSharder(),
        local_size=local_world_size, world_size=world_size, device_type=device_type)


def default_rows(zch_size: int, world_size: int) -> list[int]:
    """The rows unheld keys read when a table is split over ``world_size`` ranks: each shard's last."""
    return [(r + 1) * (zch_size // world_size) - 1 for r in range(world_size)]


def zch_rows(model_or_state: nn.Module | Mapping[str, Any], table: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, rows) of every occupied row of zch table ``table``, sorted by row: ``keys[i]`` is the
    zch key (``features.zch_keys`` of the raw id) whose embedding is row ``rows[i]`` of the table
    (global row numbers). Takes a model (sharded by DMP or not, or its train wrapper) or a state
    dict (a checkpoint's, loaded with DCP). A sharded model gives this rank's rows only: its shard
    of the table, in the same global numbering as the table's ``shard_offsets``."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    suffix = f"_managed_collision_modules.{table}."
    found = {name.rsplit(".", 1)[1]: value for name, value in state.items() if suffix in name}
    if "_mch_sorted_raw_ids" not in found:
        raise KeyError(f"no zch table {table!r} in this model or state dict")
    keys, rows = (_local(found[n]) for n in ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping"))
    held = keys != EMPTY_KEY
    keys, rows = keys[held], rows[held]
    order = torch.argsort(rows)
    return keys[order], rows[order]


def _local(t: Any) -> torch.Tensor:
    """A plain tensor, or this rank's shards of a ShardedTensor, concatenated."""
    if hasattr(t, "local_shards"):
        shards = t.local_shards()
        return torch.cat([s.tensor for s in shards]) if shards else torch.zeros(0, dtype=torch.int64)
    return t


def zch_modules(model: nn.Module) -> Sequence[nn.Module]:
    """The managed-collision modules (one per zch table, this rank's shard) in ``model``."""
    return [m for m in model.modules() if isinstance(m, MCHManagedCollisionModule)]


# ---- jobs that read trained models: the trained key -> row map and the trained default rows ----


def key_shards(keys: torch.Tensor, world_size: int) -> torch.Tensor:
    """The rank (of ``world_size``) whose key range holds each key, as TorchRec's row-wise input
    distribution routes them: ``key // ceil((2^63 - 1) / world_size)``."""
    block = (ZCH_KEY_SPACE - 1) // world_size + 1  # ceil, in int64 (as export_model.zch_remap)
    return torch.div(keys, block, rounding_mode="floor").clamp(max=world_size - 1)


def trained_default_rows(keys: torch.Tensor, zch_size: int, world_size: int) -> torch.Tensor:
    """The default row each (unheld) key read in training on ``world_size`` ranks: the last row of
    the shard its key range fell in (``default_rows``), as global row numbers."""
    return (key_shards(keys, world_size) + 1) * (zch_size // world_size) - 1


def lookup_rows(keys: torch.Tensor, sorted_keys: torch.Tensor, rows: torch.Tensor, zch_size: int,
                world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys -> (rows, default): the row holding each key (``sorted_keys`` ascending, empty slots
    ``EMPTY_KEY`` at the end, ``rows`` aligned with it), else the key's trained default row
    (``trained_default_rows`` for a model trained on ``world_size`` ranks), with ``default`` True."""
    at = torch.searchsorted(sorted_keys[:-1], keys)
    held = sorted_keys[at] == keys
    return torch.where(held, rows[at], trained_default_rows(keys, zch_size, world_size)), ~held


def sorted_map(keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A key -> row map (any order, empty slots included) sorted by key, as ``lookup_rows`` takes it."""
    order = torch.argsort(keys, stable=True)
    return keys[order].contiguous(), rows[order].contiguous()


def use_trained_defaults(model: nn.Module, schema: Schema, world_size: int) -> None:
    """Makes an eval model's zch modules (sharded or not) send unheld keys to the default row they
    read in training on ``world_size`` ranks (``trained_default_rows``), whatever this job's world
    size, instead of TorchRec's "last row of this module's shard". Where that row lies in another
    rank's shard (more scoring ranks than training ranks), the shard's last row is kept."""
    sizes = {f.name: f.zch_size for f in schema.zch}
    for m in zch_modules(model):
        m.remap = _TrainedDefaultRemap(m, sizes[m._name], world_size)


class _TrainedDefaultRemap:
    """``MCHManagedCollisionModule.remap`` with the trained default rows (``use_trained_defaults``)."""

    def __init__(self, module: MCHManagedCollisionModule, zch_size: int, world_size: int) -> None:
        self.module, self.zch_size, self.world_size = module, zch_size, world_size

    def __call__(self, features: dict, mutate_miss_lengths: bool = True, write_weights: Any = None) -> dict:
        m = self.module
        lo = m._output_global_offset
        hi = lo + m._zch_size
        out = {}
        for name, jt in features.items():
            rows, _ = lookup_rows(jt.values(), m._mch_sorted_raw_ids, m._mch_remapped_ids_mapping,
                                  self.zch_size, self.world_size)
            rows = torch.where((rows >= lo) & (rows < hi), rows, hi - 1)
            out[name] = JaggedTensor(values=rows, lengths=jt.lengths(), offsets=jt.offsets(),
                                     weights=jt.weights_or_none())
        return out
