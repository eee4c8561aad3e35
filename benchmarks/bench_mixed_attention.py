"""Attention of a step that mixes decodes with a prefill chunk, on the CPU path: one padded call against
the two kinds apart.

    python benchmarks/bench_mixed_attention.py         # CPU, GPT-2 shapes (12 heads x 64), fp32

`kernels/reference.paged_attention_padded` pads every request's queries to the step's longest, so
beside a 512-token chunk each decode is computed as if it had 512 queries. `reference.paged_attention`
therefore attends to the decodes and the chunks of such a step apart (`paged_attention_by_kind`). This
times both on one layer and prints the ratio (> 1: the split is faster).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as tb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import reference  # noqa: E402

# (decodes, their context, the prefill chunk's length): a chunk beside many decodes, as in a busy server
STEPS = ((63, 300, 512), (127, 200, 256), (255, 150, 64))


def time_ms(fn) -> float:
    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3


def mixed_step(n_decodes, decode_ctx, chunk, n_heads=12, head_dim=64, block_size=16) -> dict:
    """The arguments of paged_attention for one step: n_decodes requests adding one token, then a new chunk."""
    q_lens, ctx = [1] * n_decodes + [chunk], [decode_ctx] * n_decodes + [chunk]
    n_pages = [-(-c // block_size) for c in ctx]
    pages = torch.randperm(sum(n_pages)).split(n_pages)
    tables = torch.zeros(len(ctx), max(n_pages), dtype=torch.int32)
    for i, p in enumerate(pages):
        tables[i, : len(p)] = p
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    return dict(
        q=torch.randn(sum(q_lens), n_heads, head_dim),
        k_cache=torch.randn(sum(n_pages), block_size, n_heads, head_dim),
        v_cache=torch.randn(sum(n_pages), block_size, n_heads, head_dim),
        cu_seqlens_q=i32([0, *torch.tensor(q_lens).cumsum(0).tolist()]),
        context_lens=i32(ctx),
        block_tables=tables,
        scale=head_dim**-0.5,
        max_q=chunk,
        max_ctx=max(ctx),
    )


def row(n_decodes, decode_ctx, chunk) -> tuple[float, float]:
    """ms per call of the step's attention, padded and split; the two must agree."""
    step = mixed_step(n_decodes, decode_ctx, chunk)
    torch.testing.assert_close(reference.paged_attention(**step), reference.paged_attention_padded(**step))
    return time_ms(lambda: reference.paged_attention_padded(**step)), time_ms(lambda: reference.paged_attention(**step))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"one layer, fp32, {args.threads} thread(s); ms per call\n")
    print(f"{'step':<34} {'padded':>8} {'split':>8} {'padded / split':>15}")
    for n_decodes, decode_ctx, chunk in STEPS:
        padded, split = row(n_decodes, decode_ctx, chunk)
        name = f"{n_decodes} decodes (ctx {decode_ctx}) + {chunk} chunk"
        print(f"{name:<34} {padded:>8.1f} {split:>8.1f} {padded / split:>15.1f}")


if __name__ == "__main__":
    main()
