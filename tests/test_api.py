"""The Python API a vLLM user expects: outputs shaped like vLLM's, `n` samples sharing their prompt's pages,
stop strings, log-probabilities, and streams of new text that never split a character."""

import math

import pytest
import torch

import nanoserve as ns
from nanoserve_sched import SamplingParams
from tests.conftest import save_tiny_gpt2
from tests.test_greedy import workload

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's real tokenizer (its byte-level BPE splits characters across tokens)."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("text-model"), vocab_size=50257, with_tokenizer=True)


def test_outputs_are_shaped_like_vllms(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2))
    [out] = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    assert isinstance(out, ns.RequestOutput) and out.finished and out.prompt is None
    assert out.request_id == "0" and out.prompt_token_ids == [5, 6, 7] and out.num_cached_tokens == 0
    [c] = out.outputs
    assert isinstance(c, ns.CompletionOutput) and c.index == 0 and len(c.token_ids) == 12
    assert c.finish_reason == "length" and c.stop_reason is None and c.logprobs is None
    m = out.metrics
    assert 0 <= m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_n_samples_share_the_prompts_pages(tiny_gpt2):
    """n copies of one prompt: the first computes the prompt's pages, the others take them from the prefix
    cache in the same step (one physical page, several owners: a reference count above one)."""
    llm = ns.LLM(str(tiny_gpt2), block_size=4)
    prompt = workload()[0][7]  # 50 tokens: 12 full pages
    shared = []
    llm.scheduler.blocks.on_event = lambda kind, rid, pages: kind == "shared" and shared.append((rid, pages))
    [out] = llm.generate([prompt], SamplingParams(n=4, temperature=0, max_tokens=6), use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1, "greedy samples are the same"
    assert {rid for rid, _ in shared} == {"1_0", "2_0", "3_0"} and all(len(p) == 12 for _, p in shared)
    assert llm.scheduler.blocks.num_free_blocks == llm.num_blocks
    seeded = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in seeded.outputs}) == 3, "sample i draws with seed + i"
    again = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in seeded.outputs]


def stop_across_tokens(llm, prompt):
    """A stop string that ends inside one token and starts in the one before: its last letter of a token
    and the first letter of the next."""
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    pieces = [llm.tokenizer.decode([t]) for t in full.token_ids]
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 1 and len(pieces[i + 1]) >= 2)
    at = len("".join(pieces[: k + 1])) - 1  # the stop string begins at token k's last character
    stop = full.text[at : at + 3]
    return full, stop, at, k


def test_a_stop_string_across_a_token_boundary(text_model):
    llm = ns.LLM(str(text_model))
    prompt = "The quick brown fox"
    full, stop, at, k = stop_across_tokens(llm, prompt)
    assert full.text.find(stop) == at, "pick a first occurrence"
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.text == full.text[:at] and c.finish_reason == "stop" and c.stop_reason == stop
    assert c.token_ids == full.token_ids[: k + 2], "up to the token that completed the stop string"
    kept = SamplingParams(temperature=0, max_tokens=24, stop=stop, include_stop_str_in_output=True)
    assert llm.generate([prompt], kept, use_tqdm=False)[0].outputs[0].text == full.text[: at + len(stop)]
    streamed = "".join(
        o.outputs[0].text for o in llm.stream([prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    )
    assert streamed == full.text[:at]


def test_min_tokens_holds_back_the_stop(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2))
    prompt = workload()[0][4]
    full = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop = full[1]
    early = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]), use_tqdm=False)
    late = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop], min_tokens=5)
    held = llm.generate([prompt], late, use_tqdm=False)[0].outputs[0]
    assert early[0].outputs[0].token_ids == full[: full.index(stop) + 1]
    assert len(held.token_ids) >= 5 and held.token_ids == full[: len(held.token_ids)]


def test_logprobs_are_the_models_from_the_same_logits(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2))
    prompt = workload()[0][5]
    c = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(c.logprobs) == 5 and all(len(d) == 3 for d in c.logprobs)  # greedy: the sampled one is the top one
    seq = list(prompt)
    with torch.no_grad():
        for t, d in zip(c.token_ids, c.logprobs):
            want = llm.model(torch.tensor([seq]))[0, -1].log_softmax(-1)
            top = want.topk(3)
            assert list(d) == top.indices.tolist() and [v.rank for v in d.values()] == [1, 2, 3]
            assert [v.logprob for v in d.values()] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert d[t].logprob == pytest.approx(want[t].item(), abs=1e-4)
            seq.append(t)
    assert c.cumulative_logprob == pytest.approx(sum(d[t].logprob for t, d in zip(c.token_ids, c.logprobs)))
    sampled = SamplingParams(temperature=1.0, seed=1, max_tokens=6, logprobs=0)
    d = llm.generate([prompt], sampled, use_tqdm=False)[0].outputs[0]
    assert all(list(x) == [t] and math.isfinite(x[t].logprob) for t, x in zip(d.token_ids, d.logprobs))


def forced_output(llm, ids):
    """Make the engine 'sample' `ids` in order, for the one request it runs."""
    it = iter(ids)
    llm.runner.sample = lambda logits, s: torch.tensor([next(it)] * logits.shape[0])


def test_a_stream_never_splits_a_character(text_model):
    llm = ns.LLM(str(text_model))
    text = "héllo 日本語 ok, ŝ👍!"
    ids = llm.tokenizer.encode(text)
    assert any(llm.tokenizer.decode([t]).count("\ufffd") for t in ids), "some character must span tokens"
    forced_output(llm, ids)
    chunks = [o.outputs[0].text for o in llm.stream([[1, 2, 3]], SamplingParams(max_tokens=len(ids), ignore_eos=True))]
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)
    assert "" in chunks, "a token that completes no character comes with no text of its own"


def test_a_stream_takes_params_per_prompt_and_yields_a_failed_prompts_error(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2))
    prompts = [[5, 6], [], [7, 8, 9]]
    params = [SamplingParams(temperature=0, max_tokens=3), GREEDY, SamplingParams(temperature=0, max_tokens=5)]
    got = {}
    for out in llm.stream(prompts, params):
        got.setdefault(out.request_id, []).append(out)
    assert [sum(len(o.outputs[0].token_ids) for o in got[rid]) for rid in ("0", "2")] == [3, 5]
    [failed] = got["1"]
    assert failed.finished and failed.outputs[0].finish_reason == "error" and "prompt is empty" in failed.error
    assert got["0"][-1].finished and got["0"][-1].outputs[0].finish_reason == "length"
    assert all(not o.finished for o in got["2"][:-1]), "only the last output of a request is finished"


def test_abort_stops_a_request_and_frees_its_pages(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2))
    req = llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=50))
    steps = llm.run()
    next(steps)
    llm.abort(req.request_id)
    for _ in steps:
        pass
    out = llm.output(req)
    assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) < 50
    assert llm.scheduler.blocks.num_free_blocks == llm.num_blocks
