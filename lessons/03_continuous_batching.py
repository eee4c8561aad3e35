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
# # Lesson 3 — Continuous batching and chunked prefill
#
# A forward pass over 8 requests costs little more than over one: the weights are read once for all
# of them. So a server batches. The question is *which* requests go into each step's batch.
#
# You will:
#
# - compare static batching (a batch runs until its longest request ends) with **continuous
#   batching**, where the batch is re-formed at every step;
# - see the token budget of `nanoserve_sched/base.py` cut a long prompt into **chunks** that share steps with
#   other requests' decodes;
# - check that neither changes a single generated token.

# %%
import random

import matplotlib.pyplot as plt
import torch
from helpers import plot_timeline, show
from matplotlib.ticker import MaxNLocator

import nanoserve as ns
from nanoserve_sched import SamplingParams
from nanoserve_viz.trace import StepScheduled

torch.set_num_threads(1)

# %% [markdown]
# ## Continuous batching
#
# Eight requests with short prompts want between 4 and 40 tokens each, and at most 4 may run at
# once (`max_num_seqs=4`). With *static* batching, requests 0–3 would run together until the
# longest of them finished, then requests 4–7. A request that finished early leaves an empty seat
# until then.
#
# nanoserve's scheduler decides the batch anew at every step (the idea comes from the Orca paper,
# 2022; vLLM calls it continuous batching): a finished request leaves at once and the next waiting
# one takes its seat in the very next step.

# %%
max_tokens = [40, 4, 12, 6, 30, 8, 24, 5]
rng = random.Random(0)
prompts = [[rng.randrange(3072) for _ in range(rng.randint(3, 8))] for _ in max_tokens]

llm = ns.LLM(max_num_seqs=4, num_gpu_blocks_override=64, device="cpu")
reqs = [
    llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True), request_id=str(i))
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens))
]
for _ in llm.run():
    pass
continuous_outputs = {r.request_id: r.output_token_ids for r in reqs}

steps = [e for e in llm.recorder.events if isinstance(e, StepScheduled)]
for e in steps[:6]:
    print(f"step {e.step}: requests {e.request_ids}, tokens {e.num_tokens}")
print("...")

# %% [markdown]
# Each request needs one step per output token: the step that computes its prompt samples the first
# token, and each later step computes the newest token and samples the next. Static batching in
# groups of four would take the longest request of each group's steps:

# %%
static_steps = max(max_tokens[:4]) + max(max_tokens[4:])
continuous_steps = len(steps)
useful = sum(len(e.request_ids) for e in steps)  # (request, step) pairs that did work
print(f"static batching:     {static_steps} steps, seats used {useful / (4 * static_steps):.0%}")
print(f"continuous batching: {continuous_steps} steps, seats used {useful / (4 * continuous_steps):.0%}")

fig, ax = plt.subplots(figsize=(10, 3))
plot_timeline(ax, llm.recorder.events, "continuous batching, max_num_seqs=4")
show(fig, "03_continuous")

# %% [markdown]
# Read the timeline row by row: request 1 wants 4 tokens and is gone after step 3; request 4, which
# was waiting (grey), starts in step 4. Each column holds at most four coloured cells.

# %% [markdown]
# ## Chunked prefill
#
# The first step of a request, its **prefill**, computes its whole prompt: hundreds of tokens at
# once, where a **decode** step computes one token per request. If a long prompt arrives while other
# requests are decoding, a step that prefills it all is long, and every decoding request waits for
# it before getting its next token.
#
# `nanoserve_sched/base.py` follows vLLM v1's rule: *schedule tokens, not phases*. Each request wants its
# `num_computed_tokens` to reach `num_tokens`; each step hands out one budget of
# `max_num_batched_tokens`, running requests first (a decode needs one token), then waiting ones.
# A prompt that does not fit in what is left is cut into **chunks**, one per step, and the decodes
# of the others go on alongside.
#
# Three requests are decoding when a 200-token prompt arrives. With a budget of 64 tokens per step:

# %%
long_prompt = [rng.randrange(3072) for _ in range(200)]
params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def run(budget):
    """Three short requests; after their third step a 200-token prompt arrives."""
    llm = ns.LLM(max_num_batched_tokens=budget, num_gpu_blocks_override=64, device="cpu")
    reqs = [llm.add_request(prompts[i], params, request_id=f"short{i}") for i in range(3)]
    for step, _ in enumerate(llm.run()):
        if step == 2:
            reqs.append(llm.add_request(long_prompt, SamplingParams(temperature=0, max_tokens=8), request_id="long"))
    outputs = {r.request_id: r.output_token_ids for r in reqs}
    return llm, outputs


chunked, chunked_outputs = run(budget=64)
whole, whole_outputs = run(budget=2048)

for e in [e for e in chunked.recorder.events if isinstance(e, StepScheduled)][2:8]:
    kinds = ["prefill" if p else "decode" for p in e.is_prefill]
    print(f"step {e.step}: " + ", ".join(f"{r} {n} {k}" for r, n, k in zip(e.request_ids, e.num_tokens, kinds)))

# %% [markdown]
# The long prompt is computed 61 tokens at a time (64 minus the three decodes), and the short
# requests get a token at every step meanwhile. Only the chunk that reaches the prompt's last token
# samples: earlier chunks fill the cache and produce no output.


# %%
def tokens_per_step(llm):
    steps = [e for e in llm.recorder.events if isinstance(e, StepScheduled)]
    prefill = [sum(n for n, p in zip(e.num_tokens, e.is_prefill) if p) for e in steps]
    decode = [sum(n for n, p in zip(e.num_tokens, e.is_prefill) if not p) for e in steps]
    return prefill, decode


fig, axes = plt.subplots(1, 2, figsize=(12, 3), sharey=True)
for ax, (llm_run, budget) in zip(axes, ((whole, 2048), (chunked, 64))):
    prefill, decode = tokens_per_step(llm_run)
    x = range(len(prefill))
    ax.bar(x, decode, color="#16a34a", label="decode tokens")
    ax.bar(x, prefill, bottom=decode, color="#f59e0b", label="prefill tokens")
    if budget < 1000:
        ax.axhline(budget, color="black", ls="--", lw=1, label=f"budget {budget}")
    ax.set_xlabel("engine step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"max_num_batched_tokens={budget}")
axes[0].set_ylabel("tokens in the step")
axes[1].legend()
show(fig, "03_chunked_prefill")

# %%
fig, ax = plt.subplots(figsize=(10, 2.4))
plot_timeline(ax, chunked.recorder.events, "chunked prefill: the long prompt shares steps with decodes")
show(fig, "03_chunked_timeline")

# %% [markdown]
# ## Checks
#
# Batching and chunking change *when* tokens are computed, never *which*: every request's tokens
# are the same in every run, and each run stays within its limits.

# %%
chunked_steps = [e for e in chunked.recorder.events if isinstance(e, StepScheduled)]
assert continuous_steps < static_steps, "continuous batching must take fewer steps than static batching"
assert all(len(e.request_ids) <= 4 for e in steps), "max_num_seqs is a hard limit"
assert [len(continuous_outputs[str(i)]) for i in range(8)] == max_tokens
assert all(sum(e.num_tokens) <= 64 for e in chunked_steps), "a step never exceeds the token budget"
mixed = [e for e in chunked_steps if any(e.is_prefill) and not all(e.is_prefill)]
assert mixed, "prefill chunks and decodes must share steps"
long_chunks = [n for e in chunked_steps for r, n, p in zip(e.request_ids, e.num_tokens, e.is_prefill) if r == "long"]
assert len(long_chunks) >= 4 and long_chunks[0] < 200, "the long prompt must be cut into chunks"
assert chunked_outputs == whole_outputs, "chunking must not change any token"
print("all checks passed")

# %% [markdown]
# **Next**: lesson 4 opens the engine loop and runs it one step at a time, printing every batch —
# and runs out of pages on purpose.
