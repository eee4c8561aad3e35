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
# # Lesson 4 — The sync scheduler, one step at a time
#
# Lessons 2 and 3 showed the pieces: pages, a token budget, batches re-formed every step. Here we
# drive them ourselves. Instead of calling `llm.generate`, we run the engine loop by hand, one step
# at a time, and print every batch: who runs, how many tokens, from which position, in which pages.
#
# You will:
#
# - write the engine loop of `nanoserve.py` with its four real calls: `schedule`, `submit`, `result`,
#   `update`;
# - watch chunked prefill, decodes and request completions step by step;
# - make the cache too small on purpose and watch **preemption**: a request loses its pages and is
#   recomputed later;
# - check that none of it changes the tokens.

# %%
import matplotlib.pyplot as plt
import torch
from helpers import plot_timeline, show

import nanoserve as ns
from nanoserve_sched import Request, SamplingParams
from nanoserve_viz.trace import Preempted, RequestArrived

torch.set_num_threads(1)

# %% [markdown]
# ## The loop
#
# Every scheduler shares one loop (docs/ARCHITECTURE.md). With the sync scheduler, one batch is in flight at a
# time, so it reduces to:
#
# ```python
# while scheduler.has_work():
#     batch = scheduler.schedule()          # which requests, how many tokens each, which pages
#     handle = runner.submit(batch)         # starts the forward pass and sampling; returns at once
#     sampled = handle.result()             # waits for the device: one token per sampled request
#     scheduler.update(batch, sampled)      # append tokens, stop finished requests, free their pages
# ```
#
# `schedule` and `update` are pure Python (`nanoserve_sched/base.py`); `submit` turns the batch into tensors
# and runs the model on a device thread (`ModelRunner` in `nanoserve.py`).
#
# We build an engine with a deliberately small KV cache — 14 pages of 4 tokens — and a budget of 16
# tokens per step, and give its scheduler four requests directly. Prefix caching (lesson 5) is off,
# to see each mechanism alone.

# %%
kw = dict(
    device="cpu", block_size=4, num_gpu_blocks_override=14, max_num_batched_tokens=16, enable_prefix_caching=False
)
llm = ns.LLM(sched="sync", **kw)
scheduler, runner, tok = llm.scheduler, llm.runner, llm.tokenizer

prompts = [
    "ROMEO:\n",
    "JULIET:\nO Romeo, Romeo!",
    "GLOUCESTER:\nNow is the winter of our discontent\n",
    "LADY ANNE:\nSet down, set down your honourable load,\n",
]
params = SamplingParams(temperature=0, max_tokens=12)
requests = [Request(tok.encode(p), params, request_id=str(i)) for i, p in enumerate(prompts)]
for r in requests:
    scheduler.add_request(r)
    llm.recorder.emit(RequestArrived(llm.recorder.now(), r.request_id, r.num_prompt_tokens))  # for the plots
    print(f"request {r.request_id}: {r.num_prompt_tokens:2d} prompt tokens  {prompts[int(r.request_id)]!r}")

# %% [markdown]
# ## Running it by hand
#
# Each line below is one step. For every request in the batch: `prefill` or `decode`, the positions
# computed, and `→` when the step samples its next token. Then the pages in use, and who waits.


# %%
def describe(batch):
    parts = []
    for r in batch.requests:
        kind = "prefill" if r.is_prefill else "decode "
        end = r.start + len(r.token_ids) - 1
        span = f"{r.start}" if end == r.start else f"{r.start}-{end}"
        parts.append(f"{r.request.request_id}:{kind} {span:>5}{' →' if r.sample else '  '}")
    return " | ".join(parts)


used_pages = []  # pages held during each step
while scheduler.has_work():
    seen = len(llm.recorder.events)
    batch = scheduler.schedule()
    used_pages.append(scheduler.config.num_blocks - scheduler.blocks.num_free_blocks)
    handle = runner.submit(batch)
    sampled = handle.result()
    scheduler.update(batch, sampled)

    preempted = [e.request_id for e in llm.recorder.events[seen:] if isinstance(e, Preempted)]
    done = [r.request.request_id for r in batch.sampled if r.request.finished]
    waiting = [r.request_id for r in scheduler.waiting]
    notes = (f"  PREEMPTED {preempted}" if preempted else "") + (f"  finished {done}" if done else "")
    print(f"step {batch.step:2d}  {describe(batch):<75} waiting {waiting}{notes}")
    scheduler.blocks.check()

# %% [markdown]
# What to notice:
#
# - **Step 0** admits requests while the budget lasts: 3 + 8 tokens fit in 16, but the next prompt
#   would need 13 and gets only the 5 left — a prefill chunk, without `→` (it samples nothing yet).
# - **Decodes come first.** From step 1 on, the running requests take their one token each before a
#   waiting request may have the rest of the budget.
# - **Preemption.** As requests grow, they need new pages. When none is free, the scheduler takes
#   all the pages of the newest running request and puts it back at the front of the queue. Later
#   it is prefilled again from scratch — prompt *and* the tokens it had generated — and continues.
#   Preemption trades compute for memory: nothing is lost but time. (With prefix caching on, the
#   default, the request's old pages are often still in the cache and come back as hits: lesson 5.)
# - **Finishing** frees pages at once, which lets the waiting request back in.

# %%
fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 4.5), sharex=True, height_ratios=[2, 1])
plot_timeline(ax1, llm.recorder.events, "the sync scheduler with 14 pages of 4 tokens")
ax1.set_xlabel("")
ax2.step(range(len(used_pages)), used_pages, where="mid", color="#3b82f6")
ax2.axhline(scheduler.config.num_blocks, color="black", ls="--", lw=1, label="pool size")
ax2.set_ylabel("pages in use")
ax2.set_ylim(0, 15)
ax2.set_xlabel("engine step")
ax2.legend(loc="lower left")
fig.tight_layout()
show(fig, "04_sync_steps")

# %% [markdown]
# ## Same tokens, whatever the memory
#
# A fresh engine with plenty of pages runs the same prompts through `llm.generate`, which drives the
# same loop for us. No preemption happens there, and the tokens must be identical: recomputing a
# preempted request gives back exactly the keys and values it had.

# %%
roomy = ns.LLM(sched="sync", num_gpu_blocks_override=64, device="cpu")
reference_outputs = roomy.generate(prompts, params, use_tqdm=False)
for r, ref in zip(requests, reference_outputs):
    same = r.output_token_ids == ref.outputs[0].token_ids
    print(f"request {r.request_id}: {'same' if same else 'DIFFERENT'}  {tok.decode(r.output_token_ids)!r}")

# %% [markdown]
# ## Checks

# %%
preemptions = [e for e in llm.recorder.events if isinstance(e, Preempted)]
assert preemptions, "the small cache must force at least one preemption"
assert roomy.metrics()["preemptions"] == 0
assert [r.output_token_ids for r in requests] == [o.outputs[0].token_ids for o in reference_outputs]
assert all(r.finished and r.num_output_tokens == 12 for r in requests)
assert max(used_pages) <= 14 and scheduler.blocks.num_free_blocks == 14, "pages leak or overflow"
print("all checks passed")

# %% [markdown]
# **Next**: lesson 5 keeps the pages of finished requests around, so that a new request with the
# same beginning can skip recomputing it — prefix caching.
