"""GAUC: hand-computed values (ties, a one-class user skipped, every reduction), sklearn's AUC per
user, 2 gloo ranks with users split across them against one process, the config and input
errors, and training's eval against score --metrics on 1 and 2 ranks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from aitm_torchrec.config import ConfigError, load_config
from aitm_torchrec.dist import DistEnv
from aitm_torchrec.features import DataError
from aitm_torchrec.gauc import GaucSpec, GroupAUC, gauc, gauc_specs, user_aucs
from tests.conftest import tiny_config_dict
from tests.multiprocess import run_ranks

# Three users, rows interleaved (a user's rows need not be consecutive), one tower:
#   user 10: positives 0.9, 0.4; negatives 0.4, 0.1 -> pairs 1 + 1 + 1/2 (the tie) + 1 = 3.5 of 4
#   user 20: negatives only -> skipped
#   user 30: positive 0.5; negatives 0.6, 0.3 -> 1 of 2
# plus a row without a uid (null / ""), which belongs to no user.
UIDS = [10, 20, 30, 10, 30, 10, 20, 30, 10, None]
NAMES = ["u10", "u20", "u30", "u10", "u30", "u10", "u20", "u30", "u10", ""]
PROBS = [0.9, 0.8, 0.5, 0.4, 0.6, 0.4, 0.3, 0.3, 0.1, 0.0]
LABELS = [1, 0, 1, 0, 0, 1, 0, 0, 0, 1]
AUC_10, AUC_30 = 3.5 / 4, 1 / 2
EXPECTED = {  # reduction -> GAUC
    "mean_by_sample_num": (4 * AUC_10 + 3 * AUC_30) / 7,  # 5/7
    "mean": (AUC_10 + AUC_30) / 2,  # 0.6875
    "mean_by_positive_num": (2 * AUC_10 + 1 * AUC_30) / 3,  # 0.75
}


def _tiny() -> tuple[pa.Table, torch.Tensor, torch.Tensor]:
    uids = pa.table({"uid": pa.array(UIDS, pa.int64()), "name": pa.array(NAMES)})
    probs = torch.tensor(PROBS, dtype=torch.float32)[:, None].repeat(1, 3)
    labels = torch.tensor(LABELS, dtype=torch.float32)[:, None].repeat(1, 3)
    return uids, probs, labels


def test_hand_computed_users_ties_and_reductions():
    keys = torch.tensor([10, 20, 30, 10, 30, 10, 20, 30, 10])
    auc, rows, positives = user_aucs(keys, torch.tensor(PROBS[:9]), torch.tensor(LABELS[:9]).bool())
    assert auc.tolist() == [AUC_10, 0.0, AUC_30]  # users in key order; user 20 has one class
    assert rows.tolist() == [4, 2, 3] and positives.tolist() == [2, 0, 1]
    for reduction, expected in EXPECTED.items():
        assert gauc(keys, torch.tensor(PROBS[:9]), torch.tensor(LABELS[:9]).bool(), reduction) == pytest.approx(expected, abs=1e-15)
    # GroupAUC: integer and string uids, several towers sharing a uid column, rows over two updates
    specs = [GaucSpec("a", 0, "uid", "mean_by_sample_num"), GaucSpec("b", 1, "name", "mean"),
             GaucSpec("c", 2, "uid", "mean_by_positive_num")]
    m = GroupAUC(specs)
    uids, probs, labels = _tiny()
    m.update(uids.slice(0, 4), probs[:4], labels[:4])
    m.update(uids.slice(4), probs[4:], labels[4:])
    got = m.compute()
    assert got == {"a": {"gauc": pytest.approx(EXPECTED["mean_by_sample_num"], abs=1e-15), "gauc_users": 2},
                   "b": {"gauc": pytest.approx(EXPECTED["mean"], abs=1e-15), "gauc_users": 2},
                   "c": {"gauc": pytest.approx(EXPECTED["mean_by_positive_num"], abs=1e-15), "gauc_users": 2}}


def test_no_user_with_both_classes_gives_zero_and_bad_uid_types_are_errors():
    m = GroupAUC([GaucSpec("a", 0, "uid")])
    m.update(pa.table({"uid": pa.array([1, 1, 2])}), torch.rand(3, 1), torch.tensor([[1.0], [1.0], [0.0]]))
    assert m.compute() == {"a": {"gauc": 0.0, "gauc_users": 0}}
    with pytest.raises(DataError, match="uid column 'uid' has type double; user ids must be integers or strings"):
        m.update(pa.table({"uid": pa.array([1.5])}), torch.rand(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="reduction must be one of"):
        GroupAUC([GaucSpec("a", 0, "uid", "median")])


def test_each_users_auc_is_sklearns_roc_auc_score():
    metrics = pytest.importorskip("sklearn.metrics")
    g = np.random.default_rng(0)
    n = 5000
    users = g.integers(0, 1000, n)  # 5 rows a user on average: some have one class only
    scores = np.round(g.random(n), 2).astype(np.float32)  # two decimals: many ties within a user
    positive = g.random(n) < 0.15 + 0.5 * scores
    auc, rows, positives = user_aucs(torch.from_numpy(users), torch.from_numpy(scores), torch.from_numpy(positive))
    expected, kept = [], []
    for i, u in enumerate(np.unique(users)):
        y, s = positive[users == u], scores[users == u]
        if y.all() or not y.any():
            assert auc[i] == 0.0
            continue
        expected.append(metrics.roc_auc_score(y, s))
        kept.append(i)
        assert auc[i].item() == pytest.approx(expected[-1], abs=1e-12)
    assert 500 < len(kept) < 990  # some users skipped, most kept
    e, r, p = np.array(expected), rows.numpy()[kept], positives.numpy()[kept]
    for reduction, weights in (("mean_by_sample_num", r), ("mean", None), ("mean_by_positive_num", p)):
        got = gauc(torch.from_numpy(users), torch.from_numpy(scores), torch.from_numpy(positive), reduction)
        assert got == pytest.approx(np.average(e, weights=weights), abs=1e-12)


# --- two ranks ------------------------------------------------------------------------------

SPECS = [GaucSpec("a", 0, "uid", "mean_by_sample_num"), GaucSpec("b", 1, "name", "mean"),
         GaucSpec("c", 1, "uid", "mean_by_positive_num")]


def _rows(n: int = 3000) -> tuple[pa.Table, torch.Tensor, torch.Tensor]:
    """Rows of 200 users in random order: every user's rows fall on both ranks' halves."""
    g = np.random.default_rng(1)
    users = g.integers(0, 200, n)
    names = pa.array([f"user-{u}" if u % 17 else None for u in users])  # some rows without a name
    probs = torch.from_numpy(np.round(g.random((n, 2)), 3).astype(np.float32))
    labels = (torch.from_numpy(g.random((n, 2))) < 0.1 + 0.6 * probs).float()
    return pa.table({"uid": pa.array(users), "name": names}), probs, labels


def _rank_gauc() -> dict:
    from aitm_torchrec import dist as aitm_dist

    env = aitm_dist.setup()
    uids, probs, labels = _rows()
    split = [(0, 700), (700, 1400), (1400, 1500)] if env.rank == 0 else [(1500, 2100), (2100, 3000)]
    m = GroupAUC(SPECS)
    for lo, hi in split:
        m.update(uids.slice(lo, hi - lo), probs[lo:hi], labels[lo:hi])
    only_rank_0 = GroupAUC(SPECS)  # rank 1 has no rows at all: it still joins the collectives
    if env.rank == 0:
        only_rank_0.update(uids.slice(0, 1500), probs[:1500], labels[:1500])
    out = {"all": m.compute(), "rank0": only_rank_0.compute()}
    aitm_dist.teardown()
    return out


@pytest.mark.slow
def test_two_ranks_with_users_split_across_them_give_one_process_gauc():
    results = run_ranks(_rank_gauc)
    assert results[0] == results[1]
    uids, probs, labels = _rows()
    for key, rows in (("all", slice(0, 3000)), ("rank0", slice(0, 1500))):
        one = GroupAUC(SPECS)
        one.update(uids.slice(rows.start, rows.stop - rows.start), probs[rows], labels[rows])
        expected = one.compute()
        for tower in ("a", "b", "c"):
            got = results[0][key][tower]
            assert got["gauc_users"] == expected[tower]["gauc_users"] > 100
            # the same users' AUCs; only the order of the float64 sum over users differs
            assert got["gauc"] == pytest.approx(expected[tower]["gauc"], rel=1e-13)


# --- config and input -----------------------------------------------------------------------


def _tower(i: int) -> str:
    return f"model_config.model_params.task_towers.{i}.metrics_set"


@pytest.mark.parametrize("value, message", [
    ("[{}]", r"task_towers\[0\]\.metrics_set\[0\] \(ctr\) must name exactly one metric: auc or gauc"),
    ("[{auc: {}, gauc: {uid_field: user_id}}]", r"metrics_set\[0\] \(ctr\) must name exactly one metric"),
    ("[{gauc: {uid_field: user_id}}, {gauc: {uid_field: pid}}]", r"metrics_set\[1\] \(ctr\) is a second gauc"),
    ("[{gauc: {uid_field: ''}}]", r"metrics_set\[0\]\.gauc\.uid_field \(ctr\) must name the user id column"),
    ("[{gauc: {reduction: mean}}]", r"metrics_set\[0\]\.gauc\.uid_field is required"),
    ("[{gauc: {uid_field: user_id, reduction: median}}]",
     r"metrics_set\[0\]\.gauc\.reduction is 'median'; allowed: mean_by_sample_num, mean, mean_by_positive_num"),
])
def test_config_errors_name_the_key_and_the_tower(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"{_tower(0)}={value}"])


def test_gauc_specs_default_to_mean_by_sample_num():
    cfg = load_config(None, [f"{_tower(0)}=[{{auc: {{}}}}, {{gauc: {{uid_field: user_id}}}}]",
                             f"{_tower(1)}=[{{gauc: {{uid_field: user_id, reduction: mean}}}}]"])
    assert gauc_specs(cfg.towers) == (GaucSpec("ctr", 0, "user_id", "mean_by_sample_num"),
                                      GaucSpec("cvr", 1, "user_id", "mean"))


def test_an_eval_file_without_the_uid_column_is_named_with_its_columns(tiny_data, tmp_path):
    from aitm_torchrec.train import make_reader

    raw = tiny_config_dict(tiny_data, tmp_path / "run")
    raw["model_config"]["model_params"]["task_towers"][1]["metrics_set"] = [{"gauc": {"uid_field": "session"}}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    make_reader(cfg, env, cfg.train_input_path, train=True)  # training reads no uid
    with pytest.raises(DataError, match=r"eval/part-\d+\.parquet: missing column 'session' \(needed by gauc of cvr\); "
                                        r"columns: .*user_id"):
        make_reader(cfg, env, cfg.eval_input_path, train=False)


# --- training's eval and score --metrics ---------------------------------------------------


def _train(config_path: str) -> dict:
    from launch.train import main

    return main(["--config", config_path, "--no-resume"])


def _score(argv: list[str]) -> dict:
    from launch.score import main

    return main(argv)


@pytest.mark.slow
def test_training_eval_and_score_metrics_give_the_same_gauc_on_one_and_two_ranks(tiny_data, tmp_path, capsys):
    raw = tiny_config_dict(tiny_data, tmp_path / "run")
    raw["train_config"]["num_steps"] = 6
    towers = raw["model_config"]["model_params"]["task_towers"]
    towers[0]["metrics_set"] = [{"auc": {}}, {"gauc": {"uid_field": "user_id"}}]
    towers[1]["metrics_set"] = [{"gauc": {"uid_field": "user_id", "reduction": "mean"}}]
    config = tmp_path / "gauc.yaml"
    config.write_text(yaml.safe_dump(raw))
    trained = run_ranks(_train, str(config))[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval"] == json.loads(json.dumps(trained["eval"]))
    for tower in ("ctr", "cvr"):
        assert set(summary["eval"][tower]) == {"auc", "logloss", "calibration", "gauc", "gauc_users"}
        assert 0.0 < summary["eval"][tower]["gauc"] < 1.0 and summary["eval"][tower]["gauc_users"] > 0
    args = ["--config", str(config), "--metrics", "--batch_size", str(raw["data_config"]["batch_size"])]
    one = _score([*args, "--output", str(tmp_path / "one")])
    two = run_ranks(_score, [*args, "--output", str(tmp_path / "two")])[0]
    for tower in ("ctr", "cvr"):
        want = summary["eval"][tower]
        for got in (one["metrics"][tower], two["metrics"][tower]):
            assert got["gauc_users"] == want["gauc_users"]
            assert got["gauc"] == pytest.approx(want["gauc"], rel=1e-12)
    written = pq.read_table(tmp_path / "two" / "part-00000-00000.parquet")
    assert "user_id" in written.column_names  # passed through, like the labels
    from launch.report import main as report

    capsys.readouterr()
    report([str(tmp_path / "run" / "summary.json"), "--scores", str(tmp_path / "two")])
    printed = capsys.readouterr().out
    assert f"{summary['eval']['cvr']['gauc']:>8.4f}" in printed.splitlines()[2]  # the cvr row's GAUC column
    assert f"cvr AUC {two['metrics']['cvr']['auc']:.4f} GAUC {two['metrics']['cvr']['gauc']:.4f}" in printed
