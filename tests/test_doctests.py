"""The tiny examples in docstrings are tests too: a learner copies them, so they must stay true.

Every module of the project is searched, not a chosen few: an example no test runs goes stale unseen.
The Triton kernels' examples run in the interpreter on a CPU, in a process of their own (it must be set
before triton is imported, and the other tests import the kernels without it).
"""

import doctest
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["nanoserve_sched", "nanoserve_models", "nanoserve_kernels", "nanoserve_viz", "nanoserve_entrypoints"]
KERNELS = "nanoserve_kernels.paged_attention"


def modules() -> list[str]:
    names = ["nanoserve"]
    for pkg in PACKAGES:
        names.append(pkg)
        names += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / pkg)]) if m.name != "__main__"]
    return names


def run_examples(name: str) -> tuple[int, int, str]:
    """(examples, failures, report) of a module's docstring examples."""
    module = importlib.import_module(name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = []
    for t in finder.find(module, module.__name__):
        runner.run(t, out=report.append)
    return runner.tries, runner.failures, "".join(report)


@pytest.mark.parametrize("name", [m for m in modules() if m != KERNELS])
def test_docstring_examples(name):
    _, failures, report = run_examples(name)
    assert failures == 0, report


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels' tests run them for real")
def test_kernel_examples_in_the_interpreter():
    code = (
        "import sys; from tests.test_doctests import run_examples\n"
        f"tries, failures, report = run_examples({KERNELS!r}); print(report); sys.exit(failures > 0 or tries == 0)"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "obj", ["nanoserve_sched", "nanoserve_sched.blocks", "nanoserve_sched.request", "EngineConfig", "Tokenizer", "GPT"]
)
def test_the_first_things_a_learner_reads_have_examples(obj):
    """The scheduler package, the page table, requests and the engine's config, tokenizer and model show
    themselves in an example each (they run above, with their modules)."""
    import nanoserve as ns

    target = getattr(ns, obj) if hasattr(ns, obj) else importlib.import_module(obj)
    assert any(t.examples for t in doctest.DocTestFinder().find(target)), f"{obj} has no examples"
