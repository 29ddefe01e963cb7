"""The reader's parts, each alone: source (rank split, I/O), converter (labels, pass-through),
batcher (order, shuffle, padding), and the composed reader's scoring features."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aitm_torchrec.config import Feature
from aitm_torchrec.data import ParquetReader, ParquetSource
from aitm_torchrec.data.batch import Chunk
from aitm_torchrec.data.batcher import batches
from aitm_torchrec.data.convert import Converter
from aitm_torchrec.features import DataError
from aitm_torchrec.schema import Schema

RID = Feature(("rid",), "IdFeature", num_buckets=1000)
X = Feature(("x",), "RawFeature")
SCHEMA = Schema.from_features((RID, X), ["clk", "buy"])


@pytest.fixture
def files(tmp_path):
    """3 files of 50, 0 and 70 rows; row groups of 20; rid = global row; a string key column."""
    start = 0
    for i, n in enumerate((50, 0, 70)):
        rid = np.arange(start, start + n)
        t = pa.table({"rid": rid, "x": rid.astype(np.float64), "clk": rid % 2, "buy": np.zeros(n, np.int64),
                      "key": pa.array([f"k{r}" for r in rid]), "ts": pa.array(rid * 1000, pa.timestamp("ms"))})
        pq.write_table(t, tmp_path / f"part-{i}.parquet", row_group_size=20)
        start += n
    return tmp_path


def test_source_lays_row_groups_end_to_end_and_reads_exact_ranges(files):
    src = ParquetSource([str(files)], SCHEMA)
    assert src.num_rows == 120 and [g.rows for g in src.groups] == [20, 20, 10, 20, 20, 20, 10]
    assert src.file_rows() == {str(files / "part-0.parquet"): 50, str(files / "part-1.parquet"): 0,
                               str(files / "part-2.parquet"): 70}
    assert src.empty_files == [str(files / "part-1.parquet")]
    got = np.concatenate([t.column("rid").to_numpy() for t, _ in src.read(src.pieces(15, 63))])
    assert got.tolist() == list(range(15, 63))
    shuffled = src.order(shuffle_seed=3, epoch=1)
    assert sorted(shuffled) == list(range(7)) and shuffled == src.order(shuffle_seed=3, epoch=1)
    assert shuffled != src.order(shuffle_seed=3, epoch=2)


def test_source_checks_columns_including_pass_through(files):
    with pytest.raises(DataError, match=r"part-0.parquet: missing column 'nope' \(needed by pass-through\)"):
        ParquetSource([str(files)], SCHEMA, passthrough=["nope"])
    ParquetSource([str(files)], Schema.from_features((RID, X), []), labels=False)  # labels not needed


def test_converter_without_labels_carries_pass_through_columns(files):
    table = pq.read_table(files / "part-0.parquet")
    chunk, stats = Converter(SCHEMA, labels=False, passthrough=["key", "ts"])(table, "f")
    assert chunk.labels.shape == (50, 0) and stats.rows == 50
    assert chunk.passthrough.column_names == ["key", "ts"] and chunk.passthrough.num_rows == 50
    assert chunk.values[0].tolist() == list(range(50)) and chunk.dense[:, 0].tolist() == list(range(50))


def test_converter_label_policy_counts(files):
    table = pq.read_table(files / "part-0.parquet").set_column(3, "buy", pa.array([1] * 50))
    with pytest.raises(DataError, match="label column 'buy' is 1 while the earlier step 'clk' is 0 in 25 rows"):
        Converter(SCHEMA)(table, "f")
    chunk, stats = Converter(SCHEMA, label_chain_policy="drop")(table, "f")
    assert len(chunk) == 25 and stats.rows_dropped == 25 and stats.label_chain_violations == 25


def _chunk(lo: int, hi: int) -> Chunk:
    table = pa.table({"rid": np.arange(lo, hi), "x": np.zeros(hi - lo), "clk": np.zeros(hi - lo, np.int64),
                      "buy": np.zeros(hi - lo, np.int64), "key": np.arange(lo, hi)})
    return Converter(SCHEMA, passthrough=["key"])(table, "f")[0]


def test_batcher_keeps_order_pads_the_end_and_adds_padding_batches():
    empty = Chunk.empty(1, 1, 2)
    out = list(batches([_chunk(0, 7), _chunk(7, 30)], 8, ["rid"], empty, pad_to_steps=6))
    assert len(out) == 6
    assert [b.num_real for b in out] == [8, 8, 8, 6, 0, 0]
    real = np.concatenate([b.sparse.values().numpy() for b in out])
    assert real.tolist() == list(range(30))  # input order, no row twice
    assert out[3].weights.tolist() == [1] * 6 + [0] * 2  # padding only at the end of a batch
    assert out[3].passthrough.column("key").to_pylist() == list(range(24, 30))


def test_batcher_shuffles_within_its_buffer_only():
    empty = Chunk.empty(1, 1, 2)
    out = list(batches([_chunk(0, 16), _chunk(16, 32)], 8, ["rid"], empty, rng=np.random.default_rng(0),
                       buffer_rows=16))
    first, second = (np.concatenate([b.sparse.values().numpy() for b in out[i:i + 2]]) for i in (0, 2))
    assert sorted(first) == list(range(16)) and sorted(second) == list(range(16, 32))
    assert first.tolist() != list(range(16))
    for b in out:  # pass-through rows move with their rows
        assert b.passthrough.column("key").to_pylist() == b.sparse.values().tolist()


def test_reader_range_batches_for_scoring_keep_order_and_decode_pass_through(files):
    reader = ParquetReader([str(files)], Schema.from_features((RID, X), ["clk"]), batch_size=32, prefetch=2,
                           labels=False, passthrough=["key", "ts"])
    out = list(reader.range_batches(10, 110, pad_to_steps=5))
    assert [b.num_real for b in out] == [32, 32, 32, 4, 0]
    keys = pa.concat_tables([b.passthrough for b in out if b.passthrough is not None])
    assert keys.column("key").to_pylist() == [f"k{r}" for r in range(10, 110)]
    assert keys.schema.field("ts").type == pa.timestamp("ms") and keys.schema.field("key").type == pa.string()
    assert reader.padding_batch().num_real == 0


def test_string_pass_through_of_a_hashed_id_column_is_decoded(tmp_path):
    t = pa.table({"user": pa.array(["a", "b", "a"]), "clk": [0, 1, 1]})
    pq.write_table(t, tmp_path / "u.parquet")
    user = Feature(("user",), "IdFeature", hash_bucket_size=10)
    reader = ParquetReader([str(tmp_path)], Schema.from_features((user,), ["clk"]), 4, prefetch=0,
                           passthrough=["user"])
    (batch,) = list(reader.epoch(0))
    assert batch.passthrough.column("user").type == pa.string()
    assert batch.passthrough.column("user").to_pylist() == ["a", "b", "a"]


def test_closing_the_training_stream_stops_its_prefetch_thread(files):
    """Closing the endless training stream stops the current epoch's prefetch thread (a daemon
    thread still running at interpreter exit can abort the process)."""
    import threading
    import time

    from aitm_torchrec.train import stream

    reader = ParquetReader([str(files)], SCHEMA, batch_size=8, prefetch=2)
    batches = stream(reader)
    next(batches), next(batches)
    assert any(t.name == "aitm-prefetch" for t in threading.enumerate())
    batches.close()
    deadline = time.time() + 5
    while any(t.name == "aitm-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "aitm-prefetch" for t in threading.enumerate())
