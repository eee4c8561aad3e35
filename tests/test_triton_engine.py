"""The engine on the Triton kernels (interpreted on a CPU, compiled on a GPU): the same greedy tokens as
transformers, through the eager path and through the static decode buffers that CUDA graphs replay."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when nanoserve_kernels.paged_attention is imported

import nanoserve as ns
from nanoserve_sched import SamplingParams
from tests.test_greedy import workload

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# where these tests run: compiled on a GPU (marked `cuda`, so `pytest -m cuda` selects them), interpreted on
# a CPU (TRITON_INTERPRET=1 must be set before the kernels are imported, so one process does one or the other)
ON = pytest.mark.cuda if DEVICE == "cuda" else pytest.mark.interpreted


@ON
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "decode-graphs"])
@pytest.mark.parametrize("sched", ["sync", "async"])
def test_triton_engine_matches_transformers(tiny_gpt2, hf_greedy, graphs, sched):
    llm = ns.LLM(
        str(tiny_gpt2),
        sched=sched,
        attention="triton",
        cuda_graphs=graphs,
        device=DEVICE,
        dtype="float32",
        max_num_seqs=12,
        block_size=8,
        num_gpu_blocks_override=40,
    )
    assert llm.runner.ops.__name__ == "nanoserve_kernels.paged_attention"
    replays = []
    if graphs:  # count the decode steps that went through the static buffers
        run = llm.runner.graphs.run
        llm.runner.graphs.run = lambda x: replays.append(x.num_rows) or run(x)
    prompts, max_tokens = workload()
    prompts, max_tokens = prompts[:6], [min(m, 8) for m in max_tokens[:6]]
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(p, m) for p, m in zip(prompts, max_tokens)]
    llm.scheduler.blocks.check()
    if graphs:
        assert len(replays) >= 5 and set(replays) > {6}, "decode steps should replay, with several batch sizes"


def test_triton_backend_off_cuda_needs_the_interpreter(tiny_gpt2, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the Triton backend is the default")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="need a CUDA GPU; on a CPU set TRITON_INTERPRET=1"):
        ns.LLM(str(tiny_gpt2), attention="triton")


@ON
@pytest.mark.parametrize("sched", ["sync", "balanced"])
def test_triton_pipeline_matches_transformers(tiny_gpt2, hf_greedy, sched):
    """--pp 2: on a CPU a thread per stage, on a GPU a CUDA stream per stage with microbatches overlapping."""
    llm = ns.LLM(
        str(tiny_gpt2),
        sched=sched,
        pp=2,
        attention="triton",
        device=DEVICE,
        dtype="float32",
        max_num_seqs=12,
        block_size=8,
        num_gpu_blocks_override=40,
    )
    if DEVICE == "cuda":
        assert len(llm.runner.streams) == 2
    prompts, max_tokens = workload()
    prompts, max_tokens = prompts[:6], [min(m, 8) for m in max_tokens[:6]]
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(p, m) for p, m in zip(prompts, max_tokens)]
    llm.scheduler.blocks.check()


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "decode-graphs"])
def test_a_decode_step_launches_without_a_host_sync(tiny_gpt2, graphs):
    """On the GPU a decode step's forward and sampling queue their kernels without waiting for the device:
    torch raises on any synchronizing call while `set_sync_debug_mode("error")` is on (the CPU version of
    this check is in tests/test_host_path.py)."""
    llm = ns.LLM(str(tiny_gpt2), sched="async", cuda_graphs=graphs, device="cuda", dtype="float32")
    stage, checked = llm.runner.stage, []

    def strict(k, x, h, timer):
        if x.meta.max_q > 1:
            return stage(k, x, h, timer)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return stage(k, x, h, timer)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(x.num_rows)

    llm.runner.stage = strict
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3, max_tokens=8)
    outs = llm.generate(workload()[0][:6], params, use_tqdm=False)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    assert len(checked) >= 4
