"""Features: Arrow columns -> table rows and dense values, vectorised (the id rules of ``schema.ID_HASH``).

Id rules (the same in every process, run and machine):
- ``hash_bucket_size: n``: row = mix64(id) mod n. Integer ids are mixed as their int64 value;
  string ids are first folded to 64 bits with a polynomial byte hash (FNV constants), so a
  string column and its decimal-integer twin do NOT map to the same rows. Python's salted
  ``hash()`` is never used.
- ``zch``: the "row" the reader emits is the id's zch key, mix64(id) mod (2^63 - 1) as int64
  (string ids folded as above first); the managed-collision table maps keys to rows. Mixing
  spreads keys evenly over [0, 2^63 - 1), which the row-wise sharding splits into equal ranges
  per rank; 2^63 - 1 itself is the table's empty-slot marker, so the modulus leaves it out.
- ``num_buckets: n``: ids must already be in [0, n); anything else is an error that names the
  file and column (TorchRec would silently train row 0 instead).
- Missing values (a documented repair, counted by the reader in ``stats["empty_bags"]``): a null
  or empty-string IdFeature, a null tag list, an empty tag list and a null tag all give an empty
  bag (a zero pooled embedding, sum or mean). Empty tags in a separated string ("a||b") are
  dropped.
- RawFeature: integer or float values (or fixed-length lists of them). ``normalizer`` maps each
  value x to (f(x) - mean) / std with f(x) = sign(x) * log(1 + |x|) when ``log1p`` is set, else
  f(x) = x. A null (row or list element) becomes 0.0 *after* normalisation (null rows are counted
  in the reader's ``stats["null_raw"]``). NaN/inf are an error naming file and column.
- Dictionary-encoded string columns (how the reader asks Parquet for string ids under
  ``hash_bucket_size``) are converted per distinct value and gathered per row: the same rows as
  the plain column, hashed once per distinct string instead of once per row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aitm_torchrec.schema import DenseFeature, SparseFeature

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)


class DataError(ValueError):
    """Bad input data, with the file and column in the message."""


def is_string(t: pa.DataType) -> bool:
    """A string or large_string Arrow type."""
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over uint64 (wrapping arithmetic). N -> N uint64."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True)
        z += _GOLDEN
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


def string_hash64(arr: pa.Array) -> np.ndarray:
    """64-bit polynomial hash of each string's UTF-8 bytes, vectorised. N strings -> N uint64.

    h(s) = sum_i s[i] * P^(len-1-i) + OFFSET * P^len (mod 2^64), i.e. the polynomial form of a
    multiplicative string hash, computed with cumulative powers instead of a per-row loop.
    Nulls hash like the empty string (callers drop them first).
    """
    arr = arr.cast(pa.large_string()) if arr.type != pa.large_string() else arr
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64, n + 1, arr.offset * 8)
    start, end = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(data_buf, np.uint8, end - start, start) if end > start else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    rel = offsets[:-1] - start
    powers = _pow_table(int(lengths.max()) + 1)
    with np.errstate(over="ignore"):
        if data.size:
            # Power of P for each byte = P^(bytes after it in its own string).
            pos_in_str = np.arange(data.size, dtype=np.int64) - np.repeat(rel, lengths)
            after = np.repeat(lengths, lengths) - 1 - pos_in_str
            terms = data.astype(np.uint64) * powers[after]
            csum = np.concatenate([[np.uint64(0)], np.cumsum(terms, dtype=np.uint64)])
            body = csum[rel + lengths] - csum[rel]
        else:
            body = np.zeros(n, np.uint64)
        head = _FNV_OFFSET * powers[lengths]
        return body + head


@functools.lru_cache(maxsize=8)
def _pow_table(n: int) -> np.ndarray:
    """P^0 .. P^(n-1) mod 2^64, for n rounded up to a power of two (cached)."""
    size = 1 << max(n - 1, 1).bit_length()
    out = np.ones(size, np.uint64)
    with np.errstate(over="ignore"):
        for i in range(1, size):  # size follows the longest string, not the row count
            out[i] = out[i - 1] * _FNV_PRIME
    out.flags.writeable = False
    return out


ZCH_KEY_SPACE = (1 << 63) - 1  # keys in [0, 2^63 - 1): the managed-collision input range


def zch_keys(ids: np.ndarray) -> np.ndarray:
    """Integer ids (any integer dtype, as their 64-bit pattern) or string hashes (uint64) -> int64 zch keys."""
    return (mix64(ids.astype(np.int64, copy=False).view(np.uint64)) % np.uint64(ZCH_KEY_SPACE)).astype(np.int64)


@dataclass(frozen=True)
class Source:
    """Where a batch comes from, for error messages."""

    path: str


def ids_to_rows(feature: SparseFeature, values: pa.Array, src: Source) -> np.ndarray:
    """Non-null ids (int or string Arrow array) -> int64 table rows in [0, num_embeddings), or for
    zch features the ids' zch keys (the managed-collision table maps them to rows)."""
    col = feature.column
    if is_string(values.type):
        if feature.zch_size:
            return zch_keys(string_hash64(values).view(np.int64))
        if feature.num_buckets:
            values = _strings_as_ints(values, feature, src)
        else:
            return (mix64(string_hash64(values)) % np.uint64(feature.hash_bucket_size)).astype(np.int64)
    if not pa.types.is_integer(values.type):
        raise DataError(f"{src.path}: column {col!r} has type {values.type}; {feature.feature_type} "
                        "needs integer or string ids")
    ints = values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if feature.num_buckets:
        bad = (ints < 0) | (ints >= feature.num_buckets)
        if bad.any():
            raise DataError(f"{src.path}: column {col!r} has {int(bad.sum())} ids outside "
                            f"[0, num_buckets={feature.num_buckets}), e.g. {int(ints[bad][0])}; "
                            "use hash_bucket_size for raw ids")
        return ints
    if feature.zch_size:
        return zch_keys(ints)
    return (mix64(ints.view(np.uint64)) % np.uint64(feature.hash_bucket_size)).astype(np.int64)


def _strings_as_ints(values: pa.Array, feature: SparseFeature, src: Source) -> pa.Array:
    try:
        return pc.cast(values, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{src.path}: column {feature.column!r} holds strings that are not integers; "
                        f"num_buckets needs ids in [0, {feature.num_buckets})") from None


def bag_column(feature: SparseFeature, column: pa.ChunkedArray | pa.Array, src: Source) -> tuple[np.ndarray, np.ndarray]:
    """One sparse column of B rows -> (lengths: B int64, rows: sum(lengths) int64)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    if pa.types.is_dictionary(t):
        if feature.num_buckets:  # range errors must come from used values only: decode
            arr = arr.dictionary_decode()
            t = arr.type
        else:
            return _dictionary_bags(feature, arr, src)
    if feature.separator and is_string(t):
        arr = pc.split_pattern(arr, feature.separator)
        t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if feature.feature_type == "IdFeature":
            raise DataError(f"{src.path}: column {feature.column!r} is a list ({t}); use TagFeature")
        lengths = arr.value_lengths()
        lengths = (lengths.fill_null(0) if arr.null_count else lengths).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = arr.flatten()  # respects slicing, unlike .values
        if flat.null_count == 0 and not is_string(flat.type):  # every value kept (the common case)
            return lengths, ids_to_rows(feature, flat, src)
        keep = flat.is_valid()
        if is_string(flat.type):
            keep = pc.and_(keep, pc.not_equal(pc.utf8_length(flat), 0)).fill_null(False)
        keep_np = keep.to_numpy(zero_copy_only=False)
        if not keep_np.all():
            lengths = _drop_from_bags(lengths, keep_np)
            flat = flat.filter(keep)
        return lengths, ids_to_rows(feature, flat, src)
    if feature.feature_type == "TagFeature" and not (pa.types.is_integer(t) or is_string(t)):
        raise DataError(f"{src.path}: column {feature.column!r} has type {t}; TagFeature needs a list "
                        "column or a string with `separator`")
    valid = arr.is_valid()
    if is_string(t):
        valid = pc.and_(valid, pc.not_equal(pc.utf8_length(arr), 0)).fill_null(False)  # "" is missing, as in CSV
    valid_np = valid.to_numpy(zero_copy_only=False)
    return valid_np.astype(np.int64), ids_to_rows(feature, arr.filter(valid), src)


def _dictionary_bags(feature: SparseFeature, arr: pa.DictionaryArray, src: Source) -> tuple[np.ndarray, np.ndarray]:
    """Bags of a dictionary-encoded column: convert the D distinct values, gather per row.

    Hashing cannot fail, so converting unused dictionary entries is harmless (this path is only
    taken under hash_bucket_size).
    """
    d_len, d_rows = bag_column(feature, arr.dictionary, src)
    d_len = np.append(d_len, 0)  # entry D: the empty bag of a null index
    idx = arr.indices
    if idx.null_count:
        idx = idx.fill_null(len(d_len) - 1)
    idx_np = idx.to_numpy(zero_copy_only=False)
    lengths = d_len[idx_np]
    if d_len.max(initial=0) <= 1:
        # one id per entry at most (IdFeature): a row's id is d_rows at the entry's rank
        slot = np.cumsum(d_len) - 1
        return lengths, d_rows[slot[idx_np][lengths > 0]]
    d_off = np.zeros(len(d_len) + 1, np.int64)
    np.cumsum(d_len, out=d_off[1:])
    total = int(lengths.sum())
    starts = d_off[idx_np]
    out_off = np.cumsum(lengths) - lengths
    gather = np.repeat(starts - out_off, lengths) + np.arange(total)
    return lengths, d_rows[gather]


def _drop_from_bags(lengths: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """New bag lengths after dropping the flat values where ``keep`` is False."""
    bag_of = np.repeat(np.arange(lengths.size), lengths)
    return np.bincount(bag_of[keep], minlength=lengths.size).astype(np.int64)


def raw_column(feature: DenseFeature, column: pa.ChunkedArray | pa.Array, src: Source) -> np.ndarray:
    """A RawFeature column of B rows -> B x raw_input_dim float32, normalised."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    dim = feature.dim
    nulls = arr.null_count
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        lengths = arr.value_lengths().fill_null(dim).to_numpy(zero_copy_only=False)
        if (lengths != dim).any():
            raise DataError(f"{src.path}: column {feature.column!r} has lists whose length is not "
                            f"raw_input_dim={dim}")
        valid = np.repeat(arr.is_valid().to_numpy(zero_copy_only=False), dim)
        arr = pc.list_flatten(arr.fill_null(pa.scalar([0] * dim, arr.type)))
        nulls += arr.null_count
        valid &= arr.is_valid().to_numpy(zero_copy_only=False)
    elif dim != 1:
        raise DataError(f"{src.path}: column {feature.column!r} is scalar but raw_input_dim={dim}")
    else:
        valid = arr.is_valid().to_numpy(zero_copy_only=False) if nulls else None
    if not (pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type)):
        raise DataError(f"{src.path}: column {feature.column!r} has type {t}; RawFeature needs numbers")
    values = arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"{src.path}: column {feature.column!r} has {int((~np.isfinite(values)).sum())} "
                        "NaN or infinite values")
    norm = feature.normalizer
    if norm is not None:
        if norm.log1p:
            values = np.sign(values) * np.log1p(np.abs(values))
        values = (values - np.float32(norm.mean)) / np.float32(norm.std)
        if valid is not None and nulls:
            values[~valid] = 0.0
    return values.reshape(-1, dim)
