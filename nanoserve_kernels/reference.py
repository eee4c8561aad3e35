"""Paged attention and the KV-cache write in plain torch: the oracle every other backend is tested against.

The KV cache of one layer is a pool of pages, `k_cache` and `v_cache` of shape
(num_blocks, block_size, n_kv_heads, head_dim). A request owns a list of pages, its block table;
token t of the request lives in page `block_table[t // block_size]` at offset `t % block_size`,
i.e. in slot `block_table[t // block_size] * block_size + t % block_size`.

One step packs the new tokens of every scheduled request into one flat batch of N rows:

    q              (N, n_heads, head_dim)  queries of the new tokens, request after request
    k, v           (N, n_kv_heads, head_dim)  their keys and values, written into the cache first
    cu_seqlens_q   (B + 1,)   request i owns rows cu_seqlens_q[i] : cu_seqlens_q[i + 1]
    context_lens   (B,)       tokens of request i in the cache *after* this step's write
    block_tables   (B, max_blocks)  page ids; entries past a request's last page are padding

The new tokens of request i are its last q_len_i positions, so the query at row t of the request
sits at position context_len_i - q_len_i + t and attends causally to keys 0 ..= that position.
A decode is the case q_len = 1, a prefill chunk any q_len; both mix freely in one call.

Grouped-query attention (GQA, the Llama/Qwen family): n_heads is a multiple of n_kv_heads and query
head h reads KV head h // (n_heads // n_kv_heads). n_kv_heads == n_heads is plain multi-head attention
(GPT-2), n_kv_heads == 1 multi-query attention.

What depends only on the step (which page each key is in, which query sees which key) is the same for
every layer, so it is derived once per step by `plan_attention` and handed to every layer's
`paged_attention(..., plan=plan)`; called without a plan, `paged_attention` builds one itself.
"""

import itertools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_buffers = threading.local()  # per thread (one per pipeline stage): the reused gather buffers on CPU


WRITES_PAGES = True  # the runner may hand chunks that start on a page boundary to write_kv_pages


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Scatter each new token's key and value, (N, n_kv_heads, head_dim), into its slot of the paged cache.

    >>> kc = vc = torch.zeros(2, 4, 1, 1)                       # 2 pages of 4 slots
    >>> write_kv(kc, vc, torch.ones(1, 1, 1), torch.ones(1, 1, 1), torch.tensor([5]))
    >>> kc[1, 1, 0, 0].item()                                      # slot 5 = page 1, offset 1
    1.0
    """
    n_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, n_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, n_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def write_kv_pages(k_cache, v_cache, k, v, page_ids):
    """Write a chunk of new tokens that starts on a page boundary, a whole page at a time: token j goes
    to page page_ids[j // block_size] at offset j % block_size; the last page may be partial.

    >>> kc = vc = torch.zeros(3, 2, 1, 1)                       # 3 pages of 2 slots
    >>> write_kv_pages(kc, vc, torch.ones(3, 1, 1), torch.ones(3, 1, 1), torch.tensor([2, 0]))
    >>> kc[2].flatten().tolist(), kc[0].flatten().tolist()
    ([1.0, 1.0], [1.0, 0.0])
    """
    n, H, D = k.shape
    block_size = k_cache.shape[1]
    full, rest = divmod(n, block_size)
    page_ids = page_ids.long()
    for cache, new in ((k_cache, k), (v_cache, v)):
        new = new.to(cache.dtype)
        if full:
            cache.index_copy_(0, page_ids[:full], new[: full * block_size].view(full, block_size, H, D))
        if rest:
            cache[page_ids[full], :rest] = new[full * block_size :]


def gather_pages(cache, pages, name: str):
    """cache[pages] as a (B, n_pages * block_size, n_kv_heads, head_dim) copy.

    On CPU the copy goes into a buffer this thread reuses from call to call: a fresh tensor of a few
    hundred MB per layer would be paid in page faults (measured on a 2-core VM: 50 ms against 6.5 ms for
    a 256 x 256-token gather). The result is only valid until the thread's next call with this name.
    """
    B, n_pages = pages.shape
    idx = pages.reshape(-1)
    if cache.device.type != "cpu":
        return cache.index_select(0, idx).view(B, n_pages * cache.shape[1], *cache.shape[2:])
    need = idx.numel() * cache[0].numel()
    buf = getattr(_buffers, name, None)
    if buf is None or buf.numel() < need or buf.dtype != cache.dtype:
        buf = torch.empty(need, dtype=cache.dtype)
        setattr(_buffers, name, buf)
    out = buf[:need].view(idx.numel(), *cache.shape[1:])
    return torch.index_select(cache, 0, idx, out=out).view(B, n_pages * cache.shape[1], *cache.shape[2:])


def check_heads(q, k_cache):
    """The number of query heads per KV head; q must be (N, n_heads, head_dim) over a cache of
    (num_blocks, block_size, n_kv_heads, head_dim) with n_heads a multiple of n_kv_heads."""
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} must be (N, n_heads, head_dim) with the cache's head_dim and n_heads a multiple of "
            f"its n_kv_heads: the cache is {tuple(k_cache.shape)}, (num_blocks, block_size, n_kv_heads, head_dim)"
        )
    return q.shape[1] // k_cache.shape[2]


@dataclass(frozen=True)
class PaddedPlan:
    """One masked SDPA over every request padded to max_q queries and max_ctx keys: what it needs
    from the step's metadata, derived once (`plan_attention`) and reused by every layer.

    block_tables (B, max_blocks) int64, ready for index_select
    req, t       (N,)  query row r is query t[r] of request req[r]: its place in the padded batch
    mask         (B, 1, max_q, max_ctx)  which keys each padded query sees
    """

    max_q: int
    max_ctx: int
    block_tables: torch.Tensor
    req: torch.Tensor
    t: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class ByKindPlan:
    """A step that mixes decodes with prefill chunks, attended as two padded calls: [(rows, PaddedPlan)]."""

    kinds: list


def plan_attention(cu_seqlens_q, context_lens, block_tables, max_q, max_ctx, *, n_rows=None, key_bytes=None):
    """Everything `paged_attention` derives from the step alone, built once per step for all layers.

    `max_q` and `max_ctx` are the largest q_len and context_len, passed as ints so that a decode step
    reads no device value back on the host: its plan takes one query row per request (the N of q,
    unless `n_rows` says otherwise). A step that mixes decodes (q_len 1) with prefill chunks is
    planned as the two kinds apart: padding every decode to the chunk's length would be most of the
    work (27x the time of the two kinds apart with 63 decodes beside a 512-token chunk, GPT-2 shapes on
    a 2-core CPU: benchmarks/bench_mixed_attention.py, table 1). Only a step with max_q > 1 reads its
    lengths back.

    >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    >>> plan = plan_attention(i32(0, 1, 4), i32(6, 3), i32([1, 0], [2, 0]), max_q=3, max_ctx=6)
    >>> [rows.tolist() for rows, _ in plan.kinds]         # one decode, then a chunk of 3 tokens
    [[0], [1, 2, 3]]
    """
    if max_q == 1:
        n_rows = context_lens.shape[0] if n_rows is None else n_rows
        return _plan_padded(cu_seqlens_q, context_lens, block_tables, 1, max_ctx, n_rows=n_rows)
    cu, ctx = cu_seqlens_q.tolist(), context_lens.tolist()
    q_lens = [b - a for a, b in zip(cu, cu[1:])]
    if 1 not in q_lens:
        return _plan_padded(cu_seqlens_q, context_lens, block_tables, max_q, max_ctx, n_rows=cu[-1])
    kinds, device = [], cu_seqlens_q.device
    for kind in ([i for i, n in enumerate(q_lens) if n == 1], [i for i, n in enumerate(q_lens) if n > 1]):
        if not kind:
            continue
        rows = torch.tensor([r for i in kind for r in range(cu[i], cu[i + 1])], device=device)
        lens = [q_lens[i] for i in kind]
        kind_cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
        idx = torch.tensor(kind, device=device)
        plan = _plan_padded(
            kind_cu, context_lens[idx], block_tables[idx], max(lens), max(ctx[i] for i in kind), n_rows=len(rows)
        )
        kinds.append((rows, plan))
    return ByKindPlan(kinds)


def _plan_padded(cu_seqlens_q, context_lens, block_tables, max_q, max_ctx, n_rows):
    B, device = context_lens.shape[0], context_lens.device
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]  # (B,)
    req = torch.repeat_interleave(torch.arange(B, device=device), q_lens, output_size=n_rows)
    t = torch.arange(n_rows, device=device) - cu_seqlens_q[req].long()  # index of the query within its request

    # query t of request i sits at position context_len_i - q_len_i + t; it sees keys <= position
    q_pos = (context_lens - q_lens)[:, None] + torch.arange(max_q, device=device)  # (B, max_q)
    k_pos = torch.arange(max_ctx, device=device)
    # keys past a request's context (the rest of its last page, padding pages) get weight 0 from the
    # mask; their values must still be finite numbers, since 0 times NaN is NaN: see paged_attention
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < context_lens[:, None, None])
    mask[:, :, 0] = True  # padded query rows see key 0 instead of nothing (no NaN); they are dropped
    return PaddedPlan(max_q, max_ctx, block_tables.long(), req, t, mask[:, None])


def paged_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx, *, plan=None):
    """Attention of the step's new queries over each request's pages (module docstring: the layout).

    Gathers every request's pages into a padded (B, max_ctx) key/value tensor, its queries into a
    padded (B, max_q) one, and runs one masked SDPA (two for a step that mixes decodes with prefill
    chunks: `plan_attention`), so the reference is simple rather than fast. `plan` is
    `plan_attention(cu_seqlens_q, context_lens, block_tables, max_q, max_ctx)` of this step, built once
    for all layers; without it the call builds its own. Returns (N, n_heads, head_dim) in q's dtype.

    Every slot of the pages in `block_tables` must hold a finite number, written or not: torch.empty's
    garbage may be NaN, so zero a cache before use (nanoserve's runner zeroes each page when it is
    first written). Stale keys and values of freed pages are fine.

    >>> kc = vc = torch.randn(2, 4, 1, 8)                  # 2 pages of 4 slots, 1 KV head of dim 8
    >>> q = torch.randn(1, 2, 8)                           # one decode token, 2 query heads share the KV head
    >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    >>> paged_attention(q, kc, vc, i32(0, 1), i32(6), i32([1, 0]), 8**-0.5, max_q=1, max_ctx=6).shape
    torch.Size([1, 2, 8])
    """
    if plan is None and max_q > 1 and 1 in (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist():
        return paged_attention_by_kind(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)
    plan = plan or plan_attention(cu_seqlens_q, context_lens, block_tables, max_q, max_ctx, n_rows=q.shape[0])
    return _attend(q, k_cache, v_cache, plan, scale)


def paged_attention_by_kind(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
    """`paged_attention` of a step that mixes decodes with prefill chunks: each kind padded apart."""
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    plan = plan_attention(cu_seqlens_q, context_lens, block_tables, max(q_lens), int(context_lens.max()))
    return _attend(q, k_cache, v_cache, plan, scale)


def paged_attention_padded(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx):
    """`paged_attention` as one padded call whatever the step, decodes beside chunks included."""
    plan = _plan_padded(cu_seqlens_q, context_lens, block_tables, max_q, max_ctx, n_rows=q.shape[0])
    return _attend(q, k_cache, v_cache, plan, scale)


def _attend(q, k_cache, v_cache, plan, scale):
    if isinstance(plan, ByKindPlan):
        out = torch.empty_like(q)
        for rows, kind in plan.kinds:
            out[rows] = _attend(q[rows], k_cache, v_cache, kind, scale)
        return out
    group = check_heads(q, k_cache)
    B, block_size = plan.mask.shape[0], k_cache.shape[1]
    N, H, D = q.shape
    if plan.req.shape[0] != N:
        raise ValueError(
            f"the plan is for {plan.req.shape[0]} query rows but q has {N}; plan a step with the metadata of "
            "the step itself (a decode step's plan takes one row per request unless n_rows says otherwise)"
        )

    # gather pages -> (B, max_ctx, n_kv_heads, D); padding pages are read but masked out
    pages = plan.block_tables[:, : -(-plan.max_ctx // block_size)]
    k = gather_pages(k_cache, pages, "k")[:, : plan.max_ctx].to(q.dtype)
    v = gather_pages(v_cache, pages, "v")[:, : plan.max_ctx].to(q.dtype)
    if group > 1:  # grouped-query attention: query head h reads KV head h // group
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)

    qp = q.new_zeros(B, plan.max_q, H, D)  # the flat queries scattered into a padded batch
    qp[plan.req, plan.t] = q
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.mask, scale=scale
    )  # (B, H, max_q, D)
    return out.transpose(1, 2)[plan.req, plan.t]
