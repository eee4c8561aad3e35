"""The roofline of a nanoserve run: the least time the recorded steps could take on this hardware.

    python benchmarks/roofline.py run.jsonl                  # a step log written by nanoserve.py --trace
    python benchmarks/roofline.py run.jsonl --bandwidth-gbs 3000 --peak-tflops 989

A step cannot finish faster than it takes to move its bytes through memory, nor faster than it takes
to do its FLOPs at the chip's peak (DESIGN.md, "Measuring"):

    step time >= max(bytes / bandwidth, flops / peak)
    bytes = weights (read once per step) + KV read (every cached key and value the step's requests
            attend to) + KV written (the step's new tokens)
    flops = 2 x (weights of the linear layers) x new tokens + 2 x (LM head) x sampled rows
            + attention: 4 x n_layer x n_embd per (query, key) pair

The roofline of a run is the sum over its steps; measured wall / roofline says how far the engine is
from what the hardware allows (1.0 would be perfect). Decode steps of a small model move far more
bytes than they compute, so they sit on the bandwidth side of the roof.

Context lengths are rebuilt from the events alone (viz/trace.py): a StepScheduled gives each request's
new tokens, which start where its previous ones ended; a Preempted request starts again from 0 (its
recomputation is real work), or from its prefix-cache hit (a "shared" Pages event) when it comes back.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from viz.trace import Pages, Preempted, RequestArrived, RunInfo, StepScheduled, compute_metrics  # noqa: E402

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s and HBM bandwidth in GB/s, from NVIDIA's datasheets:
# "NVIDIA H100 Tensor Core GPU" datasheet (H100 SXM / NVL / PCIe: BF16 1,979 / 1,671 / 1,513 TFLOPS *with*
# sparsity, halved here; FP32 67 / 60 / 51 TFLOPS; 3.35 / 3.9 / 2.0 TB/s) and "NVIDIA H200 Tensor Core GPU"
# datasheet (H200 SXM / NVL: BF16 1,979 / 1,671 with sparsity; FP32 67 / 60; 4.8 TB/s). FP32 is the
# non-tensor-core peak: torch does not use TF32 for float32 matmuls unless asked.
# Matched against torch.cuda.get_device_name() in this order (an H100 SXM reports "NVIDIA H100 80GB HBM3").
GPU_SPECS = {
    "H200 NVL": dict(bf16_tflops=835.5, fp32_tflops=60.0, bandwidth_gbs=4800),
    "H200": dict(bf16_tflops=989.5, fp32_tflops=67.0, bandwidth_gbs=4800),
    "H100 NVL": dict(bf16_tflops=835.5, fp32_tflops=60.0, bandwidth_gbs=3900),
    "H100 PCIe": dict(bf16_tflops=756.5, fp32_tflops=51.0, bandwidth_gbs=2000),
    "H100": dict(bf16_tflops=989.5, fp32_tflops=67.0, bandwidth_gbs=3350),  # SXM
}


def gpu_specs(name: str) -> dict | None:
    """The datasheet numbers of a GPU by its torch name, or None when it is not in GPU_SPECS.

    >>> gpu_specs("NVIDIA H100 80GB HBM3")["bf16_tflops"]
    989.5
    """
    return next((spec for key, spec in GPU_SPECS.items() if key.lower() in name.lower()), None)


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


def _get(cfg, key):
    return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)


def model_sizes(cfg) -> dict:
    """Parameter counts of a GPT-2 config (nanoserve's GPTConfig, or a dict with the same keys).

    >>> model_sizes(dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12))["params"]
    124439808
    """
    V, P, C, L = (_get(cfg, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer"))
    per_layer = 12 * C * C + 13 * C  # qkv (3C^2 + 3C), proj (C^2 + C), MLP (8C^2 + 5C), two LayerNorms (4C)
    return dict(
        params=V * C + P * C + L * per_layer + 2 * C,  # token + position embeddings, the blocks, the final LayerNorm
        linear_params=L * 12 * C * C,  # the matmul weights every new token goes through
        lm_head_params=V * C,  # tied to the token embedding; only the sampled rows go through it
    )


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

    `events` is a Recorder's list (or `viz.trace.read_jsonl` of a --trace file); `wall_s` defaults to the
    run's wall time from the same events. Returns a dict: roofline_s, wall_s, wall_over_roofline (>= 1;
    how many times slower than the roof), roofline_frac (its inverse, the "% of roofline"), steps,
    memory_bound_steps, and the totals split by kind in bytes and flops.

    >>> ev = [RequestArrived(0.0, "a", 4), StepScheduled(0.0, 0, ["a"], [4], [True])]
    >>> cfg = dict(vocab_size=10, n_positions=8, n_embd=2, n_layer=1)
    >>> r = roofline(ev, cfg, dtype_bytes=4, bandwidth_bytes_per_s=1e9, peak_flops=1e12, wall_s=1.0)
    >>> r["bytes"]["kv_read"], r["flops"]["attention"]   # 4 keys x 2 (K, V) x 1 layer x 2 x 4 bytes; 4*1*2*(1+2+3+4)
    (64, 80)
    """
    C, L = _get(model_config, "n_embd"), _get(model_config, "n_layer")
    sizes = model_sizes(model_config)
    kv_per_token = 2 * L * C * dtype_bytes  # a key and a value, every layer
    total = dict(weights=0, kv_read=0, kv_write=0)
    flops = dict(linear=0, lm_head=0, attention=0)
    roof, steps, memory_bound = 0.0, 0, 0
    for _, work in step_work(events, block_size):
        new = sum(n for _, _, n, _ in work)
        step_bytes = dict(
            weights=sizes["params"] * dtype_bytes,  # every weight is read once per step, whatever the batch
            kv_read=sum(start + n for _, start, n, _ in work) * kv_per_token,  # each new token sees those before it
            kv_write=new * kv_per_token,
        )
        step_flops = dict(
            linear=2 * sizes["linear_params"] * new,
            lm_head=2 * sizes["lm_head_params"] * sum(samples for *_, samples in work),
            # query i of a request attends to its start + i + 1 keys: QK^T and PV, 2 x n_embd flops each
            attention=4 * L * C * sum(n * start + n * (n + 1) // 2 for _, start, n, _ in work),
        )
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
    from nanoserve import GPT2_FAMILY, GPTConfig, resolve_model_dir
    from viz.trace import read_jsonl

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a step log written by nanoserve.py --trace FILE.jsonl")
    p.add_argument("--model", default=None, help="GPT-2 family name or folder (default: the one in the log)")
    p.add_argument("--dtype-bytes", type=int, default=None, help="bytes per element (default: the log's dtype)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="default: measured here (a device copy)")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: the GPU's datasheet dense peak")
    p.add_argument("--device", default=None, help="where to measure the bandwidth (default: cuda if available)")
    args = p.parse_args(argv)
    events = read_jsonl(args.trace)
    info = next((e.config for e in events if isinstance(e, RunInfo)), {})
    model = args.model or info.get("model")
    if model in GPT2_FAMILY:
        cfg = GPT2_FAMILY[model]
    elif model is not None:
        cfg = GPTConfig.from_hf(json.loads((resolve_model_dir(model) / "config.json").read_text()))
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
