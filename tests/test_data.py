"""ParquetReader: rank split, equal steps, padding, seeded shuffling, conversion to KJT."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aitm_torchrec.config import Feature, Normalizer
from aitm_torchrec.data import ParquetReader
from aitm_torchrec.features import Source, bag_column, raw_column
from aitm_torchrec.schema import Schema, Task
from tests.conftest import dense_of, sparse_of

N_ROWS = 1000
RID = Feature(("rid",), "IdFeature", num_buckets=N_ROWS)  # num_buckets keeps ids as they are
TAGS = Feature(("tags",), "TagFeature", hash_bucket_size=97, separator="|")
USER = Feature(("user",), "IdFeature", hash_bucket_size=50)
X = Feature(("x",), "RawFeature")
FEATURES = (RID, TAGS, USER, X)


def _table(rids: np.ndarray) -> pa.Table:
    n = len(rids)
    return pa.table({
        "rid": pa.array(rids, pa.int64()),
        "tags": pa.array(["|".join(str(t) for t in range(r % 4)) for r in rids]),
        "user": pa.array([f"u{r % 13}" if r % 7 else None for r in rids]),
        "x": pa.array(rids.astype(np.float64) / 10),
        "clk": pa.array((rids % 3 == 0).astype(np.int8)),
        "buy": pa.array((rids % 6 == 0).astype(np.int8)),
    }) if n else None


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory) -> Path:
    """1000 rows (rid 0..999) over 3 files with uneven row groups, plus an empty file."""
    d = tmp_path_factory.mktemp("rows")
    splits = [(0, 370, 100), (370, 371, 7), (371, 1000, 64)]  # (first, stop, row group size)
    for i, (a, b, rg) in enumerate(splits):
        pq.write_table(_table(np.arange(a, b)), d / f"part-{i}.parquet", row_group_size=rg)
    pq.write_table(_table(np.arange(0, 1)).slice(0, 0), d / "part-9-empty.parquet")
    return d


def _reader(d: Path, rank: int, world: int, **kw) -> ParquetReader:
    kw.setdefault("prefetch", 0)
    return ParquetReader([str(d)], Schema.from_features(FEATURES, ["clk", "buy"]), batch_size=32, rank=rank, world_size=world, **kw)


def _epoch_rids(reader: ParquetReader, epoch: int) -> tuple[list[int], int, list]:
    """(real rids in order, steps, batches) of one epoch of one rank."""
    rids, batches = [], list(reader.epoch(epoch))
    for b in batches:
        kjt = b.sparse.to_dict()["rid"]
        real = b.weights.numpy() == 1
        lengths = kjt.lengths().numpy()
        assert (lengths[real] == 1).all() and (lengths[~real] == 0).all()
        rids += kjt.values().tolist()
    return rids, len(batches), batches


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_row_exactly_once_per_epoch_and_equal_steps(rows_dir, world, shuffle):
    readers = [_reader(rows_dir, r, world, shuffle=shuffle, seed=5, buffer_rows=100) for r in range(world)]
    assert readers[0].num_rows == N_ROWS
    expected_steps = math.ceil(math.ceil(N_ROWS / world) / 32)
    for epoch in (0, 1):
        seen = []
        for reader in readers:
            rids, steps, batches = _epoch_rids(reader, epoch)
            assert steps == reader.steps_per_epoch == expected_steps, "every rank runs the same steps"
            assert all(b.weights.shape[0] == 32 for b in batches)
            seen += rids
            weights = np.concatenate([b.weights.numpy() for b in batches])
            assert weights.sum() == len(rids) and set(np.unique(weights)) <= {0.0, 1.0}
            pad = weights == 0
            labels = np.concatenate([b.labels.numpy() for b in batches])
            dense = np.concatenate([b.dense.numpy() for b in batches])
            assert not labels[pad].any() and not dense[pad].any(), "padding rows carry nothing"
            assert (pad[:len(rids)] == 0).all(), "padding only at the end"
        assert sorted(seen) == list(range(N_ROWS)), f"world {world} epoch {epoch}: rows lost or repeated"


def test_labels_and_features_stay_with_their_row(rows_dir):
    reader = _reader(rows_dir, 1, 2, shuffle=True, seed=3, buffer_rows=64)
    for b in reader.epoch(0):
        d = b.sparse.to_dict()
        real = b.weights.numpy() == 1
        rid = d["rid"].values().numpy()
        np.testing.assert_array_equal(b.labels.numpy()[real], np.stack([rid % 3 == 0, rid % 6 == 0], 1))
        np.testing.assert_allclose(b.dense.numpy()[real, 0], rid / 10, rtol=1e-6)
        np.testing.assert_array_equal(d["tags"].lengths().numpy()[real], rid % 4)
        np.testing.assert_array_equal(d["user"].lengths().numpy()[real], (rid % 7 != 0).astype(int))


def test_shuffle_is_seeded_per_epoch(rows_dir):
    def order(seed: int, epoch: int, rank: int = 0) -> list[int]:
        return _epoch_rids(_reader(rows_dir, rank, 2, shuffle=True, seed=seed, buffer_rows=128), epoch)[0]

    assert order(1, 0) == order(1, 0), "same seed and epoch -> same order"
    assert order(1, 0) != order(1, 1), "another epoch -> another order"
    assert order(1, 0) != order(2, 0), "another seed -> another order"
    assert sorted(order(1, 0) + order(1, 0, rank=1)) == list(range(N_ROWS))
    plain = _epoch_rids(_reader(rows_dir, 0, 1, shuffle=False), 0)[0]
    assert plain == list(range(N_ROWS)), "no shuffle: file order"


def test_prefetch_thread_gives_the_same_batches(rows_dir):
    a = _epoch_rids(_reader(rows_dir, 0, 2, shuffle=True, seed=4, prefetch=3), 0)[0]
    b = _epoch_rids(_reader(rows_dir, 0, 2, shuffle=True, seed=4, prefetch=0), 0)[0]
    assert a == b


def test_empty_file_is_skipped_and_stats_count_repairs(rows_dir, caplog):
    reader = _reader(rows_dir, 0, 1)
    assert [Path(p).name for p in reader.stats.empty_files] == ["part-9-empty.parquet"]
    list(reader.epoch(0))
    assert reader.stats.rows == N_ROWS
    assert reader.stats.empty_bags["user"] == len(range(0, N_ROWS, 7))
    assert reader.stats.empty_bags["tags"] == len(range(0, N_ROWS, 4))
    assert reader.stats.empty_bags["rid"] == 0


def test_dictionary_encoded_strings_give_the_same_rows_as_plain_strings():
    src = Source("x.parquet")
    values = ["a|b", "", None, "c||a", "a|b", "zz"]
    for f in (TAGS, USER, Feature(("t",), "TagFeature", hash_bucket_size=1000)):
        plain = bag_column(sparse_of(f), pa.array(values), src)
        encoded = bag_column(sparse_of(f), pa.array(values).dictionary_encode(), src)
        sliced = bag_column(sparse_of(f), pa.array(values).dictionary_encode().slice(2), src)
        for x, y in zip(plain, encoded):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(sliced[0], plain[0][2:])
        np.testing.assert_array_equal(sliced[1], plain[1][plain[0][:2].sum():])


def test_string_ids_read_from_parquet_hash_like_plain_strings(tmp_path):
    t = pa.table({"user": pa.array(["u1", "u2", None, "", "u1"] * 40), "clk": pa.array([0, 1] * 100, pa.int8())})
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=50)
    reader = ParquetReader([str(tmp_path)], Schema.from_features((USER,), ["clk"]), batch_size=200, prefetch=0)
    (batch,) = list(reader.epoch(0))
    lengths, rows = bag_column(sparse_of(USER), t.column("user"), Source("a"))
    kjt = batch.sparse.to_dict()["user"]
    np.testing.assert_array_equal(kjt.lengths().numpy(), lengths)
    np.testing.assert_array_equal(kjt.values().numpy(), rows)


def test_label_chain_policy_drop_and_keep(tmp_path):
    t = pa.table({"user": pa.array(["a"] * 10), "clk": pa.array([1, 0, 0, 1, 0] * 2, pa.int8()),
                  "buy": pa.array([1, 1, 0, 0, 1] * 2, pa.int8())})  # rows 1 and 4 of each 5 buy without clk
    pq.write_table(t, tmp_path / "a.parquet")
    drop = ParquetReader([str(tmp_path)], Schema.from_features((USER,), ["clk", "buy"]), batch_size=4, prefetch=0, label_chain_policy="drop")
    batches = list(drop.epoch(0))
    assert len(batches) == drop.steps_per_epoch == 3
    labels = np.concatenate([b.labels.numpy()[b.weights.numpy() == 1] for b in batches])
    assert len(labels) == 6 and not (labels[:, 1] > labels[:, 0]).any()
    assert drop.stats.label_chain_violations == 4 and drop.stats.rows_dropped == 4
    keep = ParquetReader([str(tmp_path)], Schema.from_features((USER,), ["clk", "buy"]), batch_size=4, prefetch=0, label_chain_policy="keep")
    assert sum(float(b.weights.sum()) for b in keep.epoch(0)) == 10
    assert keep.stats.label_chain_violations == 4 and keep.stats.rows_dropped == 0


def test_raw_normalizer():
    src = Source("x.parquet")
    z = Feature(("x",), "RawFeature", normalizer=Normalizer(mean=2.0, std=4.0))
    np.testing.assert_allclose(raw_column(dense_of(z), pa.array([2.0, 6.0, None]), src)[:, 0], [0.0, 1.0, 0.0])
    lg = Feature(("x",), "RawFeature", normalizer=Normalizer(log1p=True))
    np.testing.assert_allclose(raw_column(dense_of(lg), pa.array([0, np.e - 1, -(np.e - 1)]), src)[:, 0], [0, 1, -1], atol=1e-6)
    vec = Feature(("x",), "RawFeature", raw_input_dim=2, normalizer=Normalizer(mean=1.0))
    np.testing.assert_allclose(raw_column(dense_of(vec), pa.array([[1.0, 3.0], None]), src), [[0, 2], [0, 0]])


def test_label_relations_give_a_dag_of_steps(tmp_path):
    # clk and cart are independent first steps; buy needs both.
    t = pa.table({"user": pa.array(["a"] * 4), "clk": pa.array([1, 0, 1, 0], pa.int8()),
                  "cart": pa.array([0, 1, 1, 0], pa.int8()), "buy": pa.array([0, 0, 1, 1], pa.int8())})
    pq.write_table(t, tmp_path / "a.parquet")
    chain_schema = Schema.from_features((USER,), ["clk", "cart", "buy"])
    dag = dataclasses.replace(chain_schema, tasks=(Task("clk", "clk"), Task("cart", "cart"), Task("buy", "buy", (0, 1))))
    reader = ParquetReader([str(tmp_path)], dag, batch_size=4, prefetch=0, label_chain_policy="keep")
    list(reader.epoch(0))
    assert reader.stats.label_chain_violations == 1  # only the last row: buy without clk and cart
    chain = ParquetReader([str(tmp_path)], chain_schema, batch_size=4, prefetch=0, label_chain_policy="keep")
    list(chain.epoch(0))
    assert chain.stats.label_chain_violations == 2  # cart without clk, buy without cart


@pytest.mark.parametrize("override,message", [
    ("feature_config.features.0.normalizer={mean: 1.0}", r"features\[0\].normalizer \(pid\) is only allowed for RawFeature"),
    ("data_config.label_chain_policy=skip", "label_chain_policy is 'skip'; allowed: error, drop, keep"),
])
def test_data_config_keys_are_validated(override, message):
    from aitm_torchrec.config import DEFAULT_CONFIG, ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT_CONFIG, [override])
    cfg = load_config(DEFAULT_CONFIG, ["data_config.label_chain_policy=drop"])
    assert cfg.data_config.label_chain_policy == "drop"


def test_raw_normalizer_std_must_be_positive(tmp_path):
    import yaml

    from aitm_torchrec.config import DEFAULT_CONFIG, ConfigError, load_config

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["feature_config"]["features"].append({"input_names": ["x"], "feature_type": "RawFeature",
                                              "normalizer": {"log1p": True, "std": 0}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"normalizer.std \(x\) must be > 0"):
        load_config(path)


def test_closing_an_epoch_early_stops_the_prefetch_thread(rows_dir):
    import threading

    reader = _reader(rows_dir, 0, 1, prefetch=1)
    for _ in range(3):
        batches = reader.epoch(0)
        next(batches)
        batches.close()  # the worker is blocked on a full queue: closing must not hang
    assert not [t for t in threading.enumerate() if t.name == "aitm-prefetch"]
