"""launch/plan.py: plans for GPU clusters from this CPU machine (the planner only estimates)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aitm_torchrec.config import load_config
from launch import plan

REPO = Path(__file__).resolve().parent.parent


def test_two_hosts_of_eight_gpus_spread_tables_over_sixteen_ranks():
    result = plan.main(["--hosts", "2", "--procs-per-host", "8", "--device", "cuda", "--hbm-gb", "141",
                        "--ddr-gb", "512", "--json"])
    assert result["topology"]["world_size"] == 16
    used = {r for t in result["tables"].values() for r in t["ranks"]}
    assert used == set(range(16))
    sharded = [t for t in result["tables"].values() if t["sharding_type"] != "data_parallel"]
    assert sharded and all(t["compute_kernel"].startswith("fused") for t in sharded)
    assert all(r["hbm_gb"] > 0 for r in result["ranks"])
    # every row of a row-wise table is placed exactly once
    rows = {f.name: f.num_embeddings for f in load_config().feature_config.features}
    row_wise = [n for n, t in result["tables"].items() if t["sharding_type"] in ("row_wise", "table_row_wise")]
    assert row_wise
    for name in row_wise:
        assert sum(s[0] for s in result["tables"][name]["shards"]) == rows[name]


def test_table_bigger_than_hbm_goes_to_uvm_caching():
    result = plan.main(["--hosts", "2", "--procs-per-host", "8", "--device", "cuda", "--hbm-gb", "0.2",
                        "--ddr-gb", "64", "--json", "feature_config.features.6.hash_bucket_size=50000000",
                        "sharding_config.tables={user_id: {compute_kernels: [fused_uvm_caching]}}"])
    user = result["tables"]["user_id"]
    assert user["compute_kernel"] == "fused_uvm_caching"
    assert sum(s[0] for s in user["shards"]) == 50_000_000


def test_cpu_plan_rejects_gpu_only_sharding_with_a_clear_error():
    with pytest.raises(SystemExit, match="row_wise needs CUDA"):
        plan.main(["--device", "cpu", "sharding_config.sharding_types=[row_wise]"])


@pytest.mark.slow
def test_cli_prints_a_table():
    out = subprocess.run([sys.executable, "launch/plan.py", "--hosts", "1", "--procs-per-host", "2",
                          "--device", "cpu", "sharding_config.sharding_types=[table_wise]"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "plan for 1 host(s) x 2 cpu = 2 ranks" in out.stdout
    assert "user_id" in out.stdout and "table_wise" in out.stdout


@pytest.mark.slow
def test_gpu_check_skips_cleanly_without_cuda():
    import torch

    out = subprocess.run([sys.executable, "launch/gpu_check.py"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if not torch.cuda.is_available():
        assert '"skipped"' in out.stdout
    else:
        assert '"ok": true' in out.stdout


@pytest.mark.slow
def test_gpu_check_rehearsal_runs_its_stages_on_the_cpu(tmp_path):
    """The GPU check run as typed (no torchrun, no RANK in the environment) on the CPU: catches
    set-up bugs of the script itself, such as a process group that cannot start, without a GPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    out = subprocess.run([sys.executable, "launch/gpu_check.py", "--cpu-rehearsal", "--steps", "3", "--rows",
                          "3000", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout[out.stdout.index("{\n"):])
    assert report["ok"] is True and report["backend"] == "gloo" and len(report["loss"]) >= 1
    # stage 5: every job on the best config with a zch table and GAUC (rowwise Adagrad on the CPU)
    jobs = report["jobs"]
    assert list(jobs) == ["train", "score", "tables", "serving", "score_serving", "easyrec"]
    assert all(stage["ok"] for stage in jobs.values()), jobs
    for scored in (jobs["score"], jobs["score_serving"]):
        assert set(scored["metrics"]) == {"ctr", "cvr"} and all("gauc" in m for m in scored["metrics"].values())
    assert jobs["serving"]["self_check"]["max_abs_diff_vs_checkpoint_model"] < 0.01
    assert jobs["easyrec"]["kernels"] == ["dense"]  # the seed's Adam on the CPU: torch Adam, dense kernel


def test_plan_shows_the_wide_tables_and_their_memory(capsys):
    wide = ("model_config.feature_groups=[{group_name: all, feature_names: [user_id, brand, pid]}, "
            "{group_name: wide, feature_names: [user_id, pid], wide_deep: WIDE}]")
    result = plan.main(["--hosts", "1", "--procs-per-host", "2", "--device", "cpu", "--ddr-gb", "8", wide])
    tables = result["tables"]
    assert {n for n, t in tables.items() if t["wide"]} == {"wide_user_id", "wide_pid"}
    # table-wise (pid's 10 rows would be data-parallel as a feature table), 4 columns for 2 towers
    assert tables["wide_pid"]["sharding_type"] == "table_wise" and tables["pid"]["sharding_type"] == "data_parallel"
    assert tables["wide_user_id"]["shards"] == [[100000, 4]]
    assert 0 < tables["wide_user_id"]["ddr_gb"] < tables["user_id"]["ddr_gb"]
    out = capsys.readouterr().out
    assert "wide_user_id" in out and "wide tables (WIDE feature groups): 2, HBM 0.0 MB, DDR " in out


def test_plan_shows_the_task_tables_and_their_memory(capsys):
    task = "model_config.task_embeddings={features: [user_id, pid], embedding_dim: 8, gate: stem}"
    result = plan.main(["--hosts", "1", "--procs-per-host", "2", "--device", "cpu", "--ddr-gb", "8", task])
    tables = result["tables"]
    assert {n: t["task"] for n, t in tables.items() if t["task"]} == {
        "task_ctr_user_id": "ctr", "task_ctr_pid": "ctr", "task_cvr_user_id": "cvr", "task_cvr_pid": "cvr"}
    # planned as the feature tables are: the same choices for the same rows
    assert tables["task_ctr_pid"]["sharding_type"] == tables["pid"]["sharding_type"] == "data_parallel"
    assert tables["task_cvr_user_id"]["shards"] == [[100000, 8]]
    assert 0 < tables["task_cvr_user_id"]["ddr_gb"] < tables["user_id"]["ddr_gb"]
    out = capsys.readouterr().out
    assert "task_cvr_user_id" in out and "task tables (task_embeddings): 4, HBM 0.0 MB, DDR " in out
