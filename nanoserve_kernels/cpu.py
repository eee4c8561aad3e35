"""Paged attention on the CPU, made fast: the CPU backend, tested against the oracle nanoserve_kernels/reference.py.

Same contract and signatures as `nanoserve_kernels/reference.py` (read that first: the page layout, what
`cu_seqlens_q` and `context_lens` mean, grouped-query heads); the KV writes are the reference's.
The reference pads every request to the step's longest query and longest context and runs one masked
SDPA; this does the same attention in pieces that fit the CPU (measured on a shared 2-core VM by
benchmarks/bench_mixed_attention.py and benchmarks/bench_cpu_peers.py; RESULTS.md):

1. In place, where numba is installed and the cache is fp32: the decodes, and the rows of every chunk
   of at most ROW_PAIRS query-key pairs, are attended one query at a time by a numba kernel that reads
   each key and value where it lies in its page (nanoserve_kernels/cpu_numba.py). Nothing is copied:
   a decode step is memory-bound, and torch ops could only read the pages after copying them.
2. Otherwise (no numba, fp16/bf16, or IN_PLACE = False) the decodes take torch's path: they need no
   query padding and are attended in groups of similar context, sorted by context length, cut into
   groups of at most DECODE_BYTES of padded keys, each group's pages gathered and attended up to its
   own longest context. The gathered keys and values (1024 GPT-2 keys: 3 MiB each) are still in the
   caches when SDPA reads them, where the reference's one buffer for the whole step (hundreds of MiB
   at 256 requests) comes back from memory: groups of <= 1024 keys are 2.3-2.9x faster than one.
3. Longer prefill chunks are attended one SDPA each, with no padding at all; a fresh prompt (q_len
   equal to its context) needs no mask (`is_causal`). SDPA's matrix products win there: a chunk of
   128 queries over 128 keys takes about as long either way, one of 1024 over 1024 is 5x faster in SDPA.
4. A plan per step: which rows go where, the groups, page lists and masks depend only on the step, so
   `plan_attention` derives them once and every layer's `paged_attention(..., plan=plan)` only reads
   pages and attends.

Grouped-query attention costs no copy of the keys: the kernel reads KV head h // group for query head
h; a decode group's query heads are the rows of a (n, n_kv_heads, group, head_dim) query that SDPA
attends to its KV head in one product; a chunk uses SDPA's `enable_gqa` (torch >= 2.5).
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nanoserve_kernels.reference import check_heads, gather_pages, write_kv, write_kv_pages

IN_PLACE = True  # point 1, where numba is installed
ROW_PAIRS = 8192  # a chunk of at most this many queries x keys goes to the in-place kernel, row by row
DECODE_BYTES = 3 << 20  # the gathered keys of a decode group (as many again of values): they stay in the caches


WRITES_PAGES = False  # one scatter of every new row by slot is faster on a CPU than a write per chunk


@dataclass(frozen=True)
class Rows:
    """Queries the in-place kernel attends one at a time: their rows of q and requests (int64), and how
    many of its request's keys each one sees (int32: its position + 1)."""

    rows: torch.Tensor
    reqs: torch.Tensor
    n_keys: torch.Tensor


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
    """A step's attention, decided once for every layer: the rows for the in-place kernel (None on the
    torch path), the decode groups (torch path) and the chunks for SDPA. `step` is what it was planned from."""

    rows: Rows | None
    groups: list
    chunks: list
    step: dict

    @functools.cached_property
    def torch_path(self) -> "AttentionPlan":
        """The same step planned without the kernel, for a call whose tensors it cannot take."""
        return plan_attention(**self.step, in_place=False)


def plan_attention(
    cu_seqlens_q, context_lens, block_tables, max_q, max_ctx, *, key_bytes=None, decode_keys=None, in_place=None,
    row_pairs=ROW_PAIRS,
):  # fmt: skip
    """Build the step's `AttentionPlan` (module docstring); the tensors are on the CPU, so reading
    the lengths costs no device sync. `in_place` (default: IN_PLACE, where numba is installed) sends the
    decodes and the chunks of at most `row_pairs` queries x keys to the in-place kernel. `key_bytes` is one
    layer's bytes of one key (n_kv_heads x head_dim x element size): a decode group of the torch path holds
    DECODE_BYTES of keys (or `decode_keys` keys, if given).

    >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    >>> step = (i32(0, 1, 2, 5), i32(9, 4, 3), i32([2, 1], [0, 0], [3, 0]), 3, 9)  # 2 decodes, a chunk of 3
    >>> plan_attention(*step, in_place=True).rows.rows.tolist()
    [0, 1, 2, 3, 4]
    >>> plan = plan_attention(*step, in_place=False)
    >>> [g.rows.tolist() for g in plan.groups], [(c.start, c.end) for c in plan.chunks]
    ([[1, 0]], [(2, 5)])
    """
    step = dict(cu_seqlens_q=cu_seqlens_q, context_lens=context_lens, block_tables=block_tables, max_q=max_q,
                max_ctx=max_ctx, key_bytes=key_bytes, decode_keys=decode_keys, row_pairs=row_pairs)  # fmt: skip
    if in_place is None:
        in_place = IN_PLACE and row_kernel() is not None
    cu, ctx = cu_seqlens_q.cpu().numpy().astype(np.int64), context_lens.cpu().numpy().astype(np.int64)
    q_len = np.diff(cu)
    alone = q_len == 1  # the requests whose rows are attended one by one: the decodes, and in place...
    tables, rows, groups = block_tables.long(), None, []
    if in_place:
        alone |= q_len * ctx <= row_pairs  # ...the short chunks too
        req_of_row = np.repeat(np.arange(len(ctx)), q_len)
        row = np.flatnonzero(alone[req_of_row])
        req = req_of_row[row]
        n_keys = ctx[req] - (cu[req + 1] - row) + 1  # row t of a chunk sits at position ctx - q_len + t
        rows = Rows(torch.from_numpy(row), torch.from_numpy(req), torch.from_numpy(n_keys.astype(np.int32)))
    else:  # a group's keys in bytes, not in keys: GPT-2's 12 x 64 floats make 1024 keys 3 MiB
        decode_keys = decode_keys or DECODE_BYTES // (key_bytes or 3072)
        groups = _groups(
            np.flatnonzero(q_len == 1).tolist(), cu.tolist(), ctx.tolist(), context_lens, tables, decode_keys
        )
    chunks = []
    for i in np.flatnonzero((q_len > 1) & ~alone).tolist():
        c, n = int(ctx[i]), int(q_len[i])
        mask = None  # a fresh prompt: plain causal attention
        if n < c:  # query t sits at c - n + t and sees keys 0 ..= that position
            mask = torch.arange(c)[None, :] <= torch.arange(c - n, c)[:, None]
        chunks.append(Chunk(int(cu[i]), int(cu[i + 1]), tables[i : i + 1], c, mask))
    return AttentionPlan(rows, groups, chunks, step)


@functools.cache
def row_kernel():
    """nanoserve_kernels.cpu_numba.attend_rows (numba compiles it on first import), or None without numba."""
    try:
        from nanoserve_kernels.cpu_numba import attend_rows
    except ImportError:  # no numba: the torch path
        return None
    return attend_rows


def _groups(decodes, cu, ctx, context_lens, tables, decode_keys):
    """The decodes in groups of similar context, each at most decode_keys padded keys (module docstring)."""
    groups, reqs = [], []
    for i in sorted(decodes, key=lambda i: ctx[i]):  # shortest first: a group is padded to its last
        if reqs and (len(reqs) + 1) * ctx[i] > decode_keys:
            groups.append(_group(reqs, cu, ctx, context_lens, tables))
            reqs = []
        reqs.append(i)
    if reqs:
        groups.append(_group(reqs, cu, ctx, context_lens, tables))
    return groups


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
    if plan.rows is not None and not _kernel_takes(q, k_cache, v_cache):
        plan = plan.torch_path
    out = torch.empty_like(q)
    if (r := plan.rows) is not None and len(r.rows):  # one query at a time, its pages read where they lie
        args = (k_cache, v_cache, r.reqs, r.n_keys, block_tables, scale)
        if len(r.rows) == N:  # every row (a decode step, a burst of short prompts)
            return row_kernel()(q, *args)
        out.index_copy_(0, r.rows, row_kernel()(q[r.rows], *args))
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


def _kernel_takes(q, k_cache, v_cache) -> bool:
    """The in-place kernel reads fp32 CPU tensors and caches that are contiguous (it never copies one)."""
    fp32 = q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
    return fp32 and q.device.type == "cpu" and k_cache.is_contiguous() and v_cache.is_contiguous()


def _gather(k_cache, v_cache, block_tables, ctx, block_size, dtype):
    pages = block_tables[:, : -(-ctx // block_size)]
    k = gather_pages(k_cache, pages, "k")[:, :ctx].to(dtype).transpose(1, 2)
    v = gather_pages(v_cache, pages, "v")[:, :ctx].to(dtype).transpose(1, 2)
    return k, v


__all__ = ["write_kv", "write_kv_pages", "plan_attention", "paged_attention", "AttentionPlan"]
