"""The correctness oracle: with greedy sampling in fp32, every scheduler generates exactly the tokens of
transformers' greedy `generate`, whatever the batching, paging, chunking, preemption or prefix caching."""

import random

import pytest
import torch

import nanoserve as ns
from nanoserve_kernels import reference
from nanoserve_sched import SCHEDULERS, SamplingParams
from nanoserve_viz.trace import Pages, Preempted, Span, StepScheduled


def workload(seed=0, vocab=383):
    """Prompts of varied lengths crossing page boundaries, three sharing a 40-token prefix."""
    rng = random.Random(seed)
    rand = lambda n: [rng.randrange(vocab) for _ in range(n)]
    shared = rand(40)
    prompts = [rand(n) for n in (1, 3, 15, 16, 17, 31, 33, 50)] + [shared + rand(n) for n in (1, 9, 23)]
    max_tokens = [rng.randint(4, 24) for _ in prompts]
    return prompts, max_tokens


def run(model_dir, sched, **kw):
    llm = ns.LLM(str(model_dir), sched=sched, **kw)
    prompts, max_tokens = workload()
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens], use_tqdm=False)
    assert all(o.error is None for o in outs)
    llm.scheduler.blocks.check()
    assert llm.scheduler.blocks.num_free_blocks == llm.scheduler.config.num_blocks, "a page leaked"
    return llm, [o.outputs[0].token_ids for o in outs]


def expected(hf_greedy):
    prompts, max_tokens = workload()
    return [hf_greedy(p, m) for p, m in zip(prompts, max_tokens)]


CASES = {
    "default": dict(),
    "block_size_1": dict(block_size=1, num_gpu_blocks_override=2000),
    "block_size_7": dict(block_size=7),  # divides none of the lengths
    "chunked_prefill": dict(max_num_batched_tokens=7, block_size=4),
    "preemption": dict(num_gpu_blocks_override=12, block_size=8),
    "no_prefix_caching": dict(enable_prefix_caching=False, block_size=4),
    "max_num_seqs_2": dict(max_num_seqs=2),
    "pp_2": dict(pp=2, max_num_batched_tokens=40, block_size=4),
    "pp_3_preemption": dict(pp=3, num_gpu_blocks_override=14, block_size=8),
    "pp_2_chunked": dict(pp=2, max_num_batched_tokens=9, block_size=4),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(tiny_gpt2, hf_greedy, sched, case):
    check_greedy(tiny_gpt2, sched, case, expected(hf_greedy))


def check_greedy(model, sched: str, case: str, want: list[list[int]]):
    """Run CASES[case] under `sched` and compare with transformers' tokens `want`; check that the case's
    mechanism (pipeline stages, preemption, chunks, prefix hits) really happened. tests/test_llama.py too."""
    if CASES[case].get("pp", 1) > 1 and SCHEDULERS[sched].allow_placeholders:  # refused, saying what to use
        with pytest.raises(ValueError, match="use --sched sync or balanced with --pp"):
            run(model, sched, **CASES[case])
        return
    llm, got = run(model, sched, **CASES[case])
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i}: {g} != transformers {w}"
    events = llm.recorder.events
    if case.startswith("pp"):
        lanes = {e.lane for e in events if isinstance(e, Span)}
        assert {f"device/{k}" for k in range(CASES[case]["pp"])} <= lanes, "every pipeline stage should have run"
    if "preemption" in case:
        assert any(isinstance(e, Preempted) for e in events), "the tiny pool should have forced a preemption"
    if case == "chunked_prefill":
        assert max(sum(e.num_tokens) for e in events if isinstance(e, StepScheduled)) <= 7
    # the prompts sharing a prefix arrive together: balanced (hits_within_collect False) cannot share pages
    # another request of the same collect writes, and gets its hits only when chunks spread the prompts over steps
    if case == "chunked_prefill" or case == "default" and SCHEDULERS[sched].hits_within_collect:
        assert any(isinstance(e, Pages) and e.kind == "shared" for e in events), "expected a prefix-cache hit"


@pytest.mark.parametrize("sched", ["sync", "async"])
def test_rows_in_slices_change_no_token(tiny_gpt2, hf_greedy, monkeypatch, sched):
    """A CPU takes a step's rows through the MLP CPU_ROWS at a time (nanoserve.plus_rowwise): at 5 rows every
    step of the workload is cut in slices, most with a short last one, and the tokens are still transformers'."""
    monkeypatch.setattr(ns, "CPU_ROWS", 5)
    check_greedy(tiny_gpt2, sched, "default", expected(hf_greedy))


def test_plus_rowwise_slices_are_x_plus_fn_of_x(monkeypatch):
    monkeypatch.setattr(ns, "CPU_ROWS", 4)
    x, sizes = torch.randn(11, 3), []
    fn = lambda h: sizes.append(len(h)) or h.cumsum(dim=1) * 2  # of each row alone
    assert torch.equal(ns.plus_rowwise(x, fn), x + x.cumsum(dim=1) * 2) and sizes == [4, 4, 3]
    sizes.clear()
    assert torch.equal(ns.plus_rowwise(x[:4], fn), x[:4] + x[:4].cumsum(dim=1) * 2) and sizes == [4]  # one piece


def test_stop_on_eos_matches_transformers(tmp_path, hf_greedy):
    """A model whose EOS is a token it actually generates: both stop there, EOS included."""
    from tests.conftest import save_tiny_gpt2

    prompts, _ = workload()
    folder = save_tiny_gpt2(tmp_path)
    probe = ns.LLM(str(folder))
    outs = probe.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    eos = outs[0].outputs[0].token_ids[3]  # a token greedy decoding really emits
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (folder / "config.json").write_text(json.dumps(cfg))
    llm = ns.LLM(str(folder))
    got = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)
    assert got[0].outputs[0].finish_reason == "stop" and got[0].outputs[0].token_ids[-1] == eos
    for o, full in zip(got, outs):  # stops at the first EOS, else runs to max_tokens
        full_ids = full.outputs[0].token_ids
        cut = full_ids.index(eos) + 1 if eos in full_ids else 30
        assert o.outputs[0].token_ids == full_ids[:cut]
    ignore = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert ignore[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_stop_token_ids(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2))
    prompts, _ = workload()
    full = llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    stop = full[2].outputs[0].token_ids[5]
    cut = llm.generate(
        prompts[:4], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=(stop,)), use_tqdm=False
    )
    for f, c in zip(full, cut):
        f = f.outputs[0].token_ids
        n = f.index(stop) + 1 if stop in f else len(f)
        assert c.outputs[0].token_ids == f[:n]
    assert cut[2].outputs[0].finish_reason == "stop" and cut[2].outputs[0].stop_reason == stop


def test_steps_mixing_decodes_and_chunks_attend_to_each_kind_apart(tiny_gpt2, monkeypatch):
    """The reference plans a mixed step's decodes and chunks apart; each such call equals the padded one."""
    split_steps = []
    attend = reference.paged_attention

    def checked(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx, plan=None):
        out = attend(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx, plan=plan)
        if isinstance(plan, reference.ByKindPlan):
            split_steps.append(len(plan.kinds))  # the kinds present: 2
            padded = reference.paged_attention_padded(
                q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx
            )
            torch.testing.assert_close(out, padded)
        return out

    monkeypatch.setattr(reference, "paged_attention", checked)
    run(tiny_gpt2, "sync", max_num_batched_tokens=24, block_size=4, attention="reference")
    assert len(split_steps) >= 5 and set(split_steps) == {2}


def test_context_limit_finishes_with_length(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2), max_model_len=24)
    out = llm.generate([list(range(20))], SamplingParams(temperature=0, max_tokens=100), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"


def test_abort_frees_pages(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2), num_gpu_blocks_override=64, block_size=4)
    prompts, _ = workload()
    reqs = [llm.add_request(p, SamplingParams(temperature=0, max_tokens=20)) for p in prompts]
    for step, _ in enumerate(llm.run()):
        if step == 3:
            llm.abort(reqs[5].request_id)  # running
            llm.abort(reqs[-1].request_id)
        llm.scheduler.blocks.check()
    assert reqs[5].finish_reason.value == "abort"
    assert all(r.finished for r in reqs)
    assert llm.scheduler.blocks.num_free_blocks == 64


def test_a_request_added_mid_run_is_served_before_later_arrivals(tiny_gpt2):
    """add_request while driving run() step by step: the new request is admitted at once, not behind one
    that arrives later, and it gets the tokens it would get alone."""
    prompts, _ = workload()
    params = SamplingParams(temperature=0, max_tokens=4)
    alone = ns.LLM(str(tiny_gpt2)).generate([prompts[3]], params, use_tqdm=False)[0].outputs[0].token_ids
    llm = ns.LLM(str(tiny_gpt2))
    llm.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    late = llm.add_request(prompts[1], params, arrival_s=600.0)  # ten minutes from now
    steps = llm.run()
    next(steps)
    new = llm.add_request(prompts[3], params)
    for _ in range(20):
        next(steps)
        if new.finished:
            break
    assert new.output_token_ids == alone and late in llm.pending
    llm.abort(late.request_id)
    for _ in steps:
        pass
    assert late.finish_reason.value == "abort"


def test_num_cached_tokens_counts_the_prefix_hit(tiny_gpt2):
    """A second run of prompts sharing 40 tokens: whole pages of the shared prefix come from the cache."""
    prompts, _ = workload()
    shared = prompts[-3:]  # 40 shared tokens, then 1, 9 and 23 of their own
    llm = ns.LLM(str(tiny_gpt2), block_size=8)
    params = SamplingParams(temperature=0, max_tokens=3)
    first = llm.generate(shared[:1], params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    again = llm.generate(shared, params, use_tqdm=False)
    # the first prompt's 41 tokens left 5 full pages; one token is always recomputed
    assert [o.num_cached_tokens for o in again] == [40, 40, 40]
    off = ns.LLM(str(tiny_gpt2), block_size=8, enable_prefix_caching=False).generate(shared, params, use_tqdm=False)
    assert [o.num_cached_tokens for o in off] == [0, 0, 0]
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in off]


def test_stream_yields_every_token_in_order(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2))
    prompts, _ = workload()
    params = SamplingParams(temperature=0, max_tokens=6)
    streamed = {}
    for out in llm.stream(prompts[:3], params):
        streamed.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    outs = ns.LLM(str(tiny_gpt2)).generate(prompts[:3], params, use_tqdm=False)
    assert list(streamed.values()) == [o.outputs[0].token_ids for o in outs]
