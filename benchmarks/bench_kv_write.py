"""KV-cache write of a prefill chunk on the CPU path: per-token scatter against whole pages.

    python benchmarks/bench_kv_write.py            # CPU, the plain-torch kernels the CPU runner uses

The page-aligned scheduler starts every prefill chunk on a page boundary so the runner can write
the chunk's keys and values a whole page at a time (`write_kv_pages`) instead of slot by slot
(`write_kv`). This prints, for a few chunk lengths and three cache shapes, the time of each write (both
K and V, one layer) per token and the ratio scatter / pages (> 1: pages are faster). The GPU's
Triton kernels are timed by benchmarks/bench_kernels.py.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as tb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoserve_kernels import reference  # noqa: E402

# the cache's heads: with grouped-query attention a token writes its KV heads only (Llama-3-8B: 8 for 32)
SHAPES = {"shakespeare (4 heads x 64)": (4, 64), "gpt2 (12 heads x 64)": (12, 64), "llama3-8b (8 KV x 128)": (8, 128)}
TOKENS = (16, 256, 2048)


def time_us(fn) -> float:
    """Median of torch.utils.benchmark's adaptive runs, in microseconds."""
    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median * 1e6


def row(n_heads, head_dim, n, block_size, dtype):
    n_pages = -(-n // block_size)
    num_blocks = 4 * n_pages
    kc = torch.zeros(num_blocks, block_size, n_heads, head_dim, dtype=dtype)
    vc = torch.zeros_like(kc)
    k, v = (torch.randn(n, n_heads, head_dim, dtype=dtype) for _ in range(2))
    page_ids = torch.randperm(num_blocks)[:n_pages].to(torch.int32)
    j = torch.arange(n)
    slots = page_ids.long()[j // block_size] * block_size + j % block_size  # the same destinations
    reference.write_kv_pages(kc, vc, k, v, page_ids)
    want = kc.clone()
    kc.zero_()
    reference.write_kv(kc, vc, k, v, slots)
    assert torch.equal(kc, want), "write_kv and write_kv_pages disagree"
    t_scatter = time_us(lambda: reference.write_kv(kc, vc, k, v, slots))
    t_pages = time_us(lambda: reference.write_kv_pages(kc, vc, k, v, page_ids))
    return t_scatter, t_pages


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"CPU, torch {torch.__version__}, {args.threads} thread(s), {args.dtype}, block size {args.block_size}")
    print(f"{'shape':<28} {'tokens':>6} {'scatter ns/tok':>14} {'pages ns/tok':>12} {'scatter/pages':>13}")
    for name, (h, d) in SHAPES.items():
        for n in TOKENS:
            t_scatter, t_pages = row(h, d, n, args.block_size, dtype)
            per_token = f"{1e3 * t_scatter / n:>14.1f} {1e3 * t_pages / n:>12.1f}"
            print(f"{name:<28} {n:>6} {per_token} {t_scatter / t_pages:>13.2f}")


if __name__ == "__main__":
    main()
