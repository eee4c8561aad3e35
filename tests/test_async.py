"""The async scheduler: the same tokens as sync while it plans a step ahead, and no hang on failure."""

import json

import pytest

import nanoserve as ns
from nanoserve_sched import SamplingParams
from nanoserve_viz.trace import Discarded
from tests.test_greedy import workload


def outputs(model_dir, sched, params, prompts=None, **kw):
    llm = ns.LLM(str(model_dir), sched=sched, **kw)
    outs = llm.generate(prompts or workload()[0], params, use_tqdm=False)
    llm.scheduler.blocks.check()
    assert llm.scheduler.blocks.num_free_blocks == llm.scheduler.config.num_blocks, "a page leaked"
    return llm, [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


@pytest.mark.parametrize("max_tokens", [1, 2, 3])
def test_short_max_tokens_never_scheduled_past(tiny_gpt2, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    _, sync = outputs(tiny_gpt2, "sync", params)
    llm, asyn = outputs(tiny_gpt2, "async", params)
    assert asyn == sync
    assert all(len(t) == max_tokens for t, _ in asyn)
    assert not any(isinstance(e, Discarded) for e in llm.recorder.events), "computed a token past max_tokens"


@pytest.fixture
def eos_model(tmp_path):
    """The tiny model with its EOS set to a token that greedy decoding emits early for several prompts."""
    from tests.conftest import save_tiny_gpt2

    folder = save_tiny_gpt2(tmp_path)
    _, outs = outputs(folder, "sync", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    counts = {}
    for toks, _ in outs:
        for t in set(toks[:10]):
            counts[t] = counts.get(t, 0) + 1
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_id"] = max(counts, key=counts.get)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_eos_seen_a_step_late_is_discarded(eos_model):
    params = SamplingParams(temperature=0, max_tokens=30)
    _, sync = outputs(eos_model, "sync", params)
    llm, asyn = outputs(eos_model, "async", params, max_num_batched_tokens=16, num_gpu_blocks_override=24, block_size=4)
    assert asyn == sync
    stopped = sum(reason == "stop" for _, reason in sync)
    assert stopped >= 2
    discarded = sum(isinstance(e, Discarded) for e in llm.recorder.events)
    assert 1 <= discarded <= stopped  # at most one wasted token per request stopped by EOS


def test_abort_while_a_step_is_in_flight(tiny_gpt2):
    params = SamplingParams(temperature=0, max_tokens=20)
    prompts = workload()[0]
    _, want = outputs(tiny_gpt2, "sync", params)
    llm = ns.LLM(str(tiny_gpt2), sched="async", num_gpu_blocks_override=64, block_size=4)
    reqs = [llm.add_request(p, params) for p in prompts]
    for step, _ in enumerate(llm.run()):
        if step == 4:  # step 5 is in flight now
            llm.abort(reqs[2].request_id)
            llm.abort(reqs[7].request_id)
        llm.scheduler.blocks.check()
    assert llm.scheduler.blocks.num_free_blocks == 64
    for i, r in enumerate(reqs):
        if i in (2, 7):
            assert r.finish_reason.value == "abort" and r.output_token_ids == want[i][0][: len(r.output_token_ids)]
        else:
            assert (r.output_token_ids, r.finish_reason.value) == want[i]


def test_seeded_sampling_matches_sync(tiny_gpt2):
    params = SamplingParams(temperature=0.9, top_k=50, seed=7, max_tokens=12)
    _, sync = outputs(tiny_gpt2, "sync", params)
    _, asyn = outputs(tiny_gpt2, "async", params, num_gpu_blocks_override=12, block_size=8)
    assert asyn == sync
