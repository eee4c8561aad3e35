"""The Triton kernels (nanoserve_kernels/paged_attention.py) and the fast CPU path (nanoserve_kernels/cpu.py)
against the torch oracle (nanoserve_kernels/reference.py).

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
    # i.e. when nanoserve_kernels.paged_attention is imported: it must be set before that import.
    os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nanoserve_kernels import cpu  # noqa: E402
from nanoserve_kernels import paged_attention as pa  # noqa: E402
from nanoserve_kernels import reference as ref  # noqa: E402

if not HAS_CUDA and type(pa._write_kv_kernel).__name__ != "InterpretedFunction":
    pa = importlib.reload(pa)  # imported earlier without the flag (by another test module): redo it

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if HAS_CUDA else "cpu"
# compiled on a GPU, where `pytest -m cuda` selects them; interpreted on a CPU
pytestmark = pytest.mark.cuda if HAS_CUDA else pytest.mark.interpreted
INTERPRETED = not HAS_CUDA


def cuda_only(test):
    """GPU-only tests: marked `cuda` (`pytest -m cuda` selects them) and skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")(test))


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def make_batch(
    reqs, block_size, n_heads=2, head_dim=16, dtype=torch.float32, seed=0, num_blocks=None, max_blocks=None,
    n_kv_heads=None,
):  # fmt: skip
    """A random paged cache and one step's batch: reqs is a list of (q_len, context_len).

    Pages are handed out in a random order, padding entries of the block tables hold random valid
    page ids, and the pool has spare pages (3 unless num_blocks says otherwise) full of random
    values, so reading a wrong page or a padding entry shows up as a wrong result. n_kv_heads < n_heads
    makes it grouped-query attention: q has n_heads, the cache n_kv_heads.
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
    shape = (num_blocks, block_size, n_kv_heads or n_heads, head_dim)
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
    """Few long sequences get split so the GPU fills up, about 8 programs per SM, in splits of >= 64 keys;
    many or short ones do not."""
    monkeypatch.setattr(pa, "_num_sms", lambda device: 132)  # an H100
    choose = lambda b, ctx, heads=12: pa.choose_num_kv_splits(b, heads, ctx, torch.device("cuda"))
    assert choose(1, 1024) == 16  # limited by the split length: 16 splits of 64 keys
    assert choose(1, 32768) == pa.MAX_KV_SPLITS == 64  # limited by the number of splits
    assert choose(16, 1024) == 6  # 16 x 12 x 6 = 1152 programs: 8 for each of the 132 SMs
    assert choose(64, 1024) == 2  # 768 programs alone leave the SMs under 8 each
    assert choose(256, 1024) == 1  # 3072 programs already fill the GPU
    assert choose(1, 100) == 1  # too short to be worth splitting
    assert choose(4, 4096, heads=2) == 64  # the grouped kernel has a program per KV head: fewer to start with


SPLIT_LAYOUTS = [(1024, 16, (16, 64)), (1000, 16, (16, 64)), (1000, 9, (8, 128)), (30, 4, (1, 64))]


@pytest.mark.parametrize("max_ctx, splits, want", SPLIT_LAYOUTS)
def test_splits_are_whole_tiles(max_ctx, splits, want):
    """A split is a whole number of 64-key tiles (head_dim 64), at most the splits asked for, covering max_ctx."""
    assert pa.split_layout(max_ctx, splits, block_n=64) == want


def test_num_kv_splits_is_for_decode():
    batch = make_batch(CASES["prefill"], block_size=4)
    with pytest.raises(ValueError, match="max_q == 1"):
        pa.paged_attention(**batch, num_kv_splits=2)


@pytest.mark.parametrize("head_dim", [4, 12, 48, 512])
def test_unsupported_head_dim_is_refused(head_dim):
    batch = make_batch(CASES["decode"], block_size=4, head_dim=head_dim)
    with pytest.raises(ValueError, match=r"head_dim .* power of two .* nanoserve_kernels\.reference"):
        pa.paged_attention(**batch)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(st.integers(1, 40).flatmap(lambda ctx: st.tuples(st.integers(0, ctx), st.just(ctx))), max_size=4),
    block_size=st.sampled_from([1, 2, 4, 8, 16]),
    splits=st.integers(1, 5),
    group=st.sampled_from([1, 2, 4]),
)
def test_random_batches(reqs, block_size, splits, group):
    """Any mix of chunk lengths and contexts and any query group: both kernels agree with the reference."""
    reqs = [(1, 1)] + reqs  # at least one query row
    batch = make_batch(reqs, block_size, n_heads=2 * group, n_kv_heads=2, seed=len(reqs) * 100 + block_size)
    assert_close(pa.paged_attention_tiled(**batch), batch)
    assert_close(pa.paged_attention_rowwise(**batch, num_kv_splits=splits), batch)


# --- grouped-query attention --------------------------------------------------------------------

GQA_REQS = [(1, 9), (5, 21), (1, 33), (3, 3)]  # decodes, a chunk after a prefix, a fresh prompt


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("kernel", ["tiled", "rowwise", "rowwise_split3"])
def test_grouped_query_attention(kernel, group, head_dim):
    """Query head h reads KV head h // group; 2 KV heads, so 2 * group query heads."""
    batch = make_batch(GQA_REQS, block_size=4, n_heads=2 * group, n_kv_heads=2, head_dim=head_dim, seed=group)
    assert_close(KERNELS[kernel](**batch), batch)


@pytest.mark.parametrize("group", [2, 8])
def test_grouped_query_decode(group):
    """A decode step through the dispatcher: the row-wise kernel, each program serving a whole group."""
    batch = make_batch(CASES["decode"], block_size=4, n_heads=group, n_kv_heads=1, head_dim=64, seed=group)
    assert_close(pa.paged_attention(**batch), batch)
    assert_close(pa.paged_attention(**batch, num_kv_splits=2), batch)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("splits", [1, 3])
def test_grouped_kernel(splits, group, head_dim):
    """Kernel 5, fp16: one program per KV head, its query group as the rows of tensor-core tiles."""
    batch = make_batch(GQA_REQS, 4, n_heads=2 * group, n_kv_heads=2, head_dim=head_dim, dtype=torch.float16)
    assert_close(pa.paged_attention_grouped(**batch, num_kv_splits=splits), batch, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_query_decode_half_precision(dtype):
    """The dispatcher sends a grouped-query decode in fp16/bf16 to the grouped kernel."""
    if dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("the Triton interpreter cannot run a bfloat16 tl.dot (test_cuda_grouped_query_decode covers it)")
    batch = make_batch(CASES["decode"], block_size=4, n_heads=8, n_kv_heads=2, dtype=dtype)
    assert pa.decode_kernel(batch["q"], batch["k_cache"]) is pa.paged_attention_grouped
    assert_close(pa.paged_attention(**batch), batch, dtype)
    assert_close(pa.paged_attention(**batch, num_kv_splits=2), batch, dtype)


def test_decode_kernel_choice():
    """Multi-head attention, and any fp32 step, decode with the row-wise kernel (no tl.dot needed)."""
    mha = make_batch(CASES["decode"], block_size=4, n_heads=4, dtype=torch.float16)
    gqa32 = make_batch(CASES["decode"], block_size=4, n_heads=4, n_kv_heads=2)
    for batch in (mha, gqa32):
        assert pa.decode_kernel(batch["q"], batch["k_cache"]) is pa.paged_attention_rowwise
    with pytest.raises(ValueError, match="fp16/bf16 queries; use paged_attention_rowwise"):
        pa.paged_attention_grouped(**gqa32)


@pytest.mark.parametrize("group", [1, 3])
def test_reference_grouped_query_attention_is_per_head_dense_attention(group):
    """The oracle's GQA checked against SDPA's own grouped-query attention, request by request."""
    batch = make_batch(CASES["mixed"], block_size=4, n_heads=2 * group, n_kv_heads=2, head_dim=8)
    batch = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
    out, cu = ref.paged_attention(**batch), batch["cu_seqlens_q"].tolist()
    for b, ctx in enumerate(batch["context_lens"].tolist()):
        a, n = cu[b], cu[b + 1] - cu[b]
        keys, values = (batch[c][batch["block_tables"][b].long()].flatten(0, 1)[:ctx] for c in ("k_cache", "v_cache"))
        visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
        dense = torch.nn.functional.scaled_dot_product_attention(
            batch["q"][a : a + n].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=visible, enable_gqa=True,
        ).transpose(0, 1)  # fmt: skip
        torch.testing.assert_close(out[a : a + n], dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [ref, pa])
def test_query_heads_must_be_a_multiple_of_kv_heads(backend):
    batch = make_batch(CASES["decode"], block_size=4, n_heads=3, n_kv_heads=2)
    with pytest.raises(ValueError, match="n_heads a multiple of its n_kv_heads"):
        backend.paged_attention(**batch)


def test_write_kv_refuses_query_heads():
    """With GQA the new keys have the cache's KV heads; keys shaped like q would overrun their slots."""
    cache = make_cache(n_heads=2)
    k = torch.randn(3, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(N, n_kv_heads, head_dim\) of the cache"):
        pa.write_kv(*cache, k, k, torch.tensor([0, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match=r"\(N, n_kv_heads, head_dim\) of the cache"):
        pa.write_kv_pages(*cache, k, k, torch.tensor([0], device=DEVICE))


# --- the per-step plan ---------------------------------------------------------------------------

BACKENDS = {"reference": ref, "triton": pa, "cpu": cpu}


@pytest.mark.parametrize("case", ["mixed", "decode", "prefill"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_plan_serves_every_layer(backend, case):
    """A plan built once per step gives every layer (its own q and cache) what the plain call gives."""
    ops = BACKENDS[backend]
    layers = [make_batch(CASES[case], block_size=4, n_heads=4, n_kv_heads=2, seed=seed) for seed in range(3)]
    if backend == "cpu":
        layers = [cpu_batch(batch) for batch in layers]
    step = {k: layers[0][k] for k in ("cu_seqlens_q", "context_lens", "block_tables", "max_q", "max_ctx")}
    plan = ops.plan_attention(**step)
    for batch in layers:
        batch.update(step)  # the same step, each layer with its own queries and cache
        torch.testing.assert_close(ops.paged_attention(**batch, plan=plan), ops.paged_attention(**batch))
        assert_close(ops.paged_attention(**batch, plan=plan), batch)


@pytest.mark.parametrize("max_q", [1, 7])
def test_triton_plan_reads_no_tensor(max_q):
    """The Triton plan is built from shapes and host ints alone, so a CUDA graph can capture it: here
    from tensors on the meta device, which have no values to read."""
    meta = dict(device="meta", dtype=torch.int32)
    step = dict(
        cu_seqlens_q=torch.empty(9, **meta), context_lens=torch.empty(8, **meta),
        block_tables=torch.empty(8, 5, **meta), max_q=max_q, max_ctx=80,
    )  # fmt: skip
    plan = pa.plan_attention(**step, num_kv_splits=4 if max_q == 1 else None)
    assert plan.block_tables is step["block_tables"] and plan.max_ctx == 80
    assert plan.num_kv_splits == (4 if max_q == 1 else None)


def test_reference_decode_plan_reads_no_tensor():
    """The reference's decode plan too (a decode step on a GPU may run the reference in a CUDA graph)."""
    meta = dict(device="meta", dtype=torch.int32)
    plan = ref.plan_attention(torch.empty(9, **meta), torch.empty(8, **meta), torch.empty(8, 5, **meta), 1, 80)
    assert plan.mask.shape == (8, 1, 1, 80)


# --- the fast CPU path (nanoserve_kernels/cpu.py) -----------------------------------------------------------


def cpu_batch(batch):
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}


STEP = ("cu_seqlens_q", "context_lens", "block_tables", "max_q", "max_ctx")
# the CPU backend's paths: decodes and short chunks row by row in the numba kernel (cpu_numba.py), or only
# the decodes there (row_pairs=0: every chunk to SDPA); or decodes gathered for SDPA in groups of 1, 40 or
# 1024 keys (a group per decode, a few, one)
CPU_PATHS = {
    "in_place": dict(in_place=True),
    "in_place_decodes": dict(in_place=True, row_pairs=0),
    **{f"groups{n}": dict(in_place=False, decode_keys=n) for n in (1, 40, 1024)},
}


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("case", CASES)
def test_cpu_matches_reference(case, group, path):
    """Rows in place, decodes in groups of similar context, chunks alone, GQA without copies: the oracle's answer."""
    reqs = CASES[case] + [(1, 25), (1, 3), (9, 30)]
    batch = cpu_batch(make_batch(reqs, block_size=4, n_heads=2 * group, n_kv_heads=2))
    plan = cpu.plan_attention(**{k: batch[k] for k in STEP}, **CPU_PATHS[path])
    torch.testing.assert_close(cpu.paged_attention(**batch, plan=plan), expected(batch), atol=1e-5, rtol=1e-5)


def test_cpu_in_place_copies_no_page(monkeypatch):
    """In place, a step gathers no page but those of the chunks it leaves to SDPA; without numba the
    torch path runs, and says so in its plan."""
    batch = cpu_batch(make_batch(CASES["mixed"], block_size=4, n_heads=4, n_kv_heads=2))
    step = {k: batch[k] for k in STEP}
    gathered = []
    real = cpu.gather_pages
    monkeypatch.setattr(
        cpu, "gather_pages", lambda cache, pages, name: gathered.append(len(pages)) or real(cache, pages, name)
    )
    for row_pairs, pages in ((cpu.ROW_PAIRS, []), (0, [1, 1, 1, 1])):  # the two chunks' K and V, or nothing
        plan = cpu.plan_attention(**step, row_pairs=row_pairs)
        torch.testing.assert_close(cpu.paged_attention(**batch, plan=plan), expected(batch), atol=1e-5, rtol=1e-5)
        assert plan.rows is not None and gathered == pages
        gathered.clear()
    monkeypatch.setattr(cpu, "row_kernel", lambda: None)  # as if numba were not installed
    plan = cpu.plan_attention(**step)
    assert plan.rows is None and plan.groups
    torch.testing.assert_close(cpu.paged_attention(**batch, plan=plan), expected(batch), atol=1e-5, rtol=1e-5)
    assert gathered


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    ctx=st.lists(st.integers(1, 70), min_size=2, max_size=8),
    block_size=st.sampled_from([1, 4, 16]),
    group=st.sampled_from([1, 3]),
)
def test_cpu_decode_in_place_does_not_depend_on_the_batch(ctx, block_size, group):
    """A decode's answer from the in-place kernel is the same bits alone as among other requests: each
    query reads its own pages and nothing else, in the same order whatever shares the step."""
    batch = cpu_batch(make_batch([(1, c) for c in ctx], block_size, n_heads=2 * group, n_kv_heads=2, seed=len(ctx)))
    together = cpu.paged_attention(**batch, plan=cpu.plan_attention(**{k: batch[k] for k in STEP}, in_place=True))
    for i in (0, len(ctx) - 1):
        alone = dict(batch, q=batch["q"][i : i + 1], cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32),
                     context_lens=batch["context_lens"][i : i + 1], block_tables=batch["block_tables"][i : i + 1],
                     max_ctx=ctx[i])  # fmt: skip
        out = cpu.paged_attention(**alone, plan=cpu.plan_attention(**{k: alone[k] for k in STEP}, in_place=True))
        assert torch.equal(out[0], together[i])


def test_cpu_groups_decodes_by_context():
    """Sorted by context, each group padded only to its own longest context, at most decode_keys keys."""
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)
    step = (
        torch.arange(6, dtype=torch.int32),
        i32(50, 10, 300, 12, 290),
        torch.zeros(5, 19, dtype=torch.int32),
        1,
        300,
    )
    plan = cpu.plan_attention(*step, decode_keys=500, in_place=False)
    assert [g.rows.tolist() for g in plan.groups] == [[1, 3, 0], [4], [2]]  # 3 x 50 <= 500 < 2 x 290
    assert [g.ctx for g in plan.groups] == [50, 290, 300] and plan.groups[1].mask is None
    assert not plan.chunks


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    reqs=st.lists(st.integers(1, 40).flatmap(lambda ctx: st.tuples(st.integers(0, ctx), st.just(ctx))), max_size=6),
    block_size=st.sampled_from([1, 2, 4, 16]),
    decode_keys=st.integers(1, 100),
    group=st.sampled_from([1, 3]),
    in_place=st.booleans(),
    row_pairs=st.sampled_from([0, 50, cpu.ROW_PAIRS]),
)
def test_cpu_random_batches(reqs, block_size, decode_keys, group, in_place, row_pairs):
    reqs = [(1, 1)] + reqs
    batch = cpu_batch(make_batch(reqs, block_size, n_heads=2 * group, n_kv_heads=2, seed=len(reqs)))
    plan = cpu.plan_attention(**{k: batch[k] for k in STEP}, decode_keys=decode_keys, in_place=in_place,
                              row_pairs=row_pairs)  # fmt: skip
    torch.testing.assert_close(cpu.paged_attention(**batch, plan=plan), expected(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision(dtype):
    batch = cpu_batch(make_batch(CASES["mixed"], block_size=4, n_heads=4, n_kv_heads=2, dtype=dtype))
    out = cpu.paged_attention(**batch)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected(batch), atol=TOL[dtype], rtol=TOL[dtype])


def test_cpu_cache_dtype_differs_from_q():
    batch = cpu_batch(make_batch(CASES["mixed"], block_size=4))
    batch["k_cache"], batch["v_cache"] = batch["k_cache"].half(), batch["v_cache"].half()
    torch.testing.assert_close(cpu.paged_attention(**batch), expected(batch), atol=1e-5, rtol=1e-5)


# --- KV write -----------------------------------------------------------------------------------


def write_kv_pages_reference(k_cache, v_cache, k, v, page_ids):
    """What write_kv_pages means, in terms of the reference scatter: token j -> page j // block_size."""
    block_size = k_cache.shape[1]
    j = torch.arange(k.shape[0], device=k.device)
    ref.write_kv(k_cache, v_cache, k, v, page_ids.long()[j // block_size] * block_size + j % block_size)


def make_cache(num_blocks=6, block_size=4, n_heads=3, head_dim=8, dtype=torch.float32):  # n_heads: the KV heads
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


def compile_report(*args):
    """bench_kernels.py --compile-only's table: {(config, kernel): (regs, spilled bytes, widest load in bits)}."""
    import re

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--compile-only", *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    row = r"^(.+?)\s+(\w+_kernel)\s+\w+\s+(?:\S+=\S+ )*\S+=\S+\s+(\d+)\s+(\d+)\s+\d+\s+(\d+)x(\d+)b"
    rows = re.findall(row, done.stdout, re.M)
    return {(config, kernel): (int(regs), int(spill), int(bits)) for config, kernel, regs, spill, _, bits in rows}


@pytest.mark.slow
def test_compile_report_has_the_launch_time_specialisation():
    """The report compiles as the JIT does at launch (aligned pointers, strides divisible by 16), so it
    shows the code the GPU runs: 128-bit loads and a decode kernel at <= 64 registers (8 thread blocks
    of 128 threads fit an SM's 64K registers: the split heuristic's 8 programs per SM), nothing spilled."""
    pytest.importorskip("triton.backends.nvidia")
    report = compile_report("--arch", "90", "--dtype", "float16")
    regs, spilled, widest = report[("gpt2 decode", "attn_rowwise_kernel")]
    assert regs <= 64 and spilled == 0 and widest == 128
    regs, spilled, widest = report[("llama3-8b decode", "attn_grouped_kernel")]
    assert regs <= 96 and spilled == 0 and widest == 128
    assert all(spilled == 0 and widest == 128 for _, spilled, widest in report.values()), report


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


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_grouped_query_decode(dtype):
    """Llama-3-8B heads (32 query heads over 8 KV heads of 128), long contexts, split and not."""
    batch = make_batch(GPT2_DECODE, block_size=16, n_heads=32, n_kv_heads=8, head_dim=128, dtype=dtype)
    assert pa.decode_kernel(batch["q"], batch["k_cache"]) is pa.paged_attention_grouped
    for splits in (None, 1, 7):
        assert_close(pa.paged_attention(**batch, num_kv_splits=splits), batch, dtype)


@cuda_only
def test_cuda_graph_captures_the_plan():
    """plan_attention inside the capture, from the graph's static buffers: replays read the new metadata."""
    shapes = dict(block_size=16, n_heads=8, n_kv_heads=2, head_dim=64, dtype=torch.float16, num_blocks=200)
    batch = make_batch([(1, 300), (1, 40), (1, 900)], max_blocks=64, **shapes)
    batch["max_ctx"] = 1024
    step = {k: batch[k] for k in ("cu_seqlens_q", "context_lens", "block_tables", "max_q", "max_ctx")}
    pa.paged_attention(**batch)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan = pa.plan_attention(**step)
        out = pa.paged_attention(**batch, plan=plan)
    other = make_batch([(1, 1000), (1, 17), (1, 512)], seed=1, max_blocks=64, **shapes)
    for name in ("q", "k_cache", "v_cache", "context_lens", "block_tables"):
        batch[name].copy_(other[name])
    graph.replay()
    assert_close(out, batch, torch.float16)
