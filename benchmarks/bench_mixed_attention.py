"""Attention of one step on the CPU path, GPT-2 shapes (12 heads x 64, 16-token pages), fp32: ratios
measured in one run.

    python benchmarks/bench_mixed_attention.py          # the three tables, a few minutes on 2 cores
    python benchmarks/bench_mixed_attention.py --table 2 --min-time 0.3

1. padded against split: `nanoserve_kernels/reference.paged_attention_padded` pads every request's queries to
   the step's longest, so beside a 512-token chunk each decode is computed as if it had 512 queries;
   `reference.paged_attention` attends to the decodes and the chunks of such a step apart. Ratio > 1:
   the split is faster.
2. old against new, per layer: the reference as every layer called it before (no plan: each layer
   re-derives the step's indices and masks and gathers every page into one padded buffer) against
   `nanoserve_kernels/cpu.py` with the step's plan (the plan is built once per step: its cost over 12 layers is
   added to the new time). Decode-only steps of 32, 128 and 256 requests with contexts uniform in
   100..500, and steps mixing decodes with prefill chunks; each timed old, new, new, old, the faster
   of each pair kept. Ratio > 1: new is faster.
3. the alternatives for a decode step, each timed twice, in one order and then in the reverse one
   (the machine is shared: the ratio uses the faster of the two), so the choice in nanoserve_kernels/cpu.py can
   be re-checked: the reference with a plan (hoisting alone), a gather in head-major layout,
   nanoserve_kernels/cpu.py's torch path with decode groups of several sizes, and its in-place numba kernel.

Every variant is checked against the reference before it is timed.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoserve_kernels import cpu, reference  # noqa: E402

N_LAYER = 12  # GPT-2: a plan serves this many layers
# (decodes, their context, the prefill chunk's length): a chunk beside many decodes, as in a busy server
MIXED = ((63, 300, 512), (127, 200, 256), (255, 150, 64))
DECODES = (32, 128, 256)
MIN_TIME = 1.0  # seconds of timing per measurement (--min-time)


def time_ms(fn) -> float:
    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=MIN_TIME).median * 1e3


def make_step(q_lens, ctx, n_heads=12, head_dim=64, block_size=16, seed=0) -> dict:
    """The arguments of paged_attention for one step: request i adds q_lens[i] tokens, ctx[i] in all;
    pages in a random order."""
    g = torch.Generator().manual_seed(seed)
    n_pages = [-(-c // block_size) for c in ctx]
    pages = torch.randperm(sum(n_pages), generator=g).split(n_pages)
    tables = torch.zeros(len(ctx), max(n_pages), dtype=torch.int32)
    for i, p in enumerate(pages):
        tables[i, : len(p)] = p
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    shape = (sum(n_pages), block_size, n_heads, head_dim)
    return dict(
        q=torch.randn(sum(q_lens), n_heads, head_dim, generator=g),
        k_cache=torch.randn(shape, generator=g),
        v_cache=torch.randn(shape, generator=g),
        cu_seqlens_q=i32([0, *torch.tensor(q_lens).cumsum(0).tolist()]),
        context_lens=i32(ctx),
        block_tables=tables,
        scale=head_dim**-0.5,
        max_q=max(q_lens),
        max_ctx=max(ctx),
    )


def mixed_step(n_decodes, decode_ctx, chunk) -> dict:
    """n_decodes requests adding one token after decode_ctx - 1, then a fresh prompt of `chunk` tokens."""
    return make_step([1] * n_decodes + [chunk], [decode_ctx] * n_decodes + [chunk])


def decode_step(batch, lo=100, hi=500, seed=0) -> dict:
    """`batch` requests decoding one token, their contexts uniform in lo..hi."""
    ctx = torch.randint(lo, hi + 1, (batch,), generator=torch.Generator().manual_seed(seed)).tolist()
    return make_step([1] * batch, ctx, seed=seed)


def step_meta(step):
    return [step[k] for k in ("cu_seqlens_q", "context_lens", "block_tables", "max_q", "max_ctx")]


# --- table 1 -----------------------------------------------------------------------------------


def table_padded_vs_split():
    print("\n1. a mixed step, the reference padded against split (ms per call, one layer)")
    print(f"{'step':<34} {'padded':>8} {'split':>8} {'padded / split':>15}")
    for n_decodes, decode_ctx, chunk in MIXED:
        step = mixed_step(n_decodes, decode_ctx, chunk)
        torch.testing.assert_close(reference.paged_attention(**step), reference.paged_attention_padded(**step))
        padded = time_ms(lambda step=step: reference.paged_attention_padded(**step))
        split = time_ms(lambda step=step: reference.paged_attention(**step))
        name = f"{n_decodes} decodes (ctx {decode_ctx}) + {chunk} chunk"
        print(f"{name:<34} {padded:>8.1f} {split:>8.1f} {padded / split:>15.1f}")


# --- table 2 -----------------------------------------------------------------------------------


def old_vs_new(step) -> tuple[float, float, float]:
    """ms: the old per-layer call, the new per-layer call with a plan, and building the plan (per step);
    each the faster of two measurements, old-new-new-old."""
    plan = cpu.plan_attention(*step_meta(step))
    torch.testing.assert_close(cpu.paged_attention(**step, plan=plan), reference.paged_attention(**step))
    old = lambda: time_ms(lambda: reference.paged_attention(**step))
    new = lambda: time_ms(lambda: cpu.paged_attention(**step, plan=plan))
    t_old, t_new = old(), new()
    t_new, t_old = min(t_new, new()), min(t_old, old())
    return t_old, t_new, time_ms(lambda: cpu.plan_attention(*step_meta(step)))


def table_old_vs_new():
    print(
        f"\n2. per layer, old (reference, no plan) against new (nanoserve_kernels/cpu.py + its plan"
        f" / {N_LAYER} layers), ms"
    )
    print(f"{'step':<38} {'old':>8} {'new':>8} {'plan/step':>9} {'old / new':>10}")
    steps = {f"{b} decodes, ctx 100..500": decode_step(b) for b in DECODES}
    steps |= {f"{n} decodes (ctx {c}) + {q} chunk": mixed_step(n, c, q) for n, c, q in MIXED}
    steps["31 decodes (ctx 300) + 256 after 256"] = make_step([1] * 31 + [256], [300] * 31 + [512])
    for name, step in steps.items():
        old, new, plan = old_vs_new(step)
        print(f"{name:<38} {old:>8.2f} {new:>8.2f} {plan:>9.2f} {old / (new + plan / N_LAYER):>10.2f}")


# --- table 3 -----------------------------------------------------------------------------------


def head_major_plan(step):
    """An alternative layout: one index of cache rows per step so that a single index_select gathers
    the keys straight into the (B, H, max_ctx, D) layout SDPA reads fastest, then one masked SDPA."""
    kc, ctx, tables = step["k_cache"], step["context_lens"], step["block_tables"].long()
    block_size, H = kc.shape[1], kc.shape[2]
    t = torch.arange(step["max_ctx"])
    slots = tables[:, t // block_size] * block_size + t % block_size  # (B, max_ctx)
    rows = (slots[:, None, :] * H + torch.arange(H)[None, :, None]).reshape(-1)  # (B * H * max_ctx,)
    mask = (t[None, :] < ctx[:, None])[:, None, None, :]
    B, D = ctx.shape[0], kc.shape[3]
    buffers = [torch.empty(B, H, step["max_ctx"], D) for _ in range(2)]  # reused, as gather_pages' are
    return rows, mask, buffers


def head_major(step, plan):
    rows, mask, (k, v) = plan
    D = k.shape[-1]
    torch.index_select(step["k_cache"].view(-1, D), 0, rows, out=k.view(-1, D))
    torch.index_select(step["v_cache"].view(-1, D), 0, rows, out=v.view(-1, D))
    return F.scaled_dot_product_attention(step["q"][:, :, None], k, v, attn_mask=mask, scale=step["scale"])[:, :, 0]


def alternatives(step) -> dict:
    ref_plan = reference.plan_attention(*step_meta(step))
    hm_plan = head_major_plan(step)
    variants = {
        "old (reference, no plan)": lambda: reference.paged_attention(**step),
        "reference + plan": lambda: reference.paged_attention(**step, plan=ref_plan),
        "head-major gather + plan": lambda: head_major(step, hm_plan),
        "cpu.py, one group": cpu.plan_attention(*step_meta(step), decode_keys=2**62, in_place=False),
    }
    for keys in (256, 512, 1024, 2048, 4096):
        plan = cpu.plan_attention(*step_meta(step), decode_keys=keys, in_place=False)
        variants[f"cpu.py, groups <= {keys} keys"] = plan
    if cpu.row_kernel() is not None:  # numba installed
        variants["cpu.py, in place (numba)"] = cpu.plan_attention(*step_meta(step), in_place=True)
    want = reference.paged_attention(**step)
    for name, v in variants.items():
        if isinstance(v, cpu.AttentionPlan):
            variants[name] = v = lambda plan=v: cpu.paged_attention(**step, plan=plan)
        torch.testing.assert_close(v(), want, atol=1e-5, rtol=1e-5)
    return variants


def table_alternatives():
    print("\n3. decode step, alternatives; ms per layer, measured forward then reverse; ratio: old / best of the two")
    for batch in DECODES:
        step = decode_step(batch)
        variants = alternatives(step)
        times = {name: [] for name in variants}
        for order in (list(variants), list(variants)[::-1]):
            for name in order:
                times[name].append(time_ms(variants[name]))
        old = min(times["old (reference, no plan)"])
        print(f"{batch} decodes, ctx 100..500")
        for name, (forward, reverse) in times.items():
            print(f"  {name:<30} {forward:>8.2f} {reverse:>8.2f}   {old / min(forward, reverse):>5.2f}")


def main():
    global MIN_TIME
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--table", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--min-time", type=float, default=MIN_TIME, help="seconds of timing per measurement")
    args = p.parse_args()
    MIN_TIME = args.min_time
    torch.set_num_threads(args.threads)
    print(f"CPU, torch {torch.__version__}, {args.threads} thread(s), fp32, GPT-2 heads (12 x 64), 16-token pages")
    tables = {1: table_padded_vs_split, 2: table_old_vs_new, 3: table_alternatives}
    for t in args.table:
        tables[t]()


if __name__ == "__main__":
    main()
