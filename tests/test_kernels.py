"""The Triton kernels (kernels/paged_attention.py) against the torch oracle (kernels/reference.py).

Without a GPU every kernel runs in Triton's interpreter on the CPU (TRITON_INTERPRET=1: numpy, one
program after another), so the shapes are tiny. With a GPU the same tests run compiled, plus the
`cuda`-marked ones (bf16 prefill, GPT-2 shapes, CUDA-graph capture).

    pytest tests/test_kernels.py -q
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton reads the flag when @triton.jit decorates a kernel (triton.knobs.runtime.interpret),
    # i.e. when kernels.paged_attention is imported: it must be set before that import.
    os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels import paged_attention as pa  # noqa: E402
from kernels import reference as ref  # noqa: E402

if not HAS_CUDA and type(pa._write_kv_kernel).__name__ != "InterpretedFunction":
    pa = importlib.reload(pa)  # imported earlier without the flag (by another test module): redo it

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETED = not HAS_CUDA


def cuda_only(test):
    """GPU-only tests: marked `cuda` (`pytest -m cuda` selects them) and skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")(test))


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def make_batch(reqs, block_size, n_heads=2, head_dim=16, dtype=torch.float32, seed=0, num_blocks=None, max_blocks=None):
    """A random paged cache and one step's batch: reqs is a list of (q_len, context_len).

    Pages are handed out in a random order, padding entries of the block tables hold random valid
    page ids, and the pool has spare pages (3 unless num_blocks says otherwise) full of random
    values, so reading a wrong page or a padding entry shows up as a wrong result.
    """
    g = torch.Generator().manual_seed(seed)
    pages_per_req = [-(-ctx // block_size) for _, ctx in reqs]
    num_blocks = num_blocks or sum(pages_per_req) + 3
    max_blocks = max_blocks or max(pages_per_req)
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.randint(0, num_blocks, (len(reqs), max_blocks), generator=g, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per_req):
        block_tables[b, :n] = perm[used : used + n]
        used += n
    shape = (num_blocks, block_size, n_heads, head_dim)
    q_lens = torch.tensor([q_len for q_len, _ in reqs])
    n_rows = int(q_lens.sum())
    batch = dict(
        q=torch.randn(n_rows, n_heads, head_dim, generator=g),
        k_cache=torch.randn(shape, generator=g),
        v_cache=torch.randn(shape, generator=g),
        cu_seqlens_q=torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).to(torch.int32)]),
        context_lens=torch.tensor([ctx for _, ctx in reqs], dtype=torch.int32),
        block_tables=block_tables,
        scale=head_dim**-0.5,
        max_q=max(q_len for q_len, _ in reqs),
        max_ctx=max(ctx for _, ctx in reqs),
    )
    for name in ("q", "k_cache", "v_cache"):
        batch[name] = batch[name].to(dtype)
    return {name: x.to(DEVICE) if torch.is_tensor(x) else x for name, x in batch.items()}


def expected(batch):
    """The reference in fp32 on the same (possibly fp16/bf16-rounded) inputs: the exact answer."""
    b32 = {name: x.float() if torch.is_tensor(x) and x.is_floating_point() else x for name, x in batch.items()}
    return ref.paged_attention(**b32)


def assert_close(out, batch, dtype=torch.float32):
    assert out.dtype == batch["q"].dtype and out.shape == batch["q"].shape
    torch.testing.assert_close(out.float(), expected(batch), atol=TOL[dtype], rtol=TOL[dtype])


# (q_len, context_len) per request; context_len counts the new tokens, so q_len == context_len is a
# fresh prompt and q_len < context_len a chunk after earlier chunks or a prefix-cache hit
CASES = {
    "prefill": [(5, 5), (17, 17), (1, 1)],  # nothing in the cache before the chunk
    "prefix_hit": [(3, 20), (8, 8), (4, 37)],  # contexts not a multiple of the page, partial last pages
    "mixed": [(1, 9), (6, 6), (1, 33), (0, 4), (4, 21)],  # decodes and chunks in one call, an idle request
    "decode": [(1, 1), (1, 7), (1, 40), (1, 16)],
}
KERNELS = {
    "dispatch": pa.paged_attention,
    "tiled": pa.paged_attention_tiled,
    "rowwise": pa.paged_attention_rowwise,
    "rowwise_split3": lambda *a, **kw: pa.paged_attention_rowwise(*a, **kw, num_kv_splits=3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_attention_matches_reference(kernel, case):
    batch = make_batch(CASES[case], block_size=4)
    assert_close(KERNELS[kernel](**batch), batch)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16, 64])
@pytest.mark.parametrize("kernel", ["tiled", "rowwise_split3"])
def test_block_sizes(kernel, block_size):
    batch = make_batch(CASES["mixed"] + [(2, 70)], block_size=block_size)
    assert_close(KERNELS[kernel](**batch), batch)


@pytest.mark.parametrize("head_dim", [8, 32, 64])
@pytest.mark.parametrize("kernel", ["tiled", "rowwise"])
def test_head_dims(kernel, head_dim):
    batch = make_batch(CASES["prefix_hit"], block_size=4, head_dim=head_dim, n_heads=3)
    assert_close(KERNELS[kernel](**batch), batch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["tiled", "rowwise", "rowwise_split3"])
def test_half_precision(kernel, dtype):
    if kernel == "tiled" and dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("the Triton interpreter cannot run a bfloat16 tl.dot (test_cuda_bf16_prefill covers it)")
    batch = make_batch(CASES["mixed"], block_size=4, dtype=dtype)
    assert_close(KERNELS[kernel](**batch), batch, dtype)


def test_cache_dtype_differs_from_q():
    """An fp16 cache read by fp32 queries: the keys are converted to q's dtype, as in the reference."""
    batch = make_batch(CASES["mixed"], block_size=4)
    batch["k_cache"], batch["v_cache"] = batch["k_cache"].half(), batch["v_cache"].half()
    for kernel in ("tiled", "rowwise"):
        assert_close(KERNELS[kernel](**batch), batch)


@pytest.mark.parametrize("splits", [1, 2, 4, 9])
def test_split_kv_decode(splits):
    """Flash-decoding gives the same answer for any number of splits, empty splits included (a
    short context in a batch with a long one leaves most of its splits empty)."""
    batch = make_batch([(1, 3), (1, 90), (1, 47), (1, 64)], block_size=8)
    assert_close(pa.paged_attention(**batch, num_kv_splits=splits), batch)


def test_split_kv_prefill_rows():
    """Splits also merge correctly for causal prefill rows, whose visible keys end mid-split."""
    batch = make_batch([(12, 40), (7, 7)], block_size=4)
    assert_close(pa.paged_attention_rowwise(**batch, num_kv_splits=4), batch)


def test_split_heuristic(monkeypatch):
    """Few long sequences get split so the GPU fills up; many or short ones do not."""
    monkeypatch.setattr(pa, "_num_sms", lambda device: 132)  # an H100
    choose = lambda b, ctx: pa.choose_num_kv_splits(b, 12, ctx, torch.device("cuda"))
    assert choose(1, 1024) == 1024 // pa.MIN_KEYS_PER_SPLIT  # limited by the split length
    assert choose(1, 32768) == 22  # limited by occupancy: 12 heads x 22 splits give 132 SMs two programs each
    assert choose(16, 1024) == 2  # 192 programs: twice that fills 132 SMs twice
    assert choose(64, 1024) == 1  # 768 programs already fill the GPU
    assert choose(1, 128) == 1  # too short to be worth splitting


def test_num_kv_splits_is_for_decode():
    batch = make_batch(CASES["prefill"], block_size=4)
    with pytest.raises(ValueError, match="max_q == 1"):
        pa.paged_attention(**batch, num_kv_splits=2)


@pytest.mark.parametrize("head_dim", [4, 12, 48, 512])
def test_unsupported_head_dim_is_refused(head_dim):
    batch = make_batch(CASES["decode"], block_size=4, head_dim=head_dim)
    with pytest.raises(ValueError, match=r"head_dim .* power of two .* kernels\.reference"):
        pa.paged_attention(**batch)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(st.integers(1, 40).flatmap(lambda ctx: st.tuples(st.integers(0, ctx), st.just(ctx))), max_size=4),
    block_size=st.sampled_from([1, 2, 4, 8, 16]),
    splits=st.integers(1, 5),
)
def test_random_batches(reqs, block_size, splits):
    """Any mix of chunk lengths and contexts: both kernels agree with the reference."""
    reqs = [(1, 1)] + reqs  # at least one query row
    batch = make_batch(reqs, block_size=block_size, seed=len(reqs) * 100 + block_size)
    assert_close(pa.paged_attention_tiled(**batch), batch)
    assert_close(pa.paged_attention_rowwise(**batch, num_kv_splits=splits), batch)


# --- KV write -----------------------------------------------------------------------------------


def write_kv_pages_reference(k_cache, v_cache, k, v, page_ids):
    """What write_kv_pages means, in terms of the reference scatter: token j -> page j // block_size."""
    block_size = k_cache.shape[1]
    j = torch.arange(k.shape[0], device=k.device)
    ref.write_kv(k_cache, v_cache, k, v, page_ids.long()[j // block_size] * block_size + j % block_size)


def make_cache(num_blocks=6, block_size=4, n_heads=3, head_dim=8, dtype=torch.float32):
    kc = torch.randn(num_blocks, block_size, n_heads, head_dim, device=DEVICE).to(dtype)
    return kc, torch.randn_like(kc)


def clone2(kv):
    return kv[0].clone(), kv[1].clone()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_matches_reference(cache_dtype):
    cache = make_cache(dtype=cache_dtype)
    slots = torch.randperm(cache[0].shape[0] * cache[0].shape[1], device=DEVICE)[:9]
    # k, v as the model makes them: views into one fused (N, 3*C) qkv projection, fp32
    qkv = torch.randn(9, 3 * 24, device=DEVICE)
    k, v = qkv[:, 24:48].view(9, 3, 8), qkv[:, 48:].view(9, 3, 8)
    want, got = clone2(cache), clone2(cache)
    ref.write_kv(*want, k, v, slots)
    pa.write_kv(*got, k, v, slots)
    # exact, except that the interpreter truncates fp32 -> bf16 where torch and the GPU round to
    # nearest even: one bf16 ulp (2**-7 relative) apart
    ulp = 2**-7 if cache_dtype == torch.bfloat16 and INTERPRETED else 0.0
    torch.testing.assert_close(got, want, atol=0.0, rtol=ulp)


def test_write_kv_skips_negative_slots():
    cache = make_cache()
    k, v = torch.randn(3, 3, 8, device=DEVICE), torch.randn(3, 3, 8, device=DEVICE)
    want, got = clone2(cache), clone2(cache)
    ref.write_kv(*want, k[[0, 2]], v[[0, 2]], torch.tensor([7, 2], device=DEVICE))
    pa.write_kv(*got, k, v, torch.tensor([7, -1, 2], device=DEVICE))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("n_tokens", [12, 10, 1])  # three whole pages; a partial last page; one token
def test_write_kv_pages_matches_reference(n_tokens):
    cache = make_cache(dtype=torch.float16)
    page_ids = torch.tensor([4, 1, 3], dtype=torch.int32, device=DEVICE)[: -(-n_tokens // 4)]
    k, v = torch.randn(n_tokens, 3, 8, device=DEVICE), torch.randn(n_tokens, 3, 8, device=DEVICE)
    want, got, torch_path = clone2(cache), clone2(cache), clone2(cache)
    write_kv_pages_reference(*want, k, v, page_ids)
    pa.write_kv_pages(*got, k, v, page_ids)
    ref.write_kv_pages(*torch_path, k, v, page_ids.long())  # the CPU path agrees too
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(torch_path[0], want[0]) and torch.equal(torch_path[1], want[1])


def test_write_kv_pages_refuses_a_mismatched_chunk():
    cache = make_cache()
    k = torch.randn(9, 3, 8, device=DEVICE)  # 9 tokens need 3 pages of 4, not 2
    with pytest.raises(ValueError, match="9 tokens for 2 pages"):
        pa.write_kv_pages(*cache, k, k, torch.tensor([0, 1], device=DEVICE))


@pytest.mark.parametrize("case", CASES)
def test_reference_is_dense_attention_over_each_requests_context(case):
    """The oracle checked by hand, request by request: whatever finite values lie past a context (the rest
    of a last page, padding pages) take no part."""
    batch = {k: v.cpu() if torch.is_tensor(v) else v for k, v in make_batch(CASES[case], block_size=4).items()}
    batch["k_cache"], batch["v_cache"] = batch["k_cache"] * 30, batch["v_cache"] * 30  # loud junk
    out, cu = ref.paged_attention(**batch), batch["cu_seqlens_q"].tolist()
    for b, ctx in enumerate(batch["context_lens"].tolist()):
        a, n = cu[b], cu[b + 1] - cu[b]
        keys, values = (batch[c][batch["block_tables"][b].long()].flatten(0, 1)[:ctx] for c in ("k_cache", "v_cache"))
        visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]  # (n, ctx) causal
        dense = torch.nn.functional.scaled_dot_product_attention(
            batch["q"][a : a + n].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=visible
        ).transpose(0, 1)
        torch.testing.assert_close(out[a : a + n], dense, atol=1e-4, rtol=1e-4)


def test_write_then_attend_equals_dense_causal_attention():
    """End to end: a prompt written page by page, then decoded, is plain causal attention."""
    H, D, bs, T = 2, 16, 4, 11
    kc, vc = (torch.zeros(6, bs, H, D, device=DEVICE) for _ in range(2))
    q, k, v = (torch.randn(T, H, D, device=DEVICE) for _ in range(3))
    table = torch.tensor([[5, 0, 2]], dtype=torch.int32, device=DEVICE)
    pa.write_kv_pages(kc, vc, k[:8], v[:8], table[0, :2])  # a page-aligned prefill chunk of 8
    pa.write_kv(kc, vc, k[8:], v[8:], torch.tensor([8, 9, 10], device=DEVICE))  # 3 tokens to page 2
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32, device=DEVICE)
    prefill = pa.paged_attention(q[:10], kc, vc, i32(0, 10), i32(10), table, D**-0.5, 10, 10)
    decode = pa.paged_attention(q[10:], kc, vc, i32(0, 1), i32(11), table, D**-0.5, 1, 11)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    torch.testing.assert_close(torch.cat([prefill, decode]), dense, atol=1e-5, rtol=1e-5)


# --- GPU only -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_kernels_compile_for_cuda():
    """Every kernel compiles to a CUDA binary (ahead of time, no GPU needed): the interpreter is
    laxer than the compiler (loop-carried types, tl.dot shapes), so this catches what it cannot."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--compile-only", "--arch", "80"]
    cmd += ["--dtype", "bfloat16", "float32"]  # the half-precision and the exact (ieee) tl.dot
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled" in done.stdout


@cuda_only
@pytest.mark.parametrize("kernel", ["tiled", "rowwise"])
def test_cuda_bf16_prefill(kernel):
    batch = make_batch(CASES["mixed"] + CASES["prefix_hit"], block_size=16, dtype=torch.bfloat16)
    assert_close(KERNELS[kernel](**batch), batch, torch.bfloat16)


GPT2_PREFILL = [(300, 300), (1, 1000), (200, 777), (1, 513), (64, 1024)]  # chunks, prefix hits, decodes
GPT2_DECODE = [(1, 1000), (1, 777), (1, 513), (1, 1024), (1, 5)]


@cuda_only
@pytest.mark.parametrize(
    "kernel, reqs",
    [(k, GPT2_DECODE) for k in KERNELS] + [("tiled", GPT2_PREFILL), ("dispatch", GPT2_PREFILL)],
)
def test_cuda_gpt2_shapes(kernel, reqs):
    """GPT-2 heads (12 x 64), block 16, fp16, long contexts, chunks of several hundred tokens."""
    batch = make_batch(reqs, block_size=16, n_heads=12, head_dim=64, dtype=torch.float16)
    assert_close(KERNELS[kernel](**batch), batch, torch.float16)


@cuda_only
def test_cuda_graph_decode():
    """The decode call captures into a CUDA graph and replays on new metadata written in place."""
    shapes = dict(block_size=16, n_heads=12, head_dim=64, dtype=torch.float16, num_blocks=200, max_blocks=64)
    batch = make_batch([(1, 300), (1, 40), (1, 900)], **shapes)
    batch["max_ctx"] = 1024  # a graph is captured once, for a bound on the context
    pa.paged_attention(**batch)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pa.paged_attention(**batch)
    other = make_batch([(1, 1000), (1, 17), (1, 512)], seed=1, **shapes)
    for name in ("q", "k_cache", "v_cache", "context_lens", "block_tables"):
        batch[name].copy_(other[name])
    graph.replay()
    assert_close(out, batch, torch.float16)
