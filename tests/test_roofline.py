"""The roofline (benchmarks/roofline.py) on hand-made event lists with numbers worked out by hand, its
context rebuilding against what a real engine ran, and the end-to-end benchmark's smoke run on a CPU."""

import json
import subprocess
import sys
import time

import pytest

import nanoserve as ns
from nanoserve_sched import SamplingParams
from nanoserve_viz.trace import Pages, Preempted, RequestArrived, RequestFinished, RunInfo, StepScheduled
from tests.conftest import ROOT
from tests.test_greedy import workload

sys.path.insert(0, str(ROOT / "benchmarks"))
from roofline import gpu_specs, measure_bandwidth, model_sizes, roofline, step_work  # noqa: E402

# 2 layers of width 4, vocabulary 10, context 16: 600 parameters (wte 40, wpe 64, 2 x 244 per layer, ln_f 8),
# 384 of them in the linear layers; in fp16 a token's K and V take 2 x 2 layers x 4 x 2 bytes = 32 bytes
TINY = dict(vocab_size=10, n_positions=16, n_embd=4, n_layer=2)


def two_requests(preempt: bool):
    """a (3-token prompt) and b (2-token prompt): a prefill step, a decode step, then a step in which b
    either decodes its 4th token or, preempted, recomputes its 4 tokens from scratch."""
    ev = [
        RunInfo(0.0, num_blocks=8, block_size=4),
        RequestArrived(0.0, "a", 3),
        RequestArrived(0.0, "b", 2),
        StepScheduled(0.1, 0, ["a", "b"], [3, 2], [True, True]),
        StepScheduled(0.2, 1, ["a", "b"], [1, 1], [False, False]),
    ]
    if preempt:
        ev += [Preempted(0.25, 2, "b"), StepScheduled(0.3, 2, ["a", "b"], [1, 4], [False, True])]
    else:
        ev += [StepScheduled(0.3, 2, ["a", "b"], [1, 1], [False, False])]
    return ev + [RequestFinished(3.0, "a", "length", 3, 3), RequestFinished(4.0, "b", "length", 2, 3)]


def test_model_sizes_count_the_parameters_of_the_model():
    assert model_sizes(TINY) == dict(params=600, linear_params=384, lm_head_params=40, attention_width=16)
    gpt = ns.GPT(ns.GPTConfig(**TINY, n_head=2))
    assert sum(p.numel() for p in gpt.parameters()) == 600
    assert model_sizes(ns.GPT2_FAMILY["gpt2"])["params"] == 124_439_808  # GPT-2 "124M"


def test_roofline_of_a_hand_computed_run_with_a_preemption():
    # step 0: contexts 3 and 2, 5 new tokens, both sample. bytes 1200 + 5*32 read + 5*32 written = 1520;
    #   flops 2*384*5 + 2*40*2 + 4*2*4*((1+2+3) + (1+2)) = 3840 + 160 + 288 = 4288
    # step 1: a 3 -> 4, b 2 -> 3. bytes 1200 + 7*32 + 2*32 = 1488; flops 1536 + 160 + 32*(4 + 3) = 1920
    # step 2: a 4 -> 5; b preempted: 0 -> 4 again. bytes 1200 + 9*32 + 5*32 = 1648;
    #   flops 2*384*5 + 160 + 32*(5 + (1+2+3+4)) = 3840 + 160 + 480 = 4480
    # at 1000 B/s and 2000 flop/s: max(1.52, 2.144) + max(1.488, 0.96) + max(1.648, 2.24) = 5.872 s
    r = roofline(two_requests(preempt=True), TINY, 2, bandwidth_bytes_per_s=1000, peak_flops=2000)
    assert r["bytes"] == dict(weights=3600, kv_read=(5 + 7 + 9) * 32, kv_write=(5 + 2 + 5) * 32)
    assert r["flops"] == dict(linear=2 * 384 * 12, lm_head=2 * 40 * 6, attention=32 * (9 + 7 + 15))
    assert r["roofline_s"] == pytest.approx(5.872)
    assert (r["steps"], r["memory_bound_steps"]) == (3, 1)
    assert r["wall_s"] == pytest.approx(4.0)  # first arrival to last finish, from the same events
    assert r["wall_over_roofline"] == pytest.approx(4.0 / 5.872)
    assert r["roofline_frac"] == pytest.approx(5.872 / 4.0)


def test_a_preemption_makes_the_recomputation_count():
    kept = roofline(two_requests(preempt=False), TINY, 2, 1000, 2000, wall_s=10.0)
    redone = roofline(two_requests(preempt=True), TINY, 2, 1000, 2000, wall_s=10.0)
    # without it, b's last step reads 4 keys and writes 1; recomputing, it reads 4 and writes all 4
    assert kept["bytes"]["kv_read"] == redone["bytes"]["kv_read"]
    assert redone["bytes"]["kv_write"] - kept["bytes"]["kv_write"] == 3 * 32
    assert redone["flops"]["attention"] - kept["flops"]["attention"] == 32 * ((1 + 2 + 3 + 4) - 4)
    assert redone["roofline_s"] > kept["roofline_s"]
    assert redone["roofline_frac"] == pytest.approx(redone["roofline_s"] / 10.0)


def test_a_prefix_hit_is_not_recomputed_and_a_chunk_samples_only_at_the_prompt_end():
    ev = [
        RunInfo(0.0, num_blocks=8, block_size=4),
        RequestArrived(0.0, "c", 10),
        Pages(0.0, "shared", "c", [5, 6]),  # 8 tokens from the cache
        StepScheduled(0.1, 0, ["c"], [1], [True]),
        RequestArrived(0.2, "d", 6),
        StepScheduled(0.3, 1, ["c", "d"], [1, 4], [True, True]),  # d's first chunk: no sample
        StepScheduled(0.4, 2, ["c", "d"], [1, 2], [True, True]),
    ]
    assert [work for _, work in step_work(ev)] == [
        [("c", 8, 1, False)],
        [("c", 9, 1, True), ("d", 0, 4, False)],
        [("c", 10, 1, True), ("d", 4, 2, True)],
    ]
    r = roofline(ev, TINY, 2, 1e9, 1e12, wall_s=1.0)
    assert r["flops"]["lm_head"] == 2 * 40 * 3
    assert r["bytes"]["kv_read"] == (9 + 10 + 4 + 11 + 6) * 32


@pytest.mark.parametrize("sched", ["sync", "async"])
def test_contexts_rebuilt_from_events_match_what_the_engine_ran(tiny_gpt2, sched):
    """A tiny page pool forces preemptions, shared prompts give prefix hits; the rebuilt (start, tokens)
    of every request in every step must be what the runner was handed."""
    llm = ns.LLM(str(tiny_gpt2), sched=sched, num_gpu_blocks_override=12, block_size=8)
    truth, prepare = {}, llm.runner.prepare
    llm.runner.prepare = lambda b: (
        truth.__setitem__(b.step, [(r.request.request_id, r.start, len(r.token_ids)) for r in b.requests]) or prepare(b)
    )
    prompts, max_tokens = workload()
    llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens], use_tqdm=False)
    events = llm.recorder.events
    assert any(isinstance(e, Preempted) for e in events)
    assert any(isinstance(e, Pages) and e.kind == "shared" for e in events)
    rebuilt = {e.step: [(rid, start, n) for rid, start, n, _ in work] for e, work in step_work(events)}
    assert rebuilt == truth


def test_measured_bandwidth_and_datasheet_peaks():
    assert measure_bandwidth("cpu", nbytes=2**22, repeats=3) > 0.1  # GB/s: any machine copies faster
    assert gpu_specs("NVIDIA H100 80GB HBM3")["bf16_tflops"] == pytest.approx(989.5)
    assert gpu_specs("NVIDIA H100 PCIe")["bf16_tflops"] < gpu_specs("NVIDIA H200")["bf16_tflops"]
    assert gpu_specs("NVIDIA H200")["bandwidth_gbs"] > gpu_specs("NVIDIA H100 80GB HBM3")["bandwidth_gbs"]
    assert gpu_specs("NVIDIA A100-SXM4-80GB")["bandwidth_gbs"] == 2039 and gpu_specs("NVIDIA L4") is None


@pytest.mark.slow  # ~25 s on a shared 2-core machine, most of it importing torch and transformers
def test_bench_e2e_smoke_on_cpu(tmp_path):
    """The end-to-end benchmark with tiny settings: every system that can run on a CPU runs, agrees with
    nanoserve's tokens (float32), and the JSON holds what a reader of the results needs."""
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--device", "cpu", "--model", "distilgpt2"]
    cmd += ["--num-prompts", "4", "--input-len", "8:16", "--output-len", "4:8", "--warmup-prompts", "1"]
    cmd += ["--output-json", str(out)]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert time.perf_counter() - t < 120
    assert "output tokens/s" in r.stdout and "% of roofline" in r.stdout
    d = json.loads(out.read_text())
    assert {"torch", "transformers", "device"} <= d["env"].keys()
    assert d["check"]["tokens_match"] and d["check"]["max_abs_logit_diff"] < 1e-3
    s = d["systems"]
    assert set(s) == {"nanoserve", "nanoserve-eager", "nanoserve-sync", "hf-cb", "hf-cb-sync", "hf-static"}
    assert "skipped" in s["nanoserve-eager"] and "skipped" in s["hf-cb-sync"]  # they need CUDA
    ran = ["nanoserve", "nanoserve-sync", "hf-cb", "hf-static"]
    want = d["workload"]["output_tokens"]
    for name in ran:
        assert s[name]["output_tokens"] == want and s[name]["output_throughput"] > 0 and s[name]["wall_s"] > 0, name
        assert not s[name].get("error"), name
    for name in ran[1:]:
        assert s[name]["agreement"]["same_tokens"] == 1.0, name  # float32: the same greedy tokens everywhere
    assert s["hf-cb"]["settings"]["cuda_graphs"] in ([False, False], False)
    rf = s["nanoserve"]["roofline"]
    assert 0 < rf["roofline_s"] < rf["wall_s"] and rf["wall_over_roofline"] > 1 and 0 < rf["roofline_frac"] < 1
    assert rf["steps"] == s["nanoserve"]["metrics"]["steps"]
