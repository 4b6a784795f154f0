"""The documentation site: its generated pages equal the code, and it builds with every
link resolving (`mkdocs build --strict`, as CI's docs step)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "docs"))

import generate_reference  # noqa: E402


@pytest.mark.parametrize("page", ["parameters.md", "cli.md"])
def test_generated_page_equals_the_code(page):
    path = generate_reference.PAGES / page
    expected = generate_reference.pages()[path]
    assert path.read_text(encoding="utf-8") == expected, (
        f"docs/reference/{page} differs from the code: run python docs/generate_reference.py"
    )


def build_site(top, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=top,
        capture_output=True,
        text=True,
    )


def test_site_builds_with_every_link_resolving(tmp_path):
    result = build_site(TOP, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(TOP / "mkdocs.yml", copy)
    shutil.copytree(TOP / "docs", copy / "docs")
    with open(copy / "docs" / "index.md", "a", encoding="utf-8") as page:
        page.write("\nSee [nowhere](no-such-page.md).\n")
    result = build_site(copy, tmp_path)
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def test_every_command_s_help_says_its_defaults_and_refusals():
    """`candle-ckpt COMMAND --help` alone tells an operator what DIR and EPOCH default
    to, which forms are accepted, and what the command refuses (issue 30)."""
    from candle_ckpt.operator.cli import build_parser

    helps = {
        name: sub.format_help()
        for name, sub in generate_reference._subparsers(build_parser()).items()
    }
    assert len(helps) == 8
    for name, text in helps.items():
        assert "(default ./save)" in " ".join(text.split()), name
    for name in ("info", "verify", "export"):
        assert "a number, last or best (default last)" in " ".join(helps[name].split())
    for name in ("rollback", "prune"):
        text = " ".join(helps[name].split())
        assert "ckpts/.lock (exit 2" in text and "between jobs" in text, name
    rollback = " ".join(helps["rollback"].split())
    assert "an epoch number" in rollback and "last and best are refused" in rollback
    assert "does not verify (exit 1)" in rollback
