"""Attention of a step that mixes decodes with a prefill chunk, on the CPU path: one padded call against
the two kinds apart.

    python benchmarks/bench_mixed_attention.py         # CPU, GPT-2 shapes (12 heads x 64), fp32

The reference attention (kernels/reference.py) pads every request's queries to the step's longest, so
beside a 512-token chunk each decode is computed as if it had 512 queries. The runner therefore gives
a mixed step to the reference in two parts, decodes and chunks (`AttnMetadata.parts`). This times
`AttnMetadata.attention` both ways on one layer and prints the ratio (> 1: the split is faster).
"""

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.utils.benchmark as tb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoserve as ns  # noqa: E402
from kernels import reference  # noqa: E402

# (decodes, their context, the prefill chunk's length): a chunk beside many decodes, as in a busy server
STEPS = ((63, 300, 512), (127, 200, 256), (255, 150, 64))


def time_ms(fn) -> float:
    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3


def mixed_step(n_decodes, decode_ctx, chunk, n_heads=12, head_dim=64, block_size=16):
    """AttnMetadata of one step, and its queries: n_decodes requests adding one token, then a new chunk."""
    q_lens, ctx = [1] * n_decodes + [chunk], [decode_ctx] * n_decodes + [chunk]
    num_blocks = sum(-(-c // block_size) for c in ctx)
    pages = torch.randperm(num_blocks).tolist()
    requests, cu = [], [0]
    for n, c in zip(q_lens, ctx):
        table, pages = pages[: -(-c // block_size)], pages[-(-c // block_size) :]
        requests.append(SimpleNamespace(block_table=table))
        cu.append(cu[-1] + n)
    kc, vc = (torch.randn(num_blocks, block_size, n_heads, head_dim) for _ in range(2))
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    width = max(len(r.block_table) for r in requests)
    tables = [r.block_table + [0] * (width - len(r.block_table)) for r in requests]
    meta = ns.AttnMetadata(None, i32(cu), i32(ctx), i32(tables), chunk, max(ctx), [(kc, vc)], reference)
    as_tensor = lambda x, dt=torch.int64: torch.tensor(x, dtype=dt)
    kinds = [list(range(n_decodes)), [n_decodes]]
    parts = [ns.ModelRunner.attention_part(kind, cu, ctx, requests, as_tensor) for kind in kinds]
    return meta, parts, torch.randn(cu[-1], n_heads, head_dim), kc, vc


def row(n_decodes, decode_ctx, chunk) -> tuple[float, float]:
    """ms per call of the step's attention, padded and split; the two must agree."""
    meta, parts, q, kc, vc = mixed_step(n_decodes, decode_ctx, chunk)
    split_meta = ns.AttnMetadata(**{**meta.__dict__, "parts": parts})
    torch.testing.assert_close(split_meta.attention(q, kc, vc, 0.125), meta.attention(q, kc, vc, 0.125))
    return time_ms(lambda: meta.attention(q, kc, vc, 0.125)), time_ms(lambda: split_meta.attention(q, kc, vc, 0.125))


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
