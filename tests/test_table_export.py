"""Table export: real checkpoints trained on 2 gloo ranks, exported on 2 and 1 ranks, compared
with the model's own tables; ids mapped by the training rule; crash and resume; the TorchX CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from aitm_torchrec.config import load_config
from aitm_torchrec.features import Source, bag_column
from aitm_torchrec.from_checkpoint import local_model, resolve_checkpoint
from aitm_torchrec.table_export import TABLE_KEY, ExportError, table_chunks
from tests.conftest import tiny_config_dict
from tests.multiprocess import run_ranks

REPO = Path(__file__).resolve().parent.parent
PLANS = ("table_wise", "column_wise", "data_parallel")
# adgroup_id 256 wide: column-wise plans split it into two 128-column shards (one per rank).
WIDE = "feature_config.features.1.embedding_dim=256"


def _train(config: str, overrides: list[str]) -> None:
    from launch.train import main

    main(["--config", config, *overrides])


def _export(argv: list[str]) -> dict:
    from launch.export import main

    return main(["embeddings", *argv])


_written = 0


def _die_after_three_parts(path: Path) -> None:
    global _written
    _written += 1
    if _written >= 3:  # this rank's third part and its sidecar are in place
        os._exit(17)


def _export_and_die(argv: list[str]) -> dict:
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec import table_export
    from launch.export import parse

    _, cfg, opts = parse(["embeddings", *argv])
    with aitm_dist.job() as env:
        return table_export.run(cfg, env, opts, on_part_written=_die_after_three_parts)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """{plan: config path} of a tiny model trained 4 steps on 2 ranks under each plan."""
    root = tmp_path_factory.mktemp("export_ckpts")
    out = {}
    for plan in PLANS:
        raw = tiny_config_dict(tiny_data, root / f"run_{plan}")
        raw["feature_config"]["features"][1]["embedding_dim"] = 256
        raw["sharding_config"] = {"sharding_types": [plan]}
        raw["eval_input_path"] = []
        path = root / f"{plan}.yaml"
        path.write_text(yaml.safe_dump(raw))
        run_ranks(_train, str(path), ["train_config.num_steps=4"])
        out[plan] = path
    return out


def _weights(config: Path) -> dict[str, np.ndarray]:
    cfg = load_config(config)
    model = local_model(cfg, resolve_checkpoint(cfg))
    return {f.name: model.ebc.embedding_bags[f.name].weight.detach().numpy() for f in cfg.schema.sparse}


def _read(out: Path, table: str) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    t = pq.read_table(out / table)
    return t.column("row").to_numpy(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False)), t


def _check_manifest(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    for entry in m["tables"].values():
        assert entry["rows_written"] == sum(f["rows"] for f in entry["files"])
        for f in entry["files"]:
            p = out / f["path"]
            assert hashlib.sha256(p.read_bytes()).hexdigest() == f["sha256"]
            assert pq.ParquetFile(p).metadata.num_rows == f["rows"]
    return m


@pytest.mark.slow
@pytest.mark.parametrize("plan", PLANS)
def test_round_trip_on_two_and_one_ranks_equals_trained_tables(trained, plan, tmp_path):
    config = trained[plan]
    cfg = load_config(config)
    ckpt = resolve_checkpoint(cfg)
    chunks = table_chunks(ckpt, cfg.schema.sparse[1])[1]
    if plan == "column_wise":  # the stitching path really runs: two column slices
        assert sorted((c.col0, c.cols) for c in chunks) == [(0, 128), (128, 128)]
    weights = _weights(config)
    for nproc in (2, 1):
        out = tmp_path / f"out{nproc}"
        results = run_ranks(_export, ["--config", str(config), "--output", str(out), "--chunk-rows", "128"],
                            nproc=nproc)
        assert (out / "_SUCCESS").exists()
        assert sum(r["parts_written"] for r in results.values()) == sum(
            -(-f.num_embeddings // 128) for f in cfg.schema.sparse)
        if nproc == 2:
            assert all(r["parts_written"] > 0 for r in results.values()), "both ranks write parts"
        m = _check_manifest(out)
        assert m["checkpoint"] == {"path": str(ckpt.resolve()), "step": 4}
        assert json.loads((out / "schema.json").read_text())["id_hash"]["name"] == "aitm-splitmix64"
        for f in cfg.schema.sparse:
            rows, emb, t = _read(out, f.name)
            assert t.schema.field("embedding").type == pa.list_(pa.float32(), f.embedding_dim)
            assert np.array_equal(np.sort(rows), np.arange(f.num_embeddings))
            assert np.array_equal(emb, weights[f.name][rows]), f"{plan}: table {f.name} on {nproc} rank(s)"
            entry = m["tables"][f.name]
            assert entry["rows"] == f.num_embeddings and entry["dim"] == f.embedding_dim
            assert entry["id_rule"] == f.id_rule and entry["features"] == [f.name]


def _save_row_sharded(root: str, rows: int, dim: int) -> None:
    """A DCP checkpoint whose table is split by rows over 2 ranks (a row-wise layout, which
    TorchRec plans only on CUDA), written with DTensor on gloo."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.files import write_json_atomic

    env = aitm_dist.setup()
    mesh = init_device_mesh("cpu", (env.world_size,))
    full = torch.arange(rows * dim, dtype=torch.float32).reshape(rows, dim)
    dcp.save({TABLE_KEY.format("adgroup_id"): distribute_tensor(full, mesh, [Shard(0)])}, checkpoint_id=root)
    if env.is_main:
        write_json_atomic(Path(root) / "meta.json", {"step": 1})
    aitm_dist.teardown()


@pytest.mark.slow
def test_row_sharded_checkpoint_windows_cross_shard_boundaries(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    f = cfg.schema.sparse[1]
    ckpt = tmp_path / "step_00000001"
    run_ranks(_save_row_sharded, str(ckpt), f.num_embeddings, f.embedding_dim)
    chunks = table_chunks(ckpt, f)[1]
    assert [(c.row0, c.rows) for c in chunks] == [(0, 250), (250, 250)]
    out = tmp_path / "out"
    _export(["--config", str(tiny_config), "--checkpoint", str(ckpt), "--output", str(out),
             "--tables", f.name, "--chunk-rows", "96"])  # windows 192-288 span both shards
    rows, emb, _ = _read(out, f.name)
    expect = np.arange(f.num_embeddings * f.embedding_dim, dtype=np.float32).reshape(-1, f.embedding_dim)
    assert np.array_equal(rows, np.arange(f.num_embeddings)) and np.array_equal(emb, expect)


@pytest.mark.slow
def test_ids_from_maps_int_string_and_tag_ids_to_training_rows(trained, tiny_data, tmp_path):
    config = trained["table_wise"]
    cfg = load_config(config)
    feats = {f.name: f for f in cfg.schema.sparse}
    weights = _weights(config)
    ids_file = tmp_path / "ids.parquet"
    sids = [f"user-{i % 700}" for i in range(2000)] + [None, ""]
    tags = ["a|b", "b||c", None, "", "zz|a|q9"] * 100
    pq.write_table(pa.table({"sid": sids, "tags": tags * 4 + ["x", "y"]}), ids_file)
    train_files = str(tiny_data / "train")
    out = tmp_path / "out"
    _export(["--config", str(config), "--output", str(out), "--tables", "adgroup_id,user_id,tag_category_list",
             "--ids-from", f"adgroup_id={train_files}:adgroup_id", "--ids-from", f"user_id={ids_file}:sid",
             "--ids-from", f"tag_category_list={ids_file}:tags", "--chunk-rows", "100"])
    m = _check_manifest(out)
    raw_adgroup = pq.read_table(train_files, columns=["adgroup_id"]).column(0)
    cases = {"adgroup_id": raw_adgroup, "user_id": pa.chunked_array([pa.array(sids)]),
             "tag_category_list": pa.chunked_array([pa.array(tags * 4 + ["x", "y"])])}
    for table, column in cases.items():
        f = feats[table]
        rows, emb, t = _read(out, table)
        ids = t.column("id").to_pylist()
        _, train_rows = bag_column(f, column, Source("test"))  # the reader's rows for the raw ids
        flat = [x for v in column.to_pylist() if v is not None for x in (v.split("|") if isinstance(v, str) else [v]) if x != ""]
        assert sorted(set(flat), key=str) == sorted(ids, key=str), table  # every distinct id, once
        assert dict(zip(flat, train_rows.tolist())) == dict(zip(ids, rows.tolist())), table
        assert np.array_equal(emb, weights[table][rows])
        info = m["tables"][table]["ids"]
        assert info["distinct_ids"] == len(ids)
        assert info["collisions"] == len(ids) - len(set(rows.tolist()))
    assert m["tables"]["user_id"]["ids"]["collisions"] > 0  # 700 ids into 500 rows
    assert pq.read_table(out / "adgroup_id").schema.field("id").type == pa.int64()


@pytest.mark.slow
def test_bad_arguments_fail_before_any_output_on_every_rank(trained, tmp_path):
    config = str(trained["table_wise"])
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"price": [1.5, 2.5], "sid": ["a", "b"]}), bad)
    out = tmp_path / "out"
    cases = [
        (["--tables", "nope"], "unknown table(s) nope"),
        (["--ids-from", f"user_id={bad}:missing"], f"{bad} has no column 'missing'"),
        (["--ids-from", f"user_id={bad}:price"], "column 'price' has type double"),
        (["--ids-from", f"user_id={tmp_path}/none.parquet:sid"], "matches no Parquet file"),
        (["--ids-from", "user_id"], "expected TABLE=PATH:COLUMN"),
        (["--ids-from", f"user_id={bad}:sid", "--format", "npy"], "needs --format parquet"),
    ]
    for argv, message in cases:
        with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _export(["--config", config, "--output", str(out), *argv])
        assert not out.exists() or not any(out.iterdir()), argv
    with pytest.raises(ChildFailedError, match="unknown table"):  # both ranks stop, neither hangs
        run_ranks(_export, ["--config", config, "--output", str(out), "--tables", "nope"])


@pytest.mark.slow
def test_killed_export_leaves_no_success_and_rerun_completes_it(trained, tmp_path):
    config = str(trained["column_wise"])
    out = tmp_path / "out"
    argv = ["--config", config, "--output", str(out), "--chunk-rows", "128"]
    with pytest.raises(ChildFailedError):
        run_ranks(_export_and_die, argv)
    assert not (out / "_SUCCESS").exists() and not (out / "manifest.json").exists()
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*/part-*")}
    assert len(before) >= 3
    results = run_ranks(_export, argv)
    assert (out / "_SUCCESS").exists()
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before  # untouched
    assert sum(r["parts_skipped"] for r in results.values()) == len(before)
    m = _check_manifest(out)
    assert sum(len(t["files"]) for t in m["tables"].values()) == len(list(out.glob("*/part-*")))
    weights = _weights(Path(config))
    rows, emb, _ = _read(out, "adgroup_id")
    assert np.array_equal(emb, weights["adgroup_id"][rows])
    # the same output for another checkpoint: refused, then replaced with --overwrite
    other = str(trained["table_wise"])
    with pytest.raises(ExportError, match="another checkpoint/config"):
        _export(["--config", other, "--output", str(out), "--chunk-rows", "128"])
    _export(["--config", other, "--output", str(out), "--chunk-rows", "128", "--overwrite", "--dtype", "float16"])
    rows, emb, t = _read(out, "adgroup_id")
    assert t.schema.field("embedding").type == pa.list_(pa.float16(), 256)
    assert np.array_equal(emb, _weights(Path(other))["adgroup_id"][rows].astype(np.float16))
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "float16"


@pytest.mark.slow
def test_torchx_cli_exports_on_two_ranks(trained, tmp_path):
    config = trained["data_parallel"]
    out = tmp_path / "out"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(bin_dir / "torchx"), "run", "dist.ddp", "-j", "1x2", "launch/export.py", "embeddings",
                           "--config", str(config), "--output", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = _check_manifest(out)
    assert m["world_size"] == 2 and (out / "_SUCCESS").exists()
    weights = _weights(config)
    for table in ("adgroup_id", "price"):
        rows, emb, _ = _read(out, table)
        assert np.array_equal(emb, weights[table][rows])
