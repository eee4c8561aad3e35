"""Sampling: the support of top-k and top-p, seeds, and temperature 0."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nanoserve as ns
from nanoserve_sched import SamplingParams

PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.fixture(scope="module")
def runner():
    llm = ns.LLM("distilgpt2", load_format="dummy", num_gpu_blocks_override=8)
    return llm.runner


def support(runner, n=400, **kw):
    logits = torch.tensor([[math.log(p) for p in PROBS]] * n)
    params = [SamplingParams(**kw)] * n
    return set(runner.sample(logits, ns.Sampling.of(params, list(range(n)), 4, "cpu")).tolist())


@pytest.mark.parametrize(
    ("kw", "want"),
    [
        (dict(), {0, 1, 2, 3}),
        (dict(top_k=1), {0}),
        (dict(top_k=2), {0, 1}),
        (dict(top_k=3), {0, 1, 2}),
        (dict(top_p=0.4), {0}),
        (dict(top_p=0.75), {0, 1}),
        (dict(top_p=0.9), {0, 1, 2}),
        (dict(top_k=3, top_p=0.75), {0, 1}),
        (dict(temperature=0), {0}),
    ],
)
def test_support_is_exactly_right(runner, kw, want):
    assert support(runner, **kw) == want


ROW = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0, 0.8, 1.0, 2.0]),  # each keeps every token's chance >= 3%: 1,000 draws
        "top_k": st.sampled_from([0, 1, 2, 3]),  # see the whole support
        "top_p": st.sampled_from([1.0, 0.4, 0.75, 0.9]),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ROW, min_size=2, max_size=4))
def test_each_row_of_a_mixed_batch_samples_by_its_own_parameters(runner, rows):
    """A step stages only the parameters some row uses (no greedy mask if no row is greedy, no temperatures if
    all are 1, no top-k if no row cuts): a mixed batch must still give every row the support it has alone."""
    n = 1000
    logits = torch.tensor([[math.log(p) for p in PROBS]] * (n * len(rows)))
    params = [SamplingParams(**kw) for kw in rows for _ in range(n)]
    ids = runner.sample(logits, ns.Sampling.of(params, list(range(len(params))), 4, "cpu")).view(len(rows), n)
    for kw, got in zip(rows, ids):
        assert set(got.tolist()) == support(runner, n=n, **kw), kw


def test_frequencies_follow_probs(runner):
    n = 4000
    logits = torch.tensor([[math.log(p) for p in PROBS]] * n)
    ids = runner.sample(logits, ns.Sampling.of([SamplingParams()] * n, [0] * n, 4, "cpu"))
    freq = torch.bincount(ids, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor(PROBS), atol=0.03)


def test_temperature_zero_is_argmax(runner):
    logits = torch.randn(16, 50)
    ids = runner.sample(logits, ns.Sampling.of([SamplingParams(temperature=0)] * 16, [0] * 16, 50, "cpu"))
    assert ids.tolist() == logits.argmax(-1).tolist()


def test_same_seed_same_tokens_whatever_the_batch(tiny_gpt2):
    """A seeded request gives the same tokens alone or in a crowd; another seed gives others."""
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12)
    prompt = list(range(10))
    alone = ns.LLM(str(tiny_gpt2)).generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    crowd = (
        ns.LLM(str(tiny_gpt2))
        .generate(
            [[5] * 30, prompt, [7] * 3],
            [SamplingParams(max_tokens=5), seeded, SamplingParams(max_tokens=20)],
            use_tqdm=False,
        )[1]
        .outputs[0]
        .token_ids
    )
    other = (
        ns.LLM(str(tiny_gpt2))
        .generate([prompt], SamplingParams(temperature=1.0, seed=99, max_tokens=12), use_tqdm=False)[0]
        .outputs[0]
        .token_ids
    )
    assert alone == crowd
    assert alone != other
