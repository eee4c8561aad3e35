"""Attention kernels over the paged KV cache, three backends with one interface.

`reference` is plain torch, simple rather than fast: the oracle every backend is tested against.
`cpu` is made fast for the CPU: a plan per step, decodes and short prompts read in place by a numba
kernel (`cpu_numba`), longer chunks in SDPA, and a torch path without numba (decodes in cache-sized groups).
`paged_attention` is the Triton kernels for the GPU. Each has write_kv, write_kv_pages, plan_attention
and paged_attention(..., plan=None).
"""
