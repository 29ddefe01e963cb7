"""Ali-CCP raw files -> Parquet for configs/aitm_aliccp.yaml, as in the official AITM preprocessing.

Input (``--raw DIR``; format in ``docs/data.md``): header-less CSV files

    sample_skeleton_{train,test}.csv : sample_id, click, buy, common_feature_index (md5),
                                       feature_num, feature_list
    common_features_{train,test}.csv : common_feature_index (md5), feature_num, feature_list

where ``feature_list`` is entries ``field \\x02 id \\x03 value`` joined by ``\\x01``. A sample's
features are its own entries plus those of the common-features row with its md5.

What is kept (the official AITM preprocessing):
- the 18 fields 101 121 122 124 125 126 127 128 129 205 206 207 216 508 509 702 853 301;
- ids seen more than ``--min-count`` times (default 10) among the kept training impressions (an id
  of a common-features row counts once per impression that uses it); rarer ids, and test ids not
  seen in training, become the shared "rare" id -1 (raw ids are non-negative, so -1 is never real);
- rows with click = 0 and buy = 1 are dropped (counted and reported).

Output: ``OUT/train/part-00000.parquet``, ``OUT/test/part-00000.parquet``, ``OUT/_SUCCESS``
(JSON stats, written last), with columns

    sample_id : int64
    click     : int8 0/1           (label of the ``click`` tower)
    purchase  : int8 0/1           (the raw ``buy``; label of the ``purchase`` tower)
    f101 ... f301 : int64 for a field with at most one id per training row (null: absent), or
               list<int64> for a field with several ids in some training row (``multi_fields`` in
               _SUCCESS). configs/aitm_aliccp.yaml reads every field as a TagFeature, which takes
               both forms. In the test split, extra ids of a single-id field are dropped (counted).

Memory: the skeleton files are streamed one CSV block (``--block-mb``) at a time. The join holds
the common features of one split in memory, reduced to the 18 fields: per row its md5 string
(~40 B) plus ~17 B per kept id (Ali-CCP train: ~730k rows x ~10 kept ids, about 150 MB), never
the long raw feature lists. Id counts take 16 B per distinct id. The train split is read twice
(count, then write); outputs are written under temporary names and renamed when complete.

Command:  python -m datasets.aliccp --raw data/aliccp_raw --out data/aliccp [--min-count 10]
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq
from tqdm import tqdm

FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "216",
          "508", "509", "702", "853", "301")
RARE_ID = -1
SKELETON_COLUMNS = ["sample_id", "click", "buy", "common_feature_index", "feature_num", "feature_list"]
COMMON_COLUMNS = ["common_feature_index", "feature_num", "feature_list"]
_FIELD_SET = pa.array(FIELDS)


def column_name(field: str) -> str:
    return f"f{field}"


@dataclass
class Entries:
    """Kept feature entries of M rows: row index, field index (into FIELDS), id; in row order."""

    row: np.ndarray
    field: np.ndarray
    ids: np.ndarray


def parse_feature_list(feature_list: pa.Array, path: Path) -> Entries:
    """``field\\x02id\\x03value`` entries joined by ``\\x01`` -> the entries of the 18 fields."""
    entries = pc.split_pattern(feature_list.fill_null(""), "\x01")
    row = pc.list_parent_indices(entries)
    flat = pc.list_flatten(entries)
    nonempty = pc.greater(pc.utf8_length(flat), 0)  # an empty feature_list has no entries
    flat, row = flat.filter(nonempty), row.filter(nonempty)
    parts = pc.split_pattern(flat, "\x02", max_splits=1)
    if len(flat) and pc.min(pc.list_value_length(parts)).as_py() < 2:
        raise ValueError(f"{path}: feature_list has an entry without \\x02 (expected field\\x02id\\x03value)")
    field = pc.list_element(parts, 0)
    keep = pc.is_in(field, value_set=_FIELD_SET)
    field, rest, row = field.filter(keep), pc.list_element(parts, 1).filter(keep), row.filter(keep)
    id_text = pc.list_element(pc.split_pattern(rest, "\x03", max_splits=1), 0)
    try:
        ids = pc.cast(id_text, pa.int64())
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path}: feature_list has a non-integer id ({e})") from None
    return Entries(row.to_numpy().astype(np.int64), pc.index_in(field, value_set=_FIELD_SET).to_numpy().astype(np.int8),
                   ids.to_numpy())


def _csv(path: Path, columns: list[str], block_mb: int) -> pv.CSVStreamingReader:
    types = {c: pa.string() for c in ("common_feature_index", "feature_list")}
    types.update({c: pa.int64() for c in ("sample_id", "click", "buy", "feature_num")})
    return pv.open_csv(path, read_options=pv.ReadOptions(column_names=columns, block_size=block_mb << 20),
                       parse_options=pv.ParseOptions(delimiter=",", quote_char=False),
                       convert_options=pv.ConvertOptions(column_types={c: types[c] for c in columns}))


class CommonFeatures:
    """One split's common features, reduced to the 18 fields: md5 -> CSR of (field, id)."""

    def __init__(self, path: Path, block_mb: int) -> None:
        md5s, rows, fields, ids = [], [], [], []
        n = 0
        for batch in tqdm(_csv(path, COMMON_COLUMNS, block_mb), desc=path.name, unit=" blocks"):
            e = parse_feature_list(batch.column("feature_list"), path)
            md5s.append(batch.column("common_feature_index"))
            rows.append(e.row + n), fields.append(e.field), ids.append(e.ids)
            n += batch.num_rows
        self.md5 = pa.chunked_array(md5s, pa.string()).combine_chunks() if md5s else pa.array([], pa.string())
        row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.field = np.concatenate(fields) if fields else np.zeros(0, np.int8)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.lengths = np.bincount(row, minlength=n).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.row_of_entry = row
        if pc.count_distinct(self.md5).as_py() != n:
            raise ValueError(f"{path}: common_feature_index values are not unique")

    def lookup(self, md5: pa.Array) -> np.ndarray:
        """Row of each md5, -1 where there is none."""
        return pc.index_in(md5, value_set=self.md5).fill_null(-1).to_numpy().astype(np.int64)

    def gather(self, rows: np.ndarray) -> Entries:
        """Entries of common rows ``rows`` (-1: none) for M samples, tagged with the sample index."""
        has = rows >= 0
        lengths = np.where(has, self.lengths[np.maximum(rows, 0)], 0)
        starts = self.offsets[np.maximum(rows, 0)]
        out_off = np.cumsum(lengths) - lengths
        idx = np.repeat(starts - out_off, lengths) + np.arange(int(lengths.sum()))
        return Entries(np.repeat(np.arange(len(rows)), lengths), self.field[idx], self.ids[idx])


class IdCounts:
    """Per field, sorted distinct ids and their counts (16 B per distinct id)."""

    def __init__(self) -> None:
        self.ids = [np.zeros(0, np.int64) for _ in FIELDS]
        self.counts = [np.zeros(0, np.int64) for _ in FIELDS]

    def add(self, e: Entries, weights: np.ndarray | None = None) -> None:
        for f in range(len(FIELDS)):
            sel = e.field == f
            if not sel.any():
                continue
            w = weights[sel] if weights is not None else np.ones(int(sel.sum()), np.int64)
            ids = np.concatenate([self.ids[f], e.ids[sel]])
            uniq, inv = np.unique(ids, return_inverse=True)
            counts = np.bincount(inv, weights=np.concatenate([self.counts[f], w]), minlength=len(uniq))
            self.ids[f], self.counts[f] = uniq, counts.astype(np.int64)

    def vocabulary(self, min_count: int) -> list[np.ndarray]:
        """Per field, the sorted ids seen more than ``min_count`` times."""
        return [ids[c > min_count] for ids, c in zip(self.ids, self.counts)]


def _multi(e: Entries, n_rows: int) -> np.ndarray:
    """Per field: does any row hold more than one id of it?"""
    out = np.zeros(len(FIELDS), bool)
    if len(e.row):
        per = np.bincount(e.row * len(FIELDS) + e.field, minlength=n_rows * len(FIELDS))
        out = per.reshape(n_rows, len(FIELDS)).max(axis=0) > 1
    return out


def count_train(raw: Path, common: CommonFeatures, block_mb: int) -> tuple[IdCounts, np.ndarray]:
    """Pass 1 over the training skeleton: id counts per field over kept impressions, multi fields."""
    counts = IdCounts()
    refs = np.zeros(len(common.lengths), np.int64)
    multi = _multi(Entries(common.row_of_entry, common.field, common.ids), len(common.lengths))
    path = raw / "sample_skeleton_train.csv"
    for batch in tqdm(_csv(path, SKELETON_COLUMNS, block_mb), desc=f"count {path.name}", unit=" blocks"):
        keep = ~_click0_buy1(batch)
        e = parse_feature_list(batch.column("feature_list"), path)
        kept_entry = keep[e.row]
        e = Entries(e.row[kept_entry], e.field[kept_entry], e.ids[kept_entry])
        counts.add(e)
        multi |= _multi(e, batch.num_rows)
        rows = common.lookup(batch.column("common_feature_index"))[keep]
        refs += np.bincount(rows[rows >= 0], minlength=len(refs))
    # an id of a common row counts once per kept impression that uses the row
    counts.add(Entries(common.row_of_entry, common.field, common.ids), refs[common.row_of_entry])
    return counts, multi


def _click0_buy1(batch: pa.RecordBatch) -> np.ndarray:
    click = batch.column("click").to_numpy(zero_copy_only=False)
    buy = batch.column("buy").to_numpy(zero_copy_only=False)
    return (click == 0) & (buy == 1)


def write_split(raw: Path, split: str, out: Path, common: CommonFeatures, vocab: list[np.ndarray],
                multi: np.ndarray, block_mb: int) -> dict:
    """Pass 2: stream the skeleton, join, filter ids, write ``out/part-00000.parquet`` atomically."""
    path = raw / f"sample_skeleton_{split}.csv"
    out.mkdir(parents=True, exist_ok=True)
    final = out / "part-00000.parquet"
    tmp = out / ".part-00000.parquet.tmp"
    schema = pa.schema([("sample_id", pa.int64()), ("click", pa.int8()), ("purchase", pa.int8())]
                       + [(column_name(f), pa.list_(pa.int64()) if m else pa.int64()) for f, m in zip(FIELDS, multi)])
    stats = Counter()
    extra = Counter()
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in tqdm(_csv(path, SKELETON_COLUMNS, block_mb), desc=f"write {path.name}", unit=" blocks"):
                bad = _click0_buy1(batch)
                for c in ("click", "buy"):
                    y = batch.column(c)
                    if y.null_count or not pc.all(pc.is_in(y, value_set=pa.array([0, 1]))).as_py():
                        raise ValueError(f"{path}: column {c!r} must be 0/1 without empty values")
                stats["rows_in"] += batch.num_rows
                stats["dropped_click0_buy1"] += int(bad.sum())
                keep = np.flatnonzero(~bad)
                batch = batch.take(pa.array(keep))
                n = batch.num_rows
                own = parse_feature_list(batch.column("feature_list"), path)
                rows = common.lookup(batch.column("common_feature_index"))
                stats["rows_without_common_features"] += int((rows < 0).sum())
                shared = common.gather(rows)
                cols = {"sample_id": batch.column("sample_id"),
                        "click": pc.cast(batch.column("click"), pa.int8()),
                        "purchase": pc.cast(batch.column("buy"), pa.int8())}
                for f, field in enumerate(FIELDS):
                    cols[column_name(field)] = _field_column(f, own, shared, n, vocab[f], multi[f], extra, stats)
                writer.write_table(pa.table(cols, schema=schema))
                stats["rows_out"] += n
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    stats = dict(stats)
    stats["extra_ids_dropped"] = {column_name(k): v for k, v in extra.items() if v}
    return stats


def _field_column(f: int, own: Entries, shared: Entries, n: int, vocab: np.ndarray, multi: bool,
                  extra: Counter, stats: Counter) -> pa.Array:
    a, b = own.field == f, shared.field == f
    row = np.concatenate([own.row[a], shared.row[b]])
    ids = np.concatenate([own.ids[a], shared.ids[b]])
    order = np.argsort(row, kind="stable")  # a sample's own ids first, then its common ones
    row, ids = row[order], ids[order]
    pos = np.searchsorted(vocab, ids)
    known = (pos < len(vocab)) & (vocab[np.minimum(pos, len(vocab) - 1)] == ids) if len(vocab) else np.zeros(len(ids), bool)
    stats["rare_ids"] += int((~known).sum())
    ids = np.where(known, ids, RARE_ID)
    lengths = np.bincount(row, minlength=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if multi:
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids, pa.int64()))
    extra[FIELDS[f]] += int(np.maximum(lengths - 1, 0).sum())
    has = lengths > 0
    first = np.zeros(n, np.int64)
    first[has] = ids[offsets[:-1][has]]
    return pa.array(first, pa.int64(), mask=~has)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--raw", required=True, help="directory with sample_skeleton_*.csv and common_features_*.csv")
    p.add_argument("--out", default="data/aliccp", help="output directory")
    p.add_argument("--min-count", type=int, default=10, help="keep ids seen more than this many times in train")
    p.add_argument("--block-mb", type=int, default=16, help="CSV block size (MB), the streaming unit")
    args = p.parse_args(argv)
    raw, out = Path(args.raw), Path(args.out)
    for name in ("sample_skeleton_train.csv", "common_features_train.csv"):
        if not (raw / name).exists():
            p.error(f"{raw / name} not found")
    common = CommonFeatures(raw / "common_features_train.csv", args.block_mb)
    counts, multi = count_train(raw, common, args.block_mb)
    vocab = counts.vocabulary(args.min_count)
    stats: dict = {"min_count": args.min_count,
                   "vocabulary": {column_name(f): int(len(v)) for f, v in zip(FIELDS, vocab)},
                   "multi_fields": [column_name(f) for f, m in zip(FIELDS, multi) if m]}
    stats["train"] = write_split(raw, "train", out / "train", common, vocab, multi, args.block_mb)
    del common
    if (raw / "sample_skeleton_test.csv").exists():
        test_common = CommonFeatures(raw / "common_features_test.csv", args.block_mb)
        stats["test"] = write_split(raw, "test", out / "test", test_common, vocab, multi, args.block_mb)
    tmp = out / "._SUCCESS.tmp"
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, out / "_SUCCESS")
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
