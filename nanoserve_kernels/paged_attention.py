"""Paged attention and the KV-cache write as Triton kernels: the GPU path.

Same contract, same signatures as `nanoserve_kernels/reference.py` (read that first: the page layout, what
`cu_seqlens_q` and `context_lens` mean, where the new tokens sit, grouped-query heads), so the model
swaps one module for the other. Run the tests on a CPU with `TRITON_INTERPRET=1 pytest
tests/test_kernels.py`, the benchmark on a GPU with `python benchmarks/bench_kernels.py`, and see what
the GPU would run, without one, with `python benchmarks/bench_kernels.py --compile-only`.

Layout
------
    k_cache, v_cache  (num_blocks, block_size, H_kv, D)  one layer's page pool, contiguous
    q, out            (N, H, D)         the new tokens of the step, request after request
    k, v              (N, H_kv, D)      their keys and values, to be written into the cache
    cu_seqlens_q      (B + 1,) int32    request b owns rows cu_seqlens_q[b] : cu_seqlens_q[b + 1]
    context_lens      (B,) int32        tokens of request b in the cache after this step's write
    block_tables      (B, max_blocks) int32

H is a multiple of H_kv (grouped-query attention; H == H_kv is multi-head): query head h reads KV
head h // GROUP, GROUP = H // H_kv. Key n of request b lives at k_cache[block_tables[b, n //
block_size], n % block_size]. The attention kernels compute that address for every key they load, so
one tile of keys may span several pages and every block size works, 1 included. Query t of request b
(0 <= t < q_len) sits at position context_len - q_len + t and sees keys 0 ..= that position (causal).

Kernels, in the order to read them (llm.c dev/cuda style: simplest first)
---------------------------------------------------------------------------
1. `_write_kv_kernel`        grid (N,): one program copies one token's H_kv*D keys and values into its
   slot. The cache is contiguous, so slot s is simply row s of a (num_blocks * block_size, H_kv*D) view.
2. `_write_kv_pages_kernel`  grid (pages, chunks): the whole-page path. When a chunk of new tokens
   starts on a page boundary, token j goes to page page_ids[j // block_size], so the copy is one
   contiguous run of block_size*H_kv*D elements per page: no slot lookups, long vectorised copies.
3. `_attn_rowwise_kernel`    grid (max_q * S, B, H): one program per (query row, query head), walking
   the request's keys BLOCK_N at a time with an online softmax. No `tl.dot`, so any dtype and any
   shape; slow for long prefills (keys are re-read per query) but for decode, one query per
   request, this *is* the right kernel (vLLM's paged_attention_v1 has the same grid). Each tile
   issues its K and V loads together and loads the next tile's page ids before its math, so neither
   V nor the next addresses wait behind the softmax's reductions.
4. split-KV (flash-decoding): kernels 3 and 5 with S > 1 slice the key range into S splits (whole
   tiles, `split_layout`) on the first grid axis, so that the programs fill the GPU even when B*H
   alone cannot. Each split writes its partial output and log-sum-exp; `_combine_splits_kernel`
   merges them.
5. `_attn_grouped_kernel`    grid (max_q * S, B, H_kv): grouped-query decode. One program per KV head
   serves the GROUP query heads that read it: they are the rows of one (16+, D) tile, padded to the 16
   rows `tl.dot` needs, so each key and value tile is loaded once per group, not once per query head
   (the bandwidth GQA exists to save), and the products run on tensor cores.
6. `_attn_tiled_kernel`      grid (cdiv(max_q, BLOCK_M), B, H): FlashAttention-2 for prefill. A
   program owns BLOCK_M queries of one request and one head, and each key tile it loads serves all
   of them through two `tl.dot`s (tensor cores), so the keys are read max_q / BLOCK_M times
   instead of max_q times. Its loop, as kernel 5's, goes through Triton's software pipeliner
   (num_stages), which already loads the next tiles' page ids, K and V (cp.async) during the math:
   a hand-made prefetch there only got in its way (32 scalar loads a tile instead of the pipeliner's).

`paged_attention` dispatches: max_q == 1 (a host int, so no device value is read and the decode
call can be captured in a CUDA graph) runs kernel 5 for grouped-query attention in fp16/bf16 and
kernel 3 otherwise (`decode_kernel`), with S from `choose_num_kv_splits`: about PROGRAMS_PER_SM = 8
programs per SM, splits of at least 64 keys. Anything else runs kernel 6 (it handles decodes mixed
into a prefill batch as 1-row tiles). `plan_attention` makes those decisions once per step for
every layer; it reads no tensor, so it can be built inside a CUDA-graph capture.

Online softmax (kernels 3-6), all in fp32 whatever the storage dtype
--------------------------------------------------------------------
For one query, keep the running max m, the running sum l = sum exp(s - m) and the running
output acc = sum exp(s - m) * v. For each new tile of scores s_j:

    m' = max(m, max_j s_j);  acc = acc * exp(m - m') + sum_j exp(s_j - m') v_j;  l likewise
    at the end: out = acc / l,  lse = m + log(l)

so the scores of a whole context never need to exist at once. A split-KV split ends with
(out_s, lse_s); the exact result is sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s - max lse).

Optimisations, each named where it is used
------------------------------------------
- exp2: log2(e) is folded into the softmax scale so the inner loop runs exp2 (one instruction on
  the GPU); m, lse are therefore in base-2 units inside the kernels.
- causal tile skipping: a program's key loop ends at its last query's position, so tiles above
  the causal diagonal are never loaded.
- K and V issued together, the next page ids prefetched (kernel 3), Triton's pipeliner (5, 6).
- split-KV (above), and tensor cores via `tl.dot` in the grouped and the tiled kernels.
- the whole-page write (above).

What the GPU runs (`bench_kernels.py --compile-only --arch 90`, Triton 3.9, fp16, sm_90, compiled
with the launch-time specialisation): kernel 3 at 64 registers (56 before K and V were issued
together: both tiles are now live at once; 64 is what lets 8 programs of 128 threads share an SM's
64K registers), kernel 5 at 80 for Llama-3-8B's 4-head groups, kernel 6 at 103-146; nothing spills;
the loads of K and V are 128 bits wide.

Supported: storage dtypes float32, float16, bfloat16 (q may differ from the cache; keys and values
are converted to q's dtype, as in the reference); any block_size >= 1; head_dim a power of two from
8 to 256 (head dims below 16 are padded to 16 with masks because `tl.dot` needs K >= 16).
The Triton interpreter (CPU) cannot run a bfloat16 `tl.dot`, so there bf16 prefill and bf16
grouped-query decode need kernel 3 (`paged_attention_rowwise`).
"""

import contextlib
import functools
import os
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
PROGRAMS_PER_SM = 8  # the split-KV target: enough programs in flight per SM to hide load latency
MIN_KEYS_PER_SPLIT = 64  # below this a split's fixed cost (its launch share, the merge) dominates
MAX_KV_SPLITS = 64
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# 1. KV write: scatter one token per program
# ---------------------------------------------------------------------------------------------


WRITES_PAGES = True  # the runner may hand chunks that start on a page boundary to write_kv_pages


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_k, stride_v,  # row strides of k and v; within a row the H*D elements are contiguous
    HD,  # H * D, the length of one cache row
    BLOCK_HD: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    if slot < 0:  # padding row (e.g. a CUDA graph padded to a fixed batch): nothing to write
        return
    offs = tl.arange(0, BLOCK_HD)
    mask = offs < HD
    k = tl.load(k_ptr + i * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + i * stride_v + offs, mask=mask)
    # slot = page * block_size + offset, and the cache is contiguous: row `slot` of the flat view
    tl.store(k_cache_ptr + slot * HD + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * HD + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# 2. KV write, whole-page path: one contiguous run per page
# ---------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_pages_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, page_ptr,
    n_elements,  # N * H * D: the last page may be partial, nothing past the chunk is written
    PAGE_ELEMS: tl.constexpr,  # block_size * H * D
    BLOCK: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)  # which page of the chunk
    c = tl.program_id(1)  # which BLOCK-sized piece of that page
    page = tl.load(page_ptr + p).to(tl.int64)
    offs = c * BLOCK + tl.arange(0, BLOCK)  # element index inside the page
    src = p * PAGE_ELEMS + offs  # k is contiguous (N, H, D): page p of the chunk is one run
    mask = (offs < PAGE_ELEMS) & (src < n_elements)
    k = tl.load(k_ptr + src, mask=mask)
    v = tl.load(v_ptr + src, mask=mask)
    tl.store(k_cache_ptr + page * PAGE_ELEMS + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + page * PAGE_ELEMS + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# 3 + 4. Attention, one program per (query row, query head[, KV split]): decode and split-KV
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_rowwise_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr,
    qk_scale,  # softmax scale * log2(e)  (exp2)
    split_len,  # keys per KV split
    n_heads,  # H, the query heads
    stride_qn, stride_qh,  # q (N, H, D)
    stride_on, stride_oh,  # out (N, H, D) when NUM_SPLITS == 1, else partial out (N, H, S, BLOCK_D)
    stride_cb, stride_ct, stride_ch,  # k_cache and v_cache (num_blocks, block_size, H_kv, D)
    stride_bt,  # block_tables (B, max_blocks)
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head: query head h reads KV head h // GROUP
):  # fmt: skip
    t = tl.program_id(0) // NUM_SPLITS  # query index inside its request
    split = tl.program_id(0) % NUM_SPLITS
    b = tl.program_id(1)
    h = tl.program_id(2)
    row0 = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - row0
    if t >= q_len:  # the grid is sized for the longest request (max_q); shorter ones stop here
        return
    pos = tl.load(context_lens_ptr + b) - q_len + t  # this query's position: it sees keys 0 ..= pos
    row = row0 + t

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + row * stride_qn + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)

    m = tl.full([], float("-inf"), tl.float32)  # running max of the scores (base 2)
    l = tl.full([], 0.0, tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_D], tl.float32)  # running sum of exp2(score - m) * v
    # this split's keys; causal tile skipping: nothing past pos is loaded
    start = split * split_len
    end = tl.minimum(start + split_len, pos + 1)
    bt_row = block_tables_ptr + b * stride_bt
    kv_head_off = (h // GROUP) * stride_ch
    offs_n = start + tl.arange(0, BLOCK_N)
    page = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=offs_n < end, other=0)  # the first tile's page ids
    for n0 in range(start, end, BLOCK_N):  # every tile holds >= 1 valid key, so m stays finite
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        kv_off = page.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_ct + kv_head_off  # (BLOCK_N,)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # K and V are issued together, so V's latency hides behind the score math instead of after it
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        next_n = offs_n + BLOCK_N  # prefetch: the next tile's page ids load while this tile computes
        page = tl.load(bt_row + next_n // BLOCK_SIZE, mask=next_n < end, other=0)

        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale  # (BLOCK_N,) scores, base 2
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp2(m - m_new)  # rescales what was summed under the old max
        p = tl.exp2(s - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l = l * alpha + tl.sum(p, 0)
        m = m_new

    out_off = row * stride_on + h * stride_oh
    if NUM_SPLITS == 1:
        tl.store(out_ptr + out_off + offs_d, (acc / l).to(out_ptr.dtype.element_ty), mask=d_mask)
    else:
        # A split that starts past this query's position saw no key: l = 0. It stores out = 0 and
        # lse = -inf, which gets weight exp2(-inf) = 0 in the merge. (Split 0 always sees key 0.)
        has_keys = l > 0
        out = acc / tl.where(has_keys, l, 1.0)
        lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, l, 1.0)), float("-inf"))
        tl.store(out_ptr + out_off + split * BLOCK_D + offs_d, out, mask=d_mask)
        tl.store(lse_ptr + (row * n_heads + h) * NUM_SPLITS + split, lse)


@triton.jit
def _combine_splits_kernel(
    part_ptr, lse_ptr, out_ptr,  # part (N, H, S, BLOCK_D) fp32, lse (N, H, S) fp32, out (N, H, D)
    stride_on, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    h = tl.program_id(1)
    rh = row * tl.num_programs(1) + h
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + rh * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # (BLOCK_S,) each split's share of the softmax mass
    part = tl.load(
        part_ptr + (rh * NUM_SPLITS + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None], other=0.0
    )
    out = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(out_ptr + row * stride_on + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)


# ---------------------------------------------------------------------------------------------
# 5. Attention for grouped-query decode: one program per (query row, KV head[, KV split])
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_grouped_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr,
    qk_scale,  # softmax scale * log2(e)  (exp2)
    split_len,  # keys per KV split
    n_heads,  # H, the query heads: the programs cover H_kv KV heads of GROUP query heads each
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_cb, stride_ct, stride_ch, stride_bt,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,  # query heads per KV head; that padded to >= 16 rows (tl.dot)
):  # fmt: skip
    t = tl.program_id(0) // NUM_SPLITS
    split = tl.program_id(0) % NUM_SPLITS
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    row0 = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - row0
    if t >= q_len:
        return
    pos = tl.load(context_lens_ptr + b) - q_len + t
    row = row0 + t

    # the query heads that read this KV head are the rows of one tile: each key and value tile is
    # loaded once for the whole group and serves it through two tl.dots, as the tiled kernel serves
    # BLOCK_M queries. Rows past GROUP are zero queries: computed, never stored.
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g  # (BLOCK_G,)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    gd_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + row * stride_qn + heads[:, None] * stride_qh + offs_d[None, :], mask=gd_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, pos + 1)
    for n0 in range(start, end, BLOCK_N):  # pipelined by Triton, as the tiled kernel's loop (kernel 6)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(block_tables_ptr + b * stride_bt + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        kv_off = page.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        kT = tl.load(
            k_cache_ptr + kv_off[None, :] + offs_d[:, None], mask=d_mask[:, None] & n_mask[None, :], other=0.0
        ).to(q.dtype)
        v = tl.load(
            v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
        ).to(q.dtype)
        s = tl.dot(q, kT) * qk_scale  # (BLOCK_G, BLOCK_N) fp32, base 2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    out_off = row * stride_on + heads[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + out_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:  # as kernel 4: an empty split stores out = 0 and lse = -inf
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(out_ptr + out_off + split * BLOCK_D, out, mask=gd_mask)
        tl.store(lse_ptr + (row * n_heads + heads) * NUM_SPLITS + split, lse, mask=g_mask)


# ---------------------------------------------------------------------------------------------
# 6. Attention, tiled (FlashAttention-2): BLOCK_M queries x BLOCK_N keys per step, for prefill
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_tiled_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr,
    qk_scale,  # softmax scale * log2(e)  (exp2)
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_cb, stride_ct, stride_ch, stride_bt,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr,  # GROUP: query heads per KV head
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 storage (exact, not tf32), ignored for fp16/bf16
):  # fmt: skip
    b = tl.program_id(1)
    h = tl.program_id(2)  # query head; GQA: it reads KV head h // GROUP
    kv_head = h // GROUP
    row0 = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - row0
    m_start = tl.program_id(0) * BLOCK_M
    if m_start >= q_len:  # the grid is sized for max_q; shorter requests have fewer tiles
        return
    ctx = tl.load(context_lens_ptr + b)

    offs_m = m_start + tl.arange(0, BLOCK_M)  # query indices inside the request
    m_mask = offs_m < q_len
    pos = ctx - q_len + offs_m  # (BLOCK_M,) query positions
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D  # head dims below 16 are zero-padded: tl.dot needs K >= 16
    q_off = (row0 + offs_m)[:, None] * stride_qn + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # causal tile skipping: the tile's last query sits at ctx - q_len + min(m_start + BLOCK_M, q_len) - 1
    end = ctx - q_len + tl.minimum(m_start + BLOCK_M, q_len)
    # No hand-made prefetch here: tl.dot puts this loop in Triton's software pipeliner (num_stages), which
    # already loads the page ids, K and V of the next tiles (cp.async) while this one computes.
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(block_tables_ptr + b * stride_bt + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        kv_off = page.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_ct + kv_head * stride_ch  # (BLOCK_N,)
        # K is loaded transposed, (BLOCK_D, BLOCK_N), so that q @ kT is a plain tl.dot; V is issued with it
        kT = tl.load(
            k_cache_ptr + kv_off[None, :] + offs_d[:, None], mask=d_mask[:, None] & n_mask[None, :], other=0.0
        ).to(q.dtype)
        v = tl.load(
            v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
        ).to(q.dtype)

        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, base 2
        # causal mask; key 0 is visible to every row (padding rows too), so after the first tile
        # every running max is finite and exp2(-inf - m) never becomes NaN
        s = tl.where((offs_n[None, :] <= pos[:, None]) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    out = acc / l_i[:, None]
    o_off = (row0 + offs_m)[:, None] * stride_on + h * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Host side: checks, launch helpers and the public functions
# ---------------------------------------------------------------------------------------------


# Triton's interpreter (TRITON_INTERPRET=1) keeps the launch grid in one global, so two threads launching at
# once (--pp on a CPU runs a thread per pipeline stage) would mix their grids: there, one launch at a time.
_launch_lock = threading.Lock() if os.environ.get("TRITON_INTERPRET") == "1" else contextlib.nullcontext()


def _one_launch_at_a_time(launch):
    @functools.wraps(launch)
    def locked(*args, **kwargs):
        with _launch_lock:
            return launch(*args, **kwargs)

    return locked


def _check_cache(k_cache, v_cache):
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
            "(num_blocks, block_size, n_heads, head_dim)"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous: allocate it with torch.empty/zeros, not as a strided view")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the Triton kernels support float32, float16 and bfloat16")
    head_dim = k_cache.shape[-1]
    if head_dim < 8 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(
            f"head_dim {head_dim} is not supported by the Triton kernels: they need a power of two from 8 to 256 "
            "(8, 16, 32, 64, 128, 256); use nanoserve_kernels.reference for this model"
        )


def _rows(x):
    """x (N, H, D) with every token's H*D elements contiguous (a view of a fused qkv is fine)."""
    n, h, d = x.shape
    if x.stride(2) != 1 or x.stride(1) != d:
        x = x.contiguous()  # a copy, but only for unusual layouts
    return x


def _block_n(head_dim):
    # keep a (BLOCK_N, BLOCK_D) tile at <= 4096 elements: 32 fp32 registers a thread with 4 warps
    return 64 if head_dim <= 64 else 32


def _check_kv(k, v, k_cache):
    if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (N, n_kv_heads, head_dim) of the cache "
            f"{tuple(k_cache.shape)}: with grouped-query attention they have the cache's KV heads, not q's heads"
        )


@_one_launch_at_a_time
def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Scatter each new token's key and value, (N, n_kv_heads, head_dim), into its slot of the paged
    cache (Triton). Same as `reference.write_kv`; in addition a negative slot means "padding row, skip it".

    >>> kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)   # 2 pages of 4 slots
    >>> write_kv(kc, vc, torch.ones(1, 1, 8), torch.ones(1, 1, 8), torch.tensor([5]))
    >>> kc[1, 1, 0, 0].item()                                        # slot 5 = page 1, offset 1
    1.0
    """
    _check_cache(k_cache, v_cache)
    _check_kv(k, v, k_cache)
    n, h, d = k.shape
    if n == 0:
        return
    k, v = _rows(k), _rows(v)
    hd = h * d
    block_hd = triton.next_power_of_2(hd)
    _write_kv_kernel[(n,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), hd, block_hd)


@_one_launch_at_a_time
def write_kv_pages(k_cache, v_cache, k, v, page_ids):
    """Write a chunk of new tokens that starts on a page boundary: token j goes to page
    page_ids[j // block_size] at offset j % block_size. The last page may be partial (its tail is
    left untouched), so N must satisfy (len(page_ids) - 1) * block_size < N <= len(page_ids) * block_size.

    Equivalent to `write_kv(..., slot_mapping)` with slot_mapping[j] = page_ids[j // block_size] *
    block_size + j % block_size, without the per-token slot lookups (the page-aligned scheduler's path).

    >>> kc, vc = torch.zeros(3, 2, 1, 8), torch.zeros(3, 2, 1, 8)   # 3 pages of 2 slots
    >>> write_kv_pages(kc, vc, torch.ones(3, 1, 8), torch.ones(3, 1, 8), torch.tensor([2, 0]))
    >>> [kc[2, 0, 0, 0].item(), kc[2, 1, 0, 0].item(), kc[0, 0, 0, 0].item(), kc[0, 1, 0, 0].item()]
    [1.0, 1.0, 1.0, 0.0]
    """
    _check_cache(k_cache, v_cache)
    _check_kv(k, v, k_cache)
    n, h, d = k.shape
    block_size = k_cache.shape[1]
    n_pages = page_ids.shape[0]
    if not (n_pages - 1) * block_size < n <= n_pages * block_size:
        raise ValueError(
            f"write_kv_pages got {n} tokens for {n_pages} pages of {block_size} slots; it needs "
            f"{(n_pages - 1) * block_size + 1}..{n_pages * block_size} tokens (one page per started block of "
            "tokens); write other chunks with write_kv"
        )
    if n == 0:
        return
    k, v = k.contiguous(), v.contiguous()  # one run per page needs the whole chunk contiguous
    page_elems = block_size * h * d
    block = min(triton.next_power_of_2(page_elems), 4096)
    grid = (n_pages, triton.cdiv(page_elems, block))
    _write_kv_pages_kernel[grid](k, v, k_cache, v_cache, page_ids, n * h * d, page_elems, block)


@functools.cache
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs one program at a time: splitting never pays there


def choose_num_kv_splits(batch, n_heads, max_ctx, device):
    """How many KV splits a decode step should use: the flash-decoding heuristic.

    A decode launches batch * n_heads programs, n_heads being the heads its kernel has one program for:
    the query heads for the row-wise kernel, the KV heads for the grouped one (`decode_kernel`). Split
    the keys when that is too few to give every SM PROGRAMS_PER_SM programs (several per SM, so that
    while one waits for its loads the others issue theirs), into as many splits as it takes, but keep
    every split >= MIN_KEYS_PER_SPLIT keys (shorter splits cost more in launch share and merging than
    they win) and their number <= MAX_KV_SPLITS.

    >>> choose_num_kv_splits(1, 12, 1024, torch.device("cpu"))   # no SMs to fill on a CPU
    1
    """
    want = triton.cdiv(PROGRAMS_PER_SM * _num_sms(torch.device(device)), max(1, batch * n_heads))
    return max(1, min(want, max_ctx // MIN_KEYS_PER_SPLIT, MAX_KV_SPLITS))


def _attention_args(q, k_cache, v_cache):
    _check_cache(k_cache, v_cache)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; the Triton kernels support float32, float16 and bfloat16")
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} must be (N, n_heads, head_dim) with the cache's head_dim and n_heads a multiple of "
            f"its n_kv_heads: the cache is {tuple(k_cache.shape)}, (num_blocks, block_size, n_kv_heads, head_dim)"
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    return q, torch.empty(q.shape, dtype=q.dtype, device=q.device), q.shape[1] // k_cache.shape[2]


def split_layout(max_ctx, num_kv_splits, block_n):
    """(splits, keys per split) for a request of num_kv_splits: whole tiles of block_n keys (64, 128, ...
    at head_dim 64), as few splits as cover max_ctx. A split that starts past a request's context
    stays empty and weighs nothing in the merge; none is empty for the longest request.

    >>> split_layout(1000, 9, block_n=64)                  # 9 splits of 112 keys would cut tiles: 8 of 128
    (8, 128)
    """
    splits = max(1, min(int(num_kv_splits), triton.cdiv(max_ctx, block_n)))
    split_len = triton.cdiv(triton.cdiv(max_ctx, splits), block_n) * block_n
    return triton.cdiv(max_ctx, split_len), split_len


def _decode_launch(kernel, grid_heads, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q,
                   max_ctx, num_kv_splits, block_n, **constexprs):  # fmt: skip
    """Kernels 3-5: launch `kernel` over (max_q * S, B, grid_heads) with S KV splits, then merge them."""
    q, out, group = _attention_args(q, k_cache, v_cache)
    N, H, D = q.shape
    if N == 0:
        return out
    block_d = max(16, D)
    S, split_len = split_layout(max_ctx, num_kv_splits, block_n)
    if S == 1:
        part, lse, o_strides = out, out, (out.stride(0), out.stride(1))
    else:  # partial outputs (N, H, S, BLOCK_D) and their log-sum-exp (N, H, S), in fp32
        part = torch.empty(N, H, S, block_d, dtype=torch.float32, device=q.device)
        lse = torch.empty(N, H, S, dtype=torch.float32, device=q.device)
        o_strides = (part.stride(0), part.stride(1))
    kernel[(max_q * S, context_lens.shape[0], grid_heads)](
        q, k_cache, v_cache, part, lse,
        cu_seqlens_q, context_lens, block_tables,
        scale * LOG2E, split_len, H,
        q.stride(0), q.stride(1), *o_strides,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        D=D, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_SIZE=k_cache.shape[1], NUM_SPLITS=S, GROUP=group,
        **constexprs, num_warps=4,
    )  # fmt: skip
    if S > 1:
        _combine_splits_kernel[(N, H)](
            part, lse, out, out.stride(0), out.stride(1),
            D=D, BLOCK_D=block_d, NUM_SPLITS=S, BLOCK_S=triton.next_power_of_2(S),
        )  # fmt: skip
    return out


@_one_launch_at_a_time
def paged_attention_rowwise(
    q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx, *, num_kv_splits=1
):
    """Kernels 3 + 4: one program per (query row, query head, KV split); `reference.paged_attention`'s
    contract. Any batch, dtype and query group works; it is the decode kernel of multi-head attention.
    num_kv_splits > 1 is flash-decoding."""
    return _decode_launch(
        _attn_rowwise_kernel, q.shape[1], q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
        max_q, max_ctx, num_kv_splits, _block_n(q.shape[2]),
    )  # fmt: skip


@_one_launch_at_a_time
def paged_attention_grouped(
    q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx, *, num_kv_splits=1
):
    """Kernel 5 (+ 4): one program per (query row, KV head, KV split) serving the KV head's whole
    query group with tensor cores; `reference.paged_attention`'s contract, for grouped-query attention
    with fp16/bf16 queries (the Triton interpreter cannot run its bf16 tl.dot).

    >>> kc = vc = torch.randn(2, 4, 1, 16).half()          # 2 pages of 4 slots, 1 KV head of dim 16
    >>> q = torch.randn(1, 4, 16).half()                   # one decode token, 4 query heads read that KV head
    >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    >>> paged_attention_grouped(q, kc, vc, i32(0, 1), i32(6), i32([1, 0]), 0.25, max_q=1, max_ctx=6).shape
    torch.Size([1, 4, 16])
    """
    if q.dtype == torch.float32:
        raise ValueError("paged_attention_grouped runs tl.dot on fp16/bf16 queries; use paged_attention_rowwise")
    group = q.shape[1] // k_cache.shape[2]
    return _decode_launch(
        _attn_grouped_kernel, k_cache.shape[2], q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
        scale, max_q, max_ctx, num_kv_splits, _block_n(q.shape[2]), BLOCK_G=max(16, triton.next_power_of_2(group)),
    )  # fmt: skip


def decode_kernel(q, k_cache):
    """Which decode kernel `paged_attention` runs: the grouped one (kernel 5) for grouped-query attention
    in fp16/bf16, where it reads each key once per group, else the row-wise one (kernel 3).

    >>> q, kc = torch.zeros(1, 8, 64, dtype=torch.float16), torch.zeros(4, 16, 2, 64, dtype=torch.float16)
    >>> decode_kernel(q, kc).__name__, decode_kernel(q.float(), kc).__name__   # 4 query heads per KV head
    ('paged_attention_grouped', 'paged_attention_rowwise')
    """
    grouped = q.shape[1] > k_cache.shape[2] and q.dtype in (torch.float16, torch.bfloat16)
    return paged_attention_grouped if grouped else paged_attention_rowwise


@_one_launch_at_a_time
def paged_attention_tiled(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx):
    """Kernel 5: FlashAttention-2 tiles of BLOCK_M queries; `reference.paged_attention`'s contract.
    The prefill kernel (it handles decode rows in the same batch as 1-row tiles)."""
    q, out, group = _attention_args(q, k_cache, v_cache)
    N, H, D = q.shape
    B = context_lens.shape[0]
    if N == 0:
        return out
    # a tile taller than the longest request is wasted work; tl.dot needs >= 16 rows
    block_m = max(16, min(64, triton.next_power_of_2(max_q)))
    block_d, block_n = max(16, D), _block_n(D)
    _attn_tiled_kernel[(triton.cdiv(max_q, block_m), B, H)](
        q, k_cache, v_cache, out,
        cu_seqlens_q, context_lens, block_tables,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        D=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=k_cache.shape[1], GROUP=group,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class AttentionPlan:
    """A step's attention metadata, for every layer: the tensors as given (no copy, so a plan built
    during a CUDA-graph capture from the graph's static buffers reads whatever they hold at each
    replay), the host ints, and the number of KV splits of a decode step when it is forced (None: each
    call picks it with `choose_num_kv_splits`, host arithmetic on shapes, since it depends on the
    layer's heads and on which decode kernel runs)."""

    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_q: int
    max_ctx: int
    num_kv_splits: int | None = None


def plan_attention(cu_seqlens_q, context_lens, block_tables, max_q, max_ctx, *, num_kv_splits=None, key_bytes=None):
    """The step's `AttentionPlan`, for every layer's `paged_attention(..., plan=plan)`. It reads no
    tensor, not even a shape's worth of device memory, so it can be built inside a CUDA-graph capture.
    `num_kv_splits` forces the number of KV splits of a decode step (1 = off).

    >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    >>> plan_attention(i32(0, 1), i32(6), i32([1, 0]), max_q=1, max_ctx=6, num_kv_splits=2).num_kv_splits
    2
    """
    if max_q > 1 and num_kv_splits is not None:
        raise ValueError(
            f"num_kv_splits applies to decode steps (max_q == 1), this one has max_q = {max_q}; "
            "call paged_attention_rowwise to split the keys of a prefill batch"
        )
    return AttentionPlan(cu_seqlens_q, context_lens, block_tables, max_q, max_ctx, num_kv_splits)


def paged_attention(
    q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, max_q, max_ctx, *,
    num_kv_splits=None, plan=None,
):  # fmt: skip
    """Attention of the step's new queries over each request's pages: `reference.paged_attention`
    on the GPU (the module docstring has the layout and the kernels).

    max_q == 1 (every request decodes one token) runs the row-wise decode kernel, split-KV when
    `choose_num_kv_splits` says so; `num_kv_splits` forces the number of splits (1 = off). Any
    other max_q runs the tiled prefill kernel. `max_q` and `max_ctx` are host ints and nothing is
    read back from the device, so a decode call can be captured in a CUDA graph. `plan`, this step's
    `plan_attention` (built from these same arguments), saves each layer the decisions; num_kv_splits
    then goes to plan_attention.

    >>> kc = vc = torch.randn(2, 4, 1, 8)                   # 2 pages of 4 slots, 1 KV head of dim 8
    >>> q = torch.randn(1, 2, 8)                            # one decode token, 2 query heads (GQA)
    >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    >>> out = paged_attention(q, kc, vc, i32(0, 1), i32(6), i32([1, 0]), 8**-0.5, max_q=1, max_ctx=6)
    >>> out.shape
    torch.Size([1, 2, 8])
    """
    if plan is None:
        plan = plan_attention(cu_seqlens_q, context_lens, block_tables, max_q, max_ctx, num_kv_splits=num_kv_splits)
    elif num_kv_splits is not None:
        raise ValueError("with a plan, pass num_kv_splits to plan_attention instead")
    step = (plan.cu_seqlens_q, plan.context_lens, plan.block_tables, scale, plan.max_q, plan.max_ctx)
    if plan.max_q > 1:
        return paged_attention_tiled(q, k_cache, v_cache, *step)
    kernel, splits = decode_kernel(q, k_cache), plan.num_kv_splits
    if splits is None:
        heads = k_cache.shape[2] if kernel is paged_attention_grouped else q.shape[1]  # programs per request
        splits = choose_num_kv_splits(plan.context_lens.shape[0], heads, plan.max_ctx, q.device)
    return kernel(q, k_cache, v_cache, *step, num_kv_splits=splits)


__all__ = [
    "write_kv",
    "write_kv_pages",
    "plan_attention",
    "paged_attention",
    "paged_attention_rowwise",
    "paged_attention_grouped",
    "paged_attention_tiled",
    "decode_kernel",
    "choose_num_kv_splits",
    "split_layout",
    "AttentionPlan",
]
