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
# # Lesson 5 — Prefix caching
#
# Requests often begin alike: the same system prompt, the same few-shot examples, the same chat
# history with one new question at the end. The keys and values of a shared beginning are the same
# for every request (a token's key depends only on the tokens up to it), so computing them once is
# enough — if the engine can recognise them.
#
# You will:
#
# - see how `BlockManager` names full pages with a chained hash, finds them again, shares them
#   between requests and keeps them after their owner has finished;
# - run requests with a common prefix through the engine and count the prompt tokens it skipped;
# - check that the outputs are exactly those of an engine without the cache.

# %%
import matplotlib.pyplot as plt
import torch
from helpers import plot_pages, show

import nanoserve as ns
from nanoserve_sched import SamplingParams
from nanoserve_sched.blocks import BlockManager
from nanoserve_viz.replay import Replay
from nanoserve_viz.trace import StepScheduled

torch.set_num_threads(1)

# %% [markdown]
# ## Naming pages
#
# Only **full** pages are cached. Page *i* of a request is named by a hash of its own tokens *and* of
# page *i − 1*'s name: a chain, so that a page's name stands for everything before it, not just its
# own 16 (here 4) tokens. The same tokens at the start of another prompt give the same chain of names.
#
# `lookup_prefix(tokens)` walks a new prompt page by page and returns the longest run of cached pages
# that starts it. A hit must match the stored tokens too, so a hash collision can never serve wrong
# keys. And it stops one token short: the prompt's last token is always computed, because its
# logits give the first output token.

# %%
bm = BlockManager(num_blocks=12, block_size=4)
a = [10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32]  # 11 tokens: 2 full pages, 3 tokens in a third
b = [10, 11, 12, 13, 20, 21, 22, 23, 40, 41]  # the same first 8 tokens, then different

bm.allocate("A", len(a))
bm.cache_pages("A", a, len(a))  # the scheduler does this as tokens are computed
print("A's pages:", bm.block_table("A"))
hits = bm.lookup_prefix(b)
print("B's prefix hits:", hits, f"-> {len(hits) * bm.block_size} of {len(b)} prompt tokens need no compute")
bm.allocate("B", len(b), prefix=hits)
print("B's pages:", bm.block_table("B"), "| reference counts:", [bm.pages[p].ref_cnt for p in bm.block_table("B")])
bm.check()

# %% [markdown]
# B's table starts with A's two pages; each now has two owners. When A finishes, its pages are
# released, but the shared ones stay with B. When B finishes too, its named pages are *cached-free*:
# free for anyone to take, yet still holding their keys and values, so a later hit can revive them.
# The free queue hands out unnamed pages first, then named ones, least recently used first; of one
# request's pages the last goes first, since a later page is useless without the pages before it.

# %%
bm.free("A")
bm.free("B")
print("free pages:", bm.num_free_blocks, "of which cached-free:", bm.num_cached_free_blocks)
print("a third request with B's prompt still hits:", bm.lookup_prefix(b))
bm.allocate("C", 44)  # 11 pages: the 10 unnamed ones first, then the least recently used named one
print("after a request took 11 of the 12 pages, hits:", bm.lookup_prefix(b))
bm.free("C")
bm.check()

# %% [markdown]
# ## In the engine
#
# A passage of 51 tokens is the common beginning of four prompts; each ends with a different speaker
# name, asking the model to continue as that character. Pages are 8 tokens here.

# %%
tok = ns.Tokenizer.from_folder(ns.DEFAULT_MODEL)
passage = (
    "GLOUCESTER:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n\n"
)
speakers = ["CLARENCE:\n", "LADY ANNE:\n", "BUCKINGHAM:\n", "KING EDWARD IV:\n"]
prompts = [passage + s for s in speakers]
print(len(tok.encode(passage)), "tokens in the passage;", [len(tok.encode(p)) for p in prompts], "per prompt")
params = SamplingParams(temperature=0, max_tokens=16)

# %% [markdown]
# First one request alone, then, once it has finished, the second. Each output says how many of its
# prompt tokens the prefix cache served (`num_cached_tokens`, as in vLLM); the step log says how many
# the engine computed:


# %%
def prefill_tokens(llm, request_id):
    """Prompt tokens the engine actually computed for a request (summed over its prefill chunks)."""
    return sum(
        n
        for e in llm.recorder.events
        if isinstance(e, StepScheduled)
        for rid, n, prefill in zip(e.request_ids, e.num_tokens, e.is_prefill)
        if rid == request_id and prefill
    )


llm = ns.LLM(block_size=8, num_gpu_blocks_override=64, device="cpu")
first = llm.generate([prompts[0]], params, use_tqdm=False)[0]
second = llm.generate([prompts[1]], params, use_tqdm=False)[0]
for out in (first, second):
    rid = out.request_id
    print(
        f"request {rid}: {len(out.prompt_token_ids)} prompt tokens, {out.num_cached_tokens} from the cache, "
        f"{prefill_tokens(llm, rid)} computed"
    )

# %% [markdown]
# The second request found the passage's 6 full pages (48 tokens) in the cache, cached-free since
# the first request finished, and computed only the rest of its prompt.
#
# ## Sharing while running
#
# Now all four prompts arrive together. Within the first step, the scheduler admits them one after
# the other: the first one's pages are named as soon as they are scheduled, and the next three find
# them. One forward pass computes the shared pages once; every layer writes them before any request
# attends to them.

# %%
together = ns.LLM(block_size=8, num_gpu_blocks_override=64, device="cpu")
outputs = together.generate(prompts, params, use_tqdm=False)
for out, speaker in zip(outputs, speakers):
    rid = out.request_id
    print(
        f"request {rid} ({speaker.strip()}): {out.num_cached_tokens} tokens from the cache, "
        f"{prefill_tokens(together, rid)} computed"
    )

# the visualizer's model of the run after its first step: which request holds which page
replay = Replay(together.recorder.events)
state = replay.seek(1)
fig, axes = plt.subplots(1, 2, figsize=(13, 2.8), width_ratios=[3, 2])
ids = [o.request_id for o in outputs]
plot_pages(axes[0], state.page_owners[:24], columns=12, title="KV pages after step 0", request_ids=ids)

no_cache = ns.LLM(block_size=8, num_gpu_blocks_override=64, enable_prefix_caching=False, device="cpu")
uncached_outputs = no_cache.generate(prompts, params, use_tqdm=False)
computed = [prefill_tokens(together, o.request_id) for o in outputs]
computed_without = [prefill_tokens(no_cache, o.request_id) for o in uncached_outputs]
x = range(len(prompts))
axes[1].bar([i - 0.2 for i in x], computed_without, width=0.4, color="#94a3b8", label="prefix caching off")
axes[1].bar([i + 0.2 for i in x], computed, width=0.4, color="#3b82f6", label="prefix caching on")
axes[1].set_xticks(list(x), [s.strip(":\n") for s in speakers], fontsize=8)
axes[1].set_ylabel("prompt tokens computed")
axes[1].set_ylim(0, 75)
axes[1].legend(fontsize="small")
fig.tight_layout()
show(fig, "05_prefix_pages")

# %% [markdown]
# The dark, hatched pages have four owners: the passage, stored once for four requests. Each request
# then has a page of its own for the rest of its prompt (its speaker's name), which its output grows into.

# %%
same = [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in uncached_outputs]
print("the same tokens with and without the prefix cache:", same)

# %% [markdown]
# ## n samples of one prompt: reference counts
#
# `SamplingParams(n=3)` asks for three samples of one prompt. The engine makes three requests of it
# (`0_<id>`, `1_<id>`, `2_<id>`, as vLLM names them), admitted one after the other in the same step: the
# first one's prompt pages are named, and the other two find them. Each page of the prompt then has three
# owners — its *reference count* is 3 — and it goes back to the free pool only when the last sample lets
# go of it. Each sample writes its own tokens into pages of its own. (Under `--sched balanced`, which deals
# one step's requests into several microbatches, the samples cannot share a page that is being written in
# that same step, so each computes the prompt once; they share from then on.)

# %%
three = ns.LLM(block_size=8, num_gpu_blocks_override=64, device="cpu")
group = three.add_request(prompts[0], SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=16))
steps = three.run()
next(steps)  # the first step: the prompt, computed once, and every sample's first token
blocks = three.scheduler.blocks
counts = {p: blocks.pages[p].ref_cnt for p in blocks.block_table(group[0].request_id)}
print("pages of sample 0 and their reference counts:", counts)
for _ in steps:
    pass
for c in three.output(group).outputs:
    print(f"sample {c.index}: {c.text!r}")

# %% [markdown]
# ## Checks

# %%
assert first.num_cached_tokens == 0
assert second.num_cached_tokens > 0, "the second request must hit the cached passage"
assert prefill_tokens(llm, second.request_id) == len(second.prompt_token_ids) - second.num_cached_tokens
assert second.outputs[0].token_ids == uncached_outputs[1].outputs[0].token_ids, "a cache hit must not change the output"
assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in uncached_outputs]
assert sum(computed) < sum(computed_without) / 2
assert max(len(owners) for owners in state.page_owners) == 4, "the passage's pages must be shared by all four"
prompt_pages = len(tok.encode(prompts[0])) // 8
assert list(counts.values())[:prompt_pages] == [3] * prompt_pages, "the prompt's pages have three owners"
assert len({tuple(c.token_ids) for c in three.output(group).outputs}) == 3, "three different samples"
for engine in (llm, together, no_cache, three):
    engine.scheduler.blocks.check()
    assert engine.scheduler.blocks.num_free_blocks == 64
print("all checks passed")

# %% [markdown]
# **Next**: lesson 6 looks at time rather than memory: what the device does while the CPU schedules.
