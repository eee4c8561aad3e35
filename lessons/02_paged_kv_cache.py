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
# # Lesson 2 — The paged KV cache and the block manager
#
# Lesson 1 ended with a cache of keys and values: once a token has been through the model, its key
# and value vectors at every layer never change, so the engine keeps them and computes only new
# tokens. This lesson is about *where* that cache lives when many requests share one machine.
#
# You will:
#
# - see why reserving room for a whole sequence per request wastes most of the memory;
# - drive `nanoserve_sched/blocks.py`'s `BlockManager`, which hands out the cache a page at a time;
# - write keys and values into the paged cache and run attention over it with `nanoserve_kernels/reference.py`,
#   checking it against ordinary attention on contiguous tensors, with one plan per step and with query
#   heads that share key/value heads (grouped-query attention);
# - look inside the real engine's cache after a prefill step.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from helpers import plot_pages, show

import nanoserve as ns
from nanoserve_kernels import reference
from nanoserve_sched import Request, SamplingParams
from nanoserve_sched.blocks import BlockManager

torch.set_num_threads(1)

# %% [markdown]
# ## Why pages
#
# Every token of every request stores a key and a value vector of `n_embd` numbers at every layer.
# For the embedded model in float32 that is:

# %%
model, tok, _ = ns.load_model()
cfg = model.config  # n_layer, n_embd, n_head, ... (lesson 1)
bytes_per_token = 2 * cfg.n_layer * cfg.n_embd * 4  # K and V, every layer, 4 bytes each
print(
    f"{bytes_per_token / 1024:.0f} KiB per token; a full {cfg.n_positions}-token context: "
    f"{bytes_per_token * cfg.n_positions / 2**20:.1f} MiB"
)

# %% [markdown]
# A server does not know how long a request will grow: it stops at an end-of-sequence token or at
# `max_tokens`. Reserving the whole context for each request up front wastes the room it never
# uses, and that room could have held other requests.
#
# The paged cache (vLLM's *PagedAttention*) does what an operating system does with memory: the
# cache is a pool of fixed-size **pages** (`block_size` token slots each), and each request holds a
# **block table**, the list of its pages in order. A request takes a new page only when its last one
# is full, and gives all of them back the moment it finishes. At most one page per request is
# partly empty.

# %%
lengths = [37, 120, 18, 250, 64, 9]  # tokens each request ends up with
block_size = 16
reserved = len(lengths) * cfg.n_positions
paged = sum(-(-n // block_size) * block_size for n in lengths)  # whole pages
print(f"tokens actually stored: {sum(lengths)}")
print(f"slots reserved per whole context: {reserved}  ({sum(lengths) / reserved:.0%} used)")
print(f"slots in pages of {block_size}:        {paged}  ({sum(lengths) / paged:.0%} used)")

# %% [markdown]
# ## The block manager
#
# `BlockManager` is the bookkeeping of the pool, in pure Python: which pages are free, which request
# owns which. The scheduler calls `allocate(request_id, num_tokens)` before every step to grow a
# request's table to the tokens it will hold, and `free(request_id)` when it finishes. `allocate`
# returns False, changing nothing, when too few pages are free: that is when the scheduler must
# wait or preempt (lesson 4).
#
# A small pool of 16 pages of 4 slots makes it easy to follow. (Prefix caching is off here; it is
# lesson 5.)

# %%
bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
snapshots = []  # (title, owners of every page)


def owners(bm):
    """owners[p]: the requests holding page p."""
    result = [()] * bm.num_blocks
    for rid, table in bm.tables.items():
        for p in table:
            result[p] += (rid,)
    return result


def report(title):
    bm.check()  # the invariants: free + used = total, no page owned twice, reference counts match
    print(f"{title:<30} tables {dict(bm.tables)}  free pages {bm.num_free_blocks}")
    snapshots.append((title, owners(bm)))


bm.allocate("A", 10)  # 10 tokens: 3 pages
bm.allocate("B", 5)  # 2 pages
bm.allocate("C", 7)  # 2 pages
report("A, B, C admitted")
bm.allocate("A", 13)  # A grew to 13 tokens: its 3 pages hold 12, so it takes a 4th
bm.free("B")  # B finished: its pages go back to the pool at once
report("A grew, B finished")
bm.allocate("D", 22)  # 6 pages: B's two freed pages first, then fresh ones
report("D admitted")
print("a request of 40 tokens fits?", bm.allocate("E", 40))

# %% [markdown]
# D's table is not contiguous: pages are interchangeable, so the pool never fragments. The last
# `allocate` fails because 10 pages are needed and only 4 are free.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 2.6))
for ax, (title, page_owners) in zip(axes, snapshots):
    plot_pages(ax, page_owners, columns=8, title=title, request_ids="ABCD")
fig.tight_layout()
show(fig, "02_pages")

# %% [markdown]
# ## Slots: where token *t* lives
#
# Token *t* of a request sits in page `table[t // block_size]` at offset `t % block_size`. Flattening
# the pool, that is **slot** `table[t // block_size] * block_size + t % block_size`. The runner turns
# every new token of a step into its slot (the *slot mapping*) before the forward pass.

# %%
table = bm.block_table("D")
slots = [table[t // bm.block_size] * bm.block_size + t % bm.block_size for t in range(22)]
print("D's table:", table)
print("D's slots:", slots)

# %% [markdown]
# ## Attention over pages
#
# One layer's cache is two tensors, `k_cache` and `v_cache`, of shape
# `(num_blocks, block_size, n_kv_heads, head_dim)` (in GPT-2 every query head has its own KV head).
# `reference.write_kv` scatters new keys and values into their slots; `reference.paged_attention`
# computes attention for a whole step at once: the new tokens of every request are packed into one
# flat batch, `cu_seqlens_q` says which rows belong to which request, `context_lens` how many tokens
# each request has in the cache, and `block_tables` where they are. (`nanoserve_kernels/reference.py`'s
# docstring explains each argument.)
#
# We write A's 13 tokens and D's 22 tokens with random keys and values, then run attention for all 35
# queries in one call, and compare each request with plain causal attention on its own contiguous
# tensors.

# %%
H, D = 2, 8  # heads, head dim
k_cache = torch.zeros(bm.num_blocks, bm.block_size, H, D)
v_cache = torch.zeros_like(k_cache)
gen = torch.Generator().manual_seed(0)
lens = {"A": 13, "D": 22}
q, k, v = {}, {}, {}
for rid, n in lens.items():
    q[rid], k[rid], v[rid] = (torch.randn(n, H, D, generator=gen) for _ in range(3))
    table = bm.block_table(rid)
    slot_mapping = torch.tensor([table[t // bm.block_size] * bm.block_size + t % bm.block_size for t in range(n)])
    reference.write_kv(k_cache, v_cache, k[rid], v[rid], slot_mapping)

i32 = lambda x: torch.tensor(x, dtype=torch.int32)
tables = [bm.block_table(r) for r in lens]
width = max(len(t) for t in tables)
step = dict(
    cu_seqlens_q=i32([0, 13, 35]),
    context_lens=i32([13, 22]),
    block_tables=i32([t + [0] * (width - len(t)) for t in tables]),  # padded with any page id
    max_q=22,
    max_ctx=22,
)
out = reference.paged_attention(torch.cat([q["A"], q["D"]]), k_cache, v_cache, scale=D**-0.5, **step)


def dense_attention(q, k, v):  # (T, H, D) each: ordinary causal attention on contiguous tensors
    y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    return y.transpose(0, 1)


for rid, rows in (("A", slice(0, 13)), ("D", slice(13, 35))):
    err = (out[rows] - dense_attention(q[rid], k[rid], v[rid])).abs().max().item()
    print(f"request {rid}: largest difference from dense attention {err:.1e}")

# %% [markdown]
# ## One plan per step, and heads that share keys
#
# Everything `paged_attention` derives from `cu_seqlens_q`, `context_lens` and `block_tables` — which
# page each key is in, which query may see which key — is the same at every layer of a step, so
# `reference.plan_attention` derives it once and every layer passes it as `plan=`.
#
# The cache may also hold fewer heads than the queries have. With *grouped-query attention* (Llama,
# Qwen) `n_heads` query heads share `n_kv_heads` key/value heads: query head h reads KV head
# h // (n_heads // n_kv_heads), and the cache shrinks by that factor. Here 4 query heads read the
# 2 KV heads of our cache, through one plan for the step:

# %%
plan = reference.plan_attention(**step)
q4 = torch.randn(35, 2 * H, D, generator=gen)  # 4 query heads over the cache's 2 KV heads
out4 = reference.paged_attention(q4, k_cache, v_cache, scale=D**-0.5, **step, plan=plan)


def dense_gqa(q, k, v):  # each KV head serves 2 query heads: heads 0, 1 read KV head 0; heads 2, 3 KV head 1
    return dense_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))


for rid, rows in (("A", slice(0, 13)), ("D", slice(13, 35))):
    err = (out4[rows] - dense_gqa(q4[rows], k[rid], v[rid])).abs().max().item()
    print(f"request {rid}, 4 query heads on 2 KV heads: largest difference from dense attention {err:.1e}")

# %% [markdown]
# ## Inside the engine's cache
#
# The engine allocates one `(k_cache, v_cache)` pair per layer in `ModelRunner` and fills it during
# the forward pass. We add one request, let the engine run a single step (the prefill of the whole
# prompt), and compare what layer 0 wrote into the request's slots with the keys a dense forward
# computes for the same tokens.

# %%
llm = ns.LLM(block_size=4, num_gpu_blocks_override=32, device="cpu")
prompt_ids = tok.encode("KING RICHARD III:\nA horse! a horse! my kingdom for a horse!")
req = Request(prompt_ids, SamplingParams(temperature=0, max_tokens=5))
llm.scheduler.add_request(req)  # straight to the scheduler's queue (llm.add_request also validates)
steps = llm.run()  # the engine loop is a generator: one next() = one step
next(steps)

table = llm.scheduler.blocks.block_table(req.request_id)
n = len(prompt_ids)
print(f"{n} prompt tokens in pages {table}")
slots = torch.tensor([table[t // 4] * 4 + t % 4 for t in range(n)])
k_cache0, _ = llm.runner.kv_caches[0]
engine_keys = k_cache0.view(-1, cfg.n_head, cfg.head_dim)[slots]  # (n, H, D)

with torch.no_grad():  # layer 0's keys, computed densely as in lesson 1
    x = model.wte(torch.tensor(prompt_ids)) + model.wpe(torch.arange(n))
    _, dense_keys, _ = model.h[0].attn.c_attn(model.h[0].ln_1(x)).split(cfg.n_embd, dim=-1)
print("largest difference:", (engine_keys - dense_keys.view(n, cfg.n_head, cfg.head_dim)).abs().max().item())

for _ in steps:  # run the request to the end
    pass
print("output:", repr(tok.decode(req.output_token_ids)), "| free pages after:", llm.scheduler.blocks.num_free_blocks)

# %% [markdown]
# ## Checks

# %%
assert not bm.allocate("E", 40) and "E" not in bm.tables, "a failed allocation must change nothing"
held = [p for table in bm.tables.values() for p in table]
assert len(held) == len(set(held)) == bm.num_blocks - bm.num_free_blocks, "every page has at most one owner"
assert set(bm.block_table("D")) >= {p for p, o in enumerate(snapshots[0][1]) if o == ("B",)}, "freed pages are reused"
for rid, rows in (("A", slice(0, 13)), ("D", slice(13, 35))):
    torch.testing.assert_close(out[rows], dense_attention(q[rid], k[rid], v[rid]))
    torch.testing.assert_close(out4[rows], dense_gqa(q4[rows], k[rid], v[rid]))
torch.testing.assert_close(engine_keys, dense_keys.view(n, cfg.n_head, cfg.head_dim), atol=1e-5, rtol=1e-5)
assert req.finished and len(req.output_token_ids) == 5
assert llm.scheduler.blocks.num_free_blocks == 32, "every page comes back when the request finishes"
llm.scheduler.blocks.check()
print("all checks passed")

# %% [markdown]
# **Next**: lesson 3 puts many requests through this cache at once — continuous batching, and
# prompts cut into chunks.
