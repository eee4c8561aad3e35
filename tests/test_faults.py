"""An engine that survives its own errors: a failed step, an abandoned stream, several threads, a hung device.

A failure in the forward, in sampling, in launching or in the update finishes the requests of the batches in
flight with an error naming the exception; their pages go back to the pool; the same engine then serves the
next call with exactly the tokens it would have given anyway.
"""

import threading
import time

import pytest

import nanoserve as ns
from nanoserve_sched import SCHEDULERS, SamplingParams
from nanoserve_viz.trace import RequestFinished
from tests.test_greedy import workload

GREEDY = SamplingParams(temperature=0, max_tokens=12)
CONFIGS = [(s, 1) for s in SCHEDULERS] + [(s, 2) for s in SCHEDULERS if not SCHEDULERS[s].allow_placeholders]


def engine(model_dir, sched, pp, **kw):
    return ns.LLM(str(model_dir), sched=sched, pp=pp, block_size=4, max_num_batched_tokens=32, **kw)


@pytest.fixture(scope="module")
def reference(tiny_gpt2):
    prompts = workload()[0]
    return prompts, [o.outputs[0].token_ids for o in ns.LLM(str(tiny_gpt2)).generate(prompts, GREEDY, use_tqdm=False)]


def assert_sound(llm, reference):
    """No page held, the invariants hold, and a new call gets the right tokens."""
    blocks = llm.scheduler.blocks
    blocks.check()
    assert blocks.num_free_blocks == llm.num_blocks, "a page leaked"
    assert not llm.inflight and not llm.requests
    prompts, want = reference
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == want
    assert blocks.num_free_blocks == llm.num_blocks


def inject(obj, name, at_call: int, clock):
    """Make obj.name raise on its at_call-th call (counting from 1); returns a list that gets the time it did."""
    original, calls, when = getattr(obj, name), [], []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == at_call:
            when.append(clock())
            raise RuntimeError("injected failure")
        return original(*a, **kw)

    setattr(obj, name, failing)
    return when


WHERE = {  # where a step can fail: (object, attribute) of the engine
    "forward": lambda llm: (llm.model, "layers"),
    "sampling": lambda llm: (llm.runner, "sample"),
    "launch": lambda llm: (llm.runner, "prepare"),
    "update": lambda llm: (llm.scheduler, "update"),
}


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize(("sched", "pp"), CONFIGS)
def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(tiny_gpt2, reference, sched, pp, where):
    llm = engine(tiny_gpt2, sched, pp)
    obj, name = WHERE[where](llm)
    when = inject(obj, name, 3 * pp, llm.recorder.now)  # a few steps in: some requests run, others wait
    outs = llm.generate(reference[0], GREEDY, use_tqdm=False)
    failed = [o for o in outs if o.outputs[0].finish_reason == "error"]
    assert failed, "the injected failure should have failed the requests in flight"
    assert all("failed: RuntimeError: injected failure" in o.error for o in failed)
    errors = [e.t for e in llm.recorder.events if isinstance(e, RequestFinished) and e.reason == "error"]
    assert max(errors) - when[0] < 1.0  # the failure surfaced at once
    for o, want in zip(outs, reference[1]):  # the requests that were not in flight finished as usual
        if o.outputs[0].finish_reason != "error":
            assert o.outputs[0].token_ids == want
    setattr(obj, name, getattr(type(obj), name).__get__(obj))  # the fault is gone
    assert_sound(llm, reference)


@pytest.mark.parametrize(("sched", "pp"), CONFIGS)
def test_breaking_out_of_a_stream_leaves_a_sound_engine(tiny_gpt2, reference, sched, pp):
    llm = engine(tiny_gpt2, sched, pp)
    for i, _ in enumerate(llm.stream(reference[0], GREEDY)):
        if i == 10:
            break
    assert llm.scheduler.blocks.num_free_blocks == llm.num_blocks  # the abandoned requests' pages, at once
    assert_sound(llm, reference)


@pytest.mark.parametrize(("sched", "pp"), [("sync", 1), ("async", 1), ("balanced", 2)])
def test_threads_streaming_on_one_engine_each_get_their_own_outputs(tiny_gpt2, reference, sched, pp):
    llm = engine(tiny_gpt2, sched, pp)
    prompts, want = reference
    got, errors = {}, []

    def client(k):
        try:
            mine = list(range(k, len(prompts), 4))
            tokens = {}
            for out in llm.stream([prompts[i] for i in mine], GREEDY):
                tokens.setdefault(tuple(out.prompt_token_ids), []).extend(out.outputs[0].token_ids)
            got[k] = (mine, tokens)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(got) == 4
    for mine, tokens in got.values():
        assert len(tokens) == len(mine), "a caller got tokens of requests it did not add"
        assert tokens == {tuple(prompts[i]): want[i] for i in mine}
    assert_sound(llm, reference)


def test_threads_adding_requests_while_another_generates(tiny_gpt2, reference):
    """The server's pattern: requests come from other threads while one thread drives the engine."""
    llm = engine(tiny_gpt2, "async", 1)
    prompts, want = reference
    extra = {}

    def add(i):
        extra[i] = llm.add_request(prompts[i], GREEDY)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(0, len(prompts), 2)]
    for t in threads:
        t.start()
    outs = llm.generate(prompts[1::2], GREEDY, use_tqdm=False)
    for t in threads:
        t.join()
    for _ in llm.run():
        pass
    assert [o.outputs[0].token_ids for o in outs] == want[1::2]
    assert {i: r.output_token_ids for i, r in extra.items()} == {i: want[i] for i in extra}
    assert_sound(llm, reference)


def test_a_hung_step_fails_the_run_within_the_watchdog_timeout(tiny_gpt2, reference):
    llm = engine(tiny_gpt2, "sync", 1, step_timeout_s=0.5)
    sample = llm.runner.sample

    def hang(*a, **kw):
        time.sleep(3)
        return sample(*a, **kw)

    llm.runner.sample = hang
    t = time.perf_counter()
    with pytest.raises(ns.EngineDead, match=r"did not finish within step_timeout_s=0.5 s"):
        llm.generate(reference[0], GREEDY, use_tqdm=False)
    assert time.perf_counter() - t < 2.0
    assert llm.scheduler.blocks.num_free_blocks == llm.num_blocks
    with pytest.raises(ns.EngineDead, match="make a new one"):
        llm.generate(reference[0][:1], GREEDY, use_tqdm=False)
