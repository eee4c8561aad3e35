"""Attention on the CPU that reads each key and value where it lies in its page: the numba kernel of the
CPU backend (nanoserve_kernels/cpu.py decides which queries it takes).

A decode step is memory-bound: every request's keys and values are read once per layer, and at 256
requests that is hundreds of MB per step, more than any CPU cache holds. Torch ops cannot read pages in
place: the torch path first copies each group's pages into one contiguous buffer (`index_select`) and
SDPA then reads that copy, so the bytes cross memory twice and the copy runs at the speed of copying.
This kernel is the textbook loop over the pages themselves, one query (all its heads) at a time, the
queries shared among the CPU's threads by `numba.prange`:

    for each key t the query sees:   score[h, t] = q[h] . K[page(t), slot(t), kv_head(h)] * scale
    for each head:                   softmax of score[h, :]
    for each key t the query sees:   out[h] += score[h, t] * V[page(t), slot(t), kv_head(h)]

A query sees the first n_keys keys of its request (its position + 1): a decode all of them, row t of a
chunk its causal prefix. Measured on a 2-core VM (benchmarks/RESULTS.md): one layer's decodes of 256
requests of 47-110 keys (4 heads of 64) in 1.5 ms, against 4 ms for the copy and SDPA.

numba compiles the kernel when this module is first imported (a few seconds, once: `cache=True` keeps the
machine code on disk). fp32 C-contiguous arrays only (cpu.py checks and otherwise takes its torch path).
The sums run in the order of the loops, except that numba may vectorize a dot product (`reassoc`): a
query's result depends on its own keys alone, never on which requests share the step.
"""

import threading

import numba
import numpy as np
import torch

FLOAT32_FLAGS = {"reassoc", "contract"}  # vectorized dot products and fused multiply-adds; inf and NaN kept

_launch = threading.Lock()  # one launch at a time: pipeline stages are threads, numba's thread pool is one


@numba.njit(
    "void(float32[:, :, ::1], float32[:, :, :, ::1], float32[:, :, :, ::1], int64[::1], int32[::1], int32[:, ::1],"
    " float32, float32[:, :, ::1])",
    parallel=True, fastmath=FLOAT32_FLAGS, cache=True,
)  # fmt: skip
def _attend_rows(q, k_cache, v_cache, reqs, n_keys, block_tables, scale, out):
    n_heads, head_dim = q.shape[1], q.shape[2]
    block_size, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads  # query head h reads KV head h // group
    for i in numba.prange(q.shape[0]):
        table, n = block_tables[reqs[i]], n_keys[i]
        score = np.empty((n_heads, n), np.float32)
        for t in range(n):
            page, slot = table[t // block_size], t % block_size
            for h in range(n_heads):
                acc = np.float32(0.0)
                for d in range(head_dim):
                    acc += q[i, h, d] * k_cache[page, slot, h // group, d]
                score[h, t] = acc * scale
        for h in range(n_heads):  # softmax, the largest score subtracted first
            top = score[h, 0]
            for t in range(1, n):
                top = max(top, score[h, t])
            total = np.float32(0.0)
            for t in range(n):
                score[h, t] = np.exp(score[h, t] - top)
                total += score[h, t]
            for t in range(n):
                score[h, t] /= total
        out[i] = 0.0
        for t in range(n):
            page, slot = table[t // block_size], t % block_size
            for h in range(n_heads):
                p = score[h, t]
                for d in range(head_dim):
                    out[i, h, d] += p * v_cache[page, slot, h // group, d]


def attend_rows(q, k_cache, v_cache, reqs, n_keys, block_tables, scale: float):
    """Attention of queries q (n, n_heads, head_dim), query i over the first n_keys[i] keys of request
    reqs[i] (the pages of block_tables[reqs[i]]), read from the pages in place. The cache is (num_blocks,
    block_size, n_kv_heads, head_dim) as everywhere (reference.py); fp32 CPU tensors, contiguous caches.

    >>> kc = vc = torch.randn(2, 4, 1, 8)                  # 2 pages of 4 slots, 1 KV head of dim 8
    >>> q = torch.randn(2, 2, 8)                           # 2 queries, 2 query heads share the KV head
    >>> i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    >>> out = attend_rows(q, kc, vc, torch.tensor([0, 0]), i32(5, 6), i32([1, 0]), 8**-0.5)  # positions 4, 5
    >>> out.shape
    torch.Size([2, 2, 8])
    """
    out = torch.empty(q.shape, dtype=torch.float32)
    caches = (k_cache.numpy(), v_cache.numpy())  # never copied: the kernel refuses a cache that is not contiguous
    small = [t.contiguous().numpy() for t in (reqs.long(), n_keys.int(), block_tables.int())]
    with _launch:
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        _attend_rows(q.contiguous().numpy(), *caches, *small, np.float32(scale), out.numpy())
    return out
