"""Schema: every fact about features, labels and towers, derived once from the validated config.

The reader, ``build_model``, the loss, metrics, sharding, scoring, table export and the serving
model all take a ``Schema``; none of them recomputes any of it:

- sparse features in table order, each with its id rule (``hash_bucket_size``, ``num_buckets``
  or ``zch``: a managed-collision table), separator, combiner and embedding dim; one table per
  sparse feature;
- dense (RawFeature) features in the order of the dense block, each with its column offset and
  normaliser;
- the (DEEP) feature groups, concatenated in order into the model input (``input_dim`` wide);
- the features with a wide part (WIDE groups): each has a wide table ``wide_<feature>`` of
  ``wide_dim`` columns whose first T (one per task) are added to the task logits;
- the features with task-specific embeddings (``model_config.task_embeddings``, STEM): each task
  (tower) t has a table ``task_<tower>_<feature>`` of ``task_embedding_dim`` columns per listed
  feature (the feature's rows, id rule and pooling), read into task t's tower input;
- tasks (towers) in config order, with their label, relation towers (indices), BCE weight and
  calibrator weight; ``label_relations`` are the label-chain rules the reader enforces.

It serialises to JSON (``save`` / ``load``) with the id hash named and versioned, because it
ships beside exported tables and serving models: another system can reproduce id -> row from it.
This module imports neither torch nor TorchRec, so a serving process can read it alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

# FBGEMM's training kernels take table widths that are multiples of 4: a wide table has T columns
# (one per task) rounded up to one, and the model reads the first T.
WIDE_ALIGNMENT = 4


def wide_table_name(feature: str) -> str:
    """The wide table of a WIDE group's feature (its own EmbeddingBagCollection, ``wide_ebc``)."""
    return f"wide_{feature}"


def task_table_name(tower: str, feature: str) -> str:
    """Task ``tower``'s own table of ``feature`` (STEM's task-specific embeddings, in their own
    EmbeddingBagCollection, ``task_ebc``)."""
    return f"task_{tower}_{feature}"

# The id hash of ``hash_bucket_size`` features (implemented in ``features.py``). Bump the version
# whenever the function changes: every exported table and model records the one it was built with.
ID_HASH = {
    "name": "aitm-splitmix64",
    "version": 1,
    "int": "row = splitmix64(uint64(id)) mod hash_bucket_size",
    "string": "row = splitmix64(poly64(utf8 bytes)) mod hash_bucket_size; "
              "poly64(s) = sum_i s[i] * P^(n-1-i) + O * P^n mod 2^64, P = 0x100000001B3, "
              "O = 0xCBF29CE484222325",
    "zch_key": "key = splitmix64(uint64(id) or poly64(utf8 bytes)) mod (2^63 - 1), as int64; a zch "
               "table maps each key it holds to a row of its own",
    "splitmix64": "z += 0x9E3779B97F4A7C15; z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; "
                  "z *= 0x94D049BB133111EB; z ^= z >> 31 (mod 2^64)",
}


class SchemaError(ValueError):
    """A schema file that cannot be used, with the path in the message."""


@dataclass(frozen=True)
class Normalizer:
    """RawFeature value x -> (f(x) - mean) / std, f(x) = sign(x) * log(1 + |x|) if log1p else x."""

    log1p: bool = False
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class SparseFeature:
    """One id column -> one embedding table (named after the feature)."""

    name: str
    column: str
    feature_type: str  # IdFeature | TagFeature
    embedding_dim: int
    hash_bucket_size: int = 0  # ids hashed into [0, hash_bucket_size) by ID_HASH
    num_buckets: int = 0  # ids already rows in [0, num_buckets)
    separator: str = ""  # TagFeature stored as one string
    combiner: str = "sum"  # pooling of the bag: sum | mean
    zch_size: int = 0  # managed-collision table of zch_size rows; ids become ID_HASH zch keys
    eviction_interval: int = 0  # zch: training steps between evictions
    eviction_policy: str = ""  # zch: lfu | lru | distance_lfu
    decay_exponent: float = 1.0  # zch: lru and distance_lfu

    @property
    def num_embeddings(self) -> int:
        return self.hash_bucket_size or self.num_buckets or self.zch_size

    @property
    def is_zch(self) -> bool:
        return self.zch_size > 0

    @property
    def id_rule(self) -> dict[str, Any]:
        """How a raw id becomes a row, for systems outside this one."""
        if self.hash_bucket_size:
            return {"kind": "hash", "hash": ID_HASH["name"], "hash_version": ID_HASH["version"],
                    "hash_bucket_size": self.hash_bucket_size}
        if self.zch_size:
            # The key -> row map is learned: it ships with the table (zch.zch_rows), not here.
            return {"kind": "zch", "hash": ID_HASH["name"], "hash_version": ID_HASH["version"],
                    "key": ID_HASH["zch_key"], "zch_size": self.zch_size,
                    "eviction_policy": self.eviction_policy, "eviction_interval": self.eviction_interval,
                    "unseen": "keys the table does not hold read the last row of the shard their key "
                              "falls in (key range split evenly over the training ranks)"}
        return {"kind": "identity", "num_buckets": self.num_buckets}


@dataclass(frozen=True)
class DenseFeature:
    """One RawFeature column -> ``dim`` columns of the dense block, from ``offset``."""

    name: str
    column: str
    dim: int
    offset: int
    normalizer: Normalizer | None = None
    feature_type: str = "RawFeature"

    @property
    def stop(self) -> int:
        return self.offset + self.dim


@dataclass(frozen=True)
class Task:
    """One tower: its label, the towers it receives from (indices), and its loss weights."""

    tower_name: str
    label_name: str
    relations: tuple[int, ...] = ()
    classification_weight: float = 1.0  # tower weight x its CLASSIFICATION losses' weights
    calibration_alpha: float = 0.0  # ORDER_CALIBRATE_LOSS weight against each relation tower


@dataclass(frozen=True)
class Schema:
    sparse: tuple[SparseFeature, ...]
    dense: tuple[DenseFeature, ...]
    groups: tuple[tuple[str, ...], ...]  # the DEEP groups: the model input
    tasks: tuple[Task, ...]
    version: int = SCHEMA_VERSION
    wide: tuple[str, ...] = ()  # sparse features with a wide table (the WIDE groups'), in order
    task_features: tuple[str, ...] = ()  # sparse features with a table per task (task_embeddings), in order
    task_embedding_dim: int = 0  # columns of every task table

    def __post_init__(self) -> None:
        names = [f.name for f in self.sparse + self.dense]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")
        unknown = sorted({n for g in self.groups for n in g} - set(names))
        if unknown:
            raise ValueError(f"feature groups name unknown features {unknown}")
        plain = {f.name for f in self.sparse if not f.is_zch}
        if len(set(self.wide)) != len(self.wide) or not set(self.wide) <= plain:
            raise ValueError(f"wide features must be distinct sparse features without zch, got {list(self.wide)}")
        if len(set(self.task_features)) != len(self.task_features) or not set(self.task_features) <= plain:
            raise ValueError(f"task embedding features must be distinct sparse features without zch, got "
                             f"{list(self.task_features)}")
        if self.task_features and self.task_embedding_dim < 1:
            raise ValueError(f"task embeddings need a positive embedding dim, got {self.task_embedding_dim}")
        topological_order([t.relations for t in self.tasks])  # ValueError on a cycle

    # ---- derived facts (each in one place) ----------------------------------------------------

    @property
    def dense_dim(self) -> int:
        return sum(f.dim for f in self.dense)

    @property
    def keys(self) -> list[str]:
        """KeyedJaggedTensor keys, one per table, in table order."""
        return [f.name for f in self.sparse]

    @property
    def tower_names(self) -> list[str]:
        return [t.tower_name for t in self.tasks]

    @property
    def label_names(self) -> list[str]:
        return [t.label_name for t in self.tasks]

    def tower_index(self, name: str) -> int:
        return self.tower_names.index(name)

    @property
    def label_relations(self) -> list[list[int]]:
        """Per label, the labels that must be 1 wherever it is 1 (the tower relations)."""
        return [list(t.relations) for t in self.tasks]

    @property
    def calibration_pairs(self) -> list[tuple[int, int, float]]:
        """(later task, earlier task, alpha) for every calibrated relation."""
        return [(i, r, t.calibration_alpha) for i, t in enumerate(self.tasks)
                if t.calibration_alpha for r in t.relations]

    @property
    def order(self) -> list[int]:
        """Task indices with every relation tower before the towers it feeds."""
        return topological_order([t.relations for t in self.tasks])

    @property
    def feature_columns(self) -> list[str]:
        """Input columns the features read, in feature order, without repeats."""
        return list(dict.fromkeys(f.column for f in self.sparse + self.dense))

    @property
    def dense_slices(self) -> dict[str, tuple[int, int]]:
        return {f.name: (f.offset, f.stop) for f in self.dense}

    def feature_dim(self, name: str) -> int:
        """Width of a feature in the model input: embedding dim or raw width."""
        for f in self.sparse:
            if f.name == name:
                return f.embedding_dim
        for f in self.dense:
            if f.name == name:
                return f.dim
        raise KeyError(name)

    @property
    def input_dim(self) -> int:
        """Width of the model input: every group's features concatenated."""
        return sum(self.feature_dim(n) for g in self.groups for n in g)

    @property
    def input_slices(self) -> dict[str, tuple[int, int]]:
        """Feature name -> its (start, stop) columns in the model input, in input order (a
        feature in two DEEP groups: its first place)."""
        out: dict[str, tuple[int, int]] = {}
        offset = 0
        for n in (n for g in self.groups for n in g):
            dim = self.feature_dim(n)
            out.setdefault(n, (offset, offset + dim))
            offset += dim
        return out

    @property
    def deep_sparse(self) -> tuple[str, ...]:
        """The sparse features of the DEEP groups, each once, in input order: what the backbone's
        ``dot_interaction`` dots."""
        sparse = {f.name for f in self.sparse}
        return tuple(n for n in self.input_slices if n in sparse)

    @property
    def zch(self) -> tuple[SparseFeature, ...]:
        """The sparse features with managed-collision (zch) tables."""
        return tuple(f for f in self.sparse if f.is_zch)

    @property
    def wide_dim(self) -> int:
        """Columns of every wide table: one per task, rounded up to ``WIDE_ALIGNMENT``."""
        return -(-len(self.tasks) // WIDE_ALIGNMENT) * WIDE_ALIGNMENT

    @property
    def wide_tables(self) -> dict[str, SparseFeature]:
        """Wide table name -> the feature whose ids it reads (same rows and id rule)."""
        by_name = {f.name: f for f in self.sparse}
        return {wide_table_name(n): by_name[n] for n in self.wide}

    def wide_embedding_bag_configs(self) -> list:
        """TorchRec ``EmbeddingBagConfig``s of the wide tables (``wide_<feature>``, ``wide_dim``
        columns, the feature's rows and pooling), in ``wide`` order."""
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

        pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
        return [EmbeddingBagConfig(name=name, feature_names=[f.name], num_embeddings=f.num_embeddings,
                                   embedding_dim=self.wide_dim, pooling=pooling[f.combiner])
                for name, f in self.wide_tables.items()]

    @property
    def task_tables(self) -> dict[str, tuple[str, SparseFeature]]:
        """Task table name -> (its tower, the feature whose ids it reads: same rows and id rule),
        tower by tower in tower order, each tower's in ``task_features`` order."""
        by_name = {f.name: f for f in self.sparse}
        return {task_table_name(t, n): (t, by_name[n]) for t in self.tower_names for n in self.task_features}

    @property
    def task_width(self) -> int:
        """Width of one task's embeddings e_t: ``task_embedding_dim`` per listed feature (0: none)."""
        return len(self.task_features) * self.task_embedding_dim

    def task_embedding_bag_configs(self) -> list:
        """TorchRec ``EmbeddingBagConfig``s of the task tables (``task_tables`` order:
        ``task_embedding_dim`` columns, the feature's rows and pooling). A feature read by several
        tables is a TorchRec shared feature: its pooled keys are ``<feature>@<table>``."""
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

        pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
        return [EmbeddingBagConfig(name=name, feature_names=[f.name], num_embeddings=f.num_embeddings,
                                   embedding_dim=self.task_embedding_dim, pooling=pooling[f.combiner])
                for name, (_, f) in self.task_tables.items()]

    def embedding_bag_configs(self, zch: bool | None = None) -> list:
        """TorchRec ``EmbeddingBagConfig``s, one table per sparse feature, named after it: all of
        them (``zch`` None), or only the zch tables (True) or only the others (False)."""
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

        pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
        return [EmbeddingBagConfig(name=f.name, feature_names=[f.name], num_embeddings=f.num_embeddings,
                                   embedding_dim=f.embedding_dim, pooling=pooling[f.combiner])
                for f in self.sparse if zch is None or f.is_zch == zch]

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any) -> Schema:
        """From a validated ``config.Config``: DEEP groups are the model input, WIDE groups'
        features get wide tables, ``task_embeddings``' features a table per task."""
        groups = cfg.model_config.feature_groups
        schema = cls.from_features(cfg.feature_config.features, cfg.model_config.model_params.task_towers,
                                   [g.feature_names for g in groups if g.wide_deep != "WIDE"],
                                   [n for g in groups if g.wide_deep == "WIDE" for n in g.feature_names])
        te = cfg.model_config.task_embeddings
        if te is None:
            return schema
        return dataclasses.replace(schema, task_features=tuple(te.features), task_embedding_dim=te.embedding_dim)

    @classmethod
    def from_features(cls, features: Sequence[Any], towers: Sequence[Any] = (),
                      groups: Sequence[Sequence[str]] | None = None, wide: Sequence[str] = ()) -> Schema:
        """From config ``Feature``s and ``TaskTower``s (or label names: a plain chain of tasks).
        ``groups`` (DEEP) default to one group of every feature; ``wide``: features with a wide part."""
        sparse, dense, offset = [], [], 0
        for f in features:
            if f.feature_type == "RawFeature":
                dense.append(DenseFeature(f.name, f.column, f.raw_input_dim, offset, f.normalizer))
                offset += f.raw_input_dim
            else:
                zch = {}
                if f.zch is not None:
                    zch = {"zch_size": f.zch.zch_size, "eviction_interval": f.zch.eviction_interval,
                           "eviction_policy": f.zch.eviction_policy, "decay_exponent": f.zch.decay_exponent}
                sparse.append(SparseFeature(f.name, f.column, f.feature_type, f.embedding_dim,
                                            f.hash_bucket_size, f.num_buckets, f.separator, f.combiner, **zch))
        if towers and isinstance(towers[0], str):
            tasks = [Task(label, label, (i - 1,) if i else ()) for i, label in enumerate(towers)]
        else:
            index = {t.tower_name: i for i, t in enumerate(towers)}
            tasks = [Task(t.tower_name, t.label_name, tuple(index[r] for r in t.relation_tower_names),
                          t.classification_weight, t.calibration_alpha) for t in towers]
        if groups is None:
            groups = [[f.name for f in features]]
        return cls(tuple(sparse), tuple(dense), tuple(tuple(g) for g in groups), tuple(tasks), wide=tuple(wide))

    # ---- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for f, spec in zip(d["sparse"], self.sparse):
            f["id_rule"] = spec.id_rule  # written for readers outside this project; ignored on load
        d["id_hash"] = dict(ID_HASH)
        d["dense_dim"] = self.dense_dim
        if self.wide:  # for readers outside this project; derived, ignored on load
            d["wide_tables"] = {name: {"feature": f.name, "dim": self.wide_dim, "logit_columns": self.tower_names}
                                for name, f in self.wide_tables.items()}
        if self.task_features:  # derived, ignored on load, as wide_tables
            d["task_tables"] = {name: {"feature": f.name, "dim": self.task_embedding_dim, "tower": tower}
                                for name, (tower, f) in self.task_tables.items()}
        else:  # a schema without task embeddings writes the same file as before they existed
            del d["task_features"], d["task_embedding_dim"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "schema") -> Schema:
        try:
            if d.get("version") != SCHEMA_VERSION:
                raise SchemaError(f"{where}: schema version {d.get('version')!r}; this code reads {SCHEMA_VERSION}")
            h = d.get("id_hash", {})
            if (h.get("name"), h.get("version")) != (ID_HASH["name"], ID_HASH["version"]):
                raise SchemaError(f"{where}: ids were hashed with {h.get('name')} v{h.get('version')}; this code "
                                  f"hashes with {ID_HASH['name']} v{ID_HASH['version']}, so rows would differ")
            sparse = tuple(SparseFeature(**{k: v for k, v in f.items() if k != "id_rule"}) for f in d["sparse"])
            dense = tuple(DenseFeature(**{**f, "normalizer": Normalizer(**f["normalizer"]) if f["normalizer"] else None})
                          for f in d["dense"])
            tasks = tuple(Task(**{**t, "relations": tuple(t["relations"])}) for t in d["tasks"])
            return cls(sparse, dense, tuple(tuple(g) for g in d["groups"]), tasks, d["version"],
                       tuple(d.get("wide", ())),  # files written before wide parts have none
                       tuple(d.get("task_features", ())), int(d.get("task_embedding_dim", 0)))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, SchemaError):
                raise
            raise SchemaError(f"{where}: not a valid schema ({type(e).__name__}: {e})") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        """Writes ``path`` atomically (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SchemaError(f"{path}: schema file not found") from None
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, str(path))


def topological_order(relations: Sequence[Sequence[int]]) -> list[int]:
    """Node indices ordered so each node's relations come first; ValueError naming a cycle."""
    order: list[int] = []
    pending = dict(enumerate(relations))
    while pending:
        ready = [i for i, deps in pending.items() if all(d in order for d in deps)]
        if not ready:
            raise ValueError(sorted(pending))
        order += ready
        for i in ready:
            del pending[i]
    return order
