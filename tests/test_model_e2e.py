"""Every shipped model config trains end to end on 2 real gloo ranks, from config alone.

The 3-step chain and the DAG train on 3-label data, the baselines on the seed's 2 labels, each
for a few steps on tiny tables (about 5 s per config), one after the other in one pair of
processes: the process group is set up once before the first ``main`` and kept by every job
(``aitm_torchrec.dist.job``), so no second rendezvous runs on the elastic agent's store. The
checkpoints of the baselines whose output path differs from AITM's
(ESMM, MMoE, PLE) then go through the jobs that run without
training (scoring, the serving export, table export), which must give the checkpoint's own
scores and tables; AITM's go through them in test_score.py, test_serving.py and
test_table_export.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from aitm_torchrec.config import load_config
from aitm_torchrec.data import ParquetReader
from aitm_torchrec.from_checkpoint import local_model, resolve_checkpoint
from aitm_torchrec.serving import Predictor
from datasets import synthetic
from tests.conftest import REPO, scored
from tests.multiprocess import run_ranks

STEPS = 40
CHAIN_CONFIGS = ("aitm_3step.yaml", "aitm_dag.yaml")
TAOBAO_CONFIGS = ("aitm_taobao.yaml", "esmm_taobao.yaml", "mmoe_taobao.yaml", "shared_bottom_taobao.yaml",
                  "dbmtl_taobao.yaml", "ple_taobao.yaml")


@pytest.fixture(scope="session")
def chain_data(tmp_path_factory) -> Path:
    """12k train / 4k eval rows with the labels clk -> cart -> buy."""
    out = tmp_path_factory.mktemp("chain_data")
    synthetic.main(["--out", str(out), "--rows", "12000", "--eval-rows", "4000", "--row-group-size", "1000",
                    "--labels", "clk,cart,buy", "--seed", "11"])
    return out


def shrink(name: str, data: Path, model_dir: Path) -> dict:
    """configs/<name> with small tables and layers, on ``data`` (as conftest.tiny_config_dict)."""
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    raw["train_input_path"] = str(data / "train")
    raw["eval_input_path"] = str(data / "eval")
    raw["model_dir"] = str(model_dir)
    raw["data_config"].update(batch_size=128, prefetch_size=2)
    raw["train_config"].update(num_steps=STEPS, log_step_count_steps=1, mixed_precision="none")  # fp32 on every host
    raw["train_config"]["learning_rate_scaling"] = {"rule": "none"}  # the same rates on 1 and 2 ranks
    # learning rates that show learning within STEPS
    raw["train_config"]["sparse_optimizer"]["learning_rate"] = 0.2
    raw["train_config"]["dense_optimizer"]["learning_rate"] = 0.01
    for f in raw["feature_config"]["features"]:
        if "hash_bucket_size" in f:
            f["hash_bucket_size"] = min(f["hash_bucket_size"], 500)
    mc = raw["model_config"]
    if "backbone" in mc:
        mc["backbone"]["mlp"]["hidden_units"] = [64, 32]
    if "expert_dnn" in mc["model_params"]:
        mc["model_params"]["expert_dnn"]["hidden_units"] = [32, 16]
    for net in mc["model_params"].get("extraction_networks", []):
        for key in ("task_expert_net", "share_expert_net"):
            if key in net:
                net[key]["hidden_units"] = [16]
    for t in mc["model_params"]["task_towers"]:
        t["dnn"]["hidden_units"] = [32, 16]
        if "ait_project_dim" in t:
            t["ait_project_dim"] = 16
        if "relation_dnn" in t:
            t["relation_dnn"]["hidden_units"] = [16]
    return raw


def _train_each(config_paths: list[str]) -> list[dict]:
    """One rank: ``launch/train.py --config P`` for each path in turn, in one process group."""
    from aitm_torchrec import dist as aitm_dist
    from launch.train import main

    aitm_dist.setup()  # kept by every job below: one rendezvous for all the configs
    try:
        return [main(["--config", path]) for path in config_paths]
    finally:
        aitm_dist.teardown()


@pytest.fixture(scope="module")
def trained(chain_data, tiny_data, tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """config name -> (its shrunk raw config, the summary.json it wrote)."""
    root = tmp_path_factory.mktemp("model_e2e")
    names = CHAIN_CONFIGS + TAOBAO_CONFIGS
    raws = {}
    for name in names:
        raws[name] = shrink(name, chain_data if name in CHAIN_CONFIGS else tiny_data, root / Path(name).stem)
        (root / name).write_text(yaml.safe_dump(raws[name]))
    results = run_ranks(_train_each, [str(root / name) for name in names])[0]
    out = {}
    for name, result in zip(names, results, strict=True):
        summary = json.loads((Path(raws[name]["model_dir"]) / "summary.json").read_text())
        assert summary == json.loads(json.dumps(result)), f"{name}: summary.json is rank 0's summary"
        out[name] = (raws[name], summary)
    return out


def _structure(value):
    """The nested key structure of a summary, without its numbers."""
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    return type(value).__name__


def _check_trained(name: str, raw: dict, summary: dict) -> None:
    towers = [(t["tower_name"], t["label_name"]) for t in raw["model_config"]["model_params"]["task_towers"]]
    assert [(t["tower_name"], t["label_name"]) for t in summary["towers"]] == towers
    assert summary["world_size"] == 2
    assert summary["train"]["steps"] == STEPS
    assert summary["train"]["examples"] == STEPS * 2 * 128
    losses = [loss for _, loss in summary["train"]["loss"]]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"{name}: loss did not fall ({first:.4f} -> {last:.4f})"
    assert set(summary["eval"]) == {t for t, _ in towers}
    for tower, m in summary["eval"].items():
        assert set(m) == {"auc", "logloss", "calibration"}
        assert 0.5 < m["auc"] <= 1.0 and m["logloss"] > 0, f"{name}/{tower}: {m}"
    assert summary["eval"][towers[0][0]]["auc"] > 0.58, f"{name}: the click tower did not learn"
    ckpt = Path(raw["model_dir"]) / "checkpoints" / f"step_{STEPS:08d}"
    assert (ckpt / "meta.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAIN_CONFIGS)
def test_three_step_chain_and_dag_train_on_two_ranks(trained, name):
    raw, summary = trained[name]
    _check_trained(name, raw, summary)
    assert [t["label_name"] for t in summary["towers"]] == ["clk", "cart", "buy"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TAOBAO_CONFIGS[1:])
def test_baseline_trains_on_two_ranks_with_the_same_summary(trained, name):
    raw, summary = trained[name]
    _check_trained(name, raw, summary)
    _, reference = trained["aitm_taobao.yaml"]
    assert _structure(summary) == _structure(reference), f"{name}: summary.json keys differ from AITM's"
    assert summary["plan"].keys() == reference["plan"].keys(), "same tables, sharded the same way"


def _score(argv: list[str]) -> dict:
    from launch.score import main

    return main(argv)


def _export(argv: list[str]) -> dict:
    from launch.export import main

    return main(argv)


@pytest.mark.slow
# The heads whose output path differs from AITM's: ESMM's chained marginals, MMoE's and PLE's gated
# experts (SharedBottom and DBMTL are AITM's towers without AIT; each run costs ~20 s here).
@pytest.mark.parametrize("name", ["esmm_taobao.yaml", "mmoe_taobao.yaml", "ple_taobao.yaml"])
def test_baseline_checkpoint_scores_serves_and_exports_tables_as_trained(trained, tiny_data, name, tmp_path):
    raw, _ = trained[name]
    config = tmp_path / name
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    model = local_model(cfg, resolve_checkpoint(cfg))
    rows = tmp_path / "rows"
    rows.mkdir()
    pq.write_table(pq.read_table(sorted((tiny_data / "eval").glob("*.parquet"))[0]).slice(0, 500),
                   rows / "eval.parquet")
    (batch,) = ParquetReader([str(rows / "eval.parquet")], cfg.schema, batch_size=500, prefetch=0).epoch(0)
    with torch.no_grad():
        expected = torch.sigmoid(model(batch.dense, batch.sparse)).numpy()
    towers = cfg.schema.tower_names

    _score(["--config", str(config), "--input", str(rows), "--output", str(tmp_path / "scores")])
    got = scored(tmp_path / "scores")
    np.testing.assert_allclose(np.stack([got.column(f"probs_{t}").to_numpy() for t in towers], axis=1),
                               expected, rtol=0, atol=1e-5)

    _export(["model", "--config", str(config), "--output", str(tmp_path / "artefact"), "--quant", "none"])
    served = Predictor(tmp_path / "artefact").predict_arrow(pq.read_table(rows / "eval.parquet"))
    np.testing.assert_allclose(np.stack([served[t] for t in towers], axis=1), expected, rtol=0, atol=1e-5)

    _export(["embeddings", "--config", str(config), "--output", str(tmp_path / "tables"), "--tables", "user_id"])
    table = pq.read_table(tmp_path / "tables" / "user_id")
    weights = model.ebc.embedding_bags["user_id"].weight.detach().numpy()
    rows_out = table.column("row").to_numpy()
    assert np.array_equal(np.sort(rows_out), np.arange(weights.shape[0]))
    assert np.array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), weights[rows_out])
