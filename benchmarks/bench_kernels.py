"""Benchmark the Triton kernels on a CUDA GPU: decode attention and the KV-cache write.

    python benchmarks/bench_kernels.py                      # needs a CUDA GPU
    python benchmarks/bench_kernels.py --compile-only --arch 90   # no GPU needed, see below

Prints the GPU, its device-to-device copy bandwidth measured here (the practical ceiling of a
memory-bound kernel), then two tables of ratios measured in this one run:

1. decode attention with GPT-2 shapes (12 heads x 64, fp16, block 16) for batch {1,16,64,256} x
   context {128,512,1024}: our kernel with the automatic split-KV choice, forced without splits,
   and `scaled_dot_product_attention` on the same keys laid out contiguously (no pages): time, the
   bandwidth ours achieves (K and V bytes read / time) as a fraction of the copy bandwidth, and
   SDPA time / our time (> 1: ours is faster).
2. the KV write of a prefill chunk: the per-token scatter (`write_kv`), the whole-page path
   (`write_kv_pages`) and torch's `index_copy_` (the reference).

Decode reads every cached key and value once and does ~1 FLOP per byte, so it is memory-bound:
"% of copy bandwidth" is the number that says how good a decode kernel is.

--compile-only compiles every kernel variant the engine launches (real launch arguments,
recorded from the public functions on CPU tensors) ahead of time for a GPU architecture, without a
GPU, and prints each one's shared memory. tests/test_kernels.py runs it, because Triton's CPU
interpreter accepts code that the GPU compiler rejects.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GPT2 = dict(n_heads=12, head_dim=64, block_size=16, dtype=torch.float16)
BATCHES = (1, 16, 64, 256)
CONTEXTS = (128, 512, 1024)
WRITE_TOKENS = (16, 512, 4096)


def timed(fn):
    """Median time of fn in microseconds (triton's do_bench: warm-up, L2 flushed between runs)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth():
    """Device-to-device copy of a 1 GiB tensor: bytes read + bytes written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (timed(lambda: dst.copy_(src)) * 1e-6)


def decode_batch(batch, ctx, n_heads, head_dim, block_size, dtype):
    """`batch` requests decoding one token after `ctx - 1` cached ones; pages in a random order."""
    pages = ctx // block_size
    num_blocks = batch * pages
    shape = (num_blocks, block_size, n_heads, head_dim)
    i32 = dict(dtype=torch.int32, device="cuda")
    return dict(
        q=torch.randn(batch, n_heads, head_dim, dtype=dtype, device="cuda"),
        k_cache=torch.randn(shape, dtype=dtype, device="cuda"),
        v_cache=torch.randn(shape, dtype=dtype, device="cuda"),
        cu_seqlens_q=torch.arange(batch + 1, **i32),
        context_lens=torch.full((batch,), ctx, **i32),
        block_tables=torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, pages),
        scale=head_dim**-0.5,
        max_q=1,
        max_ctx=ctx,
    )


def bench_decode(pa, bw):
    print("\n1. decode attention, GPT-2 shapes (12 heads x 64, fp16, block 16)")
    head = f"{'batch':>5} {'ctx':>5} {'splits':>6} {'ours us':>8} {'no-split us':>11} {'sdpa us':>8} "
    print(head + f"{'ours GB/s':>9} {'% copy bw':>9} {'sdpa/ours':>9}")
    for batch in BATCHES:
        for ctx in CONTEXTS:
            print(decode_row(pa, bw, batch, ctx))


def decode_row(pa, bw, batch, ctx):
    import torch.nn.functional as F

    H, D = GPT2["n_heads"], GPT2["head_dim"]
    b = decode_batch(batch, ctx, **GPT2)
    splits = pa.choose_num_kv_splits(batch, H, ctx, b["q"].device)
    # the same keys and values laid out contiguously, as SDPA wants them: (B, H, ctx, D)
    k = b["k_cache"][b["block_tables"].long()].view(batch, ctx, H, D).transpose(1, 2).contiguous()
    v = b["v_cache"][b["block_tables"].long()].view(batch, ctx, H, D).transpose(1, 2).contiguous()
    q = b["q"].view(batch, H, 1, D)
    want = F.scaled_dot_product_attention(q, k, v, scale=b["scale"]).view(batch, H, D)
    torch.testing.assert_close(pa.paged_attention(**b), want, atol=1e-2, rtol=1e-2)  # never time wrong code
    t_ours = timed(lambda: pa.paged_attention(**b))
    t_flat = timed(lambda: pa.paged_attention(**b, num_kv_splits=1))
    t_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, scale=b["scale"]))
    kv_bytes = 2 * k.numel() * k.element_size()  # K and V, each read once
    gbs = kv_bytes / (t_ours * 1e-6) / 1e9
    return (
        f"{batch:>5} {ctx:>5} {splits:>6} {t_ours:>8.1f} {t_flat:>11.1f} {t_sdpa:>8.1f} "
        f"{gbs:>9.0f} {100 * gbs * 1e9 / bw:>8.0f}% {t_sdpa / t_ours:>9.2f}"
    )


def bench_write(pa, bw):
    print("\n2. KV write of one prefill chunk, GPT-2 shapes (fp16 k/v into an fp16 cache)")
    head = f"{'tokens':>6} {'scatter us':>10} {'pages us':>8} {'index_copy us':>13} "
    print(head + f"{'scatter/pages':>13} {'% copy bw':>9}")
    for n in WRITE_TOKENS:
        print(write_row(pa, bw, n))


def write_row(pa, bw, n):
    from kernels import reference

    H, D, bs, dtype = GPT2["n_heads"], GPT2["head_dim"], GPT2["block_size"], GPT2["dtype"]
    n_pages = n // bs
    num_blocks = 4 * n_pages
    kc = torch.zeros(num_blocks, bs, H, D, dtype=dtype, device="cuda")
    vc = torch.zeros_like(kc)
    k, v = (torch.randn(n, H, D, device="cuda", dtype=dtype) for _ in range(2))
    page_ids = torch.randperm(num_blocks, device="cuda")[:n_pages].to(torch.int32)
    j = torch.arange(n, device="cuda")
    slots = page_ids.long()[j // bs] * bs + j % bs  # the same destinations, token by token
    pa.write_kv_pages(kc, vc, k, v, page_ids)
    want = kc.clone()
    kc.zero_()
    pa.write_kv(kc, vc, k, v, slots)
    assert torch.equal(kc, want), "write_kv and write_kv_pages disagree"
    t_scatter = timed(lambda: pa.write_kv(kc, vc, k, v, slots))
    t_pages = timed(lambda: pa.write_kv_pages(kc, vc, k, v, page_ids))
    t_torch = timed(lambda: reference.write_kv(kc, vc, k, v, slots))
    moved = 2 * 2 * k.numel() * k.element_size()  # k and v, each read once and written once
    best = min(t_scatter, t_pages)
    return (
        f"{n:>6} {t_scatter:>10.1f} {t_pages:>8.1f} {t_torch:>13.1f} {t_scatter / t_pages:>13.2f} "
        f"{100 * moved / (best * 1e-6) / bw:>8.0f}%"
    )


# --- ahead-of-time compilation, no GPU needed ----------------------------------------------------

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}
TRITON_TYPES[torch.int64] = "i64"


def record_launches(pa, dtypes, head_dims):
    """Call the public functions on tiny CPU tensors with every kernel swapped for a recorder:
    returns the (kernel, args, kwargs) each launch would have used on a GPU."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for name in ("_write_kv_kernel", "_write_kv_pages_kernel", "_attn_rowwise_kernel", "_combine_splits_kernel"):
        setattr(pa, name, Recorder(getattr(pa, name)))
    pa._attn_tiled_kernel = Recorder(pa._attn_tiled_kernel)

    H, bs = GPT2["n_heads"], GPT2["block_size"]
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    for dtype in dtypes:
        for D in head_dims:
            kc = torch.zeros(4, bs, H, D, dtype=dtype)
            k = torch.zeros(20, H, D)  # the model's fp32 activations
            pa.write_kv(kc, kc, k, k, torch.arange(20))
            pa.write_kv_pages(kc, kc, k, k, i32(1, 2))
            q = torch.zeros(20, H, D, dtype=dtype)
            batch = (kc, kc, i32(0, 19, 20), i32(30, 10), i32([0, 1], [2, 3]), D**-0.5)
            pa.paged_attention(q, *batch, max_q=19, max_ctx=30)  # prefill: tiled, BLOCK_M = 32
            q100 = torch.zeros(100, H, D, dtype=dtype)  # nothing runs, so the pages need not exist
            pa.paged_attention(q100, kc, kc, i32(0, 100), i32(100), *batch[4:], max_q=100, max_ctx=100)
            pa.paged_attention(q[:2], kc, kc, i32(0, 1, 2), *batch[3:], max_q=1, max_ctx=30, num_kv_splits=1)
            pa.paged_attention(q[:2], kc, kc, i32(0, 1, 2), *batch[3:], max_q=1, max_ctx=30, num_kv_splits=2)
    return launches


def compile_only(arch, dtypes, head_dims):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("--compile-only needs the real compiler: unset TRITON_INTERPRET")
    from kernels import paged_attention as pa

    seen = set()
    for kernel, args, kwargs in record_launches(pa, dtypes, head_dims):
        options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
        values = dict(zip(kernel.arg_names, args), **kwargs)
        signature, constexprs = {}, {}
        for p in kernel.params:
            x = values[p.name]
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", x
            elif torch.is_tensor(x):
                signature[p.name] = "*" + TRITON_TYPES[x.dtype]
            elif isinstance(x, float):
                signature[p.name] = "fp32"
            else:
                signature[p.name] = "i32" if -(2**31) <= x < 2**31 else "i64"
        key = (kernel.__name__, tuple(signature.items()), tuple(constexprs.items()))
        if key in seen:
            continue
        seen.add(key)
        src = ASTSource(kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        types = ",".join(sorted({t for t in signature.values() if t.startswith("*f") or t.startswith("*b")}))
        print(f"{kernel.__name__:<24} {types:<16} {constexprs}  shared={compiled.metadata.shared}B")
    print(f"compiled {len(seen)} kernel variants for sm_{arch}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compile-only", action="store_true", help="compile every kernel for --arch, no GPU needed")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only, e.g. 80, 90")
    parser.add_argument("--dtype", nargs="+", default=["float16", "bfloat16", "float32"], help="for --compile-only")
    parser.add_argument("--head-dim", nargs="+", type=int, default=[64], help="for --compile-only")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    if args.compile_only:
        return compile_only(args.arch, [getattr(torch, d) for d in args.dtype], args.head_dim)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU and found none; on a CPU run `pytest tests/test_kernels.py`")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 would time the CPU interpreter: unset it to benchmark the GPU")
    import triton

    from kernels import paged_attention as pa

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"device-to-device copy bandwidth (1 GiB, read + write): {bw / 1e9:.0f} GB/s")
    bench_decode(pa, bw)
    bench_write(pa, bw)


if __name__ == "__main__":
    main()
