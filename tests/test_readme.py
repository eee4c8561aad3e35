"""The README as a user reads it: its Python example runs as written, and every nanoserve command it shows
is one the command line accepts (a renamed flag would otherwise leave the README wrong without a sound)."""

import shlex
import subprocess
import sys

import pytest

from nanoserve_entrypoints.cli import build_parser
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str, lang: str | None = None) -> list[str]:
    """The fenced blocks of `text` (of one language, if given), in order."""
    blocks, current, fence_lang = [], None, None
    for line in text.splitlines(keepends=True):
        if line.startswith("```") and current is None:
            current, fence_lang = [], line[3:].strip()
        elif line.startswith("```"):
            if lang is None or fence_lang == lang:
                blocks.append("".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def commands(prog: str) -> list[str]:
    """Every `prog ...` line of the README's code blocks, continuation lines joined, comments left out."""
    found = []
    for block in code_blocks(README):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith(prog):
                found.append(shlex.split(line, comments=True)[len(shlex.split(prog)) :])
    return found


def test_the_python_api_example_runs_as_written(tmp_path):
    (example,) = code_blocks(section("The Python API"), "python")
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + example
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["0", "1"]  # request ids, in order
    assert all(line.split()[-1] in ("length", "stop") for line in lines[:2])
    assert len("".join(lines[2:])) > 0, "the stream printed no text"


@pytest.mark.parametrize("argv", commands("python nanoserve.py"), ids=" ".join)
def test_every_command_in_the_readme_parses(argv):
    if argv[:1] == ["serve"]:
        from nanoserve_entrypoints.openai import build_parser as serve_parser

        serve_parser().parse_args(argv[1:])
    else:
        build_parser().parse_args(argv)


def test_the_readme_shows_the_commands_a_user_needs():
    found = commands("python nanoserve.py")
    assert ["--sched", "async"] in found and ["--sched", "sync", "--viz"] in found
    assert any(a[:1] == ["serve"] for a in found) and any("--device" in a for a in found)
    assert "{{" not in README, "a placeholder was left in the README"
