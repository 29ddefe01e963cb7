"""What ``pip install .`` gives: the built wheel holds the library (every subpackage), the entry
points and the data set generators, and they run from outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project's wheel, built from this checkout and installed (without dependencies, which
    this venv has) into a directory of its own."""
    root = tmp_path_factory.mktemp("wheel")
    # A copy of the sources, so the build's own directories never land in the checkout.
    source = root / "src"
    def skip(folder: str, names: list[str]) -> set[str]:
        top = {"data", "runs", "build"} if Path(folder) == REPO else set()  # aitm_torchrec/data stays
        return {n for n in names if n in top or n.startswith(".") or n.endswith(".egg-info") or n == "__pycache__"}

    shutil.copytree(REPO, source, ignore=skip)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   check=True, cwd=root, capture_output=True)
    (wheel,) = (root / "dist").glob("aitm_torchrec-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(root / "site"), str(wheel)],
                   check=True, cwd=root, capture_output=True)
    return root / "site"


def _run(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # The installed copy first on the path; run from a directory that is not the checkout.
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_imports_the_library_and_the_generators_from_where_it_is_installed(installed, tmp_path):
    code = ("import aitm_torchrec, aitm_torchrec.data.reader, aitm_torchrec.config, datasets.synthetic, launch.train;"
            "print(aitm_torchrec.__file__, aitm_torchrec.data.reader.__file__, datasets.synthetic.__file__,"
            " launch.train.__file__)")
    out = _run(installed, "-c", code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert len(files) == 4 and all(f.startswith(str(installed)) for f in files), files


def test_an_entry_point_runs_as_a_script_without_path_edits(installed, tmp_path):
    out = _run(installed, str(installed / "launch" / "train.py"), "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--no-resume" in out.stdout
    edits = [f.name for f in (REPO / "launch").glob("*.py") if "sys.path" in f.read_text()]
    assert not edits, f"entry points that edit sys.path: {edits}"
