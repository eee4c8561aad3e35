"""The names nanoserve installs are its own. A package called `sched` or `kernels` shadows, or is shadowed by,
the standard library's `sched` and the `kernels` package transformers imports; only names under our
distribution's name are safe, wherever the checkout or the wheel sits on sys.path."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def installed_top_level_names() -> set[str]:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(tool["py-modules"]) | {p.split(".")[0] for p in tool["packages"]}


def test_every_name_we_install_is_ours():
    names = installed_top_level_names()
    assert "nanoserve" in names
    for name in names:
        assert name == "nanoserve" or name.startswith("nanoserve_"), f"{name}: not under our distribution's name"
        assert name not in sys.stdlib_module_names, f"{name}: shadows the standard library's module"
        assert (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file(), f"{name}: in pyproject, not in the checkout"


def test_every_package_in_the_checkout_is_installed():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= installed_top_level_names(), "a package of the checkout that pip install would leave out"


def test_importing_nanoserve_leaves_other_modules_alone(tmp_path):
    """After `import nanoserve`, sys.path is as it was, and `sched` and `kernels` are whatever they were before
    (the standard library's, a third party's or none), so transformers' own imports work as without us."""
    code = (
        "import sys, importlib.util\n"
        f"sys.path.append({str(ROOT)!r})\n"  # as an installed package: last on the path, not first
        "path = list(sys.path)\n"
        "where = lambda n: getattr(importlib.util.find_spec(n), 'origin', None)\n"
        "before = {n: where(n) for n in ('sched', 'kernels', 'models', 'viz', 'entrypoints')}\n"
        "import sched as stdlib_sched\n"  # imported first, as a script of the user's might
        "import nanoserve\n"
        "assert sorted(nanoserve.SCHEDULERS) == ['async', 'balanced', 'page-aligned', 'sync']\n"
        "after = {n: where(n) for n in before}\n"
        "assert sys.path == path, (path, sys.path)\n"
        "assert before == after, (before, after)\n"
        "import sched\n"
        "assert sched is stdlib_sched and hasattr(sched, 'scheduler'), sched\n"  # the standard library's
        "if importlib.util.find_spec('transformers.integrations.hub_kernels'):\n"  # 5.x: it imports `kernels`
        "    from transformers.integrations import hub_kernels\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
