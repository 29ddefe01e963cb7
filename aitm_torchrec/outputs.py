"""Job output directories: the one protocol that batch scoring and both exports follow.

A job that writes parts on several ranks (scoring, table export) owns its directory through four
files, all written atomically (temporary name, then rename):

- an identity file (scoring: ``job.json``, table export: ``_export.json``), written by rank 0
  before any part: what the output is for (config, checkpoint, inputs, options). A re-run whose
  identity equals the recorded one resumes: complete parts stay, unfinished temporaries of a crash
  are removed. A re-run with another identity stops with an error naming what differs, unless
  ``overwrite``, which removes the old output first. A non-empty directory without an identity
  file is not a job's output and is never written into.
- the parts, each renamed into place when complete (``files.atomic_write``);
- ``manifest.json`` (every part with its rows and sha256), written by rank 0 after every rank
  finished its parts;
- ``_SUCCESS``, last. Its absence means the output is incomplete, whatever else is there.

A job that writes one directory in one process (the serving export) builds it under a temporary
name beside the target and renames it into place (``publish_dir``), so the target is either the
old directory or the new one, never half of each.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aitm_torchrec import dist as aitm_dist
from aitm_torchrec.files import write_json_atomic

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any], names: Mapping[str, str] | None = None,
                        shown: Mapping[str, Callable[[Any], str]] | None = None) -> str:
    """The entries of ``new`` that differ from ``old``, as a comma-separated phrase: each key by
    its name in ``names`` (default: the key), followed by ``(was X, now Y)`` for keys in ``shown``
    (formatted by its function). Empty when nothing differs."""
    names, shown = names or {}, shown or {}
    differ = [k for k in [*new, *(k for k in old if k not in new)] if old.get(k) != new.get(k)]
    return ", ".join(names.get(k, k) + (f" (was {shown[k](old.get(k))}, now {shown[k](new.get(k))})"
                                        if k in shown else "") for k in differ)


@dataclass(frozen=True)
class JobOutput:
    """A multi-rank job's output directory (see the module docstring).

    ``holds``: what a mismatching directory holds, for the error (``"scores of another job"``);
    ``difference``: (recorded identity, new identity) -> what differs, for the error;
    ``error``: the exception class the job raises for its users."""

    path: Path
    identity_file: str
    holds: str
    difference: Callable[[dict, dict], str]
    error: Callable[[str], BaseException]

    @property
    def complete(self) -> bool:
        return (self.path / SUCCESS).exists()

    def prepare(self, identity: dict, overwrite: bool, is_main: bool) -> bool:
        """Collective. Rank 0 checks the directory against ``identity`` (a JSON-able dict), removes
        another job's output under ``overwrite``, removes a crash's temporaries, and records
        ``identity``. Every rank returns whether this same job's output was already complete
        (``_SUCCESS``), or raises the same error."""
        message, complete = None, False
        if is_main:
            try:
                complete = self._claim(json.loads(json.dumps(identity)), overwrite) and self.complete
            except OSError as e:
                message = f"{self.path}: cannot prepare the output directory ({e})"
            except ValueError as e:
                message = str(e)
        aitm_dist.agree(message, self.error)
        return bool(aitm_dist.broadcast(complete))

    def _claim(self, identity: dict, overwrite: bool) -> bool:
        """Rank 0's part of ``prepare``; True when the directory already held this job."""
        recorded = self.path / self.identity_file
        before = json.loads(recorded.read_text()) if recorded.exists() else None
        if before is not None and before != identity:
            if not overwrite:
                raise ValueError(f"{self.path}: holds {self.holds}: {self.difference(before, identity)} differ from "
                                 f"{recorded}; use a new --output, or --overwrite to replace it")
            shutil.rmtree(self.path)
            before = None
        elif before is None and self.path.exists() and any(self.path.iterdir()):
            raise ValueError(f"{self.path}: exists and is not the output of this kind of job (no "
                             f"{self.identity_file}); use a new --output")
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in self.path.rglob(".*.tmp"):  # a crash's unfinished part
            tmp.unlink()
        write_json_atomic(recorded, identity)
        return before is not None

    def finish(self, manifest: Callable[[], dict], is_main: bool) -> None:
        """Collective, after every rank wrote its parts: rank 0 writes ``manifest()`` as
        manifest.json, then ``_SUCCESS``; every rank returns once both exist."""
        aitm_dist.barrier()
        if is_main:
            write_json_atomic(self.path / MANIFEST, manifest())
            (self.path / SUCCESS).write_text("")
        aitm_dist.barrier()

    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())


def publish_dir(build: Callable[[Path], Any], output: Path, marker: str, what: str) -> Any:
    """Builds a directory with ``build(tmp)`` under a temporary name beside ``output`` and renames
    it to ``output``; returns what ``build`` returned. An existing ``output`` is replaced only if
    it holds ``marker`` (a file the same kind of job writes) or is empty: anything else raises
    FileExistsError naming it (``what``: what such a directory holds). On failure the temporary
    directory is removed and ``output`` is as it was."""
    output = Path(output)
    if output.exists() and not (output / marker).exists() and any(output.iterdir()):
        raise FileExistsError(f"{output}: exists, is not empty and holds no {what}; choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = build(tmp)
        old = None
        if output.exists():  # moved aside first, deleted once the new one is in place
            old = output.with_name(f".{output.name}.old.{os.getpid()}")
            os.replace(output, old)
        os.replace(tmp, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
