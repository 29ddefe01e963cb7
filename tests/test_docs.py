"""The documentation: README.md as a short front door, every relative link in it and in docs/
resolving (file and heading), and every flag of every command's ``--help`` documented in docs/."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Every command users run: (module, argv before --help). Subcommands each have their own flags.
COMMANDS = [
    ("launch.train", []),
    ("launch.score", []),
    ("launch.export", ["embeddings"]),
    ("launch.export", ["model"]),
    ("launch.plan", []),
    ("launch.report", []),
    ("launch.gpu_check", []),
    ("datasets.synthetic", []),
    ("datasets.aliccp", []),
    ("datasets.taobao_csv", []),
    ("aitm_torchrec.easyrec", []),
    ("aitm_torchrec.checkpoint", ["verify"]),
]
BENCHMARKS = ["data", "train", "export", "score", "serve", "zch", "quality", "peer", "all", "study", "family", "eval_memory", "true_form"]

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings (lower case, punctuation dropped, spaces to
    hyphens, repeats numbered)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_a_front_door_of_at_most_250_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_to_a_file_and_heading_in_the_repository(page):
    broken = []
    for m in _LINK.finditer(_FENCE.sub("", page.read_text())):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            assert target.startswith("https://"), f"{page.name}: {target} is not a public URL"
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or REPO not in resolved.parents and resolved != REPO:
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def _flags(module: str, argv: list[str], capsys) -> set[str]:
    main = importlib.import_module(module).main
    try:  # argparse exits 0 after --help; TorchElastic's @record turns that exit into a return
        main([*argv, "--help"])
    except SystemExit as stop:
        assert stop.code in (0, None), module
    text = capsys.readouterr().out
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9_-]*)", text)) - {"--help"}


def test_every_flag_of_every_command_is_documented(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal width, which can split a flag
    docs = "\n".join(p.read_text() for p in PAGES if p.parent.name == "docs")
    missing, seen = {}, set()
    commands = [*COMMANDS, *(("benchmarks.run", [name]) for name in BENCHMARKS)]
    for module, argv in commands:
        flags = _flags(module, argv, capsys)
        seen |= flags
        absent = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", docs))
        if absent:
            missing[" ".join([module, *argv])] = absent
    assert len(seen) > 80, f"only {len(seen)} flags read from --help: is the pattern still right?"
    assert not missing, f"flags missing from docs/: {missing}"
