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
# # Lesson 10 — Reading the visualizer and the Perfetto trace
#
# Every part of the engine reports what it does as small, typed **trace events** (`nanoserve_viz/trace.py`):
# a request arrived, a step was scheduled with these tokens, pages changed hands, a span of CPU or
# device work, a preemption, a finished request. A `Recorder` collects them. Everything you have
# seen measured — metrics, the summary the CLI prints, the terminal visualizer, the Perfetto trace —
# is computed from those events alone: one source of truth.
#
# You will:
#
# - record a run and look at its events;
# - save it as a JSONL step log and replay it step by step with `nanoserve_viz.replay`;
# - see why a viewer that pauses the engine does not change the numbers;
# - render the terminal visualizer's screen from the replay, and learn to read its panels;
# - export the run for Perfetto and check the structure of the trace.

# %%
import dataclasses
import html
import json
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from helpers import ROOT, plot_pages, plot_timeline, show, show_svg

import nanoserve as ns
from nanoserve_sched import SamplingParams
from nanoserve_viz.perfetto import to_perfetto, write_perfetto
from nanoserve_viz.replay import Replay
from nanoserve_viz.trace import VIEWER_LANE, RequestFinished, Span, compute_metrics, read_jsonl

torch.set_num_threads(1)

# %% [markdown]
# ## A run worth looking at
#
# 12 requests, half of them sharing a 24-token beginning (prefix hits), prompts long enough to be
# chunked under a 64-token budget, and a cache of 40 pages of 8 tokens — small enough to preempt.
# It is the run `docs/screenshot.py` records for the README's picture, a little smaller.

# %%
llm = ns.LLM(block_size=8, num_gpu_blocks_override=40, max_num_seqs=8, max_num_batched_tokens=64, device="cpu")
rng = random.Random(0)
vocab = llm.model_config.vocab_size
prefix = [rng.randrange(vocab) for _ in range(24)]
for i in range(12):
    prompt = (prefix if i % 2 else []) + [rng.randrange(vocab) for _ in range(rng.randint(8, 60))]
    params = SamplingParams(temperature=0, max_tokens=rng.randint(12, 40), ignore_eos=True)
    llm.add_request(prompt, params, request_id=str(i))
for _ in llm.run():
    pass

events = llm.recorder.events
print(f"{len(events)} events:", dict(Counter(type(e).__name__ for e in events)))
for e in events[:6]:
    print(" ", e)

# %% [markdown]
# ## The step log
#
# `--trace run.jsonl` writes the events one JSON object a line; `read_jsonl` reads them back into
# the same dataclasses, checking every field of every line (a bad line is refused with its number and
# what is wrong with it). The metrics computed from the file are the engine's own.

# %%
folder = Path(tempfile.mkdtemp(prefix="nanoserve-lesson10-"))
log = folder / "run.jsonl"
llm.recorder.write_jsonl(log)
replayed_events = read_jsonl(log)
print(f"wrote {log} ({log.stat().st_size // 1024} KiB)")
metrics = compute_metrics(replayed_events)
print({k: metrics[k] for k in ("num_requests", "steps", "preemptions", "num_output_tokens")})

# %% [markdown]
# ## Replay
#
# `Replay` cuts the log into one frame per engine step (frame *k*: the events up to the end of
# step *k*'s update) and rebuilds a `RunState` — the visualizer's model of the run — at any frame.
# Seeking backwards rebuilds from the start, so every frame is exactly what the live viewer showed.

# %%
replay = Replay(replayed_events)
print(f"{replay.num_steps} steps, {len(replay.frames)} frames")
history = []  # per frame: pages used, cached-free, free; requests running, waiting
for frame in range(replay.last + 1):
    st = replay.seek(frame)
    cached_free = st.num_cached_free_pages
    running, waiting = len(st.with_status("running")), len(st.with_status("waiting"))
    history.append((st.num_used_pages, cached_free, st.num_free_pages - cached_free, running, waiting))

AT = int(0.5 * replay.last)  # a frame in the middle of the run
state = replay.seek(AT)
print(
    f"frame {AT}: running {[r.id for r in state.with_status('running')]}, "
    f"waiting {[r.id for r in state.with_status('waiting')]}, preemptions so far {state.preemptions}"
)

# %%
fig = plt.figure(figsize=(12, 6.5))
grid = fig.add_gridspec(2, 2, height_ratios=[1.2, 1])
ax = fig.add_subplot(grid[0, :])
plot_timeline(ax, replayed_events, "the whole run's timeline")
ax.axvline(AT - 0.5, color="black", lw=1, ls="--")
ax = fig.add_subplot(grid[1, 0])
used, cached, free, running, waiting = zip(*history)
ax.stackplot(
    range(len(history)),
    used,
    cached,
    free,
    labels=["used", "cached-free", "free"],
    colors=["#3b82f6", "#93c5fd", "#e5e7eb"],
)
ax.plot(range(len(history)), running, color="#16a34a", label="running requests")
ax.plot(range(len(history)), waiting, color="#dc2626", label="waiting requests")
ax.set_xlabel("frame (engine step)")
ax.set_ylabel("KV pages / requests")
ax.legend(fontsize="small", loc="upper right")
ax = fig.add_subplot(grid[1, 1])
plot_pages(
    ax,
    state.page_owners,
    cached=state.cached_free_pages(),
    columns=10,
    title=f"KV pages at frame {AT}",
    request_ids=list(state.requests),
)
fig.tight_layout()
show(fig, "10_replay")

# %% [markdown]
# ## The viewer's pauses are not the engine's time
#
# The live viewer drives the engine one step per `next()` and may hold it between two steps: paused,
# stepping with `n`, or paced at 10 steps/s so a person can follow. It records each hold as a
# `Span(lane="viewer")`. `compute_metrics` runs on the *engine's clock*, which cuts those holds out
# (less any time the device was still busy with the step in flight), so the summary, `--output-json`
# and the viewer's panel give one set of numbers whatever the pace. Here we pretend a viewer held our
# run for 2 s after step 10's update, shifting every later event:


# %%
def held_after_update(events, step: int, seconds: float) -> list:
    """`events` as if a viewer had held the engine `seconds` after `step`'s update (a sync run)."""
    out, shift = [], 0.0
    for e in events:
        moved = {"t": e.t + shift} | ({"end": e.end + shift} if isinstance(e, Span) else {})
        out.append(dataclasses.replace(e, **moved))
        if isinstance(e, Span) and (e.lane, e.name, e.step) == ("cpu", "update", step):
            out.append(Span(e.end, e.end + seconds, VIEWER_LANE, "paused", step + 1))
            shift = seconds
    return out


held = held_after_update(replayed_events, 10, 2.0)
held_metrics = compute_metrics(held)
last_finish = max(e.t for e in held if isinstance(e, RequestFinished))
print(f"the held run's clock: {last_finish:.2f} s from start to the last finish")
for key in ("wall_s", "viewer_held_s"):
    print(f"{key:>14}: {metrics[key]:.4f} unheld, {held_metrics[key]:.4f} held")
print(f"{'TPOT ms':>14}: {metrics['tpot_ms']['mean']:.3f} unheld, {held_metrics['tpot_ms']['mean']:.3f} held")

# %% [markdown]
# ## The terminal visualizer
#
# `python nanoserve.py --viz` shows a run live; `python -m nanoserve_viz run.jsonl` replays a log with seeking.
# Both draw a `RunState`. The replay command can also render one frame to an SVG image without a
# terminal: the app runs headless and Textual exports its screen. We render frame `AT` of our log:

# %%
shot = folder / "screen.svg"
command = [sys.executable, "-m", "nanoserve_viz", str(log), "--screenshot", str(shot)]
command += ["--size", "120x36", "--at", str(AT)]
subprocess.run(command, cwd=ROOT, check=True)  # from the checkout, where `nanoserve_viz` is a package
svg = shot.read_text()
show_svg(svg, "10_visualizer")

# %% [markdown]
# How to read it:
#
# - **Timeline** (top left): one row per request, one column per step. `▒` a prefill chunk,
#   `█` a decode, `·` waiting, `-` running but given nothing, `✖` preempted, `✓` finished.
# - **CPU vs device** (bottom left): the latest steps' spans on a time axis — schedule, prepare and
#   update on the CPU lane, forward and sample on the device lane; `░` marks the device idle.
# - **Queues & metrics** (top right): running, waiting and finished requests; tokens/s, TTFT, TPOT,
#   device busy.
# - **KV pages** (bottom right): the pool, each page in its owner's colour; `◆` shared by several
#   requests (a prefix hit), `○` cached-free, `·` free. A pool too large for the panel (the default
#   4096 pages) shows only the range of pages the run has used so far, and says so.
#
# Keys: `space` pause, `n` one step, `←`/`→` back and forth in a replay, `+`/`-` speed, `s` save a
# screenshot, `?` help, `q` or `ctrl+c` quit. Live, the run opens at 10 steps/s (`--viz-speed N` to
# choose, `--viz-speed inf` for full speed); the numbers are the same at any pace.
#
# ## Perfetto
#
# For a zoomable timeline of every span, `to_perfetto` converts the events to the Chrome/Perfetto
# `traceEvents` format (the CLI: `--trace run.json`, or `python -m nanoserve_viz run.jsonl --perfetto run.json`).
# Open the file at https://ui.perfetto.dev. Inside:
#
# - `M` metadata names the tracks: the CPU engine thread, the device (one per pipeline stage);
# - `X` complete events: the spans, with a `step N` parent around each step's device work;
# - `b`/`e` async events: one span per request, from arrival to finish, `n` marking its first token;
# - `C` counters: KV pages used / cached-free / free, running and waiting requests, tokens per step;
# - `i` instant events: preemptions.

# %%
trace = to_perfetto(replayed_events)
write_perfetto(replayed_events, folder / "run.json")
phases = Counter(e["ph"] for e in trace["traceEvents"])
tracks = [e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
print(f"wrote {folder / 'run.json'}: open it at https://ui.perfetto.dev")
print("events by phase:", dict(phases))
print("tracks:", tracks)
print("counters:", sorted({e["name"] for e in trace["traceEvents"] if e["ph"] == "C"}))

# %% [markdown]
# ## Checks

# %%
close = lambda a, b: abs(a - b) <= 1e-6 * max(1e-3, abs(b))
assert [type(e) for e in replayed_events] == [type(e) for e in events], "the JSONL log must round-trip"
assert metrics["steps"] == llm.metrics()["steps"] and metrics["preemptions"] == llm.metrics()["preemptions"] > 0
assert close(held_metrics["viewer_held_s"], 2.0) and close(held_metrics["wall_s"], metrics["wall_s"])
assert close(held_metrics["tpot_ms"]["mean"], metrics["tpot_ms"]["mean"]), "the viewer's hold is not counted"
assert replay.last == metrics["steps"], "one frame per step, after the frame before the first"
end = replay.seek(replay.last)
assert end.page_map() == {} and len(end.with_status("finished")) == 12, "the run ends with every page free"
assert max(len(o) for o in replay.seek(AT).page_owners) >= 1
assert any(len(o) > 1 for f in range(replay.last + 1) for o in replay.seek(f).page_owners), "prefix pages shared"
screen_text = html.unescape(svg).replace("\xa0", " ")  # the SVG writes spaces as &#160;
assert svg.lstrip().startswith("<svg") and "KV pages" in screen_text and "Timeline" in screen_text
requests = Counter((e["ph"], e["id"]) for e in trace["traceEvents"] if e["ph"] in "be")
assert all(requests[("b", str(i))] == requests[("e", str(i))] == 1 for i in range(12)), "one async span per request"
assert all(e["dur"] >= 0 for e in trace["traceEvents"] if e["ph"] == "X")
assert {"CPU (engine thread)", "device"} <= set(tracks) and phases["C"] > 0 and phases["i"] > 0
assert json.loads((folder / "run.json").read_text()) == json.loads(json.dumps(trace))
print("all checks passed")

# %% [markdown]
# **Next**: lesson 11 trains a model small enough to make in a minute, and serves it.
