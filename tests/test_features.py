import numpy as np
import pyarrow as pa
import pytest

from aitm_torchrec.config import Feature
from aitm_torchrec.features import DataError, Source, bag_column, mix64, raw_column, string_hash64
from tests.conftest import dense_of, sparse_of

SRC = Source("part-0.parquet")


def test_hash_is_a_fixed_function_not_pythons_salted_hash():
    # splitmix64's published finaliser values: these must never change, or every trained
    # table would be silently scrambled between runs / machines.
    assert mix64(np.array([0], np.uint64))[0] == np.uint64(0xE220A8397B1DCDAF)
    assert mix64(np.array([1], np.uint64))[0] == np.uint64(0x910A2DEC89025CC1)
    # string hash = FNV-1a-style polynomial: check against a per-byte reference loop
    def ref(s: bytes) -> int:
        h = 0xCBF29CE484222325
        for b in s:
            h = (h * 0x100000001B3 + b) % 2**64
        return h
    words = ["", "a", "abc", "user_123456", "中文"]
    got = string_hash64(pa.array(words))
    assert [int(x) for x in got] == [ref(w.encode()) for w in words]


def test_string_hash_respects_slices():
    arr = pa.array(["x", "hello", "world", "x"])
    np.testing.assert_array_equal(string_hash64(arr.slice(1, 2)), string_hash64(pa.array(["hello", "world"])))


def test_id_feature_int_and_string_and_missing():
    f = Feature(("uid",), "IdFeature", hash_bucket_size=1000)
    lengths, rows = bag_column(sparse_of(f), pa.array([5, None, 7, 5]), SRC)
    assert lengths.tolist() == [1, 0, 1, 1]
    assert rows[0] == rows[2] and rows.min() >= 0 and rows.max() < 1000
    lengths, rows = bag_column(sparse_of(f), pa.array(["a", "", None, "a"]), SRC)
    assert lengths.tolist() == [1, 0, 0, 1] and rows[0] == rows[1]


def test_num_buckets_out_of_range_is_an_error_naming_file_and_column():
    f = Feature(("price",), "IdFeature", num_buckets=50)
    assert bag_column(sparse_of(f), pa.array([0, 49]), SRC)[1].tolist() == [0, 49]
    with pytest.raises(DataError, match=r"part-0.parquet: column 'price' has 1 ids outside \[0, num_buckets=50\)"):
        bag_column(sparse_of(f), pa.array([3, 50]), SRC)
    with pytest.raises(DataError, match="column 'price'"):
        bag_column(sparse_of(f), pa.array([-1]), SRC)


def test_tag_feature_lists_and_separated_strings_agree():
    f = Feature(("tags",), "TagFeature", hash_bucket_size=100, separator="|")
    l1, r1 = bag_column(sparse_of(f), pa.array(["a|b", "", None, "c||a"]), SRC)
    l2, r2 = bag_column(sparse_of(f), pa.array([["a", "b"], [], None, ["c", "", "a"]]), SRC)
    assert l1.tolist() == l2.tolist() == [2, 0, 0, 2]
    assert r1.tolist() == r2.tolist()
    g = Feature(("tags",), "TagFeature", hash_bucket_size=100)
    lengths, rows = bag_column(sparse_of(g), pa.array([[1, 2], [], None, [3, None]]).slice(1), SRC)
    assert lengths.tolist() == [0, 0, 1] and len(rows) == 1


def test_wrong_types_are_errors():
    with pytest.raises(DataError, match="column 'uid' has type double"):
        bag_column(Feature(("uid",), "IdFeature", hash_bucket_size=10), pa.array([1.5]), SRC)
    with pytest.raises(DataError, match="is a list"):
        bag_column(Feature(("uid",), "IdFeature", hash_bucket_size=10), pa.array([[1]]), SRC)


def test_raw_feature_nan_is_an_error_and_null_is_zero():
    f = Feature(("x",), "RawFeature")
    assert raw_column(dense_of(f), pa.array([1.0, None]), SRC).tolist() == [[1.0], [0.0]]
    with pytest.raises(DataError, match="column 'x' has 1 NaN or infinite"):
        raw_column(dense_of(f), pa.array([1.0, float("nan")]), SRC)


@pytest.mark.slow
def test_hash_buckets_are_identical_in_another_process():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    f = Feature(("uid",), "IdFeature", hash_bucket_size=1_000_003)
    words, ints = ["u1", "", "中文", "x" * 40], [0, -1, 2**62, 12345]
    here = [bag_column(sparse_of(f), pa.array(words), SRC)[1].tolist(), bag_column(sparse_of(f), pa.array(ints), SRC)[1].tolist()]
    code = ("import json, pyarrow as pa; from aitm_torchrec.schema import SparseFeature; "
            "from aitm_torchrec.features import Source, bag_column; "
            "f = SparseFeature('uid', 'uid', 'IdFeature', 16, hash_bucket_size=1_000_003); s = Source('x'); "
            f"print(json.dumps([bag_column(f, pa.array({words!r}), s)[1].tolist(), "
            f"bag_column(f, pa.array({ints!r}), s)[1].tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_dictionary_encoded_ids_under_num_buckets_check_only_used_values():
    f = Feature(("price",), "IdFeature", num_buckets=50)
    arr = pa.DictionaryArray.from_arrays(pa.array([0, 0, None], pa.int32()), pa.array([3, 99]))
    lengths, rows = bag_column(sparse_of(f), arr, SRC)  # 99 is in the dictionary but no row uses it
    assert lengths.tolist() == [1, 1, 0] and rows.tolist() == [3, 3]
