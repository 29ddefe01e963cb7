"""The wide part (WIDE feature groups) through every job: training on 2 real gloo ranks with the
wide tables' own rate (fused rowwise Adagrad, and Adam on the CPU's dense kernel), the
checkpoint resumed on 1 rank with the wide tables and their optimizer state, scoring (2 ranks, 1,
and the serving artefact), table export (2 ranks and 1) and the serving export with each
``--dense-quant``, every one compared with ``from_checkpoint.local_model`` of the checkpoint.

One tiny model (the seed config shrunk) with wide tables on user_id, adgroup_id, tag_brand_list
and pid is trained once for the module, table-wise, 8 steps, checkpoints at 4 and 8."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from aitm_torchrec.config import load_config
from aitm_torchrec.data import ParquetReader
from aitm_torchrec.features import Source, ids_to_rows
from aitm_torchrec.from_checkpoint import local_model, resolve_checkpoint
from aitm_torchrec.serving import Predictor
from tests.conftest import tiny_config_dict
from tests.extra_tables import (
    check_restored,
    check_scoring_agrees,
    export_embeddings,
    export_model,
    restored_on_one_rank,
    train,
)
from tests.multiprocess import run_ranks

pytestmark = pytest.mark.slow  # every test trains on 2 ranks or uses the module's 2-rank training

WIDE = ["user_id", "adgroup_id", "tag_brand_list", "pid"]  # pid: 10 rows, data-parallel if it were a feature table
ROWS = 1500


def wide_config_dict(data: Path, model_dir: Path) -> dict:
    raw = tiny_config_dict(data, model_dir)
    raw["model_config"]["feature_groups"].append({"group_name": "wide", "feature_names": WIDE, "wide_deep": "WIDE"})
    raw["eval_input_path"] = []
    return raw


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wide_jobs")
    raw = wide_config_dict(tiny_data, root / "run")
    raw["train_config"].update(num_steps=8, save_checkpoints_steps=4)
    raw["sharding_config"] = {"sharding_types": ["table_wise"]}
    config = root / "wide.yaml"
    config.write_text(yaml.safe_dump(raw))
    summary = run_ranks(train, str(config), [])[0]
    cfg = load_config(config)
    model = local_model(cfg, resolve_checkpoint(cfg))
    table = pq.read_table(tiny_data / "eval").slice(0, ROWS)
    table = table.append_column("rid", pa.array(np.arange(ROWS, dtype=np.int64)))
    inputs = root / "input"
    inputs.mkdir()
    pq.write_table(table, inputs / "a.parquet", row_group_size=500)
    return {"config": config, "cfg": cfg, "model": model, "root": root, "input": inputs, "table": table,
            "summary": summary}


def _reference(trained: dict, path: Path, wide: bool = True) -> np.ndarray:
    """The local model's probabilities on the rows of ``path`` (without its wide part: ``wide``
    false)."""
    cfg, model = trained["cfg"], trained["model"]
    reader = ParquetReader([str(path)], cfg.schema, batch_size=ROWS, prefetch=0, labels=False)
    (batch,) = list(reader.epoch(0))
    with torch.no_grad():
        x = model.embed(batch.dense, batch.sparse)[0]
        logits = model.predict(x, model.wide_logits(batch.sparse) if wide else None)
    return torch.sigmoid(logits)[:batch.num_real].numpy()


def test_plan_puts_every_wide_table_on_one_rank_with_the_wide_optimizer(trained):
    plan = trained["summary"]["plan"]
    assert {t for t in plan if t.startswith("wide_")} == {f"wide_{n}" for n in WIDE}
    assert all(plan[f"wide_{n}"]["sharding_type"] == "table_wise" and len(plan[f"wide_{n}"]["ranks"]) == 1
               for n in WIDE)
    # the wide part moves the predictions: the model is not its deep part alone
    deep, full = (_reference(trained, trained["input"] / "a.parquet", wide) for wide in (False, True))
    assert np.abs(full - deep).max() > 0.1  # far above every tolerance below


# ---- training: the wide tables' own rate -------------------------------------------------------

def _train_frozen_wide(config: str, overrides: list[str]) -> dict:
    """Trains with the wide optimizer's rate set to 0 on the Config (a value the config file's
    validation refuses: it freezes the wide tables, the test's witness of their own optimizer)."""
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.train import run

    cfg = load_config(config, overrides)
    tc = cfg.train_config
    frozen = dataclasses.replace(tc.wide_tables_optimizer, learning_rate=0.0)
    cfg = dataclasses.replace(cfg, train_config=dataclasses.replace(tc, wide_optimizer=frozen))
    with aitm_dist.job() as env:
        return run(cfg, env).to_dict()


def _tables(config: Path, step: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    cfg = load_config(config)
    model = local_model(cfg, resolve_checkpoint(cfg, Path(cfg.model_dir) / "checkpoints" / f"step_{step:08d}"))
    deep = {k: v.detach().numpy().copy() for k, v in model.ebc.state_dict().items()}
    wide = {k: v.detach().numpy().copy() for k, v in model.wide_ebc.state_dict().items()}
    return deep, wide


@pytest.mark.parametrize("sparse", ["rowwise_adagrad", "adam"])
def test_wide_tables_train_at_their_own_rate(tiny_data, tmp_path, sparse):
    """Wide rate 0: between the checkpoints of steps 1 and 2 the feature tables move (the sparse
    optimizer's rate) and the wide tables do not, on both table-optimizer routes: fused in
    backward, and Adam on the CPU (dense kernel, a torch Adam per table collection). The Adam run
    then resumes on 1 rank: its wide tables' Adam state reshards and they still do not move."""
    raw = wide_config_dict(tiny_data, tmp_path / "run")
    raw["train_config"].update(num_steps=2, save_checkpoints_steps=1)
    raw["sharding_config"] = {"sharding_types": ["table_wise"]}
    if sparse == "adam":
        raw["train_config"]["sparse_optimizer"] = {"name": "adam", "learning_rate": 0.01}
    config = tmp_path / "frozen.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = run_ranks(_train_frozen_wide, str(config), [])[0]
    kernels = {out["plan"][f"wide_{n}"]["compute_kernel"] for n in WIDE}
    assert kernels == ({"dense"} if sparse == "adam" else {"fused"})
    (deep1, wide1), (deep2, wide2) = _tables(config, 1), _tables(config, 2)
    assert all(np.array_equal(wide1[k], wide2[k]) for k in wide1)
    assert all(np.abs(wide1[k]).max() <= 1e-4 for k in wide1), "still at the wide init"
    moved = [k for k in deep1 if not np.array_equal(deep1[k], deep2[k])]
    assert len(moved) >= len(deep1) - 1, f"feature tables that did not move: {set(deep1) - set(moved)}"
    if sparse == "adam":
        again = run_ranks(_train_frozen_wide, str(config), ["train_config.num_steps=3"], nproc=1)[0]
        assert again["train"]["resumed_from_step"] == 2 and again["world_size"] == 1
        deep3, wide3 = _tables(config, 3)
        assert all(np.array_equal(wide2[k], wide3[k]) for k in wide2)
        assert any(not np.array_equal(deep2[k], deep3[k]) for k in deep2)


# ---- checkpoint: 2 ranks -> 1 --------------------------------------------------------------------

def test_two_rank_checkpoint_restores_on_one_rank_with_wide_tables_and_their_state(trained):
    got = run_ranks(restored_on_one_rank, str(trained["config"]), "wide_ebc", nproc=1)[0]
    assert got["step"] == 8
    check_restored(got, trained["model"].wide_ebc.state_dict(), len(WIDE), "wide_ebc")


# ---- scoring ------------------------------------------------------------------------------------

def test_scoring_on_two_ranks_one_and_the_artefact_agree_with_the_local_model(trained):
    artefact = export_model(trained, "fp32", "--quant", "none")
    check_scoring_agrees(trained, artefact, _reference(trained, trained["input"] / "a.parquet"))


# ---- table export ---------------------------------------------------------------------------------

def test_table_export_on_two_and_one_ranks_writes_the_wide_columns_the_model_reads(trained, tiny_data):
    root, model, cfg = trained["root"], trained["model"], trained["cfg"]
    users = root / "users.parquet"
    pq.write_table(pa.table({"uid": pq.read_table(tiny_data / "eval", columns=["user_id"]).column("user_id")}), users)
    common = ["--config", str(trained["config"]), "--chunk-rows", "128"]
    run_ranks(export_embeddings, [*common, "--output", str(root / "e2")])
    export_embeddings([*common, "--output", str(root / "e1"), "--tables", "wide_user_id,user_id",
             "--ids-from", f"wide_user_id={users}:uid"])
    towers = cfg.schema.tower_names
    for out, tables in (("e2", [f"wide_{n}" for n in WIDE]), ("e1", ["wide_user_id"])):
        manifest = json.loads((root / out / "manifest.json").read_text())["tables"]
        for name in tables:
            feature = cfg.schema.wide_tables[name]
            weight = model.wide_ebc.embedding_bags[name].weight.detach().numpy()
            t = pq.read_table(root / out / name)
            rows = t.column("row").to_numpy()
            emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
            assert emb.shape[1] == len(towers)  # the T columns the model reads, not the 4 stored
            np.testing.assert_array_equal(emb, weight[rows][:, :len(towers)])
            entry = manifest[name]
            assert entry["features"] == [feature.name] and entry["id_rule"] == feature.id_rule
            assert entry["dim"] == len(towers) and entry["wide"] == {"logit_columns": towers, "stored_dim": 4}
            if out == "e2":
                assert sorted(rows.tolist()) == list(range(feature.num_embeddings))
            else:  # --ids-from: the rows training gives the ids
                assert t.column_names == ["id", "row", "embedding"]
                np.testing.assert_array_equal(rows, ids_to_rows(feature, t.column("id").combine_chunks(), Source("t")))
        assert "user_id" in manifest and manifest["user_id"]["wide"] is None


# ---- serving -------------------------------------------------------------------------------------

# int8 Linears alone go through the same code as without a wide part (tests/test_serving.py)
@pytest.mark.parametrize("quant, dense_quant, tol", [("none", "none", 1e-5), ("int8", "none", 2e-3), ("int8", "int8", 2e-2)])
def test_serving_artefact_carries_the_wide_part(trained, quant, dense_quant, tol):
    """Against the checkpoint's model: exact with fp32 tables and Linear layers; with int8 ones
    within test_serving's bounds (int8 Linears: DENSE_INT8_ATOL; int8 tables: max |dp| measured
    4e-4 here, wide tables included)."""
    artefact = export_model(trained, f"a_{quant}_{dense_quant}", "--quant", quant, "--dense-quant", dense_quant)
    p = Predictor(artefact, threads=1)
    assert p.schema.wide == tuple(WIDE)
    assert p.meta["sizes_bytes"]["wide_tables_fp32"] == 4 * 4 * sum(
        trained["cfg"].schema.wide_tables[f"wide_{n}"].num_embeddings for n in WIDE)
    got = np.stack([v for v in p.predict_arrow(trained["table"]).values()], axis=1)
    expected = _reference(trained, trained["input"] / "a.parquet")
    assert np.abs(got - expected).max() <= tol
    # raw rows (string user ids) through the Predictor == the Parquet reader on the same rows
    rows = trained["table"].slice(0, 100).drop_columns(["rid"]).to_pylist()
    for r in rows:
        r["user_id"] = f"u{r['user_id']}"
    path = trained["root"] / f"raw_{quant}_{dense_quant}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    got = np.stack([v for v in p.predict_rows(rows).values()], axis=1)
    assert np.abs(got - _reference(trained, path)).max() <= tol
