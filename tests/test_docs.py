"""The paper around the code: the README's first lines, links that resolve, a docs tree
that stands alone (a clone has nothing outside the repository to point to)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pool

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# Outside tools read these two commands from the README's first lines: keep them as they are.
COMMANDS = [
    "./dev dispatcher run examples/jobs.jsonl    # send the example jobs (to ./outbox when no relay is configured)",
    "./dev pytest                                # run the tests",
]

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md"))]


def test_readme_starts_with_the_name_a_sentence_and_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# smtp-dispatcher"
    assert lines[1] == ""
    assert lines[2] and not lines[2].startswith(("#", "`", "-"))  # one sentence saying what it is
    assert lines[3] == ""
    assert lines[4].startswith("```")
    assert lines[5:7] == COMMANDS
    assert lines[7] == "```"


def test_readme_is_a_front_door_under_200_lines() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) < 200


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in _pages():
        for target in _LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_nothing_points_outside_the_repository() -> None:
    offenders = []
    for page in [*_pages(), ROOT / "mkdocs.yml", ROOT / "config.example.yaml"]:
        text = page.read_text(encoding="utf-8")
        if "SPEC.md" in text or "../shared" in text or "SPEC section" in text:
            offenders.append(str(page.relative_to(ROOT)))
    assert offenders == []


_OUTSIDE = re.compile(r"\bSPEC\b")
_TEXT = {".py", ".md", ".yml", ".yaml", ".toml", ".json", ".service", ".example", ".cfg", ".txt", ".sh"}
_SKIP = {".venv", ".git", "site", "build", "node_modules", "outbox", "__pycache__"}


def test_no_file_of_the_project_points_to_a_contract_outside_it() -> None:
    """Comments, docstrings and messages name a docs/ page (docs/library.md promise 10),
    never a SPEC a clone does not have."""
    offenders = []
    for path in sorted(ROOT.rglob("*")):
        parts = set(path.relative_to(ROOT).parts)
        if path.suffix not in _TEXT or not path.is_file() or parts & _SKIP or any(p.endswith(".egg-info") for p in parts):
            continue
        if path == Path(__file__).resolve():  # names what it looks for
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if _OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert offenders == [], "point to a docs/ page instead:\n" + "\n".join(offenders)


def test_every_docs_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if p.relative_to(DOCS).as_posix() not in nav]
    assert missing == []


def test_one_version_for_the_command_and_the_library() -> None:
    installed = importlib.metadata.version("smtp-dispatcher")  # pyproject.toml's, as installed
    out = subprocess.run([sys.executable, "-m", "dispatcher", "--version"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert out == f"dispatcher {installed}\n"
    assert pool.__version__ == installed


def test_licence_and_changelog_are_there() -> None:
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## Unreleased" in changelog


def test_the_docs_build_with_no_broken_link_or_reference(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]'; ./dev installs it)")
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
