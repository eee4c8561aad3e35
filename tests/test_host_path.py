"""The host path: the simulated device, the runner's persistent rows and one-buffer staging, and sampling
that never waits on a device value."""

import gc
import json
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nanoserve as ns
from nanoserve_entrypoints.cli import random_workload
from nanoserve_sched import SCHEDULERS, SamplingParams
from nanoserve_viz.trace import Span
from tests.test_greedy import workload

GPT2 = dict(load_format="dummy", device="sim:h200")


def random_requests(llm, n, in_len=(20, 60), out_len=(10, 30), **params):
    work = random_workload(n, in_len, out_len, llm.model_config.vocab_size, seed=0)
    return [
        llm.add_request(d["prompt_token_ids"], SamplingParams(max_tokens=d["max_tokens"], ignore_eos=True, **params))
        for d in work
    ]


@pytest.mark.parametrize(("sched", "pp"), [(s, 1) for s in SCHEDULERS] + [("sync", 2), ("balanced", 3)])
def test_the_simulated_device_runs_the_real_engine(sched, pp):
    llm = ns.LLM("gpt2", sched=sched, pp=pp, **GPT2)
    assert not any(p.device.type != "meta" for p in llm.model.parameters()), "a simulated device builds no weights"
    reqs = random_requests(llm, 24)
    for _ in llm.run():
        llm.scheduler.blocks.check()
    assert all(r.finish_reason.value == "length" and r.num_output_tokens == r.params.max_tokens for r in reqs)
    assert llm.scheduler.blocks.num_free_blocks == llm.num_blocks
    assert "H200" in llm.describe()["simulated"]
    lanes = {e.lane for e in llm.recorder.events if isinstance(e, Span)}
    assert lanes >= ({"device"} if pp == 1 else {f"device/{k}" for k in range(pp)})


def test_simulated_tokens_are_deterministic_and_the_same_under_every_scheduler():
    outs = {}
    for sched in ("sync", "async"):
        llm = ns.LLM("gpt2", sched=sched, **GPT2)
        reqs = random_requests(llm, 8)
        for _ in llm.run():
            pass
        outs[sched] = [r.output_token_ids for r in reqs]
    assert outs["sync"] == outs["async"]


def test_a_simulated_step_takes_its_roofline_time():
    llm = ns.LLM("gpt2", **GPT2)
    random_requests(llm, 4, in_len=(100, 100), out_len=(3, 3))
    for _ in llm.run():
        pass
    dev = llm.runner.dev
    forward = [e for e in llm.recorder.events if isinstance(e, Span) and e.name == "forward"]
    decode = forward[-1]  # the last step: 4 decodes at contexts 102
    cost = ns.step_cost(dev.sizes, dev.kv_per_token, 2, [1] * 4, [102] * 4, 4)
    cost["flops"].pop("lm_head")
    want = max(sum(cost["bytes"].values()) / 4.8e12, sum(cost["flops"].values()) / 989.5e12)
    assert decode.end - decode.t == pytest.approx(want, rel=1e-6)
    assert 124e6 * 2 / 4.8e12 < want < 2 * 124e6 * 2 / 4.8e12  # GPT-2's weights read once, plus a little KV


def test_the_cli_says_the_device_is_simulated(tmp_path):
    out = tmp_path / "out.json"
    argv = ["--model", "gpt2", "--load-format", "dummy", "--device", "sim:h100", "--workload", "random"]
    argv += ["--num-prompts", "8", "--input-len", "8:16", "--output-len", "4", "--ignore-eos", "--quiet"]
    r = subprocess.run(
        [sys.executable, str(ns.ROOT / "nanoserve.py"), *argv, "--output-json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "SIMULATED" in r.stdout
    cfg = json.loads(out.read_text())["config"]
    assert cfg["device"] == "sim:h100" and "H100" in cfg["simulated"] and cfg["dtype"] == "bfloat16"


def test_the_scheduler_sends_only_the_pages_a_request_gained(tiny_gpt2):
    """The runner keeps each request's page table across steps: over a run, the page ids the batches carry
    are the pages allocated (again after a preemption), not the tables of every request at every step."""
    llm = ns.LLM(str(tiny_gpt2), block_size=4, num_gpu_blocks_override=40)
    sent, tables = [0], [0]
    prepare = llm.runner.prepare

    def counting(batch):
        for r in batch.requests:
            sent[0] += len(r.new_pages)
            tables[0] += len(llm.scheduler.blocks.block_table(r.request.request_id))
        return prepare(batch)

    llm.runner.prepare = counting
    prompts, _ = workload()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    allocated = sum(len(e.pages) for e in llm.recorder.events if getattr(e, "kind", None) in ("allocated", "shared"))
    assert sent[0] == allocated and tables[0] > 4 * sent[0]
    assert all(o.error is None for o in outs)


def test_a_steps_inputs_are_views_of_one_buffer(tiny_gpt2):
    """One buffer per step: on a GPU that is one host-to-device copy (from pinned memory)."""
    llm = ns.LLM(str(tiny_gpt2))
    seen = []
    prepare = llm.runner.prepare
    llm.runner.prepare = lambda batch: seen.append(prepare(batch)) or seen[-1]
    llm.generate(workload()[0][:4], SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_tokens=3), use_tqdm=False)
    x = seen[-1]
    tensors = [x.input_ids, x.positions, x.logits_indices, x.meta.slot_mapping, x.meta.block_tables]
    tensors += [x.sampling.temperature, x.sampling.top_k, x.sampling.top_p]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1


# aten ops that read a device value back on the host, or size a result by the values in it: on a GPU each
# makes the CPU wait for the GPU to catch up (torch.cuda.set_sync_debug_mode names these)
SYNCING_OPS = ("_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "item", "equal")


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNCING_OPS or name == "repeat_interleave" and "output_size" not in (kwargs or {}):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=6),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=6),
        SamplingParams(temperature=1.0, seed=7, max_tokens=6),
    ],
    ids=["greedy", "top-k-top-p", "seeded"],
)
def test_a_decode_step_never_waits_on_a_device_value(tiny_gpt2, params):
    """The forward and sampling of a decode step (on the device thread) read nothing back on the host;
    on CUDA, tests/test_triton_engine.py checks the same with torch.cuda.set_sync_debug_mode("error")."""
    llm = ns.LLM(str(tiny_gpt2))
    stage, counted = llm.runner.stage, []

    def watched(k, x, h, timer):
        if x.meta.max_q > 1:  # prefill chunks may read their lengths back (the CPU attention plans them)
            return stage(k, x, h, timer)
        with CountSyncs() as c:
            out = stage(k, x, h, timer)
        counted.append(c.ops)
        return out

    llm.runner.stage = watched
    outs = llm.generate(workload()[0][:6], params, use_tqdm=False)
    assert all(o.error is None for o in outs)
    assert len(counted) >= 4 and all(ops == [] for ops in counted), counted


def test_seeded_rows_draw_the_same_noise_in_any_batch():
    keys = torch.tensor([11, 12, 13])
    alone = ns.seeded_noise(keys[1:2], 1000)
    crowd = ns.seeded_noise(keys, 1000)
    assert torch.equal(alone[0], crowd[1]) and not torch.equal(crowd[0], crowd[1])
    u = torch.exp(-crowd)  # Exp(1) -> uniform(0, 1)
    assert 0.45 < u.mean() < 0.55 and u.min() > 0 and u.max() < 1


@pytest.mark.parametrize("driver", ["generate", "cli"])
def test_a_steps_host_work_does_not_grow_with_the_finished_requests(driver, monkeypatch):
    """The loop and its callers look at the step's own requests, not at every request of the call: 500 requests
    that finished in the first steps must not cost the 300 steps of a long one a pass each (the progress bars of
    generate and of the CLI once counted every request's `finished` on every step)."""
    from nanoserve_entrypoints.cli import run_with_progress
    from nanoserve_sched.request import Request

    looks, finished = [0], Request.finished.fget

    def counted(req):
        looks[0] += 1
        return finished(req)

    monkeypatch.setattr(Request, "finished", property(counted))

    def run(num_short):
        llm = ns.LLM("gpt2", **GPT2)
        params = [SamplingParams(max_tokens=300, ignore_eos=True)] + [SamplingParams(max_tokens=1)] * num_short
        prompts = [[1, 2, 3]] * (1 + num_short)
        looks[0] = 0
        if driver == "generate":
            llm.generate(prompts, params, use_tqdm=True)
        else:
            run_with_progress(llm, [llm.add_request(p, sp) for p, sp in zip(prompts, params)], "run", show=True)
        return looks[0]

    alone, crowd = run(0), run(500)
    assert crowd - alone < 10 * 501, f"{crowd - alone} more looks at `finished` for 500 finished requests"


RUNS = [(s, "sim:h200") for s in SCHEDULERS] + [("sync", "cpu"), ("async", "cpu")]


@pytest.mark.parametrize(("sched", "device"), RUNS)
def test_a_run_leaves_the_garbage_collector_nothing_to_do(sched, device):
    """Python's collector pauses the host wherever an allocation crosses its threshold, in the middle of a step.
    The engine raises the young generation's threshold (GC_YOUNG), which is only safe because its loop makes
    no reference cycles: every object a step makes is freed by its count. Both are checked: a run of a few
    hundred steps starts at most one collection (at Python's 700 it started 8 or 9), and after it a full collection
    finds nothing (greedy and sampled requests, one aborted mid-run)."""

    llm = ns.LLM(device="cpu", sched=sched) if device == "cpu" else ns.LLM("gpt2", sched=sched, **GPT2)
    assert gc.get_threshold()[0] >= ns.GC_YOUNG
    random_requests(llm, 96, out_len=(60, 120))
    random_requests(llm, 16, out_len=(60, 120), temperature=0.8, top_k=20, seed=1)
    victim = random_requests(llm, 1, out_len=(200, 200))[0]
    gc.collect()
    young = gc.get_stats()[0]["collections"]
    for i, _ in enumerate(llm.run()):
        if i == 20:
            llm.abort(victim.request_id)
    started = gc.get_stats()[0]["collections"] - young
    assert llm.metrics()["steps"] > 100 and victim.finished
    assert started <= 1, f"{started} young collections during one run"
    assert gc.collect() == 0, "the run left reference cycles for the collector"
