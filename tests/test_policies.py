"""Scheduling policies driven without a model (pure Python): properties of the batches they form."""

import random
from collections import deque

import hypothesis.strategies as st
from hypothesis import given, settings

from nanoserve_sched import EngineConfig, Request, SamplingParams, make_scheduler

requests_st = st.lists(st.tuples(st.integers(1, 90), st.integers(1, 12)), min_size=1, max_size=24)
config_st = st.fixed_dictionaries(
    dict(
        block_size=st.sampled_from([1, 4, 16]),
        max_num_batched_tokens=st.integers(16, 120),
        max_num_seqs=st.integers(1, 16),
        num_blocks=st.integers(24, 200),
    )
)


def drive(name, cfg, reqs, pp=1, on_batch=lambda batch, inflight: None):
    """The engine loop with a fake device that returns random tokens; returns every batch formed."""
    longest = max(n_prompt + n_out for n_prompt, n_out in reqs)  # the pool must hold any one request alone
    cfg = {**cfg, "num_blocks": max(cfg["num_blocks"], -(-longest // cfg["block_size"]))}
    sched = make_scheduler(EngineConfig(sched=name, pp=pp, max_model_len=1024, **cfg))
    rng = random.Random(0)
    for i, (n_prompt, n_out) in enumerate(reqs):
        ids = [rng.randrange(50) for _ in range(n_prompt)]
        sched.add_request(Request(ids, SamplingParams(max_tokens=n_out, ignore_eos=True), request_id=str(i)))
    inflight, batches = deque(), []
    for _ in range(5000):
        if not (sched.has_work() or inflight):
            break
        if len(inflight) < sched.depth and (batch := sched.schedule()):
            on_batch(batch, inflight)
            inflight.append(batch)
            batches.append(batch)
            continue
        if inflight:
            done = inflight.popleft()
            sched.update(done, [rng.randrange(50) for _ in done.sampled])
        sched.blocks.check()
    assert not sched.has_work() and not inflight, "the run did not finish"
    assert sched.blocks.num_free_blocks == sched.config.num_blocks, "a page leaked"
    return batches


@settings(max_examples=60, deadline=None)
@given(cfg=config_st, reqs=requests_st, pp=st.integers(2, 4))
def test_balanced_microbatches_are_disjoint_and_even(cfg, reqs, pp):
    def check(batch, inflight):
        ids = {r.request.request_id for r in batch.requests}
        for other in inflight:  # never a request in two microbatches in flight
            assert not ids & {r.request.request_id for r in other.requests}

    batches = drive("balanced", cfg, reqs, pp, check)
    # microbatches cut in one round (consecutive steps handed out together) differ by at most one chunk
    rounds, current = [], []
    for b in batches:
        current.append(b)
        if len(current) == pp:
            rounds.append(current)
            current = []
    first = rounds[0] if rounds else [batches[0]]
    sizes = [b.num_tokens for b in first]
    biggest = max(len(r.token_ids) for b in first for r in b.requests)
    assert max(sizes) - min(sizes) <= biggest


@settings(max_examples=60, deadline=None)
@given(cfg=config_st, reqs=requests_st)
def test_page_aligned_chunks_are_whole_pages(cfg, reqs):
    bs = cfg["block_size"]
    for batch in drive("page-aligned", cfg, reqs):
        for r in batch.requests:
            final = r.start + len(r.token_ids) >= r.request.num_prompt_tokens
            if r.is_prefill:
                assert r.start % bs == 0, "a prefill chunk starts on a page boundary"
                if not final:
                    assert len(r.token_ids) % bs == 0, "a non-final prefill chunk is whole pages"


@settings(max_examples=40, deadline=None)
@given(cfg=config_st, reqs=requests_st)
def test_sync_respects_budget_and_max_num_seqs(cfg, reqs):
    for batch in drive("sync", cfg, reqs):
        assert batch.num_tokens <= cfg["max_num_batched_tokens"]
        assert len(batch.requests) <= cfg["max_num_seqs"]


def test_balanced_spreads_a_burst_over_every_stage():
    """24 prompts of 100 tokens arriving together, 4 stages: sync fills the first microbatch with the whole
    2048-token budget and the next ones get leftovers; balanced cuts four even ones. Later sync's decodes
    stay lopsided (21 and 3 requests), while balanced keeps four microbatches of six."""
    reqs = [(100, 8)] * 24
    cfg = dict(block_size=16, max_num_batched_tokens=2048, max_num_seqs=256, num_blocks=4096)
    sync, balanced = (drive(name, cfg, reqs, pp=4) for name in ("sync", "balanced"))
    assert [b.num_tokens for b in sync[:3]] == [2048, 300, 72]
    assert [b.num_tokens for b in balanced[:4]] == [600] * 4
    decode = lambda batches: {b.num_tokens for b in batches if not any(r.is_prefill for r in b.requests)}
    assert decode(sync) >= {3, 21} and decode(balanced) == {6}
