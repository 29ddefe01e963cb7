"""What the tests of the tables beside the feature tables share (the wide part's ``wide_ebc`` in
test_wide_jobs.py, the task tables' ``task_ebc`` in test_stem_jobs.py, the managed-collision
tables in test_zch_jobs.py): the jobs as the rank functions call them, the check that scoring on
2 ranks, on 1 and through the serving artefact gives the local model's probabilities, and the
check that a 2-rank checkpoint restores on 1 rank with those tables and their optimizer state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aitm_torchrec.config import load_config
from tests.conftest import scored
from tests.multiprocess import run_ranks


def train(config: str, overrides: list[str]) -> dict:
    from launch.train import main

    return main(["--config", config, *overrides])


def score(argv: list[str]) -> dict:
    from launch.score import main

    return main(argv)


def export_embeddings(argv: list[str]) -> dict:
    from launch.export import main

    return main(["embeddings", *argv])


def export_model(trained: dict, name: str, *flags: str) -> Path:
    """The serving artefact of the module's checkpoint under ``trained["root"] / name`` (made once)."""
    from launch.export import main

    out = trained["root"] / name
    if not out.exists():
        main(["model", "--config", str(trained["config"]), "--output", str(out), *flags])
    return out


def check_scoring_agrees(trained: dict, artefact: Path, expected: np.ndarray) -> None:
    """``trained["input"]`` scored on 2 ranks, on 1, and by ``artefact`` (a serving export) keeps
    its ``rid`` order and gives ``expected`` (the local model's probabilities, a row per input row)
    in each tower's ``probs_`` column."""
    root = trained["root"]
    args = ["--config", str(trained["config"]), "--input", str(trained["input"]), "--reserved_columns", "rid",
            "--batch_size", "256"]
    run_ranks(score, [*args, "--output", str(root / "s2")])
    score([*args, "--output", str(root / "s1")])
    score([*args, "--output", str(root / "sm"), "--model", str(artefact), "--threads", "1"])
    for out in ("s2", "s1", "sm"):
        t = scored(root / out)
        assert t.column("rid").to_pylist() == list(range(len(expected)))
        got = np.stack([t.column(f"probs_{x}").to_numpy() for x in trained["cfg"].schema.tower_names], axis=1)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=out)


def restored_on_one_rank(config: str, collection: str) -> dict:
    """The config's latest checkpoint restored into a 1-rank job: the weights of ``collection``
    (``wide_ebc``, ``task_ebc``) and their optimizer state as this job holds them."""
    from aitm_torchrec import checkpoint
    from aitm_torchrec import dist as aitm_dist
    from aitm_torchrec.train import build, restore

    cfg = load_config(config)
    marker = f".{collection}."
    with aitm_dist.job() as env:
        dmp, optimizer, _ = build(cfg, env)
        path = checkpoint.latest(Path(cfg.model_dir) / "checkpoints")
        pos = restore(path, dmp, optimizer, env, cfg.data_config.batch_size)

        def full(v) -> np.ndarray:
            return (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).detach().numpy().copy()

        weights = {k: full(v) for k, v in dmp.state_dict().items() if marker in k}
        state = {f"{k}.{n}": full(v) for k, entry in optimizer.state_dict()["state"].items() if marker in k
                 for n, v in entry.items()}
    return {"step": pos.step, "path": str(path), "weights": weights, "state": state}


def check_restored(got: dict, local: dict, tables: int, collection: str) -> None:
    """``got`` (``restored_on_one_rank``) holds ``tables`` tables equal to ``local`` (the local
    model's ``collection`` state dict) and one rowwise-Adagrad momentum per table, non-zero and
    equal to what the checkpoint stored."""
    import torch.distributed.checkpoint as dcp

    assert len(got["weights"]) == tables
    for key, value in got["weights"].items():  # model.model.<collection>.embedding_bags.<t>.weight
        np.testing.assert_array_equal(value, local[key.split(f"{collection}.", 1)[1]].numpy())
    assert len(got["state"]) == tables
    saved = {f"optim.state.{k}": torch.zeros(v.shape, dtype=torch.float32) for k, v in got["state"].items()}
    dcp.load(saved, checkpoint_id=got["path"], no_dist=True)
    for key, value in got["state"].items():
        assert np.abs(value).max() > 0, f"{key}: the {collection} tables' optimizer has state"
        np.testing.assert_array_equal(value, saved[f"optim.state.{key}"].numpy())
