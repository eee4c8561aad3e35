"""End-to-end throughput: nanoserve against Hugging Face transformers, same model, same weights, same requests.

    python benchmarks/bench_e2e.py --model gpt2 --load-format dummy --output-json e2e.json        # on a GPU
    python benchmarks/bench_e2e.py --device cpu --model distilgpt2 --num-prompts 4 --input-len 8:16 --output-len 4:8

The workload is nano-vllm's benchmark: 256 requests of random token ids,
prompt and output lengths uniform in [100, 500], seed 0, EOS ignored, greedy. Throughput is output
tokens / wall time of the timed run (weights loaded, CUDA graphs captured and kernels compiled before).
The systems, each run in this one process, one after the other:

  nanoserve        LLM.generate with --sched (async by default) and CUDA graphs for decode steps
  nanoserve-eager  the same with --enforce-eager: what the graphs are worth (CUDA only)
  nanoserve-sync   the same as nanoserve with --sched sync: what planning a step ahead is worth
  hf-cb            transformers' continuous batching (the manager behind `generate_batch`), paged
                   attention, with CUDA graphs and async batching when this transformers has them
  hf-cb-sync       the same with async batching off: transformers' own sync vs async (CUDA only)
  hf-static        transformers' `generate` on padded batches of --static-batch-size, left padding

The weights are nanoserve's random ones (`--load-format dummy`, no files, no network), converted into a
`transformers.GPT2LMHeadModel` with `nanoserve.ours_to_hf`; before any timing, both models must give the
same logits and the same greedy tokens in float32 on a few prompts.

Why not `generate_batch` itself: it takes one `max_new_tokens` for all prompts, and this workload has one
per request. We use what it is made of (transformers 5.x, continuous_api.py): the same
`continuous_batching_context_manager` (warm-up = CUDA graph capture, then the background thread), then
`add_request(ids, max_new_tokens=n, eos_token_id=-1)` per request and `get_result` until all are done.

Static batching has no per-request length: each batch of --static-batch-size requests (in workload order,
as they would arrive) runs for the longest output in it, with no end-of-sequence id (eos_token_id=[]):
EOS neither ends it early nor is kept from being chosen, as nanoserve's ignore_eos. Only the tokens
each request asked for count as output; the rest is the padding waste static batching pays (reported
as `generated_tokens`).

Prints the hardware and versions, a table (output tokens/s, wall, agreement with nanoserve's tokens),
the ratio of every system to every other, and the roofline of each nanoserve run (benchmarks/roofline.py).
"""

import argparse
import dataclasses
import gc
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from roofline import (  # noqa: E402
    default_peak_tflops,
    gpu_specs,
    measure_bandwidth,
    measure_peak_tflops,
    print_roofline,
    roofline,
)

import nanoserve as ns  # noqa: E402
from nanoserve_entrypoints.cli import parse_range, random_workload  # noqa: E402
from nanoserve_models.llama import LlamaConfig  # noqa: E402
from nanoserve_sched import SamplingParams  # noqa: E402
from nanoserve_viz.trace import RunInfo, compute_metrics  # noqa: E402

SYSTEMS = ("nanoserve", "nanoserve-eager", "nanoserve-sync", "hf-cb", "hf-cb-sync", "hf-static")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device) -> dict:
    """What ran: the device and every version a reader needs to reproduce the numbers."""
    import transformers

    env = dict(
        device=str(device),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        cpu=cpu_name(),
        torch_threads=torch.get_num_threads(),
    )
    if importlib.util.find_spec("triton"):
        import triton

        env["triton"] = triton.__version__
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
    return env


# -----------------------------------------------------------------------------
# nanoserve


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def build_llm(args, sched="sync", eager=False, dtype=None, **override) -> ns.LLM:
    torch.manual_seed(args.seed)  # dummy weights come from the global generator: the same ones every time
    kw = dict(
        sched=sched,
        load_format=args.load_format,
        dtype=dtype or args.dtype,
        device=args.device,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        seed=args.seed,
        enforce_eager=eager,
    )
    return ns.LLM(args.model, **{**kw, **override})


def run_nanoserve(args, sched, eager, state, work, warm) -> dict:
    """One timed LLM.generate of the workload, after a short warm-up on the same engine (Triton compiles
    each kernel variant at its first launch). Only the timed run's events feed metrics and the roofline."""
    llm = build_llm(args, sched, eager)
    llm.model.load_state_dict(state)  # the weights every system shares
    llm.generate(warm["prompts"], [greedy(m) for m in warm["max_tokens"]], use_tqdm=False)
    sync(llm.device)
    mark = llm.recorder.now()
    t = time.perf_counter()
    outs = llm.generate(work["prompts"], [greedy(m) for m in work["max_tokens"]], use_tqdm=False)
    wall = time.perf_counter() - t
    events = [e for e in llm.recorder.events if isinstance(e, RunInfo) or e.t >= mark]
    m = compute_metrics(events)
    errors = [o.error for o in outs if o.error]
    settings = dict(
        sched=sched,
        cuda_graphs=llm.config.cuda_graphs,
        attention=llm.config.attention,
        dtype=llm.config.dtype,
        num_blocks=llm.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    result = dict(
        settings=settings,
        outputs=[o.outputs[0].token_ids for o in outs],
        wall_s=wall,
        error=errors[0] if errors else None,
        metrics={k: m[k] for k in ("ttft_ms", "tpot_ms", "device_busy_frac", "steps", "preemptions", "wall_s")},
        events=events,
        model_config=llm.model_config,
    )
    del llm
    free_memory()
    return result


# -----------------------------------------------------------------------------
# transformers: the same weights in a GPT2LMHeadModel


def hf_model(cfg, state: dict, dtype, device):
    """A transformers model holding nanoserve's weights (state: our model's state dict), no files involved."""
    if isinstance(cfg, LlamaConfig):
        return hf_llama(cfg, state, dtype, device)
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):  # no memory and no random init: every tensor comes from `state`
        model = GPT2LMHeadModel(GPT2Config(**cfg.to_hf()))
    missing, unexpected = model.load_state_dict(ns.ours_to_hf(state), strict=False, assign=True)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise RuntimeError(f"ours_to_hf does not fit GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    model.lm_head.weight = model.transformer.wte.weight  # GPT-2's LM head is the token embedding
    model = model.to(device=device, dtype=dtype).eval()
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise RuntimeError("GPT2LMHeadModel's LM head is not tied to its token embedding; the weights would differ")
    return model


def pad_id(model) -> int:
    """The id the transformers runs pad with: the model's end-of-sequence id, the first where it has several."""
    eos = model.config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def hf_llama(cfg: LlamaConfig, state: dict, dtype, device):
    """The Llama family keeps Hugging Face's parameter names, so the state dict loads as it is. The model is
    built on the CPU, not on `meta`: its RoPE table is a buffer computed at construction."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = cfg.to_hf()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_cfg), dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()) or unexpected:
        raise RuntimeError(
            f"the weights do not fit {hf_cfg['architectures'][0]}: missing {missing}, unexpected {unexpected}"
        )
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def check_same_model(args, cfg, state, device) -> dict:
    """Before timing: float32 copies of both models must agree, logits and greedy tokens, on a few prompts."""
    state32 = {k: v.float() for k, v in state.items()}
    ours = build_llm(args, "sync", eager=True, dtype="float32", max_num_seqs=4, num_gpu_blocks_override=64)
    ours.model.load_state_dict(state32)
    hf = hf_model(cfg, state32, torch.float32, device)
    n_new = 16
    prompts = [d["prompt_token_ids"] for d in random_workload(3, (7, 40), (1, 1), cfg.vocab_size, args.seed + 2)]
    with torch.inference_mode():
        pairs = [(ours.model(ids), hf(ids).logits) for ids in (torch.tensor([p], device=device) for p in prompts)]
        diff = max((a - b).abs().max().item() for a, b in pairs)
        scale = max(b.abs().max().item() for _, b in pairs)
        theirs = [
            hf.generate(
                torch.tensor([p], device=device),
                attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device),
                max_new_tokens=n_new,
                eos_token_id=[],  # as ignore_eos: EOS does not stop it, and is not suppressed (min_new_tokens would)
                do_sample=False,
                pad_token_id=cfg.eos_token_id,
            )[0, len(p) :].tolist()
            for p in prompts
        ]
    mine = [o.outputs[0].token_ids for o in ours.generate(prompts, greedy(n_new), use_tqdm=False)]
    del ours, hf
    free_memory()
    if diff > 1e-3 * max(1.0, scale):
        raise RuntimeError(
            f"nanoserve and transformers compute different logits from the same weights (max |difference| "
            f"{diff:.3g}, logits up to {scale:.3g}): the weights reached transformers wrongly (GPT-2: "
            "nanoserve.ours_to_hf; the Llama family: LlamaConfig.to_hf); fix it first"
        )
    same = mine == theirs
    if not same:  # near-ties of random weights can flip a greedy pick; say so, the timing is still meaningful
        print(f"WARNING: greedy tokens differ in float32 (logits agree to {diff:.2g}):\n  ours {mine}\n  hf   {theirs}")
    return dict(max_abs_logit_diff=diff, tokens_match=same, prompts=len(prompts), new_tokens=n_new)


def hf_attention(device, requested: str) -> str:
    """The paged attention implementation to ask for, by its name in this transformers.

    Continuous batching needs a paged KV cache. transformers 5.x before 5.23 names the paged versions
    "paged|sdpa" / "paged|flash_attention_2" (and switches a plain "sdpa" to flash when it finds flash, then
    to "paged|"); early 5.x named them "sdpa_paged" / "paged_attention"; from 5.23 the plain names are paged
    inside continuous batching. Flash attention is used when the flash_attn package is installed."""
    from transformers.modeling_utils import AttentionInterface

    names = set(AttentionInterface._global_mapping)
    base = requested
    if requested == "auto":
        flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
        base = "flash_attention_2" if flash else "sdpa"
    old = {"sdpa": "sdpa_paged", "flash_attention_2": "paged_attention"}
    for name in (f"paged|{base}", old.get(base)):
        if name in names:
            return name
    return base


def cb_config_fields() -> set:
    from transformers.generation import ContinuousBatchingConfig

    return {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}


def run_hf_cb(model, work, device, attn, cuda_graphs, async_batching, timeout, max_batch_tokens=None) -> dict:
    """Every request through transformers' continuous batching manager; returns outputs, wall and the
    settings transformers resolved (what actually ran, read back from the manager).

    On a GPU the cache and the token budget are left to transformers (sized from free memory) unless
    max_batch_tokens is given. On a CPU it would size them as for a GPU, and filling their masks takes
    longer than a smoke run, so there the cache holds just the workload and the budget is nanoserve's."""
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    fields = cb_config_fields()
    prompts, max_tokens = work["prompts"], work["max_tokens"]
    kw, notes = {}, []
    if max_batch_tokens:
        kw["max_batch_tokens"] = max_batch_tokens
    if device.type == "cpu":
        page = getattr(ContinuousBatchingConfig(), "page_size", None) or ContinuousBatchingConfig().block_size
        longest = max(map(len, prompts)) + max(max_tokens)
        kw["num_blocks"] = len(prompts) * -(-longest // page) + 1
    for flag, value in (("use_cuda_graph", cuda_graphs), ("use_async_batching", async_batching)):
        if flag in fields:
            kw[flag] = value
        else:
            notes.append(f"this transformers has no {flag} option: ran without it")
    if "auto_switch_to_flash" in fields:
        kw["auto_switch_to_flash"] = False  # we chose the implementation; don't let it swap
    model.set_attn_implementation(attn)
    eos = pad_id(model)
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(max_tokens), eos_token_id=eos, pad_token_id=eos)
    session = dict(generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**kw), warmup=True)
    session.update(block=True, timeout=5)
    try:  # sizes the cache and the graphs as generate_batch does
        from transformers.generation.continuous_batching.utils import WorkloadHints

        session["workload_hints"] = WorkloadHints(max(map(len, prompts)), max(max_tokens), len(prompts))
    except ImportError:
        pass
    results = {}
    with model.continuous_batching_context_manager(**session) as manager:
        cbc = manager.continuous_batching_config
        graphs = getattr(cbc, "use_cuda_graph", None)
        used = dict(
            attention=model.config._attn_implementation,
            cuda_graphs=list(graphs) if isinstance(graphs, tuple) else graphs,  # (varlen, decode) paths
            async_batching=getattr(cbc, "use_async_batching", None),
            **{k: getattr(cbc, k, None) for k in ("max_batch_tokens", "num_blocks", "block_size", "page_size")},
        )
        sync(device)
        t, cpu = time.perf_counter(), time.process_time()  # CPU: every thread's, the manager's included
        for i, (p, n) in enumerate(zip(prompts, max_tokens)):
            if manager.add_request(p, request_id=str(i), max_new_tokens=n, eos_token_id=-1) is None:
                raise RuntimeError(f"the continuous batching manager refused request {i}")
        while len(results) < len(prompts):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[r.request_id] = r
            elif r is None and not manager.is_running():
                raise RuntimeError("transformers' generation thread stopped (its error is logged above)")
            elif time.perf_counter() - t > timeout:
                raise TimeoutError(f"{len(results)} of {len(prompts)} requests done after {timeout} s (--hf-timeout)")
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    errors = [r.error for r in results.values() if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed in transformers: {errors[0]}")
    used = {k: v for k, v in used.items() if v is not None}
    outputs = [results[str(i)].generated_tokens for i in range(len(prompts))]
    return dict(settings=used, notes=notes, outputs=outputs, wall_s=wall, cpu_s=cpu)


def run_hf_static(model, work, device, batch_size) -> dict:
    """transformers' generate on padded batches, in workload order; see the docstring at the top."""
    from transformers import GenerationConfig

    model.set_attn_implementation("sdpa")
    eos = pad_id(model)
    prompts, max_tokens = work["prompts"], work["max_tokens"]

    def generate(idx):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        n = max(max_tokens[i] for i in idx)
        gen = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=eos, eos_token_id=[])  # as ignore_eos
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
        out = out[:, width:].tolist()
        return [out[row][: max_tokens[i]] for row, i in enumerate(idx)], len(idx) * n

    with torch.inference_mode():  # warm-up: cuBLAS handles, kernel loads
        ids = torch.tensor(prompts[:1], device=device)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=eos)
    outputs, generated = [], 0
    sync(device)
    t, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(prompts), batch_size):
        outs, n = generate(range(start, min(start + batch_size, len(prompts))))
        outputs += outs
        generated += n
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    settings = dict(attention="sdpa", batch_size=batch_size, padding="left", cache="dynamic")
    return dict(settings=settings, outputs=outputs, wall_s=wall, cpu_s=cpu, generated_tokens=generated)


def run_hf_cb_best(model, work, device, args) -> dict:
    """hf-cb with every speed feature this machine and transformers allow, dropping the ones that fail;
    then hf-cb-sync (async batching off) for transformers' own sync vs async ratio."""
    cuda = device.type == "cuda"
    attn = hf_attention(device, args.hf_attn)
    fields = cb_config_fields()
    want_graphs = cuda and args.hf_cuda_graphs
    want_async = cuda and "use_async_batching" in fields
    notes = []
    if not cuda:
        notes.append("CPU: CUDA graphs and async batching need CUDA, both off")
    hf_tokens = args.hf_max_batch_tokens or (args.max_num_batched_tokens if not cuda else None)
    attempts = list(dict.fromkeys([(want_graphs, want_async), (want_graphs, False), (False, False)]))
    best = None
    for graphs, async_ in attempts:
        try:
            best = run_hf_cb(model, work, device, attn, graphs, async_, args.hf_timeout, hf_tokens)
            break
        except Exception as e:  # say what failed, then try without it
            notes.append(f"cuda_graphs={graphs} async={async_} failed: {type(e).__name__}: {e}"[:400])
            print(f"hf-cb: {notes[-1]}", file=sys.stderr)
            free_memory()
    if best is None:
        return {"hf-cb": dict(error="; ".join(notes))}
    best["notes"] = notes + best["notes"]
    out = {"hf-cb": best}
    if "hf-cb-sync" not in args.systems:
        return out
    if not best["settings"].get("async_batching"):
        why = "async batching needs CUDA" if not cuda else "hf-cb already ran without async batching"
        if "use_async_batching" not in fields:
            why = "this transformers has no use_async_batching option"
        out["hf-cb-sync"] = dict(skipped=why)
        return out
    free_memory()
    try:
        out["hf-cb-sync"] = run_hf_cb(model, work, device, attn, graphs, False, args.hf_timeout, hf_tokens)
    except Exception as e:
        out["hf-cb-sync"] = dict(error=f"{type(e).__name__}: {e}"[:400])
    return out


# -----------------------------------------------------------------------------
# the report


def agreement(outputs, reference) -> dict:
    """How many requests got exactly the reference's tokens, and how many the same first token."""
    n = len(reference)
    return dict(
        same_first_token=sum(a[:1] == b[:1] for a, b in zip(outputs, reference)) / n,
        same_tokens=sum(a == b for a, b in zip(outputs, reference)) / n,
    )


def print_report(report: dict):
    env, systems = report["env"], report["systems"]
    hw = env.get("gpu") or f"CPU {env['cpu']}, {env['torch_threads']} torch thread(s)"
    versions = f"torch {env['torch']}, transformers {env['transformers']}, triton {env.get('triton', '-')}"
    w = report["workload"]
    print(f"\n{hw}; {versions}; python {env['python']}")
    print(
        f"model {w['model']} ({w['load_format']} weights, {w['dtype']}), {w['num_prompts']} requests, input "
        f"{w['input_len']}, output {w['output_len']} tokens (seed {w['seed']}), greedy, EOS ignored"
    )
    ran = {k: v for k, v in systems.items() if "output_throughput" in v}
    head = f"{'system':<16}{'output tok/s':>13}{'wall s':>9}{'output tok':>11}  {'same tokens as nanoserve':<26}"
    print(f"\n{head}settings")
    for name, r in systems.items():
        if name not in ran:
            print(f"{name:<16}{'-':>13}{'-':>9}{'-':>11}  {r.get('skipped') or 'FAILED: ' + str(r.get('error'))}")
            continue
        agree = r.get("agreement")
        agree = f"{100 * agree['same_tokens']:.0f}% (first {100 * agree['same_first_token']:.0f}%)" if agree else ""
        s = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        print(f"{name:<16}{r['output_throughput']:>13.1f}{r['wall_s']:>9.2f}{r['output_tokens']:>11}  {agree:<26}{s}")
        for note in r.get("notes", []) + ([f"ERROR: {r['error']}"] if r.get("error") else []):
            print(f"{'':<16}note: {note}")
    if len(ran) > 1:
        print("\nratio of output tokens/s, row / column (> 1: the row is faster)")
        print(f"{'':<16}" + "".join(f"{n:>16}" for n in ran))
        for a, row in report["ratios"].items():
            print(f"{a:<16}" + "".join(f"{x:>15.2f}x" for x in row.values()))
    pairs = [
        ("nanoserve", "nanoserve-eager", "nanoserve CUDA graphs / eager"),
        ("nanoserve", "nanoserve-sync", f"nanoserve {report['workload']['sched']} / sync scheduling"),
        ("hf-cb", "hf-cb-sync", "transformers async batching on / off"),
        ("nanoserve", "hf-cb", "nanoserve / transformers continuous batching"),
        ("nanoserve", "hf-static", "nanoserve / transformers static batches"),
    ]
    for a, b, label in pairs:
        if a in ran and b in ran:
            print(f"{label}: {ran[a]['output_throughput'] / ran[b]['output_throughput']:.2f}x")
    rf = report.get("roofline_hardware")
    if rf:
        bw, peak = f"{rf['bandwidth_gbs']:.0f} GB/s", f"{rf['peak_tflops']:.1f} TFLOP/s"
        print(f"\nroofline: {bw} ({rf['bandwidth_source']}), {peak} ({rf['peak_source']})")
    for name, r in ran.items():
        if "roofline" in r:
            print_roofline(r["roofline"], label=f"{name}: ")


def roofline_hardware(args, device, dtype) -> dict:
    """The roof: memory bandwidth (measured, or --bandwidth-gbs) and peak FLOP/s (--peak-tflops, else the
    GPU's datasheet, else a measured matmul), each with where it came from."""
    if args.bandwidth_gbs:
        bw, bw_src = args.bandwidth_gbs, "--bandwidth-gbs"
    else:
        bw, bw_src = measure_bandwidth(device), "measured: device copy"
        spec = device.type == "cuda" and gpu_specs(torch.cuda.get_device_name(device))
        bw_src += f"; datasheet {spec['bandwidth_gbs']} GB/s" if spec else ""
        free_memory()  # the copy's buffers: leave the memory to the engines
    peak, peak_src = args.peak_tflops, "--peak-tflops"
    if peak is None and (peak := default_peak_tflops(device, torch.finfo(dtype).bits // 8)):
        peak_src = "datasheet, dense"
    if peak is None:
        peak, peak_src = measure_peak_tflops(device, dtype), "measured: a matmul"
    return dict(bandwidth_gbs=bw, bandwidth_source=bw_src, peak_tflops=peak, peak_source=peak_src)


def ratios(systems: dict) -> dict:
    """output tokens/s of every system that ran over every other's: ratios[a][b] > 1 when a is faster."""
    ran = {k: v["output_throughput"] for k, v in systems.items() if "output_throughput" in v}
    return {a: {b: ta / tb for b, tb in ran.items()} for a, ta in ran.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        default="gpt2",
        help="a GPT-2 or Llama-family name (with --load-format dummy: gpt2, qwen3-0.6b, ...) or a folder",
    )
    p.add_argument("--load-format", default="dummy", choices=["auto", "dummy"])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", default="100:500", help="MIN:MAX prompt tokens, uniform")
    p.add_argument("--output-len", default="100:500", help="MIN:MAX output tokens, uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sched", default="async", help="nanoserve's scheduler (sync, async, balanced, page-aligned)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--warmup-prompts", type=int, default=8, help="untimed requests run first on each nanoserve engine")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="which to run, comma-separated")
    p.add_argument("--hf-attn", default="auto", help="auto: flash_attention_2 if flash_attn is installed, else sdpa")
    p.add_argument("--no-hf-cuda-graphs", dest="hf_cuda_graphs", action="store_false")
    p.add_argument(
        "--hf-max-batch-tokens",
        type=int,
        default=None,
        help="hf-cb token budget per step (default: transformers' choice on a GPU, --max-num-batched-tokens on a CPU)",
    )
    p.add_argument("--hf-timeout", type=float, default=300, help="seconds one transformers run may take")
    p.add_argument("--static-batch-size", type=int, default=64, help="hf-static: requests per padded batch")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="roofline: default measured (a device copy)")
    p.add_argument("--peak-tflops", type=float, default=None, help="roofline: default the GPU's datasheet peak")
    p.add_argument("--skip-check", action="store_true", help="don't compare the two models before timing")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (on a CPU)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if bad := set(args.systems) - set(SYSTEMS):
        p.error(f"--systems: unknown {sorted(bad)}; choose from {', '.join(SYSTEMS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = str(device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = ns.resolve_dtype(args.dtype, device)
    in_len, out_len = parse_range(args.input_len, "--input-len"), parse_range(args.output_len, "--output-len")

    # the weights every system shares: this engine's (random, or loaded); it needs no graphs and few pages
    first = build_llm(args, "sync", eager=True, max_num_seqs=1, num_gpu_blocks_override=16)
    cfg = first.model_config
    if in_len[1] + out_len[1] > first.max_model_len:
        longest, ctx = in_len[1] + out_len[1], first.max_model_len
        raise SystemExit(f"--input-len MAX + --output-len MAX = {longest} tokens, more than the context, {ctx}")
    state = {k: v.detach().to("cpu", copy=True) for k, v in first.model.state_dict().items()}
    del first
    free_memory()

    items = random_workload(args.num_prompts, in_len, out_len, cfg.vocab_size, args.seed)
    work = dict(prompts=[d["prompt_token_ids"] for d in items], max_tokens=[d["max_tokens"] for d in items])
    warm_items = random_workload(args.warmup_prompts, in_len, out_len, cfg.vocab_size, args.seed + 1)
    warm = dict(prompts=[d["prompt_token_ids"] for d in warm_items], max_tokens=[d["max_tokens"] for d in warm_items])
    report = dict(
        env=environment(device),
        workload=dict(
            model=args.model,
            load_format=args.load_format,
            dtype=str(dtype).split(".")[-1],
            num_prompts=args.num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            seed=args.seed,
            sched=args.sched,
            prompt_tokens=sum(map(len, work["prompts"])),
            output_tokens=sum(work["max_tokens"]),
        ),
        systems={},
    )
    save = lambda: args.output_json and Path(args.output_json).write_text(json.dumps(report, indent=1, default=str))
    print(f"{report['env'].get('gpu', device)}: {args.num_prompts} requests, {sum(work['max_tokens'])} output tokens")
    if not args.skip_check:
        report["check"] = check_same_model(args, cfg, state, device)
        print(f"same model: {report['check']}")

    dtype_bytes = torch.finfo(dtype).bits // 8
    report["roofline_hardware"] = hw = roofline_hardware(args, device, dtype)
    bw, peak = hw["bandwidth_gbs"], hw["peak_tflops"]

    def record(name, r):
        if "outputs" in r:
            bad = [(i, len(o), m) for i, (o, m) in enumerate(zip(r["outputs"], work["max_tokens"])) if len(o) != m]
            if bad and not r.get("error"):
                r["error"] = "request {} got {} tokens, not {}".format(*bad[0])
            n = sum(map(len, r["outputs"]))
            r.update(output_tokens=n, output_throughput=n / r["wall_s"])
            ref = report["systems"].get("nanoserve", {}).get("outputs")
            if ref is not None and name != "nanoserve":
                r["agreement"] = agreement(r["outputs"], ref)
            print(
                f"{name}: Throughput: {args.num_prompts / r['wall_s']:.2f} requests/s, "
                f"{(n + report['workload']['prompt_tokens']) / r['wall_s']:.2f} total tokens/s, "
                f"{n / r['wall_s']:.2f} output tokens/s"
            )
        if events := r.pop("events", None):
            rf = roofline(events, r.pop("model_config"), dtype_bytes, bw * 1e9, peak * 1e12, wall_s=r["wall_s"])
            r["roofline"] = rf
        report["systems"][name] = r
        save()

    cuda_only = "needs CUDA (CUDA graphs); on a CPU it is the same as nanoserve"
    for name, sched, eager in (
        ("nanoserve", args.sched, False),
        ("nanoserve-eager", args.sched, True),
        ("nanoserve-sync", "sync", False),
    ):
        if name not in args.systems:
            continue
        if name == "nanoserve-eager" and device.type != "cuda":
            record(name, dict(skipped=cuda_only))
        elif name == "nanoserve-sync" and args.sched == "sync":
            record(name, dict(skipped="--sched is already sync"))
        else:
            record(name, run_nanoserve(args, sched, eager, state, work, warm))

    if {"hf-cb", "hf-cb-sync", "hf-static"} & set(args.systems):
        model = hf_model(cfg, state, dtype, device)
        if "hf-cb" in args.systems:
            for name, r in run_hf_cb_best(model, work, device, args).items():
                record(name, r)
        elif "hf-cb-sync" in args.systems:
            attn = hf_attention(device, args.hf_attn)
            cuda = device.type == "cuda"
            hf_tokens = args.hf_max_batch_tokens or (args.max_num_batched_tokens if not cuda else None)
            record("hf-cb-sync", run_hf_cb(model, work, device, attn, cuda, False, args.hf_timeout, hf_tokens))
        free_memory()
        if "hf-static" in args.systems:
            record("hf-static", run_hf_static(model, work, device, args.static_batch_size))
        del model
        free_memory()

    for r in report["systems"].values():
        r.pop("outputs", None)  # thousands of token ids: not worth the file
    report["ratios"] = ratios(report["systems"])
    save()
    print_report(report)
    failed = [n for n, r in report["systems"].items() if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
