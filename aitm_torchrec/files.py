"""Files: input paths expanded the same way for every input kind, and outputs every job writes
the same way: atomically (temporary name, then rename), with sha256 checksums in manifests."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from aitm_torchrec.features import DataError


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in blocks (hashlib's file_digest)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yields the temporary path to write ``path`` under (``.<name>.tmp`` beside it); renames it to
    ``path`` when the block completes, removes it when the block raises. So ``path`` is either
    absent, or as it was, or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` at ``path``, written under a temporary name, then renamed."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, written under a temporary name, then renamed."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def expand_paths(paths: Sequence[str], what: str = "input", kind: str = "Parquet",
                 directory_glob: str = "*.parquet") -> list[str]:
    """Files, globs and directories -> file list, each path's files sorted. A directory gives
    every file below it matching ``directory_glob``, without hidden or ``_``-prefixed names
    (``_SUCCESS``, temporaries). A path matching no file is a DataError naming it."""
    files: list[str] = []
    for p in map(str, paths):
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "**", directory_glob), recursive=True)
                           if os.path.isfile(f) and not os.path.basename(f).startswith((".", "_")))
        elif any(c in p for c in "*?["):
            found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
        else:
            found = [p] if os.path.isfile(p) else []
        if not found:
            raise DataError(f"{what} path {p!r} matches no {kind} file")
        files += found
    return files
