"""EasyRec's Taobao CSV (the seed's ``aitm_on_taobao`` sample data) -> Parquet for configs/aitm_taobao.yaml.

Input: header-less CSV files, one impression per line, columns in the order of
``data_config.input_fields`` of ``tests/fixtures/easyrec/aitm_seed_taobao.config``:

    clk, buy, pid, adgroup_id, cate_id, campaign_id, customer, brand, user_id, cms_segid,
    cms_group_id, final_gender_code, age_level, pvalue_level, shopping_level, occupation,
    new_user_class_level, tag_category_list, tag_brand_list, price

Output: ``OUT/<input file stem>.parquet`` per input file, with exactly these column names:

    clk, buy : int8, 0/1 (a null or other value is an error naming file and column)
    pid ... new_user_class_level : string (EasyRec's STRING input type: hashed as strings by
               hash_bucket_size; an empty field becomes null, i.e. a missing id)
    tag_category_list, tag_brand_list : string, tags joined by "|" as in the CSV (the config's
               TagFeatures split them with ``separator: '|'``); empty -> null (an empty bag)
    price    : int64 (EasyRec's INT32; the config reads it with num_buckets: 50)

Rows keep their order. Memory is bounded by one CSV block (``--block-mb``, default 16 MB) and
one Parquet row group: the file is streamed with ``pyarrow.csv.open_csv``, each block written as
it comes. Each output is written under a temporary name and renamed when complete.

Command:  python -m datasets.taobao_csv data/tb_data/taobao_train_data --out data/taobao/train
          python -m datasets.taobao_csv data/tb_data/taobao_test_data --out data/taobao/eval
then train with ``train_input_path=data/taobao/train eval_input_path=data/taobao/eval``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq
from tqdm import tqdm

LABELS = ("clk", "buy")
ID_COLUMNS = ("pid", "adgroup_id", "cate_id", "campaign_id", "customer", "brand", "user_id", "cms_segid",
              "cms_group_id", "final_gender_code", "age_level", "pvalue_level", "shopping_level",
              "occupation", "new_user_class_level")
TAG_COLUMNS = ("tag_category_list", "tag_brand_list")
COLUMNS = LABELS + ID_COLUMNS + TAG_COLUMNS + ("price",)
SCHEMA = pa.schema([(c, pa.int8()) for c in LABELS] + [(c, pa.string()) for c in ID_COLUMNS + TAG_COLUMNS]
                   + [("price", pa.int64())])


def convert_file(src: Path, dst: Path, block_mb: int = 16, delimiter: str = ",") -> int:
    """Streams one CSV file into one Parquet file (atomically). Returns the number of rows."""
    read = pv.ReadOptions(column_names=list(COLUMNS), block_size=block_mb << 20)
    parse = pv.ParseOptions(delimiter=delimiter, quote_char=False)
    types = {c: pa.int64() for c in LABELS + ("price",)} | {c: pa.string() for c in ID_COLUMNS + TAG_COLUMNS}
    convert = pv.ConvertOptions(column_types=types, strings_can_be_null=True, null_values=[""])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    rows = 0
    try:
        reader = pv.open_csv(src, read_options=read, parse_options=parse, convert_options=convert)
        with pq.ParquetWriter(tmp, SCHEMA) as writer, \
                tqdm(unit=" rows", unit_scale=True, desc=src.name) as bar:
            for batch in reader:
                table = pa.Table.from_batches([batch])
                for c in LABELS:
                    _check_label(table.column(c), src, c)
                writer.write_table(table.cast(SCHEMA))
                rows += table.num_rows
                bar.update(table.num_rows)
        os.replace(tmp, dst)
    except pa.ArrowInvalid as e:
        raise ValueError(f"{src}: not a Taobao CSV with the {len(COLUMNS)} columns {', '.join(COLUMNS)} ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return rows


def _check_label(col: pa.ChunkedArray, src: Path, name: str) -> None:
    if col.null_count:
        raise ValueError(f"{src}: label column {name!r} has {col.null_count} empty values")
    bad = pc.sum(pc.and_(pc.not_equal(col, 0), pc.not_equal(col, 1))).as_py() or 0
    if bad:
        raise ValueError(f"{src}: label column {name!r} has {bad} values other than 0 and 1")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="CSV files (header-less, EasyRec's input_fields order)")
    p.add_argument("--out", required=True, help="output directory: one <stem>.parquet per input")
    p.add_argument("--block-mb", type=int, default=16, help="CSV block size, the memory bound (MB)")
    p.add_argument("--delimiter", default=",")
    args = p.parse_args(argv)
    out = Path(args.out)
    stats = {}
    for name in args.inputs:
        src = Path(name)
        stats[str(out / f"{src.stem}.parquet")] = convert_file(src, out / f"{src.stem}.parquet",
                                                               args.block_mb, args.delimiter)
    print(json.dumps({"rows": stats}))
    return stats


if __name__ == "__main__":
    main()
