# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 8 — Page-aligned prefill
#
# Chunked prefill (lesson 3) cuts a long prompt wherever the step's token budget runs out. The next
# chunk then starts in the middle of a page, and writing its keys and values into the cache is a
# scatter: every token to its own slot, looked up one by one in the slot mapping.
#
# If every chunk but the last is a whole number of pages, every chunk starts on a page boundary,
# and its keys and values are whole pages: long contiguous copies, with no per-token lookup. That is
# the page-aligned scheduler (`nanoserve_sched/page_aligned.py`, after vLLM #19878). You will:
#
# - read its two hooks;
# - run the same workload under sync and page-aligned, and see where the chunks end;
# - count the tokens the runner writes page by page against those it scatters;
# - check that the page write and the scatter store the same thing, and the tokens do not change.

# %%
import inspect
import random

import matplotlib.pyplot as plt
import torch
from helpers import show

import nanoserve as ns
from nanoserve_kernels import reference
from nanoserve_sched import SamplingParams
from nanoserve_sched.page_aligned import PageAlignedScheduler
from nanoserve_viz.trace import StepScheduled

torch.set_num_threads(1)

# %% [markdown]
# ## Two hooks

# %%
source = inspect.getsource(PageAlignedScheduler)
print(source[source.index("    def chunk_size") :])

# %% [markdown]
# `chunk_size` takes the base scheduler's chunk and, unless it reaches the end of the prompt, cuts it
# back to the last page boundary. `charge` makes a prefill chunk cost whole pages of the budget, so
# that the budget matches what is written.
#
# ## The same workload under both
#
# Three short requests are decoding when a 150-token prompt arrives. Pages hold 16 tokens; the
# budget is 40 tokens a step, so the three decodes leave 37 for the prompt.

# %%
rng = random.Random(0)
shorts = [[rng.randrange(3072) for _ in range(5)] for _ in range(3)]
long_prompt = [rng.randrange(3072) for _ in range(150)]
BLOCK, BUDGET = 16, 40


def run(sched):
    """Run the workload; record, for every step, the rows the runner writes by page and by slot."""
    llm = ns.LLM(
        sched=sched, block_size=BLOCK, max_num_batched_tokens=BUDGET, num_gpu_blocks_override=64, device="cpu",
        attention="reference",  # the backend with both KV writes (the fast CPU one always scatters by slot)
    )  # fmt: skip
    writes = []  # per step: (rows written page by page, rows scattered slot by slot)
    prepare = llm.runner.prepare

    def recording_prepare(batch):
        x = prepare(batch)
        meta = x.meta
        by_page = sum(end - start for start, end, _ in meta.page_writes)
        writes.append((by_page, x.num_rows - by_page))
        return x

    llm.runner.prepare = recording_prepare
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reqs = [llm.add_request(prompt, params, request_id=f"s{i}") for i, prompt in enumerate(shorts)]
    for step, _ in enumerate(llm.run()):
        if step == 1:
            reqs.append(llm.add_request(long_prompt, SamplingParams(temperature=0, max_tokens=4), request_id="long"))
    chunks = [  # (start, length) of the long prompt's prefill chunks
        (e.step, n)
        for e in llm.recorder.events
        if isinstance(e, StepScheduled)
        for rid, n, prefill in zip(e.request_ids, e.num_tokens, e.is_prefill)
        if rid == "long" and prefill
    ]
    starts = [sum(n for _, n in chunks[:i]) for i in range(len(chunks))]
    outputs = {r.request_id: r.output_token_ids for r in reqs}
    return dict(chunks=[(s, n) for s, (_, n) in zip(starts, chunks)], writes=writes, outputs=outputs)


results = {name: run(name) for name in ("sync", "page-aligned")}
for name, r in results.items():
    print(f"{name:>12}: the long prompt's chunks (start, tokens): {r['chunks']}")

# %% [markdown]
# Under sync the chunks are 37 tokens: the second starts at position 37, in the middle of page 2,
# and so does every later one. Under page-aligned they are 32 tokens, two pages, and each starts on
# a page boundary; only the last chunk, which ends the prompt, may stop anywhere. The price is the
# budget's leftover: 5 tokens a step go unused while the prompt is being prefilled.

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 2.8), width_ratios=[3, 1])
ax = axes[0]
colors = ["#3b82f6", "#f97316", "#16a34a", "#a855f7", "#0891b2", "#db2777"]
for y, r in enumerate(results.values()):
    for i, (start, n) in enumerate(r["chunks"]):
        ax.broken_barh([(start, n)], (y - 0.35, 0.7), color=colors[i % len(colors)], edgecolor="white")
        ax.text(start + n / 2, y, str(n), ha="center", va="center", color="white", fontsize=8)
for boundary in range(0, 151, BLOCK):
    ax.axvline(boundary, color="black", lw=0.6, ls=":")
ax.set_yticks([0, 1], list(results))
ax.set_ylim(1.6, -0.6)
ax.set_xlabel(f"position in the 150-token prompt (dotted: page boundaries every {BLOCK} tokens)")
ax.set_title("where the prefill chunks start and end")

ax = axes[1]
for x, r in enumerate(results.values()):
    prefill_steps = [w for w in r["writes"] if w[0] or w[1] > 3]  # steps that write more than the decodes
    by_page = sum(w[0] for w in prefill_steps)
    scattered = sum(w[1] for w in prefill_steps)
    ax.bar(x, by_page, color="#16a34a", label="written by page" if x == 0 else None)
    ax.bar(x, scattered, bottom=by_page, color="#f59e0b", label="scattered by slot" if x == 0 else None)
ax.set_xticks([0, 1], list(results))
ax.set_ylabel("rows in prefill steps")
ax.set_ylim(0, 1.4 * ax.get_ylim()[1])
ax.legend(fontsize="small", loc="upper center", ncols=2)
fig.tight_layout()
show(fig, "08_chunks")

# %% [markdown]
# ## The two writes store the same thing
#
# `reference.write_kv` scatters rows to slots; `reference.write_kv_pages` copies a chunk that starts
# on a page boundary page by page (the Triton kernels of lesson 9 have the same pair). For a chunk
# of 40 tokens over three pages, both must leave the cache identical:

# %%
pages = [5, 2, 7]  # a request's pages for positions 32..79 (its table's entries 2, 3 and 4)
k, v = torch.randn(40, 2, 8), torch.randn(40, 2, 8)
by_slot = [torch.zeros(8, BLOCK, 2, 8) for _ in range(2)]
by_page = [torch.zeros(8, BLOCK, 2, 8) for _ in range(2)]
slots = torch.tensor([pages[j // BLOCK] * BLOCK + j % BLOCK for j in range(40)])
reference.write_kv(*by_slot, k, v, slots)
reference.write_kv_pages(*by_page, k, v, torch.tensor(pages))
print("identical caches:", all(torch.equal(a, b) for a, b in zip(by_slot, by_page)))

# %% [markdown]
# On a CPU the page write is no faster than the scatter (benchmarks/RESULTS.md): both are memory
# copies of the same bytes. The gain was designed for accelerators, where a kernel that copies whole
# pages makes long, coalesced memory transactions.
#
# ## Checks

# %%
aligned = results["page-aligned"]["chunks"]
assert all(start % BLOCK == 0 for start, _ in aligned), "every chunk must start on a page boundary"
assert all(n % BLOCK == 0 for _, n in aligned[:-1]), "every chunk but the last must be whole pages"
assert sum(n for _, n in aligned) == 150 and sum(n for _, n in results["sync"]["chunks"]) == 150
assert any(start % BLOCK for start, _ in results["sync"]["chunks"]), "sync's chunks start mid-page"
page_rows = {name: sum(w[0] for w in r["writes"]) for name, r in results.items()}
assert page_rows["page-aligned"] >= 144 > page_rows["sync"], "page-aligned must write its chunks by page"
assert results["sync"]["outputs"] == results["page-aligned"]["outputs"], "the tokens must not change"
assert all(torch.equal(a, b) for a, b in zip(by_slot, by_page))
print("all checks passed")

# %% [markdown]
# **Next**: lesson 9 opens `nanoserve_kernels/` — the Triton kernels that run this attention on a GPU.
