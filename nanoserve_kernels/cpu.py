"""Paged attention on the CPU, made fast: the CPU backend, tested against the oracle nanoserve_kernels/reference.py.

Same contract and signatures as `nanoserve_kernels/reference.py` (read that first: the page layout, what
`cu_seqlens_q` and `context_lens` mean, grouped-query heads); the KV writes are the reference's.
The reference pads every request to the step's longest query and longest context and runs one masked
SDPA; this does the same attention in pieces that fit the CPU's caches (measured on a shared 2-core
VM by benchmarks/bench_mixed_attention.py, which also times the alternatives that lost):

1. Decodes (one query each) need no query padding, and are attended in groups of similar context:
   sorted by context length, cut into groups of at most DECODE_BYTES of padded keys, each group's pages
   gathered and attended up to its own longest context. The padding saved is the smaller gain; the
   larger is that a group's gathered keys and values (1024 GPT-2 keys: 3 MiB each) are still in the
   caches when SDPA reads them, where the reference's one buffer for the whole step (hundreds of MiB
   at 256 requests) comes back from memory: one sorted group of every decode is no faster than the
   reference, groups of <= 1024 keys are 2.3-2.9x faster (table 3).
2. Prefill chunks are attended one SDPA each, with no padding at all; a fresh prompt (q_len equal to
   its context) needs no mask (`is_causal`).
3. A plan per step: the groups, rows, page lists and masks depend only on the step, so
   `plan_attention` derives them once and every layer's `paged_attention(..., plan=plan)` only gathers
   pages and calls SDPA. (Hoisting alone buys little: the reference with its own plan is within noise
   of the reference without; the plan is what makes the grouping free for layers 2 to 12.)

Grouped-query attention costs no copy of the keys: a decode group's query heads are the rows of a
(n, n_kv_heads, group, head_dim) query that SDPA attends to its KV head in one product; a chunk uses
SDPA's `enable_gqa` (torch >= 2.5).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoserve_kernels.reference import check_heads, gather_pages, write_kv, write_kv_pages

DECODE_BYTES = 3 << 20  # the gathered keys of a decode group (as many again of values): they stay in the caches


WRITES_PAGES = False  # one scatter of every new row by slot is faster on a CPU than a write per chunk


@dataclass(frozen=True)
class Group:
    """Decodes attended in one SDPA: their rows of q, their block tables (int64) and the longest context
    among them; mask (n, 1, 1, ctx) marks each request's keys, None when all have ctx keys."""

    rows: torch.Tensor
    block_tables: torch.Tensor
    ctx: int
    mask: torch.Tensor | None


@dataclass(frozen=True)
class Chunk:
    """A prefill chunk attended alone: its rows start:end of q, its block table (1, max_blocks) int64
    and context; mask (q_len, ctx) is the causal mask of its queries, None for a fresh prompt."""

    start: int
    end: int
    block_table: torch.Tensor
    ctx: int
    mask: torch.Tensor | None


@dataclass(frozen=True)
class AttentionPlan:
    """A step's attention, decided once for every layer: the decode groups and the chunks."""

    groups: list
    chunks: list


def plan_attention(cu_seqlens_q, context_lens, block_tables, max_q, max_ctx, *, key_bytes=None, decode_keys=None):
    """Build the step's `AttentionPlan` (module docstring); the tensors are on the CPU, so reading
    the lengths costs no device sync. `key_bytes` is one layer's bytes of one key (n_kv_heads x head_dim x
    element size): a decode group holds DECODE_BYTES of keys (or `decode_keys` keys, if given).

    >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    >>> plan = plan_attention(i32(0, 1, 2, 5), i32(9, 4, 3), i32([2, 1], [0, 0], [3, 0]), max_q=3, max_ctx=9)
    >>> [g.rows.tolist() for g in plan.groups], [(c.start, c.end) for c in plan.chunks]
    ([[1, 0]], [(2, 5)])
    """
    cu, ctx = cu_seqlens_q.tolist(), context_lens.tolist()
    tables = block_tables.long()
    if decode_keys is None:  # a group's keys in bytes, not in keys: GPT-2's 12 x 64 floats make 1024 keys 3 MiB
        decode_keys = DECODE_BYTES // (key_bytes or 3072)
    decodes = sorted((i for i in range(len(ctx)) if cu[i + 1] - cu[i] == 1), key=lambda i: ctx[i])
    groups, reqs = [], []
    for i in decodes:  # shortest context first: a group is padded to its last request's context
        if reqs and (len(reqs) + 1) * ctx[i] > decode_keys:
            groups.append(_group(reqs, cu, ctx, context_lens, tables))
            reqs = []
        reqs.append(i)
    if reqs:
        groups.append(_group(reqs, cu, ctx, context_lens, tables))
    chunks = []
    for i in range(len(ctx)):
        q_len = cu[i + 1] - cu[i]
        if q_len > 1:
            mask = None  # a fresh prompt: plain causal attention
            if q_len < ctx[i]:  # query t sits at ctx - q_len + t and sees keys 0 ..= that position
                mask = torch.arange(ctx[i])[None, :] <= torch.arange(ctx[i] - q_len, ctx[i])[:, None]
            chunks.append(Chunk(cu[i], cu[i + 1], tables[i : i + 1], ctx[i], mask))
    return AttentionPlan(groups, chunks)


def _group(reqs, cu, ctx, context_lens, tables):
    longest, mask = ctx[reqs[-1]], None
    if ctx[reqs[0]] < longest:  # keys past a request's context are masked out
        mask = (torch.arange(longest) < context_lens[reqs][:, None])[:, None, None, :]
    return Group(torch.tensor([cu[i] for i in reqs]), tables[reqs], longest, mask)


def paged_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx, *, plan=None):
    """`reference.paged_attention` on the CPU, fast (module docstring). `plan` is this step's
    `plan_attention`, built once for all layers; without it the call builds its own.

    >>> kc = vc = torch.randn(2, 4, 1, 8)                  # 2 pages of 4 slots, 1 KV head of dim 8
    >>> q = torch.randn(1, 2, 8)                           # one decode token, 2 query heads share the KV head
    >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    >>> paged_attention(q, kc, vc, i32(0, 1), i32(6), i32([1, 0]), 8**-0.5, max_q=1, max_ctx=6).shape
    torch.Size([1, 2, 8])
    """
    group = check_heads(q, k_cache)
    plan = plan or plan_attention(cu_seqlens_q, context_lens, block_tables, max_q, max_ctx)
    N, H, D = q.shape
    H_kv, block_size = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    for g in plan.groups:
        k, v = _gather(k_cache, v_cache, g.block_tables, g.ctx, block_size, q.dtype)  # (n, H_kv, ctx, D)
        rows = q.index_select(0, g.rows).view(-1, H_kv, group, D)  # a KV head's queries are its rows
        y = F.scaled_dot_product_attention(rows, k, v, attn_mask=g.mask, scale=scale)
        out.index_copy_(0, g.rows, y.view(-1, H, D))
    for c in plan.chunks:
        k, v = _gather(k_cache, v_cache, c.block_table, c.ctx, block_size, q.dtype)  # (1, H_kv, ctx, D)
        rows = q[c.start : c.end].transpose(0, 1)[None]  # (1, H, q_len, D)
        gqa = {"enable_gqa": True} if group > 1 else {}
        y = F.scaled_dot_product_attention(
            rows, k, v, attn_mask=c.mask, is_causal=c.mask is None, scale=scale, **gqa
        )  # (1, H, q_len, D)
        out[c.start : c.end] = y[0].transpose(0, 1)
    return out


def _gather(k_cache, v_cache, block_tables, ctx, block_size, dtype):
    pages = block_tables[:, : -(-ctx // block_size)]
    k = gather_pages(k_cache, pages, "k")[:, :ctx].to(dtype).transpose(1, 2)
    v = gather_pages(v_cache, pages, "v")[:, :ctx].to(dtype).transpose(1, 2)
    return k, v


__all__ = ["write_kv", "write_kv_pages", "plan_attention", "paged_attention", "AttentionPlan"]
