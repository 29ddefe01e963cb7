"""Adam on the tables on the CPU (TorchRec's dense kernel + torch Adam, aitm_torchrec/table_optim.py):
what the pinned FBGEMM CPU build runs, training on 2 gloo ranks, exact stop-and-resume, resharding
onto 1 rank, table export and scoring from such a checkpoint, the seed EasyRec config, config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from aitm_torchrec.config import ConfigError, load_config
from tests.conftest import REPO, scored, tiny_config_dict
from tests.multiprocess import run_ranks
from tests.test_easyrec import easyrec_csv  # noqa: F401  (a module fixture)

ADAM = ["train_config.sparse_optimizer.name=adam", "train_config.sparse_optimizer.learning_rate=0.003"]


def test_fbgemm_cpu_build_has_no_adam_kernel():
    """What the pinned fbgemm-gpu-cpu runs: exact (rowwise) Adagrad and exact SGD; no Adam-class."""
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    def runs(opt: EmbOptimType) -> bool:
        try:
            tbe = SplitTableBatchedEmbeddingBagsCodegen([(10, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                        optimizer=opt, learning_rate=0.1, device="cpu")
        except AssertionError:
            return False
        before = tbe.split_embedding_weights()[0].clone()
        tbe(torch.tensor([1, 2]), torch.tensor([0, 1, 2])).sum().backward()
        return not torch.equal(before, tbe.split_embedding_weights()[0])

    assert all(runs(o) for o in (EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.EXACT_ADAGRAD,
                                 EmbOptimType.EXACT_SGD))
    assert not any(runs(o) for o in (EmbOptimType.ADAM, EmbOptimType.PARTIAL_ROWWISE_ADAM, EmbOptimType.LAMB,
                                     EmbOptimType.PARTIAL_ROWWISE_LAMB))


def _runs(config_path: str, runs: list[list[str]]) -> list[dict]:
    """Training jobs one after the other in the same ranks, each returning its summary and the
    tables' local weights after it."""
    from aitm_torchrec import dist as aitm_dist
    from launch.train import main

    aitm_dist.setup()
    try:
        return [main(["--config", config_path, *overrides]) for overrides in runs]
    finally:
        aitm_dist.teardown()


def _tables_and_optimizer(config_path: str, overrides: list[str]) -> dict:
    """Builds the job (no training): the plan's kernels, the optimizer's parts and their keys."""
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.config import load_config
    from aitm_torchrec.train import build

    env = aitm_dist.setup()
    try:
        dmp, optimizer, plan = build(load_config(config_path, overrides), env)
        parts = {type(o).__name__: sorted(o.params) for _, o in optimizer.optimizers}
        return {"plan": plan, "parts": parts, "state_keys": sorted(optimizer.state_dict()["state"])}
    finally:
        aitm_dist.teardown()


@pytest.mark.slow
def test_adam_tables_on_cpu_train_on_the_dense_kernel_once(tiny_config):
    out = run_ranks(_tables_and_optimizer, str(tiny_config), ADAM)
    for rank, r in out.items():
        assert {t["compute_kernel"] for t in r["plan"].values()} == {"dense"}
        assert {t["sharding_type"] for t in r["plan"].values()} <= {"table_wise", "column_wise",
                                                                  "table_column_wise"}
        tables, dense = r["parts"]["ShardedTableOptimizer"], r["parts"]["GradientClippingOptimizer"]
        assert not set(tables) & set(dense), "no parameter is trained twice"
        assert not any(".embedding_bags." in k for k in dense)
        owned = [t for t, p in r["plan"].items() if rank in p["ranks"]]
        assert sorted(k.split(".embedding_bags.")[1].removesuffix(".weight") for k in tables) == sorted(owned)


@pytest.fixture(scope="module")
def adam_run(tiny_data, tmp_path_factory) -> dict:
    """2 ranks: 16 steps uninterrupted; 8 steps then resumed to 16 (each saving); then the 16-step
    checkpoint loaded on 1 rank (nothing left to train: it evaluates the saved model)."""
    root = tmp_path_factory.mktemp("adam")
    raw = tiny_config_dict(tiny_data, root / "whole")
    raw["train_config"]["sparse_optimizer"] = {"name": "adam", "learning_rate": 0.003}
    raw["train_config"]["num_steps"] = 16
    config = root / "adam.yaml"
    config.write_text(yaml.safe_dump(raw))
    parts = str(root / "parts")
    whole, first, second = run_ranks(_runs, str(config), [
        [], [f"model_dir={parts}", "train_config.num_steps=8"], [f"model_dir={parts}"]])[0]
    one = run_ranks(_runs, str(config), [[f"model_dir={parts}"]], nproc=1)[0][0]
    return {"config": config, "root": root, "parts": parts, "whole": whole, "first": first, "second": second,
            "one": one}


@pytest.mark.slow
def test_adam_tables_learn_and_resume_exactly(adam_run):
    whole, first, second = (dict(adam_run[k]["train"]["loss"]) for k in ("whole", "first", "second"))
    assert np.mean([whole[s] for s in range(13, 17)]) < np.mean([whole[s] for s in range(1, 5)])
    assert adam_run["second"]["train"]["resumed_from_step"] == 8
    for step in range(1, 9):
        assert first[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7)
    for step in range(9, 17):  # the tables' Adam moments and step count came back from the checkpoint
        assert second[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6), f"step {step}"


@pytest.mark.slow
def test_adam_checkpoint_loads_on_one_rank_and_tables_moved(adam_run, tiny_data):
    from aitm_torchrec.from_checkpoint import local_model, resolve_checkpoint

    one, saved = adam_run["one"], adam_run["second"]
    assert one["world_size"] == 1 and one["train"]["resumed_from_step"] == 16
    for tower, m in saved["eval"].items():
        assert one["eval"][tower]["auc"] == pytest.approx(m["auc"], abs=1e-6)
    import torch

    cfg = load_config(adam_run["config"], [f"model_dir={adam_run['parts']}"])
    root = Path(adam_run["parts"]) / "checkpoints"
    at8, at16 = (local_model(cfg, resolve_checkpoint(cfg, root / f"step_{n:08d}")) for n in (8, 16))
    for f in cfg.schema.sparse:  # Adam trained every table between the two checkpoints
        w8, w16 = (m.ebc.embedding_bags[f.name].weight.detach() for m in (at8, at16))
        assert torch.isfinite(w16).all() and (w8 != w16).any(dim=1).sum() > 0, f.name
    # the uninterrupted run and the resumed one end with the same tables
    whole = local_model(cfg, resolve_checkpoint(load_config(adam_run["config"])))
    for f in cfg.schema.sparse:
        assert torch.allclose(whole.ebc.embedding_bags[f.name].weight, at16.ebc.embedding_bags[f.name].weight,
                              atol=1e-5), f.name


def _export(argv: list[str]) -> dict:
    from launch.export import main

    return main(["embeddings", *argv])


def _score(argv: list[str]) -> dict:
    from launch.score import main

    return main(argv)


@pytest.mark.slow
def test_table_export_and_scoring_from_an_adam_checkpoint(adam_run, tiny_data, tmp_path):
    from aitm_torchrec.from_checkpoint import local_model, resolve_checkpoint

    config = str(adam_run["config"])
    cfg = load_config(config)
    model = local_model(cfg, resolve_checkpoint(cfg))
    out = tmp_path / "tables"
    run_ranks(_export, ["--config", config, "--output", str(out), "--chunk-rows", "128"])
    for f in cfg.schema.sparse:
        t = pq.read_table(out / f.name)
        rows, emb = t.column("row").to_numpy(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
        assert np.array_equal(np.sort(rows), np.arange(f.num_embeddings))
        assert np.array_equal(emb, model.ebc.embedding_bags[f.name].weight.detach().numpy()[rows]), f.name
    inputs = tmp_path / "input"
    inputs.mkdir()
    table = pq.read_table(tiny_data / "eval").slice(0, 600)
    pq.write_table(table.append_column("rid", pa.array(np.arange(600, dtype=np.int64))), inputs / "a.parquet")

    def args(out: str, *more: str) -> list[str]:
        return ["--config", config, "--input", str(inputs), "--output", str(tmp_path / out), "--batch_size", "256",
                "--reserved_columns", "rid", *more]

    run_ranks(_score, args("scored"))  # the checkpoint, sharded for 2 ranks
    from launch.export import main as export_main

    export_main(["model", "--config", config, "--output", str(tmp_path / "artefact"), "--quant", "none"])
    _score(args("served", "--model", str(tmp_path / "artefact"), "--threads", "1"))  # the serving artefact
    got, served = (scored(tmp_path / d).sort_by("rid") for d in ("scored", "served"))
    assert got.num_rows == served.num_rows == 600
    for tower in ("ctr", "cvr"):
        p = got.column(f"probs_{tower}").to_numpy()
        assert np.isfinite(p).all() and ((p > 0) & (p < 1)).all()
        np.testing.assert_allclose(served.column(f"probs_{tower}").to_numpy(), p, atol=1e-5)


def test_seed_easyrec_config_builds_adam_tables_on_cpu():
    cfg = load_config(REPO / "tests/fixtures/easyrec/aitm_seed_taobao.config")
    opt = cfg.train_config.sparse_optimizer
    assert (opt.name, opt.beta1, opt.beta2) == ("adam", 0.9, 0.999)
    assert opt.learning_rate == pytest.approx(1e-4)  # EasyRec's rate as written (docs/easyrec.md)
    from aitm_torchrec.sharding import constraints
    from aitm_torchrec.table_optim import on_dense_kernel

    assert on_dense_kernel(opt, "cpu") and not on_dense_kernel(opt, "cuda")
    cons = constraints(cfg, "cpu")
    assert cons and all(c.compute_kernels == ["fused"] and "row_wise" not in c.sharding_types
                        for c in cons.values())  # planned fused, sharded on the dense kernel


def test_config_errors_name_the_key(tiny_config):
    with pytest.raises(ConfigError, match=r"train_config\.sparse_optimizer\.name.*'lamb'"):
        load_config(tiny_config, ["train_config.sparse_optimizer.name=lamb"])
    with pytest.raises(ConfigError, match=r"train_config\.sparse_optimizer\.beta2"):
        load_config(tiny_config, ["train_config.sparse_optimizer.beta2=1.0"])
    with pytest.raises(ConfigError, match=r"train_config\.sparse_optimizer.*betas"):
        load_config(tiny_config, ["train_config.sparse_optimizer.betas=[0.9,0.99]"])
    from aitm_torchrec.sharding import constraints, sparse_optimizer

    cfg = load_config(tiny_config, [*ADAM, "sharding_config.compute_kernels=[fused]"])
    with pytest.raises(ConfigError, match=r"sharding_config compute_kernels.*dense kernel"):
        constraints(cfg, "cpu")
    cfg = load_config(tiny_config, ["train_config.sparse_optimizer.name=partial_rowwise_adam"])
    with pytest.raises(ConfigError, match=r"train_config\.sparse_optimizer\.name: partial_rowwise_adam.*CPU"):
        sparse_optimizer(cfg.train_config.sparse_optimizer, "cpu")


def _train(config: str, overrides: list[str]) -> dict:
    from launch.train import main

    return main(["--config", config, *overrides])


@pytest.mark.slow
def test_seed_easyrec_config_trains_on_cpu_with_its_own_adam(easyrec_csv, tmp_path):  # noqa: F811
    """The seed's one adam_optimizer (1e-4, every variable) as written: tables on the dense kernel."""
    from tests.test_easyrec import FIXTURES, shrink_overrides

    name = "aitm_seed_taobao.config"
    overrides = [o for o in shrink_overrides(name, easyrec_csv, tmp_path / "run")
                 if not o.startswith(("train_config.sparse_optimizer", "train_config.dense_optimizer"))]
    assert not any("optimizer" in o for o in overrides)
    summary = run_ranks(_train, str(FIXTURES / name), overrides)[0]
    assert {t["compute_kernel"] for t in summary["plan"].values()} == {"dense"}
    losses = [loss for _, loss in summary["train"]["loss"]]
    assert sum(losses[-5:]) < sum(losses[:5]), "loss did not fall"


def _restored_moments(config: str, overrides: list[str], step_dir: str) -> dict:
    """This rank's job built and restored from ``step_dir``: each table's Adam moments, whole
    (stitched from the local shards at their offsets), and the shard count per table."""
    import torch

    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.train import build, restore

    env = aitm_dist.setup()
    try:
        cfg = load_config(config, overrides)
        dmp, optimizer, _ = build(cfg, env)
        restore(Path(step_dir), dmp, optimizer, env, cfg.data_config.batch_size)
        out = {}
        for key, entry in optimizer.state_dict()["state"].items():
            if "exp_avg" not in entry or not hasattr(entry["exp_avg"], "local_shards"):
                continue
            st = entry["exp_avg_sq"]
            whole = torch.zeros(st.size())
            for s in st.local_shards():
                (r, c), (h, w) = s.metadata.shard_offsets, s.metadata.shard_sizes
                whole[r:r + h, c:c + w] = s.tensor
            out[key] = (whole, len(st.local_shards()), int(entry["step"]))
        return out
    finally:
        aitm_dist.teardown()


@pytest.mark.slow
def test_column_wise_adam_state_reshards_onto_one_rank(tiny_config, tmp_path):
    """256-wide adgroup_id, column-wise: one 128-column shard per rank on 2 ranks, both on the
    one rank after; the moments read back on 1 rank equal the 2 ranks' saved ones."""
    import torch.distributed.checkpoint as dcp

    model_dir = tmp_path / "cw"
    common = [*ADAM, "sharding_config.sharding_types=[column_wise]", "feature_config.features.1.embedding_dim=256",
              f"model_dir={model_dir}", "eval_input_path=[]", "train_config.num_steps=3"]
    saved = run_ranks(_runs, str(tiny_config), [common])[0][0]
    assert saved["plan"]["adgroup_id"]["ranks"] == [0, 1]
    step_dir = model_dir / "checkpoints" / "step_00000003"
    one = run_ranks(_restored_moments, str(tiny_config), common, str(step_dir), nproc=1)[0]
    key = next(k for k in one if k.endswith("embedding_bags.adgroup_id.weight"))
    assert one[key][1] == 2, "two column shards of one table on one rank"
    for k, (whole, _, step) in one.items():
        assert step == 3
        saved = {"optim": {"state": {k: {"exp_avg_sq": whole.clone().zero_()}}}}
        dcp.load(saved, checkpoint_id=str(step_dir), no_dist=True)
        assert saved["optim"]["state"][k]["exp_avg_sq"].abs().sum() > 0, k
        assert np.array_equal(saved["optim"]["state"][k]["exp_avg_sq"].numpy(), whole.numpy()), k
    more = run_ranks(_runs, str(tiny_config), [[*common, "train_config.num_steps=5"]], nproc=1)[0][0]
    assert more["train"]["resumed_from_step"] == 3 and more["train"]["steps_this_run"] == 2


@pytest.mark.slow
def test_nonfinite_skip_leaves_adam_tables_and_moments_untouched(tiny_config, tmp_path):
    """A NaN loss at step 7 under nonfinite_policy skip: the step-7 checkpoint's tables, moments
    and Adam step equal the step-6 ones (the table update rides the skipped optimizer step)."""
    from tests.test_faults import COMMON, _model_tensors, _runs_with_nan_labels

    a, b = tmp_path / "a", tmp_path / "b"
    common = [*COMMON, *ADAM, "train_config.nonfinite_policy=skip"]
    out = run_ranks(_runs_with_nan_labels, str(tiny_config), [
        [*common, f"model_dir={a}", "train_config.num_steps=6"],
        [*common, f"model_dir={b}", "train_config.num_steps=7"],
    ], 7, 0)[0]
    assert out[1]["train"]["skipped_batches"] == 1
    six, seven = (_model_tensors(p) for p in (a / "checkpoints" / "step_00000006", b / "checkpoints" / "step_00000007"))
    assert six.keys() == seven.keys() and any(k.endswith(".exp_avg_sq") for k in six)
    for key in six:
        assert np.array_equal(six[key].numpy(), seven[key].numpy()), key
