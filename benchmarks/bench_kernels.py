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

--compile-only compiles every kernel variant the engine launches (real launch arguments, recorded
from the public functions on CPU tensors, for GPT-2 and for Llama-3-8B's grouped-query heads) ahead of
time for a GPU architecture, without a GPU, and prints what the GPU would run: registers per thread,
spilled bytes, shared memory and the global loads by width. It compiles each variant the way Triton's
JIT does at launch, with the specialisation it derives from the arguments (16-byte aligned pointers and
strides divisible by 16 marked as such): without those hints the compiler must assume any alignment,
loads 2 bytes at a time and needs several times the registers (`--without-hints` shows it). `--sass
rowwise` prints a kernel's machine code too (the order of its loads, say). tests/test_kernels.py runs
it, because Triton's CPU interpreter accepts code that the GPU compiler rejects.

    python benchmarks/bench_kernels.py --compile-only --arch 90 [--dtype float16] [--model gpt2]
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
    from nanoserve_kernels import reference

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

# query heads, KV heads, head dim: GPT-2 (multi-head) and Llama-3-8B (grouped-query, 4 query heads a KV head)
MODELS = {"gpt2": (12, 12, 64), "llama3-8b": (32, 8, 128)}
H100_SMS = 132  # the split count the decode launches are recorded with is the heuristic's on an H100


def record_launches(pa, dtypes, models):
    """Call the public functions on small CPU tensors with every kernel swapped for a recorder: returns
    the (config, kernel, args, kwargs) of each launch a GPU would get, with the engine's strides (q a view
    of the fused qkv projection, block tables 64 pages wide: a 1024-token context of 16-token pages)."""
    launches, config = [], None

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((config, self.kernel, args, kwargs))

    from triton.runtime.jit import JITFunction

    for name, kernel in list(vars(pa).items()):
        if isinstance(kernel, JITFunction):
            setattr(pa, name, Recorder(kernel))

    bs = GPT2["block_size"]
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    for dtype in dtypes:
        for model in models:
            H, H_kv, D = MODELS[model]
            kc = torch.zeros(4, bs, H_kv, D, dtype=dtype)  # nothing runs, so the pages need not exist
            qkv = torch.zeros(100, (H + 2 * H_kv) * D)  # the model's fp32 activations, q k v fused
            k = qkv[:20, H * D : (H + H_kv) * D].view(20, H_kv, D)
            tables = torch.zeros(2, 64, dtype=torch.int32)
            config = f"{model} write"
            pa.write_kv(kc, kc, k, k, torch.arange(20))
            pa.write_kv_pages(kc, kc, k.contiguous(), k.contiguous(), i32(1, 2))
            q = qkv[:, : H * D].view(100, H, D).to(dtype)
            config = f"{model} prefill"
            pa.paged_attention(q[:20], kc, kc, i32(0, 19, 20), i32(30, 10), tables, D**-0.5, max_q=19, max_ctx=30)
            pa.paged_attention(q, kc, kc, i32(0, 100), i32(100), tables[:1], D**-0.5, max_q=100, max_ctx=100)
            config = f"{model} decode"
            decode = (kc, kc, i32(0, 1, 2), i32(1000, 10), tables, D**-0.5)
            pa.paged_attention(q[:2], *decode, max_q=1, max_ctx=1024, num_kv_splits=1)
            splits = min(triton_cdiv(8 * H100_SMS, 2 * H_kv), 1024 // pa.MIN_KEYS_PER_SPLIT, pa.MAX_KV_SPLITS)
            config = f"{model} decode split"
            pa.paged_attention(q[:2], *decode, max_q=1, max_ctx=1024, num_kv_splits=splits)
    return launches


def triton_cdiv(a, b):
    return -(-a // b)


def jit_specialization(kernel, args, kwargs, backend):
    """What Triton's JIT hands the compiler when the kernel is launched with these arguments: options,
    signature, constexprs and attributes. The attributes are the launch-time specialisation: pointers
    16-byte aligned and ints divisible by 16 get `tt.divisibility = 16` (what lets the compiler emit
    128-bit loads), ints equal to 1 become constants. It runs the JIT's own binder, with the GPU
    target's backend in place of the (absent) driver's. These are Triton internals (3.3 to 3.9); a
    Triton that moved them fails here with an AttributeError or an ImportError."""
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound_args, specialization, options)


def cuobjdump(cubin: bytes, *flags) -> str:
    """Run the cuobjdump that ships with Triton on a compiled kernel."""
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """Registers, local memory per thread (spills: Triton kernels have no local arrays) and shared
    memory, as `cuobjdump --dump-resource-usage` reads them from the binary."""
    import re

    text = cuobjdump(cubin, "--dump-resource-usage")
    return {key: int(n) for key, n in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def global_loads(ptx: str) -> str:
    """The kernel's global load instructions (static count) by width, widest first: '9x128b 11x32b'."""
    import collections
    import re

    bits = collections.Counter()
    for vec, width in re.findall(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfsu](\d+)", ptx):
        bits[int(vec or 1) * int(width)] += 1
    return " ".join(f"{n}x{b}b" for b, n in sorted(bits.items(), reverse=True))


VARIANT_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "GROUP", "NUM_SPLITS", "BLOCK_HD", "BLOCK")


def compile_only(arch, dtypes, models, hints=True, sass=None):
    """Compile every kernel variant the engine launches for sm_`arch`, specialised as the JIT would at
    launch, and print each one's registers, spills and shared memory (the module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("--compile-only needs the real compiler: unset TRITON_INTERPRET")
    from nanoserve_kernels import paged_attention as pa

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    hinted = "with the launch-time specialisation" if hints else "WITHOUT the launch-time specialisation"
    print(f"triton {triton.__version__}, target sm_{arch} (cuda, warp size 32), {hinted}")
    print(f"{'config':<22} {'kernel':<21} {'dtype':<5} {'variant':<42} {'regs':>4} {'spill B':>7} {'smem B':>6}  loads")
    seen = set()
    for config, kernel, args, kwargs in record_launches(pa, dtypes, models):
        options, signature, constexprs, attrs = jit_specialization(kernel, args, kwargs, backend)
        key = (kernel.__name__, str(signature), str(constexprs), str(attrs if hints else None))
        if key in seen:  # e.g. the same write kernel for two models
            continue
        seen.add(key)
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs if hints else None), target, options.__dict__
        )
        use = resource_usage(compiled.asm["cubin"])
        names = dict(zip(kernel.arg_names, args), **kwargs)
        variant = " ".join(f"{n}={names[n]}" for n in VARIANT_KEYS if n in names)
        dtype = next(signature[n] for n in ("k_cache_ptr", "out_ptr") if n in signature)[1:]
        print(
            f"{config:<22} {kernel.__name__.strip('_'):<21} {dtype:<5} {variant:<42} {use['REG']:>4} "
            f"{use['LOCAL']:>7} {use['SHARED']:>6}  {global_loads(compiled.asm['ptx'])}"
        )
        if sass and kernel.__name__.strip("_") == sass.strip("_"):
            print(cuobjdump(compiled.asm["cubin"], "-sass"))
            sass = None  # the first variant only
    print(f"compiled {len(seen)} kernel variants for sm_{arch}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compile-only", action="store_true", help="compile every kernel for --arch, no GPU needed")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only, e.g. 80, 90")
    parser.add_argument("--dtype", nargs="+", default=["float16", "bfloat16", "float32"], help="for --compile-only")
    parser.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS), help="for --compile-only")
    parser.add_argument(
        "--without-hints", action="store_true", help="for --compile-only: compile without the launch-time hints"
    )
    parser.add_argument("--sass", metavar="KERNEL", help="for --compile-only: print this kernel's SASS (first variant)")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    if args.compile_only:
        dtypes = [getattr(torch, d) for d in args.dtype]
        return compile_only(args.arch, dtypes, args.model, hints=not args.without_hints, sass=args.sass)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU and found none; on a CPU run `pytest tests/test_kernels.py`")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("TRITON_INTERPRET=1 would time the CPU interpreter: unset it to benchmark the GPU")
    import triton

    from nanoserve_kernels import paged_attention as pa

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"device-to-device copy bandwidth (1 GiB, read + write): {bw / 1e9:.0f} GB/s")
    bench_decode(pa, bw)
    bench_write(pa, bw)


if __name__ == "__main__":
    main()
