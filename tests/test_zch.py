"""Managed-collision (zch) tables: config, id keys, the unsharded module, and 2-rank training with
eviction, exact resume, resharding 2 -> 1 and ``zch_rows``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import yaml
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from aitm_torchrec.config import ConfigError, load_config
from aitm_torchrec.features import ZCH_KEY_SPACE, Source, ids_to_rows, mix64, zch_keys
from aitm_torchrec.registry import build_model
from aitm_torchrec.schema import Schema
from aitm_torchrec.zch import EMPTY_KEY, build_mc_ebc, default_rows, zch_plan, zch_rows
from tests.conftest import tiny_config_dict
from tests.multiprocess import run_ranks

USER = 6  # feature_config.features index of user_id in the seed config
ADGROUP = 1


def zch_overrides(size: int = 512, interval: int = 4, policy: str = "lfu") -> list[str]:
    return [o for i in (USER, ADGROUP) for o in (
        f"feature_config.features.{i}.hash_bucket_size=0",
        f"feature_config.features.{i}.zch={{zch_size: {size}, eviction_interval: {interval}, "
        f"eviction_policy: {policy}}}")]


NO_HASH = "feature_config.features.6.hash_bucket_size=0"


@pytest.mark.parametrize("overrides,message", [
    (["feature_config.features.6.zch={zch_size: 64}"], "(user_id) needs exactly one of hash_bucket_size"),
    ([NO_HASH, "feature_config.features.6.zch={zch_size: 1}"], "zch.zch_size (user_id) must be >= 2"),
    ([NO_HASH, "feature_config.features.6.zch={zch_size: 64, eviction_interval: 0}"],
     "zch.eviction_interval (user_id) must be >= 1"),
    ([NO_HASH, "feature_config.features.6.zch={zch_size: 64, eviction_policy: mru}"],
     "zch.eviction_policy is 'mru'; allowed: lfu, lru, distance_lfu"),
])
def test_zch_config_errors_name_the_key_and_feature(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_zch_tables_take_no_sharding_constraints():
    with pytest.raises(ConfigError, match="zch tables are always row-wise"):
        load_config(None, [*zch_overrides(), "sharding_config.tables={user_id: {sharding_types: [table_wise]}}"])


def test_schema_records_the_zch_rule_and_round_trips():
    s = load_config(None, zch_overrides(1024, 50, "lru")).schema
    user = next(f for f in s.sparse if f.name == "user_id")
    assert user.num_embeddings == 1024 and user.is_zch
    rule = user.id_rule
    assert rule["kind"] == "zch" and rule["zch_size"] == 1024 and rule["eviction_policy"] == "lru"
    assert rule["eviction_interval"] == 50 and "2^63 - 1" in rule["key"]
    assert [f.name for f in s.zch] == ["adgroup_id", "user_id"]
    assert [c.name for c in s.embedding_bag_configs(zch=True)] == ["adgroup_id", "user_id"]
    assert len(s.embedding_bag_configs(zch=False)) + 2 == len(s.embedding_bag_configs())
    again = Schema.from_dict(yaml.safe_load(s.to_json()))
    assert again == s


def test_zch_keys_are_mixed_non_negative_and_never_the_empty_marker():
    import pyarrow as pa

    f = load_config(None, zch_overrides()).schema.sparse[USER]
    ids = np.arange(-5, 10_000, dtype=np.int64)
    keys = ids_to_rows(f, pa.array(ids), Source("x"))
    assert keys.dtype == np.int64 and (keys >= 0).all() and (keys < ZCH_KEY_SPACE).all()
    assert len(np.unique(keys)) == len(ids)
    assert (keys == ((mix64(ids.view(np.uint64)) % np.uint64(ZCH_KEY_SPACE)).astype(np.int64))).all()
    # value-range routing over 2 ranks: about half the keys on each
    assert 0.45 < (keys < ZCH_KEY_SPACE // 2).mean() < 0.55
    strings = ids_to_rows(f, pa.array(["a", "b", "a"]), Source("x"))
    assert strings[0] == strings[2] != strings[1] and (strings >= 0).all()


def _colliding_ids(buckets: int) -> tuple[int, int]:
    rows = mix64(np.arange(10_000, dtype=np.int64).view(np.uint64)) % np.uint64(buckets)
    first = {}
    for i, r in enumerate(rows.tolist()):
        if r in first:
            return first[r], i
        first[r] = i
    raise AssertionError("no collision")


def test_unsharded_zch_admits_at_the_eviction_interval_and_separates_hash_collisions():
    s = load_config(None, zch_overrides(size=16, interval=3)).schema
    mc = build_mc_ebc(s, "cpu")
    a, b = _colliding_ids(500)  # the same row under hash_bucket_size 500
    keys = torch.from_numpy(zch_keys(np.array([a, b, a, b])))
    kjt = KeyedJaggedTensor(keys=["adgroup_id", "user_id"], values=torch.cat([keys[:1], keys]),
                            lengths=torch.tensor([1, 0, 0, 0, 1, 1, 1, 1]), stride=4)
    for step in range(1, 4):
        assert len(zch_rows(mc, "user_id")[0]) == 0, f"nothing is admitted before step 3 (step {step})"
        mc(kjt)
    held, rows = zch_rows(mc, "user_id")
    assert sorted(held.tolist()) == sorted(keys[:2].tolist())
    assert rows[0] != rows[1] and set(rows.tolist()) <= set(range(15))
    mc.eval()
    weight = mc._embedding_module.embedding_bags["user_id"].weight
    unseen = torch.from_numpy(zch_keys(np.array([123_456_789])))
    probe = KeyedJaggedTensor(keys=["adgroup_id", "user_id"], values=torch.cat([keys[:1], keys[:2], unseen]),
                              lengths=torch.tensor([1, 0, 0, 1, 1, 1]), stride=3)
    pooled = mc(probe)[0]["user_id"]
    by_key = dict(zip(held.tolist(), rows.tolist()))
    for i, k in enumerate(keys[:2].tolist()):
        torch.testing.assert_close(pooled[i], weight[by_key[k]])
    torch.testing.assert_close(pooled[2], weight[15])  # unseen: the last (default) row


def test_plan_needs_zch_size_divisible_by_the_world_size():
    cfg = load_config(None, zch_overrides(size=510))
    model = build_model(cfg)
    with pytest.raises(ConfigError, match="'adgroup_id': zch.zch_size 510 must split evenly over the 4 ranks"):
        zch_plan(model.mc_ebc, cfg.schema, 4, 4, "cpu")
    assert default_rows(512, 2) == [255, 511]


def test_models_without_zch_are_unchanged():
    model = build_model(load_config())
    assert model.mc_ebc is None and not any("mc_ebc" in k for k in model.state_dict())


# ---- 2 ranks --------------------------------------------------------------------------------

def _runs_then_shards(config_path: str, runs: list[list[str]]) -> dict:
    """Training jobs one after the other, then the last run's checkpoint loaded into a sharded
    model: this rank's zch rows and table shard."""
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.from_checkpoint import resolve_checkpoint, sharded_model
    from launch.train import main

    env = aitm_dist.setup()
    try:
        out = [main(["--config", config_path, *overrides]) for overrides in runs]
        cfg = load_config(config_path, runs[-1])
        dmp, _ = sharded_model(cfg, env, resolve_checkpoint(cfg))
        tables = {}
        for t in ("user_id", "adgroup_id"):
            w = dmp.state_dict()[f"mc_ebc._embedding_module.embedding_bags.{t}.weight"].local_shards()[0]
            keys, rows = zch_rows(dmp, t)
            tables[t] = (keys, rows, w.metadata.shard_offsets[0], w.tensor.clone())
        return {"runs": out, "tables": tables}
    finally:
        aitm_dist.teardown()


@pytest.mark.slow
def test_two_rank_zch_training_resumes_exactly_and_reshards_to_one(tiny_data, tmp_path):
    raw = tiny_config_dict(tiny_data, tmp_path / "unused")
    path = tmp_path / "zch.yaml"
    path.write_text(yaml.safe_dump(raw))
    common = [*zch_overrides(size=512, interval=4), "sharding_config.sharding_types=[table_wise]",
              "train_config.log_step_count_steps=1", "eval_input_path=[]"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    whole = run_ranks(_runs_then_shards, str(path), [[*common, f"model_dir={a}", "train_config.num_steps=24"]])
    parts = run_ranks(_runs_then_shards, str(path), [[*common, f"model_dir={b}", "train_config.num_steps=12"],
                                                     [*common, f"model_dir={b}", "train_config.num_steps=24"]])
    plan = whole[0]["runs"][0]["plan"]
    assert plan["user_id"]["sharding_type"] == "row_wise" and plan["user_id"]["ranks"] == [0, 1]
    assert plan["price"]["sharding_type"] == "table_wise"
    # Resume (saved at step 12, a multiple of the eviction interval): the same losses as one run.
    full, first, second = (dict(r["train"]["loss"]) for r in (whole[0]["runs"][0], *parts[0]["runs"]))
    assert parts[0]["runs"][1]["train"]["resumed_from_step"] == 12
    for step in range(1, 25):
        got = first[step] if step <= 12 else second[step]
        assert got == pytest.approx(full[step], rel=1e-5, abs=1e-6), f"step {step}"
    # The same key -> row map and table after the resumed run as after the whole one.
    for t in ("user_id", "adgroup_id"):
        for r in (0, 1):
            wk, wr, _, ww = whole[r]["tables"][t]
            pk, pr, _, pw = parts[r]["tables"][t]
            assert torch.equal(wk, pk) and torch.equal(wr, pr)
            torch.testing.assert_close(ww, pw, rtol=1e-5, atol=1e-6)

    # Eviction ran: frequent ids hold rows; each rank's rows lie in its shard, keys in its range.
    held = {}
    for r in (0, 1):
        keys, rows, offset, shard = whole[r]["tables"]["user_id"]
        assert len(keys) > 50
        assert ((rows >= offset) & (rows < offset + 255)).all(), "the shard's last row stays the default"
        in_range = (keys < ZCH_KEY_SPACE // 2) if r == 0 else (keys >= ZCH_KEY_SPACE // 2)
        assert in_range.all()
        held.update(zip(keys.tolist(), rows.tolist()))
    # Two held ids that share a row under hash_bucket_size 500 have rows of their own here.
    raw_of = dict(zip(zch_keys(np.arange(20_000)).tolist(), range(20_000)))
    ids = np.array(sorted(raw_of[k] for k in held))
    hashed = mix64(ids.view(np.uint64)) % np.uint64(500)
    _, first_of, counts = np.unique(hashed, return_index=True, return_counts=True)
    pair = [i for i in ids[hashed == hashed[first_of[counts > 1][0]]][:2]]
    k0, k1 = zch_keys(np.array(pair)).tolist()
    assert held[k0] != held[k1]

    # Reshard 2 -> 1: one process, no process group, reads the 2-rank checkpoint.
    from aitm_torchrec.from_checkpoint import local_model, resolve_checkpoint

    cfg = load_config(path, [*common, f"model_dir={a}"])
    model = local_model(cfg, resolve_checkpoint(cfg))
    keys, rows = zch_rows(model, "user_id")
    assert dict(zip(keys.tolist(), rows.tolist())) == held
    weight = model.mc_ebc._embedding_module.embedding_bags["user_id"].weight
    for r in (0, 1):
        _, _, offset, shard = whole[r]["tables"]["user_id"]
        torch.testing.assert_close(weight[offset:offset + shard.shape[0]], shard)
    # The exported vector of a raw id (its key's row) is what the model looks up for that id.
    probe_keys = keys[:8]
    kjt = KeyedJaggedTensor(keys=["adgroup_id", "user_id"], values=torch.cat([probe_keys, probe_keys]),
                            lengths=torch.ones(16, dtype=torch.int64), stride=8)
    with torch.no_grad():
        pooled = model.mc_ebc(kjt)[0]["user_id"]
    torch.testing.assert_close(pooled, weight[rows[:8]])
    assert EMPTY_KEY not in keys

    # Training continues on one rank from the 2-rank checkpoint.
    more = run_ranks(_runs_then_shards, str(path), [[*common, f"model_dir={a}", "train_config.num_steps=28"]],
                     nproc=1)[0]["runs"][0]
    assert more["world_size"] == 1 and more["train"]["resumed_from_step"] == 24
    assert more["train"]["steps_this_run"] == 4


def test_cluster_plans_show_zch_tables_row_wise_and_even():
    from aitm_torchrec.sharding import plan_for_topology

    r = plan_for_topology(load_config(None, zch_overrides(size=1024)), 2, 2, "cpu")
    assert r["tables"]["user_id"]["sharding_type"] == "row_wise"
    assert r["tables"]["user_id"]["shards"] == [[256, 16]] * 4
    assert r["tables"]["price"]["sharding_type"] != "row_wise"
