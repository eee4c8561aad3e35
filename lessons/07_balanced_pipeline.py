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
# # Lesson 7 — Pipeline bubbles and the balanced scheduler
#
# A model too big for one device is split by layers into **pipeline stages**, one device each. A
# batch goes through stage 0, then stage 1, and so on. While stage 1 works on it, stage 0 would sit
# idle, so the engine keeps several **microbatches** in flight, one per stage: with `pp` stages,
# `pp` batches are in the pipeline at once. Any time a stage waits for work is a **bubble**.
#
# A stage's time for a microbatch grows with the microbatch's tokens. If one microbatch is fat and
# the next ones are thin, the thin ones wait behind the fat one at every stage, and the stages that
# finish them early wait too. The balanced scheduler (`nanoserve_sched/balanced.py`, after vLLM #19873) cuts
# microbatches of equal size. You will:
#
# - drive the sync and balanced schedulers with `pp=4` and compare the microbatches they form;
# - put those microbatches through a simulated four-stage device and draw where the bubbles are;
# - run the real engine with four pipeline stages and check the tokens do not change.

# %%
import random
from collections import deque

import matplotlib.pyplot as plt
import torch
from helpers import plot_lanes, show

import nanoserve as ns
from nanoserve_sched import EngineConfig, Request, SamplingParams, make_scheduler

torch.set_num_threads(1)

# %% [markdown]
# ## The workload: a burst
#
# 24 prompts of 100 tokens arrive at once; each wants 8 output tokens. The token budget is vLLM's
# default of 2048 per batch, and 4 stages means 4 microbatches in flight.

# %%
PP, BUDGET = 4, 2048
rng = random.Random(0)
prompts = [[rng.randrange(3072) for _ in range(100)] for _ in range(24)]


def scheduler_with_burst(name):
    config = EngineConfig(sched=name, pp=PP, num_blocks=1024, max_model_len=1024, max_num_batched_tokens=BUDGET)
    sched = make_scheduler(config)
    for i, prompt in enumerate(prompts):
        sched.add_request(Request(prompt, SamplingParams(max_tokens=8, ignore_eos=True), request_id=str(i)))
    return sched


# %% [markdown]
# ## A simulated pipeline
#
# To see the schedulers' effect without noise, we run the engine loop (docs/ARCHITECTURE.md) with a pretend
# device: a microbatch of *n* tokens takes `1 + 0.02·n` ms on each stage (a fixed cost for reading
# the stage's weights, plus a cost per token), stages run microbatches in order, and a stage starts
# a microbatch when both the microbatch (from the stage before) and the stage are free. The
# scheduler is the real one; only the device is pretend.


# %%
def simulate(name, ms_fixed=1.0, ms_per_token=0.02):
    """The engine loop with a pretend pipelined device; returns the stage spans and the microbatch sizes."""
    sched = scheduler_with_burst(name)
    stage_free = [0.0] * PP  # when each stage finishes its current work
    inflight, now, spans, sizes = deque(), 0.0, [], []
    while sched.has_work() or inflight:
        if len(inflight) < sched.depth and (batch := sched.schedule()):
            t = now  # the batch is ready once scheduled; each stage takes it when it is free
            for stage in range(PP):
                start = max(t, stage_free[stage])
                t = stage_free[stage] = start + ms_fixed + ms_per_token * batch.num_tokens
                spans.append((stage, start, t, batch.step))
            inflight.append((batch, t))
            sizes.append(batch.num_tokens)
            continue
        batch, done = inflight.popleft()
        now = max(now, done)  # the engine waits for the oldest microbatch's tokens
        sched.update(batch, [0] * len(batch.sampled))  # the pretend device samples token 0
    return spans, sizes


sim = {name: simulate(name) for name in ("sync", "balanced")}
for name, (spans, sizes) in sim.items():
    makespan = max(end for _, _, end, _ in spans)
    busy = sum(end - start for _, start, end, _ in spans)
    print(f"{name:>8}: first microbatches {sizes[:8]} ...")
    print(f"{'':>8}  {len(sizes)} microbatches, {makespan:.0f} ms, bubbles {1 - busy / (PP * makespan):.0%}")

# %% [markdown]
# The base scheduler fills the first microbatch to the whole budget: 20 prompts and part of a 21st
# (2048 tokens). The next microbatch gets what is left of the prompts, the third and fourth almost
# nothing. Decodes stay lopsided afterwards: the requests of a microbatch move on together, and
# they cannot join another microbatch while theirs is in flight.
#
# The balanced scheduler first collects everything that could run, estimates one microbatch's
# share as the pending tokens divided by the free pipeline slots, then deals requests out largest
# first into the lightest microbatch: four microbatches of 600 tokens, then four of 6 decodes.

# %%
fig, axes = plt.subplots(2, 1, figsize=(11, 4), sharex=True)
colors = ["#3b82f6", "#f97316", "#16a34a", "#a855f7"]
for ax, (name, (spans, _)) in zip(axes, sim.items()):
    for stage, start, end, step in spans:
        ax.broken_barh([(start, end - start)], (stage - 0.4, 0.8), color=colors[step % 4], edgecolor="white", lw=0.5)
    ax.set_yticks(range(PP), [f"stage {s}" for s in range(PP)])
    ax.set_ylim(PP - 0.5, -0.5)
    ax.set_title(f"{name}: microbatches through 4 pipeline stages (white: bubbles)")
axes[1].set_xlabel("simulated time (ms)")
fig.tight_layout()
show(fig, "07_pipeline_simulated")

# %% [markdown]
# Each coloured block is a microbatch on a stage. Under sync, the 2048-token microbatch takes long
# on every stage, and the small ones behind it wait; later the stages alternate between a 21-request
# and a 3-request decode. Under balanced, the four prefill microbatches keep all stages busy. Then
# each group of six requests can decode only once its own microbatch has left the last stage, so
# the first decodes trickle in one prefill-time apart and the stages wait (the gap after 50 ms);
# once all four groups decode, the pipeline is full again.
#
# ## The real engine with four stages
#
# `ns.LLM(pp=4)` splits the model's 4 layers into 4 stages (`runner.bounds`), each run by its own
# thread on CPU; the scheduler's `depth` becomes 4. The same burst, on the embedded model:

# %%
params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
engines, tokens = {}, {}
for name in ("sync", "balanced"):
    llm = ns.LLM(sched=name, pp=PP, num_gpu_blocks_override=512, max_num_batched_tokens=BUDGET, device="cpu")
    tokens[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engines[name] = llm
    m = llm.metrics()
    stages = m["stage_busy_frac"]
    print(
        f"{name:>8}: stage layers {llm.runner.bounds}, {m['steps']} microbatches, {m['wall_s'] * 1e3:.0f} ms, "
        f"stage busy {' '.join(f'{v:.0%}' for v in stages.values())}"
    )

one_stage = ns.LLM(num_gpu_blocks_override=512, device="cpu")
tokens["pp=1"] = [o.outputs[0].token_ids for o in one_stage.generate(prompts, params, use_tqdm=False)]
print(
    "same tokens with 1 stage, 4 stages sync, 4 stages balanced:",
    tokens["sync"] == tokens["balanced"] == tokens["pp=1"],
)

# %% [markdown]
# On this 2-core CPU the four stage threads share two cores, so the measured busy fractions are only
# a rough picture of a real pipeline; the simulated one above is the clean version. The lanes of the
# real run show the same shapes, one device lane per stage:

# %%
fig, axes = plt.subplots(2, 1, figsize=(11, 4.4))
for ax, (name, llm) in zip(axes, engines.items()):
    plot_lanes(ax, llm.recorder.events, title=f"{name}, --pp 4: the real run")
fig.tight_layout()
show(fig, "07_pipeline_real")

# %% [markdown]
# ## Checks

# %%
sync_sizes, balanced_sizes = sim["sync"][1], sim["balanced"][1]
assert sync_sizes[:3] == [2048, 300, 72], "the base scheduler fills the first microbatch"
assert balanced_sizes[:4] == [600] * 4, "balanced cuts equal microbatches"
makespan = {name: max(end for _, _, end, _ in spans) for name, (spans, _) in sim.items()}
assert makespan["balanced"] < 0.8 * makespan["sync"], "even microbatches must shorten the pipelined run"
assert tokens["sync"] == tokens["balanced"] == tokens["pp=1"], "pipelining must not change any token"
for llm in engines.values():
    steps = [e for e in llm.recorder.events if type(e).__name__ == "StepScheduled"]
    assert len(llm.runner.bounds) == PP + 1 and all(sum(e.num_tokens) <= BUDGET for e in steps)
    assert llm.scheduler.blocks.num_free_blocks == 512
print("all checks passed")

# %% [markdown]
# **Next**: lesson 8 changes where prefill chunks end, so that keys and values are written a whole
# page at a time.
