"""Batch scoring: real processes, a real checkpoint, real Parquet in and out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from aitm_torchrec.score import Part, plan_parts
from tests.conftest import scored, tiny_config_dict
from tests.multiprocess import run_ranks, torchx

pytestmark = pytest.mark.slow  # every test here starts ranks (or uses the module's trained checkpoint)

ROWS = 2500


def _train(config_path: str) -> dict:
    from launch.train import main

    return main(["--config", config_path, "--no-resume"])


def _score(argv: list[str]) -> dict:
    from launch.score import main

    return main(argv)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict:
    """A tiny model trained 2 ranks x 12 steps, and a scoring input with row ids and a string key."""
    root = tmp_path_factory.mktemp("score")
    raw = tiny_config_dict(tiny_data, root / "run")
    raw["train_config"]["num_steps"] = 12
    raw["train_config"]["save_checkpoints_steps"] = 6
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_ranks(_train, str(config))
    table = pq.read_table(tiny_data / "eval").slice(0, ROWS)
    table = table.append_column("rid", pa.array(np.arange(ROWS, dtype=np.int64)))
    table = table.append_column("key", pa.array([f"k{i}" for i in range(ROWS)]))
    inputs = root / "input"
    inputs.mkdir()
    pq.write_table(table.slice(0, 1000), inputs / "a.parquet", row_group_size=300)
    pq.write_table(table.slice(1000), inputs / "b.parquet", row_group_size=400)
    return {"config": str(config), "input": str(inputs), "root": root}


def _args(trained: dict, out: Path, *more: str) -> list[str]:
    return ["--config", trained["config"], "--input", trained["input"], "--output", str(out),
            "--reserved_columns", "rid,key", "--rows_per_part", "700", "--batch_size", "256", *more]


def test_parts_cover_every_row_once_in_order():
    parts = plan_parts(10, 3, 2)
    assert [(p.rank, p.index, p.lo, p.hi) for p in parts] == [
        (0, 0, 0, 2), (0, 1, 2, 3), (1, 0, 3, 5), (1, 1, 5, 6), (2, 0, 6, 8), (2, 1, 8, 10)]
    assert sorted(p.name for p in parts) == [p.name for p in parts]


def test_two_ranks_one_and_three_score_every_row_once_with_equal_probabilities(trained):
    root = trained["root"]
    one = _score(_args(trained, root / "one", "--metrics"))
    run_ranks(_score, _args(trained, root / "two"), nproc=2)
    run_ranks(_score, _args(trained, root / "three", "--output_columns", "probs,logits"), nproc=3)
    a, b, c = (scored(root / d) for d in ("one", "two", "three"))
    for t in (a, b, c):
        assert t.num_rows == ROWS
        assert t.column("rid").to_pylist() == list(range(ROWS))  # input order, each row once
        assert t.column("key").to_pylist() == [f"k{i}" for i in range(ROWS)]
        assert t.schema.field("key").type == pa.string() and t.schema.field("probs_cvr").type == pa.float32()
    for tower in ("ctr", "cvr"):
        np.testing.assert_allclose(b.column(f"probs_{tower}").to_numpy(), a.column(f"probs_{tower}").to_numpy(),
                                   atol=1e-5)
        np.testing.assert_allclose(c.column(f"probs_{tower}").to_numpy(), a.column(f"probs_{tower}").to_numpy(),
                                   atol=1e-5)
        logits = c.column(f"logits_{tower}").to_numpy()
        np.testing.assert_allclose(1 / (1 + np.exp(-logits)), c.column(f"probs_{tower}").to_numpy(), atol=1e-6)
    manifest = json.loads((root / "two" / "manifest.json").read_text())
    assert (root / "two" / "_SUCCESS").exists() and manifest["rows"] == ROWS and manifest["world_size"] == 2
    assert manifest["checkpoint"]["step"] == 12
    assert sum(p["rows"] for p in manifest["parts"]) == ROWS and len(manifest["parts"]) == 4
    import hashlib

    for p in manifest["parts"]:
        assert hashlib.sha256((root / "two" / p["file"]).read_bytes()).hexdigest() == p["sha256"]
    assert [i["rows"] for i in manifest["inputs"]] == [1000, 1500]
    # --metrics: the same whole-set metrics as training's own evaluation of these rows would give
    assert set(one["metrics"]) == {"ctr", "cvr"} and 0.0 <= one["metrics"]["ctr"]["auc"] <= 1.0


def _die_on_rank_1(part: Part) -> None:
    if part.rank == 1:  # right after its first part is in place
        os._exit(3)


def _score_and_die(argv: list[str]) -> dict:
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.score import run
    from launch.score import parse

    cfg, opts = parse(argv)
    with aitm_dist.job() as env:
        return run(cfg, env, opts, on_part_written=_die_on_rank_1)


def test_a_killed_rank_then_a_rerun_scores_every_row_exactly_once(trained):
    out = trained["root"] / "killed"
    with pytest.raises(ChildFailedError):
        run_ranks(_score_and_die, _args(trained, out), nproc=2)
    assert not (out / "_SUCCESS").exists()
    survivors = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert "part-00001-00000.parquet" in survivors and "part-00001-00001.parquet" not in survivors
    run_ranks(_score, _args(trained, out), nproc=2)
    for name, stamp in survivors.items():  # complete parts are kept as they were
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp
    t = scored(out)
    assert t.column("rid").to_pylist() == list(range(ROWS))
    assert (out / "_SUCCESS").exists() and not list(out.glob(".*tmp"))


def test_inputs_without_labels_bad_inputs_and_another_checkpoint(trained, tmp_path):
    root = trained["root"]
    no_labels = tmp_path / "nolabels"
    no_labels.mkdir()
    t = pq.read_table(Path(trained["input"]) / "a.parquet").drop(["clk", "buy"])
    pq.write_table(t, no_labels / "x.parquet")
    manifest = _score(["--config", trained["config"], "--input", str(no_labels), "--output", str(tmp_path / "o"),
                       "--reserved_columns", "ALL"])
    got = scored(tmp_path / "o")
    assert manifest["rows"] == 1000 and got.column_names[:len(t.column_names)] == t.column_names
    with pytest.raises(Exception, match=r"missing column 'clk' \(needed by labels\)"):
        _score(["--config", trained["config"], "--input", str(no_labels), "--output", str(tmp_path / "m"), "--metrics"])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(Exception, match=r"bad.parquet: not a readable Parquet file"):
        _score(["--config", trained["config"], "--input", str(tmp_path / "bad.parquet"), "--output", str(tmp_path / "b")])
    step6 = root / "run" / "checkpoints" / "step_00000006"
    assert step6.exists()
    out = tmp_path / "o"
    with pytest.raises(Exception, match=r"holds scores of another job: the checkpoint \(was step 12 at .*step_00000012, now step 6"):
        _score(["--config", trained["config"], "--input", str(no_labels), "--output", str(out),
                "--reserved_columns", "ALL", "--checkpoint", str(step6)])
    again = _score(["--config", trained["config"], "--input", str(no_labels), "--output", str(out),
                    "--reserved_columns", "ALL", "--checkpoint", str(step6), "--overwrite"])
    assert again["checkpoint"]["step"] == 6


def test_torchx_as_typed_scores_on_two_ranks(trained, tmp_path):
    out = tmp_path / "tx"
    res = torchx("run", "dist.ddp", "-j", "1x2", "launch/score.py", "--config", trained["config"],
                 "--input", trained["input"], "--output", str(out), "--reserved_columns", "rid")
    assert res.returncode == 0, res.stderr[-3000:]
    assert scored(out).column("rid").to_pylist() == list(range(ROWS))
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2


def test_scoring_with_the_serving_artefact_gives_the_checkpoints_scores(trained, tmp_path):
    from launch.export import main as export_main

    export_main(["model", "--config", trained["config"], "--output", str(tmp_path / "artefact"), "--quant", "none"])
    from_checkpoint = _score(_args(trained, tmp_path / "ckpt"))
    from_model = _score(_args(trained, tmp_path / "model", "--model", str(tmp_path / "artefact"), "--threads", "1"))
    a, b = scored(tmp_path / "ckpt"), scored(tmp_path / "model")
    assert b.column("rid").to_pylist() == list(range(ROWS)) and from_model["rows"] == from_checkpoint["rows"]
    for tower in ("ctr", "cvr"):
        np.testing.assert_allclose(b.column(f"probs_{tower}").to_numpy(), a.column(f"probs_{tower}").to_numpy(),
                                   atol=1e-5)
    with pytest.raises(Exception, match="--output_columns logits needs a checkpoint"):
        _score(_args(trained, tmp_path / "l", "--model", str(tmp_path / "artefact"), "--output_columns", "logits"))
    # bf16: the artefact under the same autocast as the checkpoint's model gives its bf16 scores
    bf16 = "train_config.mixed_precision=bf16"
    ckpt16 = _score(_args(trained, tmp_path / "ckpt16", bf16))
    model16 = _score(_args(trained, tmp_path / "model16", "--model", str(tmp_path / "artefact"), bf16))
    assert ckpt16["mixed_precision"]["resolved"] == model16["mixed_precision"]["resolved"] == "bf16"
    assert from_model["mixed_precision"]["resolved"] == "none"  # the test config's none
    c, d = scored(tmp_path / "ckpt16"), scored(tmp_path / "model16")
    for tower in ("ctr", "cvr"):
        x16, y16 = c.column(f"probs_{tower}").to_numpy(), d.column(f"probs_{tower}").to_numpy()
        assert not np.array_equal(y16, b.column(f"probs_{tower}").to_numpy())  # bf16 did run
        np.testing.assert_allclose(y16, x16, atol=2e-3)


def test_a_damaged_checkpoint_stops_scoring_naming_the_file(trained, tmp_path):
    import shutil

    from aitm_torchrec.checkpoint import CheckpointError

    damaged = tmp_path / "step_00000012"
    shutil.copytree(trained["root"] / "run" / "checkpoints" / "step_00000012", damaged)
    shard = sorted(damaged.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{damaged}.*{shard.name}"):
        _score(_args(trained, tmp_path / "o", "--checkpoint", str(damaged)))
    assert not (tmp_path / "o").exists()  # nothing written


def test_scoring_runs_the_dense_layers_in_the_resolved_precision_and_records_it(trained, tmp_path):
    fp32 = _score(_args(trained, tmp_path / "fp32"))
    bf16 = _score(_args(trained, tmp_path / "bf16", "train_config.mixed_precision=bf16"))
    assert fp32["mixed_precision"] == {"requested": "none", "resolved": "none", "reason": "set in the config"}
    assert bf16["mixed_precision"]["resolved"] == "bf16"
    assert json.loads((tmp_path / "bf16" / "job.json").read_text())["mixed_precision"] == "bf16"
    a, b = scored(tmp_path / "fp32"), scored(tmp_path / "bf16")
    for tower in ("ctr", "cvr"):
        x, y = a.column(f"probs_{tower}").to_numpy(), b.column(f"probs_{tower}").to_numpy()
        assert not np.array_equal(x, y)  # bf16 GEMMs round differently
        np.testing.assert_allclose(y, x, atol=2e-2)
    with pytest.raises(Exception, match=r"the mixed precision \(was bf16, now none\)"):
        _score(_args(trained, tmp_path / "bf16", "train_config.mixed_precision=none"))


# Dynamic int8 Linears vs fp32: the bound and its reasons are test_serving.DENSE_INT8_ATOL's (this
# module's model is trained less, 12 steps; measured max |dp| 1.2e-3, mean 2.4e-4 and 2.8e-4).
DENSE_INT8_ATOL = 2e-2


def test_dense_int8_scoring_on_two_ranks_close_to_fp32_and_its_own_job(trained, tmp_path):
    run_ranks(_score, _args(trained, tmp_path / "fp32", "--output_columns", "probs,logits"), nproc=2)
    run_ranks(_score, _args(trained, tmp_path / "int8", "--output_columns", "probs,logits", "--dense-quant", "int8"),
              nproc=2)
    a, b = scored(tmp_path / "fp32"), scored(tmp_path / "int8")
    assert b.column("rid").to_pylist() == list(range(ROWS))
    diffs = [np.abs(b.column(f"probs_{t}").to_numpy() - a.column(f"probs_{t}").to_numpy()) for t in ("ctr", "cvr")]
    print(f"\nscore --dense-quant int8 vs none, 2 ranks: max |dp| {max(float(d.max()) for d in diffs):.2e} "
          f"mean |dp| {[round(float(d.mean()), 6) for d in diffs]}")
    assert all(float(d.max()) <= DENSE_INT8_ATOL for d in diffs)
    assert any(float(d.max()) > 0 for d in diffs), "int8 Linears must change the scores somewhat"
    job = json.loads((tmp_path / "int8" / "job.json").read_text())
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert job["dense_quant"] == manifest["dense_quant"] == "int8"
    assert json.loads((tmp_path / "fp32" / "manifest.json").read_text())["dense_quant"] == "none"
    # another dense quantization is another job; the same one resumes (nothing left to score)
    with pytest.raises(Exception, match=r"holds scores of another job: .*--dense-quant \(was int8, now none\)"):
        _score(_args(trained, tmp_path / "int8", "--output_columns", "probs,logits"))
    with pytest.raises(Exception, match="--dense-quant applies to a checkpoint"):
        _score(_args(trained, tmp_path / "m", "--model", str(tmp_path), "--dense-quant", "int8"))


def test_scoring_with_an_int8_dense_artefact(trained, tmp_path):
    from launch.export import main as export_main

    export_main(["model", "--config", trained["config"], "--output", str(tmp_path / "artefact"), "--quant", "none",
                 "--dense-quant", "int8"])
    from_checkpoint = _score(_args(trained, tmp_path / "ckpt"))
    from_model = _score(_args(trained, tmp_path / "model", "--model", str(tmp_path / "artefact"), "--threads", "1"))
    assert from_model["dense_quant"] == "int8" and from_checkpoint["dense_quant"] == "none"
    # int8 Linears take fp32 inputs: bf16 asked, fp32 run, and the manifest says why
    bf16 = _score(_args(trained, tmp_path / "model16", "--model", str(tmp_path / "artefact"),
                        "train_config.mixed_precision=bf16"))
    assert bf16["mixed_precision"]["resolved"] == "none" and "int8 Linears" in bf16["mixed_precision"]["reason"]
    a, b = scored(tmp_path / "ckpt"), scored(tmp_path / "model")
    assert b.column("rid").to_pylist() == list(range(ROWS))
    for tower in ("ctr", "cvr"):
        diff = np.abs(b.column(f"probs_{tower}").to_numpy() - a.column(f"probs_{tower}").to_numpy())
        assert 0 < float(diff.max()) <= DENSE_INT8_ATOL
