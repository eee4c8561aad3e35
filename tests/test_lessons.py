"""The lessons: every `lessons/NN_topic.py` agrees with its paired notebook, and every notebook runs top to
bottom on this machine (a CPU is enough; GPU-only cells skip themselves) with its final checks passing.

After editing a lesson, re-pair it: `jupytext --sync lessons/NN_topic.py` (Jupyter with jupytext installed
keeps both files in step on save).
"""

from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext", reason="the lessons need the dev extra: pip install -e '.[dev]'")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

LESSONS = Path(__file__).resolve().parents[1] / "lessons"
SCRIPTS = sorted(LESSONS.glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT_S = 120


def cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_lessons_are_numbered_in_order():
    assert [int(p.name[:2]) for p in SCRIPTS] == list(range(1, 13))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_and_notebook_agree(script):
    notebook = script.with_suffix(".ipynb")
    assert notebook.exists(), f"{notebook.name} is missing: run `jupytext --to ipynb lessons/{script.name}`"
    want, got = cells(jupytext.read(script)), cells(jupytext.read(notebook))
    assert got == want, f"{script.name} and {notebook.name} differ: run `jupytext --sync lessons/{script.name}`"
    assert jupytext.read(notebook).metadata["jupytext"]["formats"] == "ipynb,py:percent"


NEEDS = {"10_visualizer": "textual", "09_triton_kernels": "triton"}  # a lesson's optional package


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_lesson_runs(script):
    if script.stem in NEEDS:
        pytest.importorskip(NEEDS[script.stem], reason=f"{script.name} needs {NEEDS[script.stem]}")
    notebook = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",  # the kernel of the Python running the tests
        resources={"metadata": {"path": str(LESSONS)}},  # run where Jupyter would: in lessons/
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    text = [out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])]
    assert "all checks passed" in "".join(text)
