"""Jobs that read a trained zch model: embedding export (2 ranks and 1), scoring (2 ranks vs 1,
and with the serving artefact) and the serving export (fp32, int8) with the Predictor.

One tiny model with ``user_id`` as a zch table (256 rows, eviction every 4 steps) is trained
once for the module on 2 real gloo ranks, 16 steps (a checkpoint at a multiple of 4). Every job
is compared with ``from_checkpoint.local_model`` of the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torchrec.sparse.jagged_tensor import JaggedTensor

from aitm_torchrec.config import load_config
from aitm_torchrec.data import ParquetReader
from aitm_torchrec.features import Source, ids_to_rows, zch_keys
from aitm_torchrec.from_checkpoint import local_model, resolve_checkpoint
from aitm_torchrec.serving import Predictor
from aitm_torchrec.zch import default_rows, zch_rows
from tests.conftest import tiny_config_dict
from tests.extra_tables import check_scoring_agrees, export_model
from tests.multiprocess import run_ranks

pytestmark = pytest.mark.slow  # every test uses the module's 2-rank training

USER = 6  # user_id in the seed config's features
ZCH_SIZE = 256
ROWS = 1500


def _train(config: str) -> dict:
    from launch.train import main

    return main(["--config", config])


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zch_jobs")
    raw = tiny_config_dict(tiny_data, root / "run")
    user = raw["feature_config"]["features"][USER]
    assert user.get("feature_name", user["input_names"][0]) == "user_id"
    user["hash_bucket_size"] = 0
    user["zch"] = {"zch_size": ZCH_SIZE, "eviction_interval": 4}
    raw["eval_input_path"] = []
    raw["train_config"]["num_steps"] = 16
    config = root / "zch.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_ranks(_train, str(config))
    cfg = load_config(config)
    model = local_model(cfg, resolve_checkpoint(cfg))
    # scoring input: eval rows (many users never seen in training) with a row id
    table = pq.read_table(tiny_data / "eval").slice(0, ROWS)
    table = table.append_column("rid", pa.array(np.arange(ROWS, dtype=np.int64)))
    inputs = root / "input"
    inputs.mkdir()
    pq.write_table(table, inputs / "a.parquet", row_group_size=500)
    return {"config": config, "cfg": cfg, "model": model, "root": root, "input": inputs, "table": table}


def _weight(model) -> np.ndarray:
    return model.mc_ebc._embedding_module.embedding_bags["user_id"].weight.detach().numpy()


def _model_rows(model, keys: np.ndarray) -> np.ndarray:
    """The rows the local model's managed-collision module gives these keys."""
    mc = model.mc_ebc._managed_collision_collection._managed_collision_modules["user_id"]
    out = mc.remap({"user_id": JaggedTensor(values=torch.from_numpy(keys), lengths=torch.tensor([len(keys)]))})
    return out["user_id"].values().numpy()


# ---- embedding export ----------------------------------------------------------------------

def _export(argv: list[str]) -> dict:
    from launch.export import main

    return main(["embeddings", *argv])


def test_export_on_two_and_one_ranks_gives_the_models_rows_keys_and_id_rows(trained, tiny_data):
    root, model = trained["root"], trained["model"]
    # ids: training users (some held, some not), unseen ints, and the same ids as strings
    users = pq.read_table(tiny_data / "train", columns=["user_id"]).column("user_id").to_numpy()
    ints = np.concatenate([np.unique(users)[:300], np.arange(10**12, 10**12 + 50)])
    pq.write_table(pa.table({"uid": ints}), root / "ids_int.parquet")
    pq.write_table(pa.table({"uid": [f"u{i}" for i in ints]}), root / "ids_str.parquet")
    common = ["--config", str(trained["config"]), "--tables", "user_id,adgroup_id", "--chunk-rows", "100"]
    run_ranks(_export, [*common, "--output", str(root / "e2")])
    _export([*common, "--output", str(root / "e1")])
    weight = _weight(model)
    held_keys, held_rows = (t.numpy() for t in zch_rows(model, "user_id"))
    assert len(held_keys) > 100
    for out in ("e2", "e1"):
        t = pq.read_table(root / out / "user_id")
        assert t.column_names == ["row", "key", "embedding"]
        rows = t.column("row").to_numpy()
        assert sorted(rows.tolist()) == list(range(ZCH_SIZE))
        np.testing.assert_array_equal(np.stack(t.column("embedding").to_numpy(zero_copy_only=False)), weight[rows])
        keys = t.column("key")
        occupied = ~np.asarray(keys.is_null())
        got = dict(zip(rows[occupied].tolist(), keys.filter(pa.array(occupied)).to_numpy().tolist()))
        assert got == dict(zip(held_rows.tolist(), held_keys.tolist()))
        assert not set(default_rows(ZCH_SIZE, 2)) & set(got), "default rows hold no key"
        m = json.loads((root / out / "manifest.json").read_text())["tables"]["user_id"]
        assert m["zch"] == {"held_rows": len(held_keys), "trained_world_size": 2, "default_rows": [127, 255]}
        assert m["id_rule"]["kind"] == "zch" and m["columns"] == ["row", "key", "embedding"]

    f = trained["cfg"].schema.sparse[[s.name for s in trained["cfg"].schema.sparse].index("user_id")]
    for kind in ("int", "str"):
        out = root / f"ids_{kind}"
        ids_arg = ["--ids-from", f"user_id={root / f'ids_{kind}.parquet'}:uid"]
        run_ranks(_export, [*common, "--output", str(out), *ids_arg])
        t = pq.read_table(out / "user_id")
        assert t.column_names == ["id", "row", "key", "default_row", "embedding"]
        ids = t.column("id")
        keys = ids_to_rows(f, ids.combine_chunks(), Source("test"))
        expected_keys = zch_keys(np.array(ids.to_pylist())) if kind == "int" else keys
        np.testing.assert_array_equal(t.column("key").to_numpy(), expected_keys)
        rows = t.column("row").to_numpy()
        np.testing.assert_array_equal(rows, _model_rows(model, keys))  # the row the model reads
        np.testing.assert_array_equal(np.stack(t.column("embedding").to_numpy(zero_copy_only=False)), weight[rows])
        default = t.column("default_row").to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(default, ~np.isin(keys, held_keys))
        assert set(rows[default].tolist()) <= set(default_rows(ZCH_SIZE, 2))
        by_id = dict(zip(ids.to_pylist(), default.tolist()))
        unseen = [10**12 + i for i in range(50)]
        assert all(by_id[i if kind == "int" else f"u{i}"] for i in unseen)
        if kind == "int":
            assert 0 < sum(not by_id[int(i)] for i in ints[:300])  # some training users are held
        summary = json.loads((out / "manifest.json").read_text())["tables"]["user_id"]["ids"]
        assert summary["default_row_ids"] == int(default.sum()) and summary["distinct_ids"] == len(ints)


def test_single_id_bag_pools_the_exported_row(trained):
    """The model's pooled user_id embedding of a one-id bag is the row the export gives the id."""
    model = trained["model"]
    keys = np.concatenate([zch_rows(model, "user_id")[0][:4].numpy(), zch_keys(np.array([10**12, 7 * 10**12]))])
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    names = trained["cfg"].schema.keys  # all the model's features (TorchRec keeps the first call's order)
    lengths = torch.tensor([int(n == "user_id") for n in names for _ in keys])
    kjt = KeyedJaggedTensor(keys=names, values=torch.from_numpy(keys), lengths=lengths, stride=len(keys))
    with torch.no_grad():
        pooled = model.mc_ebc(kjt)[0]["user_id"].numpy()
    np.testing.assert_array_equal(pooled, _weight(model)[_model_rows(model, keys)])
    # unseen keys: the trained default row of their key range (2 training ranks)
    assert _model_rows(model, keys[4:]).tolist() == [
        default_rows(ZCH_SIZE, 2)[int(k >= (1 << 62))] for k in keys[4:]]


# ---- scoring -------------------------------------------------------------------------------

def _reference(trained: dict, path: Path) -> np.ndarray:
    cfg, model = trained["cfg"], trained["model"]
    reader = ParquetReader([str(path)], cfg.schema, batch_size=ROWS, prefetch=0, labels=False)
    (batch,) = list(reader.epoch(0))
    with torch.no_grad():
        return torch.sigmoid(model(batch.dense, batch.sparse))[:batch.num_real].numpy()


def test_scoring_on_two_ranks_one_and_the_artefact_agree_with_the_local_model(trained):
    artefact = export_model(trained, "fp32", "--quant", "none")
    check_scoring_agrees(trained, artefact, _reference(trained, trained["input"] / "a.parquet"))


# ---- serving -------------------------------------------------------------------------------

def test_serving_artefacts_fp32_and_int8_and_predictor_on_raw_rows(trained):
    from launch.export import main as export_main

    root = trained["root"]
    expected = _reference(trained, trained["input"] / "a.parquet")
    held = set(zch_rows(trained["model"], "user_id")[0].tolist())
    users = trained["table"].column("user_id").to_numpy()
    held_users = np.isin(zch_keys(users), list(held))
    assert 0 < held_users.mean() < 1, "the rows mix held and unheld (default-row) users"
    for quant, tol in (("none", 1e-5), ("int8", 1e-3)):
        export_main(["model", "--config", str(trained["config"]), "--output", str(root / f"a_{quant}"),
                     "--quant", quant])
        p = Predictor(root / f"a_{quant}", threads=1)
        got = np.stack([v for v in p.predict_arrow(trained["table"]).values()], axis=1)
        if quant == "none":
            np.testing.assert_allclose(got, expected, rtol=0, atol=tol)
        else:
            assert np.abs(got - expected).mean() <= tol
    # raw rows (string user ids) through the Predictor == the Parquet reader on the same rows
    rows = trained["table"].slice(0, 200).drop_columns(["rid"]).to_pylist()
    for r in rows:
        r["user_id"] = f"u{r['user_id']}"
    path = root / "raw.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    p = Predictor(root / "a_none", threads=1)
    got = np.stack([v for v in p.predict_rows(rows).values()], axis=1)
    np.testing.assert_allclose(got, _reference(trained, path), rtol=0, atol=1e-5)
    inputs = p.inputs_from_arrow(pq.read_table(path))
    f = p.schema.sparse[[s.name for s in p.schema.sparse].index("user_id")]
    np.testing.assert_array_equal(inputs["user_id.values"].numpy(),
                                  ids_to_rows(f, pa.array([r["user_id"] for r in rows]), Source("t")))
    assert (inputs["user_id.values"].numpy() >= ZCH_SIZE).all(), "serving feeds zch keys, not rows"
