"""The tiny examples in docstrings are tests too: a learner copies them, so they must stay true."""

import doctest

import pytest

import nanoserve as ns
import nanoserve_sched
import nanoserve_sched.blocks
import nanoserve_sched.request

CHEAP = [nanoserve_sched, nanoserve_sched.blocks, nanoserve_sched.request, ns.EngineConfig, ns.Tokenizer, ns.GPT]


@pytest.mark.parametrize("obj", CHEAP, ids=lambda o: getattr(o, "__name__", str(o)))
def test_docstring_examples(obj):
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(obj, globs=None)
    assert any(t.examples for t in tests), f"{obj} has no examples"
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, runner.summarize()
