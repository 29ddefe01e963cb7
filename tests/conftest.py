"""Shared fixtures: a tiny synthetic data set and a tiny version of the seed config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aitm_torchrec.config import DEFAULT_CONFIG
from datasets import synthetic

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """12k train / 4k eval rows of the Taobao schema, row groups of 1000, 2 files per split."""
    out = tmp_path_factory.mktemp("tiny_data")
    synthetic.main(["--out", str(out), "--rows", "12000", "--eval-rows", "4000",
                    "--row-group-size", "1000", "--seed", "7"])
    return out


def tiny_config_dict(data: Path, model_dir: Path) -> dict:
    """The seed config with small tables and layers, on ``data``."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["train_input_path"] = str(data / "train")
    raw["eval_input_path"] = str(data / "eval")
    raw["model_dir"] = str(model_dir)
    raw["data_config"].update(batch_size=128, prefetch_size=2)
    # fp32 on every host: the default (auto) would be bf16 on CPUs with AMX and change the
    # numbers the tests compare; tests/test_precision.py covers auto.
    raw["train_config"].update(num_steps=40, log_step_count_steps=1, mixed_precision="none")
    raw["train_config"]["learning_rate_scaling"] = {"rule": "none"}  # the same rates on 1 and 2 ranks
    for f in raw["feature_config"]["features"]:
        if "hash_bucket_size" in f:
            f["hash_bucket_size"] = min(f["hash_bucket_size"], 500)
    raw["model_config"]["backbone"]["mlp"]["hidden_units"] = [64, 32]
    for t in raw["model_config"]["model_params"]["task_towers"]:
        t["dnn"]["hidden_units"] = [32, 16]
        if "ait_project_dim" in t:
            t["ait_project_dim"] = 16
    return raw


@pytest.fixture
def tiny_config(tiny_data, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, tmp_path / "run")))
    return path


def scored(out: Path):
    """The parts a scoring job wrote to ``out``, in order, as one Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])


def sparse_of(feature):
    """A config ``Feature`` as the schema's ``SparseFeature`` (what the id functions take)."""
    from aitm_torchrec.schema import Schema

    return Schema.from_features([feature]).sparse[0]


def dense_of(feature):
    """A config RawFeature as the schema's ``DenseFeature``."""
    from aitm_torchrec.schema import Schema

    return Schema.from_features([feature]).dense[0]
