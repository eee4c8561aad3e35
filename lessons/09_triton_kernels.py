# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 9 — The Triton paged-attention kernels
#
# `nanoserve_kernels/reference.py` gathers every request's pages into one padded tensor, then calls PyTorch's
# attention: short and obviously right, which makes it the oracle — but it copies every key and value of
# the batch at every layer of every step. Reading the pages where they are needs a kernel: on a CPU,
# `nanoserve_kernels/cpu_numba.py` is a numba loop over each query's pages (one layer of 256 decodes: 1.5 ms, against
# 4 ms to gather and attend them); on a GPU, `nanoserve_kernels/paged_attention.py` does it with kernels written
# in Triton.
#
# This lesson follows the kernels in the order the file presents them (the order of llm.c's
# `dev/cuda`: simplest first), and checks each one against the reference:
#
# 1. the KV write, one token per program, then whole pages at a time;
# 2. the row-wise attention kernel: one program per query row and head, with an *online softmax*;
# 3. split-KV (flash-decoding): the same kernel with the keys cut into slices that run in parallel;
# 4. grouped-query attention: one program per key/value head, serving all the query heads that read it;
# 5. the tiled kernel (FlashAttention-2) for prefill;
#
# and ends with the step's *plan* and with what the GPU compiler makes of the kernels.
#
# **No GPU needed.** Without one, Triton's *interpreter* runs the kernels on the CPU with NumPy, one
# program after another: slow, so the shapes here are tiny, but every line of the kernels runs.
# The interpreter is switched on by an environment variable that must be set *before* Triton compiles
# the kernels, i.e. before `nanoserve_kernels.paged_attention` is imported. Cells marked **GPU only** run
# when a CUDA GPU is present and are skipped otherwise.

# %%
import os

import torch
from helpers import show

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before the import below: the kernels run in the interpreter
DEVICE = "cuda" if HAS_GPU else "cpu"

import math

import matplotlib.pyplot as plt

import nanoserve as ns
from nanoserve_kernels import paged_attention, reference
from nanoserve_sched import SamplingParams

torch.set_num_threads(1)
print("device:", DEVICE, "| Triton interpreter:", os.environ.get("TRITON_INTERPRET") == "1")

# %% [markdown]
# ## A test batch
#
# One step's batch mixes requests: decodes (one new token) and prefill chunks (several), each with
# its own number of tokens already in the cache. Pages are handed out in shuffled order and the pool
# has spare pages full of random values, so a kernel that reads a wrong page gives a wrong answer.


# %%
def make_batch(reqs, block_size=4, n_heads=2, head_dim=16, seed=0, n_kv_heads=None):
    """A random paged cache and one step's attention inputs; reqs is a list of (q_len, context_len).
    The cache has n_kv_heads heads (default: n_heads, one per query head)."""
    g = torch.Generator().manual_seed(seed)
    n_pages = [-(-ctx // block_size) for _, ctx in reqs]
    num_blocks = sum(n_pages) + 4
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [perm[sum(n_pages[:i]) : sum(n_pages[: i + 1])] for i in range(len(reqs))]
    width = max(n_pages)
    q_lens = [q for q, _ in reqs]
    cu = [sum(q_lens[:i]) for i in range(len(reqs) + 1)]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)
    return dict(
        q=rand(cu[-1], n_heads, head_dim),
        k_cache=rand(num_blocks, block_size, n_kv_heads or n_heads, head_dim),
        v_cache=rand(num_blocks, block_size, n_kv_heads or n_heads, head_dim),
        cu_seqlens_q=i32(cu),
        context_lens=i32([ctx for _, ctx in reqs]),
        block_tables=i32([t + [0] * (width - len(t)) for t in tables]),
        scale=head_dim**-0.5,
        max_q=max(q_lens),
        max_ctx=max(ctx for _, ctx in reqs),
    )


decode_batch = make_batch([(1, 40), (1, 70), (1, 9)])  # three decodes
mixed_batch = make_batch([(1, 40), (7, 25), (12, 12), (1, 33)])  # decodes and prefill chunks
errors, tolerances = {}, {}  # kernel -> largest difference from the reference, and the one allowed


def check(name, got, want, tol=1e-5):
    errors[name], tolerances[name] = (got - want).abs().max().item(), tol
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    print(f"{name:<34} matches the reference (largest difference {errors[name]:.1e})")


# %% [markdown]
# Which keys each query may see: a query at position *p* attends to keys 0..*p* of its own request
# (causal). For a decode that is the whole context; for a chunk of *q* tokens, a staircase:

# %%
b = mixed_batch
cu, ctx = b["cu_seqlens_q"].tolist(), b["context_lens"].tolist()
mask = torch.full((cu[-1], b["max_ctx"]), float("nan"))
for i in range(len(ctx)):
    q_len = cu[i + 1] - cu[i]
    for t in range(q_len):
        mask[cu[i] + t, : ctx[i] - q_len + t + 1] = i
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.imshow(mask, cmap="tab10", vmin=0, vmax=9, aspect="auto", interpolation="nearest")
ax.set_xlabel("key position in the request's context")
ax.set_ylabel("query row of the batch")
ax.set_title("what each query attends to (one colour per request)")
show(fig, "09_mask")

# %% [markdown]
# ## 1. Writing the cache
#
# `_write_kv_kernel` runs one program per new token: it copies the token's `H·D` key and value
# elements into row `slot` of the cache viewed as `(num_blocks · block_size, H·D)`.
# `_write_kv_pages_kernel` is the page-aligned path of lesson 8: one program per (page, piece of a
# page), each a contiguous copy.

# %%
k_cache = torch.zeros(8, 4, 2, 16, device=DEVICE)
v_cache = torch.zeros_like(k_cache)
k_new, v_new = torch.randn(10, 2, 16, device=DEVICE), torch.randn(10, 2, 16, device=DEVICE)
slots = torch.tensor([21, 22, 23, 8, 9, 10, 11, 0, 1, 2], device=DEVICE)  # pages 5, 2 and 0

want = [torch.zeros_like(k_cache), torch.zeros_like(v_cache)]
reference.write_kv(*want, k_new, v_new, slots)
paged_attention.write_kv(k_cache, v_cache, k_new, v_new, slots)
check("1a. write_kv (one token a program)", torch.stack([k_cache, v_cache]), torch.stack(want), tol=0)

pages = torch.tensor([6, 3, 7], device=DEVICE)  # 10 tokens from a page boundary: 2 full pages and 2 tokens
want = [torch.zeros_like(k_cache), torch.zeros_like(v_cache)]
reference.write_kv_pages(*want, k_new, v_new, pages)
got = [torch.zeros_like(k_cache), torch.zeros_like(v_cache)]
paged_attention.write_kv_pages(*got, k_new, v_new, pages)
check("1b. write_kv_pages (whole pages)", torch.stack(got), torch.stack(want), tol=0)

# %% [markdown]
# ## Online softmax, in plain torch first
#
# Attention for one query is `softmax(scores) @ V` over all its keys. A kernel cannot hold all the
# scores of a long context at once; it walks the keys a tile at a time and keeps three running
# values: the largest score so far `m`, the sum `l` of `exp(score − m)`, and the weighted sum `acc`
# of value vectors. When a tile brings a larger maximum, the old sums are rescaled by
# `exp(m_old − m_new)`. At the end, `acc / l` is exactly the softmax-weighted sum. Here it is on 64
# keys in tiles of 16:

# %%
g = torch.Generator().manual_seed(1)
scores, values = 3 * torch.randn(64, generator=g), torch.randn(64, 4, generator=g)
m, l, acc = torch.tensor(-math.inf), torch.tensor(0.0), torch.zeros(4)
for start in range(0, 64, 16):
    s = scores[start : start + 16]
    m_new = torch.maximum(m, s.max())
    p = torch.exp(s - m_new)
    acc = acc * torch.exp(m - m_new) + p @ values[start : start + 16]
    l = l * torch.exp(m - m_new) + p.sum()
    m = m_new
online = acc / l
print("online softmax == softmax:", torch.allclose(online, scores.softmax(0) @ values, atol=1e-6))

# %% [markdown]
# The kernels do exactly this, in fp32 whatever the storage dtype, and with `exp2` in place of `exp`
# (the factor log2(e) is folded into the scale; `exp2` is a single GPU instruction).
#
# ## 2. The row-wise kernel
#
# `_attn_rowwise_kernel` runs one program per (query row, head). It finds its request and its
# position, then walks the request's keys `BLOCK_N` at a time, computing each key's address from the
# block table (`page = block_tables[b, n // block_size]`), with the online softmax above. A decode
# has one query row per request, so for decode this simple grid is the right one: vLLM's
# `paged_attention_v1` has the same shape.

# %%
want = reference.paged_attention(**decode_batch)
check("2a. row-wise, decode batch", paged_attention.paged_attention_rowwise(**decode_batch), want)
want_mixed = reference.paged_attention(**mixed_batch)
check("2b. row-wise, mixed batch", paged_attention.paged_attention_rowwise(**mixed_batch), want_mixed)

# %% [markdown]
# ## 3. Split-KV (flash-decoding)
#
# A decode step with few requests launches few programs: batch × heads. A GPU has a hundred or more
# multiprocessors, so most of them would idle while each program walks a long context alone.
# Split-KV gives each (row, head) `S` programs, each over one slice of the keys. Each slice ends with
# its partial output and its *log-sum-exp* `lse = m + log(l)`; `_combine_splits_kernel` merges
# them, weighting slice *s* by `exp(lse_s − max lse)`. In torch, on the example above:

# %%
parts = []
for s_scores, s_values in ((scores[:40], values[:40]), (scores[40:], values[40:])):
    lse = torch.logsumexp(s_scores, 0)
    parts.append((s_scores.softmax(0) @ s_values, lse))
lses = torch.stack([lse for _, lse in parts])
weights = torch.exp(lses - lses.max())
merged = sum(w * out for w, (out, _) in zip(weights, parts)) / weights.sum()
print("two slices merged == softmax:", torch.allclose(merged, scores.softmax(0) @ values, atol=1e-6))

# %%
for splits in (2, 4):
    got = paged_attention.paged_attention_rowwise(**decode_batch, num_kv_splits=splits)
    check(f"3. split-KV, {splits} splits", got, want)
print("splits the dispatcher picks here:", paged_attention.choose_num_kv_splits(3, 2, 70, torch.device(DEVICE)))

# %% [markdown]
# On a CPU `choose_num_kv_splits` always says 1: there are no multiprocessors to fill. On a GPU it
# splits when batch × heads programs are too few to give every multiprocessor about eight (while one
# program waits for its keys to arrive from memory, the others issue theirs), keeping each slice at
# least 64 keys long. A slice is a whole number of key tiles (`split_layout`).
#
# ## 4. Grouped-query attention
#
# Llama and Qwen models give their key/value heads to *groups* of query heads: 32 query heads may
# share 8 KV heads, so query head h reads KV head h // 4 and the cache is 4 times smaller. The
# row-wise kernel handles that by reading KV head h // 4 — but then four programs load the same keys.
# `_attn_grouped_kernel` gives one program a whole group instead: the group's query heads are the
# rows of one tile, so each key tile is loaded once and serves all four through a `tl.dot` (tensor
# cores need 16 rows, so the tile is padded). It is the decode kernel for fp16/bf16 models with
# grouped heads; the interpreter cannot run its bf16 `tl.dot`, so this check uses fp16.

# %%
gqa_batch = make_batch([(1, 40), (1, 70), (1, 9)], n_heads=8, n_kv_heads=2)  # 4 query heads per KV head
want_gqa = reference.paged_attention(**gqa_batch)
check("4a. row-wise, grouped heads", paged_attention.paged_attention_rowwise(**gqa_batch), want_gqa)
half = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in gqa_batch.items()}
got_half = paged_attention.paged_attention_grouped(**half, num_kv_splits=2)
check("4b. grouped kernel, fp16, 2 splits", got_half.float(), want_gqa, tol=1e-2)  # fp16 inputs: ~1e-3 off
print("paged_attention's decode kernel in fp16:", paged_attention.decode_kernel(half["q"], half["k_cache"]).__name__)

# %% [markdown]
# ## 5. The tiled kernel (FlashAttention-2)
#
# For a prefill chunk of *q* tokens, the row-wise kernel would read every key *q* times, once per
# query row. `_attn_tiled_kernel` gives a program `BLOCK_M` query rows of one request: each tile of
# keys it loads serves all of them, through two matrix products (`tl.dot`, the GPU's tensor cores).
# Tiles entirely above the causal diagonal are skipped. Decode rows in the same batch are 1-row tiles.

# %%
check("5. tiled, mixed batch", paged_attention.paged_attention_tiled(**mixed_batch), want_mixed)
check("   paged_attention(), mixed batch", paged_attention.paged_attention(**mixed_batch), want_mixed)
check("   paged_attention(), decode batch", paged_attention.paged_attention(**decode_batch), want)

# %%
fig, ax = plt.subplots(figsize=(8, 3))
names = [n.strip() for n in errors][::-1]
diffs = [errors[n] for n in errors][::-1]
ax.barh(names, [max(d, 1e-9) for d in diffs], color="#3b82f6")
for y, d in enumerate(diffs):
    if d == 0:
        ax.text(2e-9, y, "exact", va="center", fontsize=8)
ax.axvline(1e-5, color="black", ls="--", lw=1, label="tolerance (fp32)")
ax.set_xscale("log")
ax.set_xlim(1e-10, 1e-3)
ax.set_xlabel("largest difference from nanoserve_kernels/reference.py")
ax.legend(fontsize="small")
show(fig, "09_errors")

# %% [markdown]
# ## One plan per step
#
# Which kernel runs and how many splits it uses depend only on the step — the same for all layers.
# `plan_attention` decides once; each layer passes the plan. It holds the step's tensors as they are
# and reads none of them, so it can be built inside a CUDA-graph capture: on each replay, the graph's
# kernels read whatever the static buffers then hold.

# %%
meta = {k: decode_batch[k] for k in ("cu_seqlens_q", "context_lens", "block_tables", "max_q", "max_ctx")}
plan = paged_attention.plan_attention(**meta)
assert plan.block_tables is meta["block_tables"]  # held, not copied: a graph replay sees new contents
print(f"plan: max_q {plan.max_q}, max_ctx {plan.max_ctx}, KV splits {plan.num_kv_splits} (None: chosen per call)")
check("   paged_attention(plan=...)", paged_attention.paged_attention(**decode_batch, plan=plan), want)

# %% [markdown]
# ## What the GPU would run
#
# The interpreter runs every line of the kernels, but it says nothing about speed. The GPU compiler
# does, and it runs without a GPU: `benchmarks/bench_kernels.py --compile-only` compiles each kernel
# as Triton would at launch — with the *specialisation* it derives from the arguments: pointers
# aligned to 16 bytes and strides divisible by 16, which is what lets the compiler load 16 bytes at a
# time — and prints per kernel the registers each thread needs (fewer: more programs fit on an SM),
# the bytes spilled to memory when registers run out, shared memory, and the loads by width.

# %%
import importlib.util
import subprocess
import sys
from pathlib import Path

bench = Path(paged_attention.__file__).parents[1] / "benchmarks" / "bench_kernels.py"
if importlib.util.find_spec("triton.backends.nvidia"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    cmd = [sys.executable, str(bench), "--compile-only", "--arch", "90", "--dtype", "float16", "--model", "gpt2"]
    report = subprocess.run(cmd, env=env, capture_output=True, text=True).stdout
    print(report)
else:
    report = ""
    print("this Triton has no NVIDIA backend: no compile-only report")

# %% [markdown]
# The decode kernel (`attn_rowwise_kernel`) needs 64 registers a thread, so 8 of its 128-thread
# programs fit in an SM's 65,536 registers: the 8 programs per SM the split heuristic aims at. Its key
# and value loads are 128 bits wide. Run the same command with `--without-hints` to see the kernels
# compiled without the launch-time specialisation: every load 16 or 32 bits, and two to four times
# the registers.

# %% [markdown]
# ## The engine on the kernels
#
# `ns.LLM(attention="triton")` swaps the module the model calls for its attention and KV writes
# (`AttnMetadata.ops`). With the interpreter this is slow, so a few tokens only; the greedy tokens
# must equal the reference backend's.

# %%
params = SamplingParams(temperature=0, max_tokens=6)
prompts = ["ROMEO:\n", "JULIET:\nO Romeo, Romeo!"]
triton_engine = ns.LLM(attention="triton", device=DEVICE, dtype="float32", num_gpu_blocks_override=32)
reference_engine = ns.LLM(attention="reference", device=DEVICE, dtype="float32", num_gpu_blocks_override=32)
triton_tokens = [o.outputs[0].token_ids for o in triton_engine.generate(prompts, params, use_tqdm=False)]
reference_tokens = [o.outputs[0].token_ids for o in reference_engine.generate(prompts, params, use_tqdm=False)]
print("backend:", triton_engine.runner.ops.__name__, "| same tokens:", triton_tokens == reference_tokens)

# %% [markdown]
# ## GPU only: how fast
#
# With a CUDA GPU, this cell times the decode kernel with and without split-KV on a GPT-2-sized
# decode (12 heads of 64, fp16, 16-token pages) against the reference, with `triton.testing.do_bench`.
# On a CPU it is skipped.

# %%
if HAS_GPU:
    import triton

    for batch, context in ((1, 4096), (64, 1024)):
        b = make_batch([(1, context)] * batch, block_size=16, n_heads=12, head_dim=64)
        b.update(q=b["q"].half(), k_cache=b["k_cache"].half(), v_cache=b["v_cache"].half())
        splits = paged_attention.choose_num_kv_splits(batch, 12, context, b["q"].device)
        times = {
            "reference": triton.testing.do_bench(lambda b=b: reference.paged_attention(**b)),
            "row-wise": triton.testing.do_bench(lambda b=b: paged_attention.paged_attention_rowwise(**b)),
            f"split-KV ({splits})": triton.testing.do_bench(
                lambda b=b, s=splits: paged_attention.paged_attention_rowwise(**b, num_kv_splits=s)
            ),
        }
        print(f"batch {batch} x {context} keys: " + ", ".join(f"{k} {v * 1e3:.0f} µs" for k, v in times.items()))
        torch.testing.assert_close(
            paged_attention.paged_attention_rowwise(**b, num_kv_splits=splits),
            reference.paged_attention(**b),
            atol=1e-2,
            rtol=1e-2,
        )
else:
    print("no CUDA GPU: timing skipped (benchmarks/bench_kernels.py has the full benchmark)")

# %% [markdown]
# ## Checks

# %%
assert all(errors[name] <= tolerances[name] for name in errors), errors
assert torch.allclose(online, scores.softmax(0) @ values, atol=1e-6)
assert torch.allclose(merged, scores.softmax(0) @ values, atol=1e-6)
assert triton_engine.runner.ops is paged_attention
assert not report or "attn_rowwise_kernel" in report, report
assert triton_tokens == reference_tokens, "the engine on the Triton kernels must produce the same tokens"
print("all checks passed")

# %% [markdown]
# **Next**: lesson 10 reads a whole run back — in the terminal visualizer and in Perfetto.
