"""The roofline of a nanoserve run: the least time the recorded steps could take on this hardware.

    python benchmarks/roofline.py run.jsonl                  # a step log written by nanoserve.py --trace
    python benchmarks/roofline.py run.jsonl --bandwidth-gbs 3000 --peak-tflops 989

A step cannot finish faster than it takes to move its bytes through memory, nor faster than it takes
to do its FLOPs at the chip's peak:

    step time >= max(bytes / bandwidth, flops / peak)

with the bytes and FLOPs of `nanoserve.step_cost` — the same model the simulated device (--device
sim:NAME) waits out step by step, and the same datasheet numbers (`nanoserve.GPUS`).

The roofline of a run is the sum over its steps; measured wall / roofline says how far the engine is
from what the hardware allows (1.0 would be perfect). Decode steps of a small model move far more
bytes than they compute, so they sit on the bandwidth side of the roof.

Context lengths are rebuilt from the events alone (nanoserve_viz/trace.py): a StepScheduled gives each request's
new tokens, which start where its previous ones ended; a Preempted request starts again from 0 (its
recomputation is real work), or from its prefix-cache hit (a "shared" Pages event) when it comes back.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoserve_viz.trace import Pages, Preempted, RequestArrived, RunInfo, StepScheduled, compute_metrics  # noqa: E402


def gpu_specs(name: str) -> dict | None:
    """The datasheet numbers of a GPU by its torch name (nanoserve.GPUS, the ones --device sim:NAME uses),
    or None when it is not one of them.

    >>> gpu_specs("NVIDIA H100 80GB HBM3")["bf16_tflops"]
    989.5
    """
    from nanoserve import gpu_spec

    spec = gpu_spec(name)
    return spec and dict(bf16_tflops=spec.bf16_tflops, fp32_tflops=spec.fp32_tflops, bandwidth_gbs=spec.bandwidth_gbs)


def default_peak_tflops(device, dtype_bytes: int) -> float | None:
    """The datasheet peak for this GPU and element size (2: bf16/fp16, 4: fp32); None when unknown."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    spec = gpu_specs(torch.cuda.get_device_name(device))
    return spec and spec["bf16_tflops" if dtype_bytes <= 2 else "fp32_tflops"]


def measure_bandwidth(device="cuda", nbytes: int | None = None, repeats: int = 20) -> float:
    """Memory bandwidth in GB/s (1e9 bytes/s): a device-to-device copy of a large tensor, counting the
    bytes read and the bytes written. The practical ceiling of a memory-bound kernel (a little below
    the datasheet figure). On a CPU it times the same copy in RAM.

    >>> measure_bandwidth("cpu", nbytes=2**20, repeats=2) > 0
    True
    """
    device = torch.device(device)
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**27)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm up: first touch of the pages, kernel load
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    return 2 * nbytes / sorted(times)[len(times) // 2] / 1e9


def measure_peak_tflops(device="cpu", dtype=torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """Achieved TFLOP/s of an n x n matmul: a stand-in peak where no datasheet number is known (a CPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e12


def model_sizes(cfg) -> dict:
    """Parameter counts of a model config (nanoserve.model_sizes of the model built on torch's "meta" device:
    shapes, no memory); a dict is read as GPT-2 keys.

    >>> model_sizes(__import__("nanoserve").dummy_shapes()["qwen3-0.6b"])["params"]  # tied head: counted once
    596049920

    >>> model_sizes(dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12))["params"]
    124439808
    """
    import nanoserve as ns

    if isinstance(cfg, dict):
        cfg = ns.GPTConfig(**{"n_head": 1, **cfg})
    with torch.device("meta"):
        return ns.model_sizes(ns.build_model(cfg))  # GPT-2, or the Llama family's model for its config


def step_work(events, block_size=None):
    """Rebuild what every step computed from the events alone: yields (StepScheduled event, a list of
    (request id, start, new tokens, samples)) per step, where `start` is the request's context before
    the step and `samples` says whether the step runs its LM head (a prompt's non-final chunk does not).

    A Preempted request starts again from 0; when it comes back with a prefix-cache hit (a "shared" Pages
    event, as does a new request), from the tokens those pages hold. The page size is the RunInfo's.

    >>> ev = [StepScheduled(0.0, 0, ["a"], [3], [True]), StepScheduled(0.0, 1, ["a"], [1], [False])]
    >>> [work for _, work in step_work(ev)]
    [[('a', 0, 3, True)], [('a', 3, 1, True)]]
    """
    computed, prompt_len = {}, {}  # request id -> tokens whose K/V are in the cache; -> its prompt length
    for e in events:
        if isinstance(e, RunInfo) and block_size is None:
            block_size = e.block_size
        elif isinstance(e, RequestArrived):
            prompt_len[e.request_id] = e.num_prompt_tokens
        elif isinstance(e, Preempted):
            computed[e.request_id] = 0  # pages freed: everything is recomputed
        elif isinstance(e, Pages) and e.kind == "shared":  # a prefix-cache hit: those tokens are not recomputed
            if block_size is None:
                raise ValueError("a prefix-cache hit needs the page size: pass block_size or keep the RunInfo event")
            computed[e.request_id] = len(e.pages) * block_size
        elif isinstance(e, StepScheduled):
            work = []
            for rid, n in zip(e.request_ids, e.num_tokens):
                start = computed.get(rid, 0)
                computed[rid] = start + n
                work.append((rid, start, n, start + n >= prompt_len.get(rid, 0)))
            yield e, work


def roofline(events, model_config, dtype_bytes, bandwidth_bytes_per_s, peak_flops, wall_s=None, block_size=None):
    """Sum over the recorded steps of max(bytes / bandwidth, flops / peak), and how the run compares.

    `events` is a Recorder's list (or `nanoserve_viz.trace.read_jsonl` of a --trace file); `wall_s` defaults to the
    run's wall time from the same events. Returns a dict: roofline_s, wall_s, wall_over_roofline (>= 1;
    how many times slower than the roof), roofline_frac (its inverse, the "% of roofline"), steps,
    memory_bound_steps, and the totals split by kind in bytes and flops.

    >>> ev = [RequestArrived(0.0, "a", 4), StepScheduled(0.0, 0, ["a"], [4], [True])]
    >>> cfg = dict(vocab_size=10, n_positions=8, n_embd=2, n_layer=1)
    >>> r = roofline(ev, cfg, dtype_bytes=4, bandwidth_bytes_per_s=1e9, peak_flops=1e12, wall_s=1.0)
    >>> r["bytes"]["kv_read"], r["flops"]["attention"]   # 4 keys x 2 (K, V) x 1 layer x 2 x 4 bytes; 4*1*2*(1+2+3+4)
    (64, 80)
    """
    import nanoserve as ns

    sizes = model_sizes(model_config)
    cfg = ns.GPTConfig(**{"n_head": 1, **model_config}) if isinstance(model_config, dict) else model_config
    kv_per_token = ns.kv_bytes_per_token(cfg, dtype_bytes)  # a key and a value, every layer
    total = dict(weights=0, kv_read=0, kv_write=0)
    flops = dict(linear=0, lm_head=0, attention=0)
    roof, steps, memory_bound = 0.0, 0, 0
    for _, work in step_work(events, block_size):
        q_lens = [n for _, _, n, _ in work]
        ctx = [start + n for _, start, n, _ in work]
        cost = ns.step_cost(sizes, kv_per_token, dtype_bytes, q_lens, ctx, sum(s for *_, s in work))
        step_bytes, step_flops = cost["bytes"], cost["flops"]
        t_mem, t_compute = sum(step_bytes.values()) / bandwidth_bytes_per_s, sum(step_flops.values()) / peak_flops
        roof += max(t_mem, t_compute)
        memory_bound += t_mem >= t_compute
        steps += 1
        for k, v in step_bytes.items():
            total[k] += v
        for k, v in step_flops.items():
            flops[k] += v
    wall = wall_s if wall_s is not None else compute_metrics(events)["wall_s"]
    return dict(
        roofline_s=roof,
        wall_s=wall,
        wall_over_roofline=wall / roof if roof else float("inf"),
        roofline_frac=roof / wall if wall else 0.0,
        steps=steps,
        memory_bound_steps=memory_bound,
        bytes=total,
        flops=flops,
        dtype_bytes=dtype_bytes,
        bandwidth_gbs=bandwidth_bytes_per_s / 1e9,
        peak_tflops=peak_flops / 1e12,
    )


def print_roofline(r: dict, label: str = "", file=sys.stdout):
    """Two lines: the roof, then measured / roof and where the bytes and FLOPs went."""
    b, f = r["bytes"], r["flops"]
    gb = lambda x: f"{x / 1e9:.1f} GB"
    print(
        f"{label}roofline {r['roofline_s']:.3f} s over {r['steps']} steps ({r['memory_bound_steps']} memory-bound) at "
        f"{r['bandwidth_gbs']:.0f} GB/s, {r['peak_tflops']:.1f} TFLOP/s; measured {r['wall_s']:.3f} s = "
        f"{r['wall_over_roofline']:.2f}x the roofline ({100 * r['roofline_frac']:.1f}% of roofline)",
        file=file,
    )
    print(
        f"{' ' * len(label)}bytes: weights {gb(b['weights'])}, KV read {gb(b['kv_read'])}, KV written "
        f"{gb(b['kv_write'])};  FLOPs: linear {f['linear'] / 1e12:.2f} T, LM head {f['lm_head'] / 1e12:.2f} T, "
        f"attention {f['attention'] / 1e12:.2f} T",
        file=file,
    )


def main(argv=None):
    from nanoserve import dummy_shapes, read_config, resolve_model_dir
    from nanoserve_viz.trace import read_jsonl

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a step log written by nanoserve.py --trace FILE.jsonl")
    p.add_argument("--model", default=None, help="a built-in shape or a model folder (default: the one in the log)")
    p.add_argument("--dtype-bytes", type=int, default=None, help="bytes per element (default: the log's dtype)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="default: measured here (a device copy)")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: the GPU's datasheet dense peak")
    p.add_argument("--device", default=None, help="where to measure the bandwidth (default: cuda if available)")
    args = p.parse_args(argv)
    events = read_jsonl(args.trace)
    info = next((e.config for e in events if isinstance(e, RunInfo)), {})
    model = args.model or info.get("model")
    if model in dummy_shapes():
        cfg = dummy_shapes()[model]
    elif model is not None:
        cfg = read_config(resolve_model_dir(model))  # GPT-2's or the Llama family's
    else:
        p.error("the log names no model; pass --model")
    dtype_bytes = args.dtype_bytes or {"float32": 4, "float16": 2, "bfloat16": 2}[info.get("dtype", "float32")]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bandwidth = args.bandwidth_gbs or measure_bandwidth(device)
    fallback_dtype = torch.bfloat16 if dtype_bytes == 2 and device.startswith("cuda") else torch.float32
    peak = args.peak_tflops or default_peak_tflops(device, dtype_bytes) or measure_peak_tflops(device, fallback_dtype)
    print_roofline(roofline(events, cfg, dtype_bytes, bandwidth * 1e9, peak * 1e12))


if __name__ == "__main__":
    main()
