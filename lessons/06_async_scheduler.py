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
# # Lesson 6 — The async scheduler and the device's idle gaps
#
# In the sync loop of lesson 4 the CPU and the device take turns: the CPU schedules a step, prepares
# its tensors, waits while the device runs it, then appends the tokens; meanwhile the device waits.
# On a GPU a decode step of a small model takes a few milliseconds, and the CPU's share of each step
# can leave the expensive device idle for a good part of the time.
#
# The async scheduler (`sched/nanoflow.py`, after NanoFlow and vLLM's async scheduling) plans step
# *i + 1* while the device runs step *i*. You will:
#
# - read the whole difference between the two schedulers — two lines;
# - see *placeholders*: inputs whose token is still being sampled on the device;
# - measure the device's idle time under both, and draw the CPU and device lanes;
# - see the price: a stop token is noticed one step late, and one token is computed for nothing.

# %%
import inspect
import time

import matplotlib.pyplot as plt
import torch
from helpers import plot_lanes, show

import nanoserve as ns
from sched import SamplingParams
from sched.nanoflow import AsyncScheduler
from sched.sync import SyncScheduler
from viz.trace import Discarded, Span, busy_time

torch.set_num_threads(1)

# %% [markdown]
# ## Two lines of difference

# %%
print(inspect.getsource(SyncScheduler))
print(inspect.getsource(AsyncScheduler))

# %% [markdown]
# `depth` is how many batches the engine loop keeps in flight. With 2, the loop schedules and
# submits a second batch before it waits for the first. `allow_placeholders` lets a request that is
# in the first batch also be in the second, although the token it needs as input is not known yet.
#
# ## Placeholders
#
# The scheduler puts `PLACEHOLDER` (−1) where that token goes. The runner fills it on the device
# from the previous step's sampled ids (`ModelRunner.run_stage`), so the token never makes the round
# trip to the CPU before the next step can start. We record each batch's input tokens as the
# runner receives them:

# %%
prompts = ["ROMEO:\n", "JULIET:\nO Romeo, Romeo!", "First Citizen:\n", "DUKE VINCENTIO:\n"] * 2

llm = ns.LLM(sched="async", num_gpu_blocks_override=128, device="cpu")
inputs = []  # per step: each request's input tokens
submit = llm.runner.submit


def recording_submit(batch):
    inputs.append([list(r.token_ids) for r in batch.requests])
    return submit(batch)


llm.runner.submit = recording_submit
llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
for step, tokens in enumerate(inputs):
    print(f"step {step}: inputs {tokens}")

# %% [markdown]
# Step 0 is the two prompts. Step 1 is scheduled before step 0's tokens exist: each request's input
# is a placeholder. So is every later decode input.
#
# ## Measuring the idle device
#
# Every step records spans: `schedule`, `prepare` and `update` on the CPU lane, `forward` and
# `sample` on the device lane. The device is idle wherever no device span covers the time. We run
# 8 requests of 48 tokens under each scheduler and add up the gaps.


# %%
def device_idle_ms(llm):
    """Time between the first and the last device span during which the device ran nothing."""
    spans = [(e.t, e.end) for e in llm.recorder.events if isinstance(e, Span) and e.lane == "device"]
    first, last = min(t for t, _ in spans), max(end for _, end in spans)
    return (last - first - busy_time(spans)) * 1e3


def run(sched, cpu_ms=0.0, stop=()):
    """Run the prompts; cpu_ms adds that much host time to every schedule() (see below)."""
    llm = ns.LLM(sched=sched, num_gpu_blocks_override=128, device="cpu")
    if cpu_ms:
        schedule = llm.scheduler.schedule

        def slow_schedule():
            time.sleep(cpu_ms / 1e3)
            return schedule()

        llm.scheduler.schedule = slow_schedule
    p = SamplingParams(temperature=0, max_tokens=48, stop_token_ids=stop)
    outputs = llm.generate(prompts, p, use_tqdm=False)
    return llm, [o.output_token_ids for o in outputs]


runs = {name: run(name) for name in ("sync", "async")}
for name, (llm, _) in runs.items():
    m = llm.metrics()
    print(
        f"{name:>5}: {m['steps']} steps, {m['wall_s'] * 1e3:6.1f} ms, device idle {device_idle_ms(llm):5.1f} ms "
        f"({1 - m['device_busy_frac']:.1%})"
    )

# %% [markdown]
# On this CPU there is little to win. The "device" is a thread on the same cores and a decode step
# of the model takes several milliseconds, of which the CPU's bookkeeping is a few percent. Async
# closes most of the gaps, but they were a small part of the run, and the wall time barely moves.
#
# A GPU changes the ratio: the forward shrinks to a millisecond or two while the Python bookkeeping
# stays. We can reproduce that ratio here by making the host slower instead: 2 ms more in every
# `schedule()` call (a `time.sleep`, which releases the CPU to the device thread, as a GPU would run
# on its own).

# %%
slow = {name: run(name, cpu_ms=2.0) for name in ("sync", "async")}
for name, (llm, _) in slow.items():
    m = llm.metrics()
    print(
        f"{name:>5}: {m['steps']} steps, {m['wall_s'] * 1e3:6.1f} ms, device idle {device_idle_ms(llm):5.1f} ms "
        f"({1 - m['device_busy_frac']:.1%})"
    )


# %%
def step_window(llm, first, last):
    """(t0, t1) from the start of step `first`'s schedule span to the end of step `last`'s update."""
    spans = [e for e in llm.recorder.events if isinstance(e, Span) and first <= e.step <= last]
    return min(s.t for s in spans if s.step == first), max(s.end for s in spans if s.step == last)


fig, axes = plt.subplots(2, 1, figsize=(11, 3.6))
longest = 0.0
for ax, (name, (llm, _)) in zip(axes, slow.items()):
    t0, t1 = step_window(llm, 10, 17)
    plot_lanes(ax, llm.recorder.events, t0, t1, title=f"{name}, steps 10-17, with 2 ms of host time per schedule")
    longest = max(longest, (t1 - t0) * 1e3)
for ax in axes:
    ax.set_xlim(0, longest)  # one time scale: the async window is shorter
fig.tight_layout()
show(fig, "06_lanes")

# %% [markdown]
# Under sync, every step's `schedule` and `prepare` sit between two forwards, and the device lane has
# a gap for each. Under async, the next step is already prepared when a forward ends: the device
# lane is one block, and the CPU's work hides behind the forward.
#
# ## The price: a stop seen one step late
#
# The async scheduler plans step *i + 1* before it knows step *i*'s tokens. If step *i* samples a
# request's stop token, step *i + 1* has already computed one more token for it. That token is
# discarded (a `Discarded` event), and the request's pages are freed one step later. The outputs
# stay exactly those of sync. Here the newline token is a stop token:

# %%
[newline] = ns.Tokenizer.from_folder(ns.DEFAULT_MODEL).encode("\n")
sync_llm, sync_tokens = run("sync", stop=(newline,))
async_llm, async_tokens = run("async", stop=(newline,))
stopped = sum(newline in t for t in sync_tokens)
discarded = sum(isinstance(e, Discarded) for e in async_llm.recorder.events)
wasted = {"sync": sync_llm.metrics()["discarded_tokens"], "async": discarded}
print(f"{stopped} requests stopped on a newline; tokens computed and discarded: {wasted}")
print("same outputs:", sync_tokens == async_tokens)

# %% [markdown]
# ## Checks

# %%
assert any(-1 in tokens for batch in inputs[1:] for tokens in batch), "async decodes must start from placeholders"
assert runs["sync"][1] == runs["async"][1] and slow["sync"][1] == slow["async"][1], "same tokens as sync"
assert runs["sync"][1] == slow["sync"][1]
idle_sync, idle_async = (device_idle_ms(slow[name][0]) for name in ("sync", "async"))
assert idle_async < 0.5 * idle_sync, f"async must hide the host's time: idle {idle_async:.1f} vs {idle_sync:.1f} ms"
assert sync_tokens == async_tokens and stopped >= 1
assert 1 <= discarded <= stopped, "at most one wasted token per request stopped"
for llm in (sync_llm, async_llm):
    assert llm.scheduler.blocks.num_free_blocks == 128, "a page leaked"
print("all checks passed")

# %% [markdown]
# **Next**: lesson 7 splits the model into pipeline stages, where the idle time has another name —
# bubbles.
