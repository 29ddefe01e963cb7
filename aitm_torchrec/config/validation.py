"""Cross-field checks of a built ``Config``: what the types alone cannot say.

``validate(cfg, where)`` raises the first problem found as a ``ConfigError``
``"<where>: <key path> <what is wrong>"`` (``where`` is the file). It runs one check per part of
the config, in this order, each checking its keys in file order, so that when several problems
apply the same one is always reported:

1. ``check_features``: names unique, one id space per table (hash_bucket_size, num_buckets or zch),
   RawFeature / TagFeature-only keys, zch sizes, embedding_dim.
2. ``check_model``: model_class, feature_groups naming defined features (WIDE groups: id features
   without zch, each once, at least one DEEP group), task_embeddings (id features of the DEEP
   groups without zch, each once; the width; table names free), the backbone MLP, its interaction
   blocks (cross sizes, dot_interaction's sparse features of one embedding_dim, top_mlp beside
   them), the transfer / expert MLPs, num_expert, PLE's extraction_networks.
3. ``check_towers``: per task tower: name and label unique, its MLPs, relation_tower_names naming
   other towers (at most one for ESMM), losses; then no cycle among the relations.
4. ``check_data``: label_fields in tower order, sizes, CSVInput columns, no label used as a feature.
5. ``check_embedding_init``: model_config.embedding_init_scale (a model key checked after the data,
   where it always was: moving it would change which error wins).
6. ``check_train``: num_steps, the optimizers' names and rates (the wide tables' too), checkpoint
   counts, the learning rate scaling and schedule.
7. ``check_eval``: step counts.
8. ``check_sharding``: cache_load_factor, per-table constraints naming non-zch tables (a feature,
   ``wide_<feature>`` of a WIDE group, or a task table ``task_<tower>_<feature>``), allowed
   sharding types and compute kernels.
9. ``check_metrics``: per task tower, each ``metrics_set`` entry names one metric (auc or gauc), at
   most one gauc, its uid_field not empty and, for CSVInput, one of the input_fields (Parquet
   columns are checked when the files are opened).

Later checks may assume earlier ones passed (e.g. feature names are unique, towers have names).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from aitm_torchrec.config.errors import ConfigError
from aitm_torchrec.config.types import (
    COMPUTE_KERNELS,
    DENSE_OPTIMIZERS,
    DNN,
    MODEL_CLASSES,
    SHARDING_TYPES_CUDA,
    SPARSE_OPTIMIZERS,
    Config,
    ExtractionNetwork,
    TableConstraint,
)
from aitm_torchrec.schema import task_table_name

Fail = Callable[[str, str], NoReturn]


def validate(cfg: Config, where: str) -> None:
    """Raises ``ConfigError`` for the first problem, checking the parts in the order above."""
    for check in CHECKS:
        check(cfg, where)


def _fail(where: str) -> Fail:
    def fail(key: str, msg: str) -> NoReturn:
        raise ConfigError(f"{where}: {key} {msg}")

    return fail


def _check_dnn(fail: Fail, key: str, dnn: DNN, owner: str = "", required: bool = False) -> None:
    owner = f"({owner}) " if owner else ""
    if required and not dnn.hidden_units:
        fail(f"{key}.hidden_units", f"{owner}must list at least one size")
    if any(u < 1 for u in dnn.hidden_units):
        fail(f"{key}.hidden_units", f"{owner}must list positive sizes, got {list(dnn.hidden_units)}")
    if not 0.0 <= dnn.dropout_ratio < 1.0:
        fail(f"{key}.dropout_ratio", f"{owner}must be in [0, 1), got {dnn.dropout_ratio}")


def check_features(cfg: Config, where: str) -> None:
    fail = _fail(where)
    features = cfg.feature_config.features
    if not features:
        fail("feature_config.features", "must list at least one feature")
    seen: set[str] = set()
    for i, f in enumerate(features):
        key = f"feature_config.features[{i}]"
        if not f.input_names:
            fail(f"{key}.input_names", "must name the input column")
        if f.name in seen:
            fail(f"{key}.feature_name", f"{f.name!r} is defined twice")
        seen.add(f.name)
        if f.feature_type == "RawFeature":
            if f.hash_bucket_size or f.num_buckets or f.zch:
                fail(key, f"({f.name}) RawFeature takes no hash_bucket_size / num_buckets / zch")
            if f.raw_input_dim < 1:
                fail(f"{key}.raw_input_dim", "must be >= 1")
            if f.normalizer is not None and f.normalizer.std <= 0:
                fail(f"{key}.normalizer.std", f"({f.name}) must be > 0")
            if f.separator:
                fail(f"{key}.separator", f"({f.name}) is only allowed for TagFeature")
            continue
        if f.normalizer is not None:
            fail(f"{key}.normalizer", f"({f.name}) is only allowed for RawFeature")
        if [f.hash_bucket_size > 0, f.num_buckets > 0, f.zch is not None].count(True) != 1:
            fail(key, f"({f.name}) needs exactly one of hash_bucket_size or num_buckets (> 0), or zch")
        if f.zch is not None:
            if f.zch.zch_size < 2:
                fail(f"{key}.zch.zch_size", f"({f.name}) must be >= 2 (one row is kept for unseen ids), "
                     f"got {f.zch.zch_size}")
            if f.zch.eviction_interval < 1:
                fail(f"{key}.zch.eviction_interval", f"({f.name}) must be >= 1 step, got {f.zch.eviction_interval}")
            if f.zch.decay_exponent <= 0:
                fail(f"{key}.zch.decay_exponent", f"({f.name}) must be > 0, got {f.zch.decay_exponent}")
        if f.embedding_dim < 1:
            fail(f"{key}.embedding_dim", f"({f.name}) must be >= 1")
        if f.separator and f.feature_type != "TagFeature":
            fail(f"{key}.separator", f"({f.name}) is only allowed for TagFeature")


def check_model(cfg: Config, where: str) -> None:
    fail = _fail(where)
    seen = {f.name for f in cfg.feature_config.features}  # unique: check_features passed
    mc = cfg.model_config
    if mc.model_class not in MODEL_CLASSES:
        fail("model_config.model_class", f"is {mc.model_class!r}; allowed: {', '.join(MODEL_CLASSES)}")
    if not mc.feature_groups:
        fail("model_config.feature_groups", "must list at least one group")
    for i, g in enumerate(mc.feature_groups):
        for name in g.feature_names:
            if name not in seen:
                fail(f"model_config.feature_groups[{i}].feature_names",
                     f"names unknown feature {name!r}; defined: {', '.join(sorted(seen))}")
    _check_wide_groups(fail, cfg)
    _check_task_embeddings(fail, cfg)
    _check_dnn(fail, "model_config.backbone.mlp", mc.backbone.mlp)
    _check_interaction(fail, cfg)
    mp = mc.model_params
    _check_dnn(fail, "model_config.model_params.transfer_mlp", mp.transfer_mlp)
    _check_dnn(fail, "model_config.model_params.expert_dnn", mp.expert_dnn,
               required=mc.model_class == "MMoE")
    if mp.num_expert < 1:
        fail("model_config.model_params.num_expert", f"must be >= 1, got {mp.num_expert}")
    _check_extraction_networks(fail, mc.model_class, mp.extraction_networks)


def _check_extraction_networks(fail: Fail, model_class: str, networks: tuple[ExtractionNetwork, ...]) -> None:
    key = "model_config.model_params.extraction_networks"
    if model_class == "PLE" and not networks:
        fail(key, "must list at least one extraction layer for PLE")
    if networks and model_class != "PLE":
        fail(key, f"is read by PLE only (model_class is {model_class!r})")
    names: list[str] = []
    for i, net in enumerate(networks):
        k, name = f"{key}[{i}]", net.network_name
        if not name:
            fail(f"{k}.network_name", "must not be empty")
        if name in names:
            fail(f"{k}.network_name", f"{name!r} names two extraction layers")
        names.append(name)
        if net.expert_num_per_task < 1:
            fail(f"{k}.expert_num_per_task", f"({name}) must be >= 1, got {net.expert_num_per_task}")
        if net.share_num < 0:
            fail(f"{k}.share_num", f"({name}) must be >= 0, got {net.share_num}")
        _check_dnn(fail, f"{k}.task_expert_net", net.task_expert_net, name, required=True)
        _check_dnn(fail, f"{k}.share_expert_net", net.share_expert_net, name, required=net.share_num > 0)
        task_size = net.task_expert_net.hidden_units[-1]
        if net.share_num and net.share_expert_net.hidden_units[-1] != task_size:
            fail(f"{k}.share_expert_net.hidden_units", f"({name}) must end in task_expert_net's last size "
                 f"{task_size}, got {list(net.share_expert_net.hidden_units)}: the gates mix task and "
                 "shared experts' outputs")


def _check_interaction(fail: Fail, cfg: Config) -> None:
    """The backbone's interaction blocks: cross sizes; dot_interaction over at least two sparse
    features of the DEEP groups (one with self_interaction), all of one embedding_dim; top_mlp
    only beside them (it runs on their concatenation with the mlp's output)."""
    bb = cfg.model_config.backbone
    key = "model_config.backbone"
    if bb.cross is not None:
        if bb.cross.num_layers < 1:
            fail(f"{key}.cross.num_layers", f"must be >= 1, got {bb.cross.num_layers} (no cross network: leave "
                 "cross out)")
        if bb.cross.low_rank < 0:
            fail(f"{key}.cross.low_rank", f"must be >= 0 (0: full-rank kernels), got {bb.cross.low_rank}")
    if bb.dot_interaction is not None:
        features = cfg.features
        # The same rule as Schema.deep_sparse: each sparse feature of the DEEP groups once, in input order.
        deep = list(dict.fromkeys(n for g in cfg.model_config.feature_groups if g.wide_deep != "WIDE"
                                  for n in g.feature_names if features[n].feature_type != "RawFeature"))
        names, what = deep, "the DEEP groups' sparse features"
        if bb.dot_interaction.features:
            names, what = list(bb.dot_interaction.features), "the features listed"
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                fail(f"{key}.dot_interaction.features", f"lists {twice[0]!r} twice: each pair is dotted once")
            unknown = [n for n in names if n not in deep]
            if unknown:
                fail(f"{key}.dot_interaction.features", f"{unknown[0]!r} is not a sparse feature of the DEEP groups "
                     f"({', '.join(deep)}): the dot products read the pooled embeddings in the model input")
        need = 1 if bb.dot_interaction.self_interaction else 2
        if len(names) < need:
            fail(f"{key}.dot_interaction", f"dots the pooled embeddings of {what} and needs "
                 f"at least {need}; they have {len(names)}{': ' + ', '.join(names) if names else ''}")
        dims: dict[int, list[str]] = {}
        for n in names:
            dims.setdefault(features[n].embedding_dim, []).append(n)
        if len(dims) > 1:
            fail(f"{key}.dot_interaction", f"dots the pooled embeddings of {what}, which "
                 "must share one embedding_dim; got " + ", ".join(f"{d} ({', '.join(ns)})" for d, ns in dims.items()))
    _check_dnn(fail, f"{key}.top_mlp", bb.top_mlp)
    if bb.top_mlp.hidden_units and bb.cross is None and bb.dot_interaction is None:
        fail(f"{key}.top_mlp", "is read with cross or dot_interaction only (it runs on their concatenation with "
             "the mlp's output); without them, add its sizes to backbone.mlp")


def _check_wide_groups(fail: Fail, cfg: Config) -> None:
    """WIDE groups: a wide table per listed id feature (``wide_<feature>``), so each feature once,
    no RawFeature (no ids), no zch feature (its ids are keys its own table remaps), and no
    feature already named like the wide table; the towers still need a DEEP group."""
    groups = cfg.model_config.feature_groups
    if all(g.wide_deep == "WIDE" for g in groups):
        fail("model_config.feature_groups", "needs at least one DEEP group (the towers' input); "
             "WIDE groups only add to the logits")
    features = cfg.features
    wide: dict[str, int] = {}
    for i, g in enumerate(groups):
        if g.wide_deep != "WIDE":
            continue
        key = f"model_config.feature_groups[{i}].feature_names"
        for name in g.feature_names:
            f = features[name]
            if f.feature_type == "RawFeature":
                fail(key, f"({g.group_name}, WIDE) names RawFeature {name!r}; a wide part is a table of "
                     "ids: list raw features in DEEP groups only")
            if f.zch is not None:
                fail(key, f"({g.group_name}, WIDE) names zch feature {name!r}; a wide part on a managed-"
                     "collision table is not supported: give it hash_bucket_size, or list it in DEEP groups only")
            if name in wide:
                fail(key, f"({g.group_name}, WIDE) names feature {name!r}, which WIDE group "
                     f"{groups[wide[name]].group_name!r} already lists: a feature has one wide table")
            if f"wide_{name}" in features:
                fail(key, f"({g.group_name}, WIDE) feature {name!r} would get the wide table 'wide_{name}', "
                     "which is also a feature's name (and table's): rename that feature")
            wide[name] = i


def _check_task_embeddings(fail: Fail, cfg: Config) -> None:
    """task_embeddings: a table per task of each listed id feature (``task_<tower>_<feature>``),
    so each feature once, only sparse features without zch (ids their own table remaps) that a
    DEEP group lists (the task embeddings sit beside their shared ones, which the stem gate reads),
    a width FBGEMM takes, and table names no feature or other task table has. Runs before the
    schema is built (check_towers), which would refuse such features less clearly."""
    te = cfg.model_config.task_embeddings
    if te is None:
        return
    key = "model_config.task_embeddings"
    features = cfg.features
    if not te.features:
        fail(f"{key}.features", "must list at least one sparse feature of a DEEP group")
    deep = {n for g in cfg.model_config.feature_groups if g.wide_deep != "WIDE" for n in g.feature_names}
    for i, name in enumerate(te.features):
        k = f"{key}.features[{i}]"
        f = features.get(name)
        if f is None:
            fail(k, f"names unknown feature {name!r}; defined: {', '.join(sorted(features))}")
        if f.feature_type == "RawFeature":
            fail(k, f"names RawFeature {name!r}; a task embedding is a table of ids: list sparse features only")
        if f.zch is not None:
            fail(k, f"names zch feature {name!r}; task tables of a managed-collision feature are not "
                 "supported: give it hash_bucket_size or num_buckets, or leave it out")
        if name in te.features[:i]:
            fail(k, f"names feature {name!r} twice: a feature has one table per task")
        if name not in deep:
            fail(k, f"names feature {name!r}, which no DEEP group lists: task embeddings sit beside the "
                 "shared embeddings of the model input")
    if te.embedding_dim < 1 or te.embedding_dim % 4:
        fail(f"{key}.embedding_dim", f"must be a positive multiple of 4 (FBGEMM's training kernels take "
             f"no other widths), got {te.embedding_dim}")
    tables: dict[str, tuple[str, str]] = {}
    for tower in dict.fromkeys(t.tower_name for t in cfg.towers):  # repeated names: check_towers says so
        for name in te.features:
            table = task_table_name(tower, name)
            if table in features:
                fail(f"{key}.features", f"feature {name!r} would get the task table {table!r} (tower "
                     f"{tower!r}), which is also a feature's name (and table's): rename that feature")
            if table in tables:
                fail(f"{key}.features", f"the task tables of tower {tower!r} and feature {name!r} and of tower "
                     f"{tables[table][0]!r} and feature {tables[table][1]!r} would both be named {table!r}: "
                     "rename a tower or feature")
            tables[table] = (tower, name)


def check_towers(cfg: Config, where: str) -> None:
    fail = _fail(where)
    mc = cfg.model_config
    towers = mc.model_params.task_towers
    if len(towers) < 1:
        fail("model_config.model_params.task_towers", "must list at least one tower")
    names = [t.tower_name for t in towers]
    labels: dict[str, str] = {}
    for i, t in enumerate(towers):
        key = f"model_config.model_params.task_towers[{i}]"
        if names.count(t.tower_name) > 1:
            fail(f"{key}.tower_name", f"{t.tower_name!r} is used by more than one tower")
        if t.label_name in labels:
            fail(f"{key}.label_name", f"({t.tower_name}) label {t.label_name!r} is already used "
                 f"by tower {labels[t.label_name]!r}")
        labels[t.label_name] = t.tower_name
        if t.num_class != 1:
            fail(f"{key}.num_class", f"({t.tower_name}) must be 1 (binary tasks only)")
        _check_dnn(fail, f"{key}.dnn", t.dnn, t.tower_name, required=True)
        _check_dnn(fail, f"{key}.relation_dnn", t.relation_dnn, t.tower_name)
        _check_dnn(fail, f"{key}.output_dnn", t.output_dnn, t.tower_name)
        if t.output_dnn.hidden_units and mc.model_class not in ("AITM", "DBMTL"):
            fail(f"{key}.output_dnn", f"({t.tower_name}) is read by AITM and DBMTL only")
        if t.ait_project_dim < 0:
            fail(f"{key}.ait_project_dim", f"({t.tower_name}) must be >= 0")
        for j, r in enumerate(t.relation_tower_names):
            if r not in names:
                fail(f"{key}.relation_tower_names", f"({t.tower_name}) names unknown tower {r!r}; "
                     f"towers: {', '.join(names)}")
            if r == t.tower_name:
                fail(f"{key}.relation_tower_names", f"({t.tower_name}) names itself")
            if r in t.relation_tower_names[:j]:
                fail(f"{key}.relation_tower_names", f"({t.tower_name}) names tower {r!r} twice")
        if mc.model_class == "ESMM" and len(t.relation_tower_names) > 1:
            fail(f"{key}.relation_tower_names", f"({t.tower_name}) ESMM multiplies along a chain: "
                 f"name at most one earlier tower, got {list(t.relation_tower_names)}")
        if t.calibration_alpha and not t.relation_tower_names:
            fail(f"{key}.losses", f"({t.tower_name}) ORDER_CALIBRATE_LOSS needs relation_tower_names")
        if not any(l.loss_type == "CLASSIFICATION" for l in t.all_losses):
            fail(f"{key}.losses", f"({t.tower_name}) needs a CLASSIFICATION loss")
        if t.weight < 0 or any(l.weight < 0 for l in t.all_losses):
            fail(f"{key}", f"({t.tower_name}) weight and losses[].weight must be >= 0")
    try:
        _ = cfg.schema  # the one place tower indices are resolved; rejects cycles
    except ValueError as e:
        cycle = ", ".join(towers[i].tower_name for i in e.args[0])
        fail("model_config.model_params.task_towers", f"relation_tower_names form a cycle among towers: {cycle}")


def check_data(cfg: Config, where: str) -> None:
    fail = _fail(where)
    features = cfg.feature_config.features
    towers = cfg.towers
    dc = cfg.data_config
    if dc.label_fields and tuple(dc.label_fields) != tuple(t.label_name for t in towers):
        fail("data_config.label_fields", f"{list(dc.label_fields)} must match the towers' "
             f"label_name in order: {[t.label_name for t in towers]}")
    if dc.batch_size < 1:
        fail("data_config.batch_size", "must be >= 1")
    if dc.shuffle_buffer_size < 0:
        fail("data_config.shuffle_buffer_size", "must be >= 0")
    if dc.prefetch_size < 0:
        fail("data_config.prefetch_size", "must be >= 0")
    if dc.eval_batch_size < 0:
        fail("data_config.eval_batch_size", "must be >= 0")
    if dc.input_type == "CSVInput":
        if len(dc.separator) != 1:
            fail("data_config.separator", f"must be one character for CSVInput, got {dc.separator!r}")
        fields = [f.input_name for f in dc.input_fields]
        for col in [f.column for f in features] + [t.label_name for t in towers]:
            if col not in fields:
                fail("data_config.input_fields", f"has no column {col!r} (CSVInput reads only input_fields); "
                     f"columns: {', '.join(fields) or 'none'}")
        if len(set(fields)) != len(fields):
            fail("data_config.input_fields", "names a column twice")
    columns = {f.column: f.name for f in features}
    for label in (t.label_name for t in towers):
        if label in columns:
            fail("data_config.label_fields", f"label {label!r} is also the input of feature {columns[label]!r}")


def check_embedding_init(cfg: Config, where: str) -> None:
    fail = _fail(where)
    if cfg.model_config.embedding_init_scale < 0:
        fail("model_config.embedding_init_scale", "must be >= 0 (0: TorchRec's default per table)")


def check_train(cfg: Config, where: str) -> None:
    fail = _fail(where)
    tc = cfg.train_config
    if tc.num_steps < 0:
        fail("train_config.num_steps", "must be >= 0")
    sides = [("sparse_optimizer", SPARSE_OPTIMIZERS), ("dense_optimizer", DENSE_OPTIMIZERS)]
    if tc.wide_optimizer is not None:
        sides.append(("wide_optimizer", SPARSE_OPTIMIZERS))
    for side, allowed in sides:
        opt = getattr(tc, side)
        if opt.name not in allowed:
            fail(f"train_config.{side}.name", f"is {opt.name!r}; allowed: {', '.join(allowed)}")
        if opt.learning_rate <= 0:
            fail(f"train_config.{side}.learning_rate", "must be > 0")
        for beta in ("beta1", "beta2"):
            if not 0 <= getattr(opt, beta) < 1:
                fail(f"train_config.{side}.{beta}", f"is {getattr(opt, beta)}; must be in [0, 1)")
        if opt.eps <= 0 or opt.weight_decay < 0:
            fail(f"train_config.{side}", "eps must be > 0 and weight_decay >= 0")
    if tc.keep_checkpoint_max < 0 or tc.save_checkpoints_steps < 0 or tc.log_step_count_steps < 0:
        fail("train_config", "keep_checkpoint_max, save_checkpoints_steps and log_step_count_steps must be >= 0")
    if not tc.gradient_clipping_by_norm >= 0:
        fail("train_config.gradient_clipping_by_norm", f"is {tc.gradient_clipping_by_norm}; must be a number >= 0 "
             "(0: no clipping)")
    lr = tc.learning_rate_schedule
    if tc.learning_rate_scaling.reference_batch_size < 1:
        fail("train_config.learning_rate_scaling.reference_batch_size", "must be >= 1")
    if lr.warmup_steps < 0 or lr.decay_steps < 0:
        fail("train_config.learning_rate_schedule", "warmup_steps and decay_steps must be >= 0")
    if lr.decay == "exponential" and not lr.decay_steps:
        fail("train_config.learning_rate_schedule.decay_steps", "must be > 0 for exponential decay")
    if not 0 <= lr.min_ratio <= 1 or not 0 <= lr.warmup_start_ratio <= 1 or not 0 < lr.decay_rate <= 1:
        fail("train_config.learning_rate_schedule", "min_ratio and warmup_start_ratio must be in [0, 1], "
             "decay_rate in (0, 1]")


def check_eval(cfg: Config, where: str) -> None:
    fail = _fail(where)
    if cfg.eval_config.every_steps < 0 or cfg.eval_config.num_steps < 0:
        fail("eval_config", "num_steps and every_steps must be >= 0")


def check_sharding(cfg: Config, where: str) -> None:
    fail = _fail(where)
    features = cfg.feature_config.features
    seen = {f.name for f in features}
    sc = cfg.sharding_config
    if not 0 < sc.cache_load_factor <= 1:
        fail("sharding_config.cache_load_factor", "must be in (0, 1]")
    constraints = [("sharding_config", TableConstraint(sc.sharding_types, sc.compute_kernels))]
    zch_features = {f.name for f in features if f.zch is not None}
    wide_tables = {f"wide_{n}" for n in cfg.schema.wide}
    task_tables = set(cfg.schema.task_tables)
    for name, c in sc.tables:
        if name not in seen and name not in wide_tables and name not in task_tables:
            fail(f"sharding_config.tables.{name}", "names no feature (nor the wide table of a WIDE group's feature, "
                 "nor a task table of task_embeddings)")
        if name in zch_features:
            fail(f"sharding_config.tables.{name}", "is a zch table; zch tables are always row-wise, "
                 "split evenly over the ranks")
        constraints.append((f"sharding_config.tables.{name}", c))
    for key, c in constraints:
        for s in c.sharding_types:
            if s not in SHARDING_TYPES_CUDA:
                fail(f"{key}.sharding_types", f"has {s!r}; allowed: {', '.join(SHARDING_TYPES_CUDA)}")
        for k in c.compute_kernels:
            if k not in COMPUTE_KERNELS:
                fail(f"{key}.compute_kernels", f"has {k!r}; allowed: {', '.join(COMPUTE_KERNELS)}")


def check_metrics(cfg: Config, where: str) -> None:
    fail = _fail(where)
    dc = cfg.data_config
    columns = [f.input_name for f in dc.input_fields] if dc.input_type == "CSVInput" else None
    for i, t in enumerate(cfg.towers):
        gaucs = 0
        for j, m in enumerate(t.metrics_set):
            key = f"model_config.model_params.task_towers[{i}].metrics_set[{j}]"
            if (m.auc is None) == (m.gauc is None):
                fail(key, f"({t.tower_name}) must name exactly one metric: auc or gauc")
            if m.gauc is None:
                continue
            gaucs += 1
            if gaucs > 1:  # one "gauc" entry in the tower's metrics (EasyRec keeps one per name too)
                fail(key, f"({t.tower_name}) is a second gauc; a tower takes at most one")
            uid = m.gauc.uid_field
            if not uid:
                fail(f"{key}.gauc.uid_field", f"({t.tower_name}) must name the user id column")
            if columns is not None and uid not in columns:
                fail(f"{key}.gauc.uid_field", f"({t.tower_name}) names unknown column {uid!r} (CSVInput reads "
                     f"only input_fields); columns: {', '.join(columns) or 'none'}")


# The order is part of the behaviour: the first failing check names the error (see above).
CHECKS: tuple[Callable[[Config, str], None], ...] = (
    check_features, check_model, check_towers, check_data, check_embedding_init, check_train,
    check_eval, check_sharding, check_metrics,
)
