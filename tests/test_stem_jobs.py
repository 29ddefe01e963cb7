"""Task-specific embeddings (STEM, ``model_config.task_embeddings``) through every job: training on
2 real gloo ranks with the task tables on the sparse optimizer's route (fused rowwise Adagrad, and
Adam on the CPU's dense kernel), the checkpoint restored on 1 rank with the task tables and their
optimizer state, scoring (2 ranks, 1, and the serving artefact), table export (2 ranks and 1) and
the serving export with each ``--quant`` and ``--dense-quant``, every one compared with
``from_checkpoint.local_model`` of the checkpoint.

One tiny model (the seed config shrunk) with task tables of user_id, adgroup_id, tag_brand_list
and pid behind the stem gate, and a wide part on user_id beside them, is trained once for the
module, table-wise, 8 steps, checkpoints at 4 and 8."""

from __future__ import annotations

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

TASK = ["user_id", "adgroup_id", "tag_brand_list", "pid"]  # pid: 10 rows, data-parallel if the planner chose
DIM = 8
TOWERS = ["ctr", "cvr"]
TABLES = [f"task_{t}_{f}" for t in TOWERS for f in TASK]
ROWS = 1500


def stem_config_dict(data: Path, model_dir: Path, gate: str = "stem") -> dict:
    raw = tiny_config_dict(data, model_dir)
    raw["model_config"]["task_embeddings"] = {"features": TASK, "embedding_dim": DIM, "gate": gate}
    raw["model_config"]["feature_groups"].append({"group_name": "wide", "feature_names": ["user_id"],
                                                  "wide_deep": "WIDE"})
    raw["eval_input_path"] = []
    raw["sharding_config"] = {"sharding_types": ["table_wise"]}
    return raw


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stem_jobs")
    raw = stem_config_dict(tiny_data, root / "run")
    raw["train_config"].update(num_steps=8, save_checkpoints_steps=4)
    config = root / "stem.yaml"
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


def _reference(trained: dict, path: Path, task_scale: float = 1.0) -> np.ndarray:
    """The local model's probabilities on the rows of ``path`` (its task embeddings times
    ``task_scale``: 0 shows what they add)."""
    cfg, model = trained["cfg"], trained["model"]
    reader = ParquetReader([str(path)], cfg.schema, batch_size=ROWS, prefetch=0, labels=False)
    (batch,) = list(reader.epoch(0))
    with torch.no_grad():
        x = model.embed(batch.dense, batch.sparse)[0]
        task = [e * task_scale for e in model.task_embeddings(batch.sparse)]
        logits = model.predict(x, model.wide_logits(batch.sparse), task)
    return torch.sigmoid(logits)[:batch.num_real].numpy()


def test_plan_shards_every_task_table_on_the_sparse_optimizers_kernel(trained):
    plan = trained["summary"]["plan"]
    assert {t for t in plan if t.startswith("task_")} == set(TABLES)
    assert {plan[t]["compute_kernel"] for t in TABLES} == {plan["user_id"]["compute_kernel"]} == {"fused"}
    assert all(plan[t]["sharding_type"] == "table_wise" and len(plan[t]["ranks"]) == 1 for t in TABLES)
    assert {r for t in TABLES for r in plan[t]["ranks"]} == {0, 1}  # spread over both ranks
    # the task embeddings move the predictions: the model is not its shared part alone
    shared, full = (_reference(trained, trained["input"] / "a.parquet", s) for s in (0.0, 1.0))
    assert np.abs(full - shared).max() > 1e-3  # far above every fp32 tolerance below


# ---- training: the sparse optimizer's two routes ------------------------------------------------

def _tables(config: Path, step: int) -> dict[str, np.ndarray]:
    cfg = load_config(config)
    model = local_model(cfg, resolve_checkpoint(cfg, Path(cfg.model_dir) / "checkpoints" / f"step_{step:08d}"))
    return {k: v.detach().numpy().copy() for k, v in model.task_ebc.state_dict().items()}


def test_task_tables_train_with_adam_on_the_cpu_and_resume_on_one_rank(tiny_data, tmp_path):
    """Adam on the CPU: the task tables go on the dense kernel with the feature tables, trained by
    their torch Adam; every task table moves each step, and the run resumes on 1 rank (their Adam
    state resharded) and moves them again."""
    raw = stem_config_dict(tiny_data, tmp_path / "run", gate="none")
    raw["train_config"].update(num_steps=2, save_checkpoints_steps=1,
                               sparse_optimizer={"name": "adam", "learning_rate": 0.01})
    config = tmp_path / "adam.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = run_ranks(train, str(config), [])[0]
    assert {out["plan"][t]["compute_kernel"] for t in TABLES} == {"dense"}
    one, two = _tables(config, 1), _tables(config, 2)
    assert len(one) == len(TABLES) and all(not np.array_equal(one[k], two[k]) for k in one)
    again = run_ranks(train, str(config), ["train_config.num_steps=3"], nproc=1)[0]
    assert again["train"]["resumed_from_step"] == 2 and again["world_size"] == 1
    three = _tables(config, 3)
    assert all(not np.array_equal(two[k], three[k]) for k in two)


# ---- checkpoint: 2 ranks -> 1 --------------------------------------------------------------------

def test_two_rank_checkpoint_restores_on_one_rank_with_task_tables_and_their_state(trained):
    got = run_ranks(restored_on_one_rank, str(trained["config"]), "task_ebc", nproc=1)[0]
    assert got["step"] == 8
    check_restored(got, trained["model"].task_ebc.state_dict(), len(TABLES), "task_ebc")


# ---- scoring ------------------------------------------------------------------------------------

def test_scoring_on_two_ranks_one_and_the_artefact_agree_with_the_local_model(trained):
    artefact = export_model(trained, "a_none_none", "--quant", "none", "--dense-quant", "none")
    check_scoring_agrees(trained, artefact, _reference(trained, trained["input"] / "a.parquet"))


# ---- table export ---------------------------------------------------------------------------------

def test_table_export_on_two_and_one_ranks_writes_each_task_table_and_its_tower(trained, tiny_data):
    root, model, cfg = trained["root"], trained["model"], trained["cfg"]
    users = root / "users.parquet"
    pq.write_table(pa.table({"uid": pq.read_table(tiny_data / "eval", columns=["user_id"]).column("user_id")}), users)
    common = ["--config", str(trained["config"]), "--chunk-rows", "128"]
    run_ranks(export_embeddings, [*common, "--output", str(root / "e2")])
    export_embeddings([*common, "--output", str(root / "e1"), "--tables", "task_cvr_user_id,user_id",
             "--ids-from", f"task_cvr_user_id={users}:uid"])
    for out, tables in (("e2", TABLES), ("e1", ["task_cvr_user_id"])):
        manifest = json.loads((root / out / "manifest.json").read_text())["tables"]
        for name in tables:
            tower, feature = cfg.schema.task_tables[name]
            weight = model.task_ebc.embedding_bags[name].weight.detach().numpy()
            t = pq.read_table(root / out / name)
            rows = t.column("row").to_numpy()
            emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
            assert emb.shape[1] == DIM
            np.testing.assert_array_equal(emb, weight[rows])
            entry = manifest[name]
            assert entry["features"] == [feature.name] and entry["id_rule"] == feature.id_rule
            assert entry["dim"] == DIM and entry["task"] == {"tower": tower} and entry["wide"] is None
            if out == "e2":
                assert sorted(rows.tolist()) == list(range(feature.num_embeddings))
            else:  # --ids-from: the rows training gives the ids
                assert t.column_names == ["id", "row", "embedding"]
                np.testing.assert_array_equal(rows, ids_to_rows(feature, t.column("id").combine_chunks(), Source("t")))
        assert manifest["user_id"]["task"] is None
    assert manifest_towers(root / "e2") == {t: TOWERS[i // len(TASK)] for i, t in enumerate(TABLES)}


def manifest_towers(out: Path) -> dict[str, str]:
    tables = json.loads((out / "manifest.json").read_text())["tables"]
    return {n: e["task"]["tower"] for n, e in tables.items() if e["task"]}


# ---- serving -------------------------------------------------------------------------------------

# fp16 / int4 tables and int8 Linears alone go through the same code as the feature tables'
# (tests/test_serving.py); here: exact, int8 task tables, and both quantized.
@pytest.mark.parametrize("quant, dense_quant, tol", [("none", "none", 1e-5), ("int8", "none", 2e-3), ("int8", "int8", 2e-2)])
def test_serving_artefact_carries_the_task_embeddings(trained, quant, dense_quant, tol):
    """Against the checkpoint's model: exact with fp32 tables and Linear layers; quantized within
    test_serving's bounds (int8 Linears: DENSE_INT8_ATOL; int8 / fp16 tables; int4 loosely)."""
    artefact = export_model(trained, f"a_{quant}_{dense_quant}", "--quant", quant, "--dense-quant", dense_quant)
    p = Predictor(artefact, threads=1)
    assert p.schema.task_features == tuple(TASK) and p.schema.task_embedding_dim == DIM
    assert p.meta["sizes_bytes"]["task_tables_fp32"] == 4 * DIM * len(TOWERS) * sum(
        f.num_embeddings for f in trained["cfg"].schema.sparse if f.name in TASK)
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
