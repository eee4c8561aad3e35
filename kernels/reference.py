"""Paged attention and the KV-cache write in plain torch: the CPU path and the oracle.

The KV cache of one layer is a pool of pages, `k_cache` and `v_cache` of shape
(num_blocks, block_size, n_heads, head_dim). A request owns a list of pages, its block table;
token t of the request lives in page `block_table[t // block_size]` at offset `t % block_size`,
i.e. in slot `block_table[t // block_size] * block_size + t % block_size`.

One step packs the new tokens of every scheduled request into one flat batch of N rows:

    q              (N, n_heads, head_dim)  queries of the new tokens, request after request
    cu_seqlens_q   (B + 1,)   request i owns rows cu_seqlens_q[i] : cu_seqlens_q[i + 1]
    context_lens   (B,)       tokens of request i in the cache *after* this step's write
    block_tables   (B, max_blocks)  page ids; entries past a request's last page are padding

The new tokens of request i are its last q_len_i positions, so the query at row t of the request
sits at position context_len_i - q_len_i + t and attends causally to keys 0 ..= that position.
A decode is the case q_len = 1, a prefill chunk any q_len; both mix freely in one call.
"""

import itertools
import threading

import torch
import torch.nn.functional as F

_buffers = threading.local()  # per thread (one per pipeline stage): the reused gather buffers on CPU


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Scatter each new token's key and value into its slot of the paged cache.

    >>> kc = vc = torch.zeros(2, 4, 1, 1)                       # 2 pages of 4 slots
    >>> write_kv(kc, vc, torch.ones(1, 1, 1), torch.ones(1, 1, 1), torch.tensor([5]))
    >>> kc[1, 1, 0, 0].item()                                      # slot 5 = page 1, offset 1
    1.0
    """
    n_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, n_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, n_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


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
    """cache[pages] as a (B, n_pages * block_size, n_heads, head_dim) copy.

    On CPU the copy goes into a buffer this thread reuses from call to call: a fresh tensor of a few
    hundred MB per layer would be paid in page faults (measured on a 2-core VM: 50 ms against 6.5 ms for
    a 256 x 256-token gather). The result is only valid until the thread's next call.
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


def paged_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx):
    """Attention of the step's new queries over each request's pages (module docstring: the layout).

    `paged_attention_padded`, except for a step that mixes decodes with prefill chunks: padding every
    decode to the chunk's length would be most of the work (13x the time of the two kinds apart with
    63 decodes beside a 512-token chunk, GPT-2 shapes on CPU: benchmarks/bench_mixed_attention.py), so
    the decodes and the chunks are attended apart. Only such a step reads the query and context lengths
    back on the host.
    """
    if max_q > 1:
        q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        if 1 in q_lens:
            return paged_attention_by_kind(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)
    return paged_attention_padded(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx)


def paged_attention_by_kind(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
    """`paged_attention_padded` for the decodes (one query each) and for the longer chunks, apart."""
    cu, ctx = cu_seqlens_q.tolist(), context_lens.tolist()
    q_lens = [b - a for a, b in zip(cu, cu[1:])]
    out = torch.empty_like(q)
    for kind in ([i for i, n in enumerate(q_lens) if n == 1], [i for i, n in enumerate(q_lens) if n > 1]):
        rows = torch.tensor([r for i in kind for r in range(cu[i], cu[i + 1])], device=q.device)
        lens = [q_lens[i] for i in kind]
        kind_cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=q.device)
        idx = torch.tensor(kind, device=q.device)
        out[rows] = paged_attention_padded(
            q[rows], k_cache, v_cache, kind_cu, context_lens[idx], block_tables[idx], scale,
            max(lens), max(ctx[i] for i in kind),
        )  # fmt: skip
    return out


def paged_attention_padded(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx):
    """Gathers every request's pages into a padded (B, max_ctx) key/value tensor, its queries into a
    padded (B, max_q) one, and runs one masked SDPA, so the reference is simple rather than fast.
    `max_q` and `max_ctx` are the largest q_len and context_len, passed as ints so that no device value
    is read back on the host. Returns (N, n_heads, head_dim) in q's dtype.

    Every slot of the pages in `block_tables` must hold a finite number, written or not: torch.empty's
    garbage may be NaN, so zero a cache before use (nanoserve's runner zeroes each page when it is
    first written). Stale keys and values of freed pages are fine.
    """
    B = context_lens.shape[0]
    N, H, D = q.shape
    block_size = k_cache.shape[1]
    device = q.device
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]  # (B,)

    # gather pages -> (B, max_ctx, H, D); padding pages are read but masked out below
    n_pages = (max_ctx + block_size - 1) // block_size
    pages = block_tables[:, :n_pages].long()
    k = gather_pages(k_cache, pages, "k")[:, :max_ctx]
    v = gather_pages(v_cache, pages, "v")[:, :max_ctx]

    # scatter the flat queries into a padded (B, max_q, H, D) tensor
    row = torch.arange(N, device=device)
    req = torch.repeat_interleave(torch.arange(B, device=device), q_lens, output_size=N)
    t = row - cu_seqlens_q[req].long()  # index of the query within its request
    qp = q.new_zeros(B, max_q, H, D)
    qp[req, t] = q

    # query t of request i sits at position context_len_i - q_len_i + t; it sees keys <= position
    q_pos = (context_lens - q_lens)[:, None] + torch.arange(max_q, device=device)  # (B, max_q)
    k_pos = torch.arange(max_ctx, device=device)
    # keys past a request's context (the rest of its last page, padding pages) get weight 0 from the
    # mask; their values must still be finite numbers, since 0 times NaN is NaN: see the docstring
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < context_lens[:, None, None])
    mask[:, :, 0] = True  # padded query rows see key 0 instead of nothing (no NaN); they are dropped

    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),
        k.to(q.dtype).transpose(1, 2),
        v.to(q.dtype).transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
    )  # (B, H, max_q, D)
    return out.transpose(1, 2)[req, t]
