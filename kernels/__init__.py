"""Attention kernels over the paged KV cache.

`reference` is plain torch: the CPU path and the oracle every Triton kernel is tested against.
"""
