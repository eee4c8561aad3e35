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
# The async scheduler (`nanoserve_sched/nanoflow.py`, after NanoFlow and vLLM's async scheduling) plans step
# *i + 1* while the device runs step *i*. You will:
#
# - read the whole difference between the two schedulers — two lines;
# - see *placeholders*: inputs whose token is still being sampled on the device;
# - measure the device's idle time under both, and draw the CPU and device lanes;
# - see the price: a stop token is noticed one step late, and one token is computed for nothing.

# %%
import inspect

import matplotlib.pyplot as plt
import torch
from helpers import plot_lanes, show

import nanoserve as ns
from nanoserve_entrypoints.cli import random_workload
from nanoserve_sched import SamplingParams
from nanoserve_sched.nanoflow import AsyncScheduler
from nanoserve_sched.sync import SyncScheduler
from nanoserve_viz.trace import Discarded, Span, busy_time

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
# from the previous step's sampled ids (`ModelRunner.stage`), so the token never makes the round
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


def run(sched, stop=()):
    """Run the prompts on the CPU, with the embedded model."""
    llm = ns.LLM(sched=sched, num_gpu_blocks_override=128, device="cpu")
    p = SamplingParams(temperature=0, max_tokens=48, stop_token_ids=stop)
    outputs = llm.generate(prompts, p, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outputs]


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
# A GPU changes the ratio: the forward of a small model shrinks to well under a millisecond while the
# Python bookkeeping stays. The *simulated device* shows it on any laptop. `device="sim:h200"` keeps
# everything of the engine — scheduler, input preparation, the loop, the events — but replaces the
# forward and sampling by a wait: each step takes the roofline time of its real inputs on an H200 (its
# weights, the KV pages it reads and writes, its FLOPs at the datasheet's bandwidth and peak:
# `ns.step_cost`), then returns made-up tokens. No weights are built, so GPT-2 124M costs nothing here.
# The device's time is a model, not a measurement; the host's time is real, this machine's.


# %%
def run_simulated(sched):
    llm = ns.LLM("gpt2", load_format="dummy", device="sim:h200", sched=sched)
    work = random_workload(256, (100, 500), (100, 500), llm.model_config.vocab_size, seed=0)
    for d in work:
        llm.add_request(d["prompt_token_ids"], SamplingParams(max_tokens=d["max_tokens"], ignore_eos=True))
    reqs = list(llm.requests.values())
    for _ in llm.run():
        pass
    return llm, [r.output_token_ids for r in reqs]


slow = {name: run_simulated(name) for name in ("sync", "async")}
for name, (llm, _) in slow.items():
    m = llm.metrics()
    split = m["step_ms"]["all"]
    host = split["schedule"] + split["prepare"] + split["update"]
    print(
        f"{name:>5}: {m['steps']} steps, {m['wall_s'] * 1e3:6.1f} ms, host {host:.2f} ms per step, "
        f"simulated device busy {m['device_busy_frac']:.1%}, {m['output_throughput']:,.0f} tokens/s"
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
    plot_lanes(ax, llm.recorder.events, t0, t1, title=f"{name}, steps 10-17, GPT-2 124M on a simulated H200")
    longest = max(longest, (t1 - t0) * 1e3)
for ax in axes:
    ax.set_xlim(0, longest)  # one time scale: the async window is shorter
fig.tight_layout()
show(fig, "06_lanes")

# %% [markdown]
# Under sync, every step's `schedule`, `prepare` and `update` sit between two forwards, and the device
# lane has a gap for each: on this GPU the host's share of a step is larger than the device's. Under
# async, the next step is already prepared when a forward ends, so the CPU's work hides behind the
# forward — as far as it is shorter than the forward: what is left of the gaps is host time per step
# beyond the device's (`benchmarks/bench_host.py` measures it, batch by batch).
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
busy_sync, busy_async = (slow[name][0].metrics()["device_busy_frac"] for name in ("sync", "async"))
# the host's time is this machine's: 1.6-2.2x on a quiet 2-core VM, 1.2x seen on a busy one
assert busy_async > 1.1 * busy_sync, f"async must hide the host's time: busy {busy_async:.0%} vs {busy_sync:.0%}"
assert sync_tokens == async_tokens and stopped >= 1
assert 1 <= discarded <= stopped, "at most one wasted token per request stopped"
for llm in (sync_llm, async_llm):
    assert llm.scheduler.blocks.num_free_blocks == 128, "a page leaked"
print("all checks passed")

# %% [markdown]
# **Next**: lesson 7 splits the model into pipeline stages, where the idle time has another name —
# bubbles.
