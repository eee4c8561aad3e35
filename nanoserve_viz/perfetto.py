"""Export a run's events as a Chrome / Perfetto trace (`traceEvents` JSON; open it at ui.perfetto.dev).

Tracks: one per lane (the CPU engine thread, the device or each of its pipeline stages, the viewer's
pauses), each a thread of the "nanoserve" process, with complete ("X") events that nest (the device's
forward and sample sit inside a "step N" span); every request is one async span from arrival to
finish; KV pages, queues and the tokens of each step are counters; preemptions are instant events.
Times are microseconds.

    >>> from nanoserve_viz.trace import RequestArrived, RequestFinished, Span
    >>> ev = [RequestArrived(0.0, "0", 4), Span(0.001, 0.002, "device", "forward", 0),
    ...       RequestFinished(0.003, "0", "length", 4, 2)]
    >>> [(e["ph"], e["name"], e["ts"]) for e in to_perfetto(ev)["traceEvents"] if e["ph"] in "Xbe"]
    [('b', 'request 0', 0.0), ('X', 'step 0', 1000.0), ('X', 'forward', 1000.0), ('e', 'request 0', 3000.0)]
"""

import json

from nanoserve_viz.state import VIEWER_LANE, RunState
from nanoserve_viz.trace import (
    Discarded,
    FirstToken,
    Pages,
    Preempted,
    RequestArrived,
    RequestFinished,
    RunInfo,
    Span,
    StepScheduled,
)

PID = 1
LANE_TIDS = {"cpu": 1, "device": 2, VIEWER_LANE: 3}
LANE_NAMES = {"cpu": "CPU (engine thread)", "device": "device", VIEWER_LANE: "viewer (engine held)"}


def _ns(t: float) -> int:
    return round(t * 1e9)


def _us(ns: int) -> float:
    return ns / 1000


def _place(spans: list[tuple[int, int, str, dict]]) -> list[list[tuple[int, int, str, dict]]]:
    """Split one lane's spans into tracks on which every two spans nest or are disjoint."""
    tracks, stacks = [], []
    for s in sorted(spans, key=lambda s: (s[0], -s[1])):
        for track, stack in zip(tracks, stacks):
            while stack and stack[-1] <= s[0]:
                stack.pop()
            if not stack or s[1] <= stack[-1]:
                track.append(s)
                stack.append(s[1])
                break
        else:
            tracks.append([s])
            stacks.append([s[1]])
    return tracks


def to_perfetto(events) -> dict:
    """The `traceEvents` JSON object of a run (see the module docstring for what goes where)."""
    out, lanes, device_steps = [], {}, {}
    state = RunState()  # the page and queue counters, computed as the viewer computes them
    open_requests: dict[str, int] = {}  # request id -> when it arrived (ns)
    for e in events:
        state.apply(e)
        if isinstance(e, Span):
            _add_span(e, lanes, device_steps)
        else:
            out += _request_events(e, open_requests) + _counter_events(e, state)
    t_last = max((_ns(getattr(e, "end", e.t)) for e in events), default=0)
    for rid in open_requests:  # the log ends before these finished (stopped early or truncated)
        out.append(dict(ph="e", cat="request", name=f"request {rid}", id=rid, ts=t_last, args={"unfinished": True}))
    for (lane, step), (lo, hi) in device_steps.items():  # a parent per step around its forward and sample
        lanes[lane].insert(0, (lo, hi, f"step {step}", {"step": step}))  # first: a parent wins ties with its child
    info = next((e for e in reversed(events) if isinstance(e, RunInfo)), None)
    sched = info.config.get("sched") if info else None
    meta, spans = _tracks(lanes, f"nanoserve ({sched} scheduler)" if sched else "nanoserve")
    out += spans
    for ev in out:
        ev.setdefault("pid", PID)
        ev.setdefault("tid", 0)
        ev["ts"] = _us(ev["ts"])
        if "dur" in ev:
            ev["dur"] = _us(ev["dur"])
    out.sort(key=lambda ev: (ev["ts"], -ev.get("dur", 0)))
    return {"traceEvents": meta + out, "displayTimeUnit": "ms"}


def _add_span(e: Span, lanes: dict, device_steps: dict):
    ts, end = _ns(e.t), _ns(e.end)
    lanes.setdefault(e.lane, []).append((ts, end, e.name, {"step": e.step}))
    if e.lane.startswith("device"):  # "device", or "device/k" for pipeline stage k
        lo, hi = device_steps.get((e.lane, e.step), (ts, ts))
        device_steps[e.lane, e.step] = (min(lo, ts), max(hi, end))


def _request_events(e, open_requests: dict[str, int]) -> list[dict]:
    """A request's async span: begun when it arrives, a mark at its first token, ended when it finishes."""
    ts, rid = _ns(e.t), getattr(e, "request_id", None)
    span = dict(cat="request", name=f"request {rid}", id=rid, ts=ts)
    if isinstance(e, RequestArrived):
        open_requests[rid] = ts
        return [dict(span, ph="b", args={"prompt_tokens": e.num_prompt_tokens})]
    if isinstance(e, FirstToken) and rid in open_requests:
        return [dict(span, ph="n", name="first token")]
    if isinstance(e, RequestFinished):
        begin = [] if rid in open_requests else [dict(span, ph="b")]  # failed before it arrived: zero length
        open_requests.pop(rid, None)
        args = {"reason": e.reason, "output_tokens": e.num_output_tokens} | ({"error": e.error} if e.error else {})
        return begin + [dict(span, ph="e", args=args)]
    return []


def _counter_events(e, state: RunState) -> list[dict]:
    """KV pages and queue lengths as counters; preemptions and discarded tokens as instant events."""
    ts = _ns(e.t)
    if isinstance(e, Pages):
        cached = state.num_cached_free_pages
        args = {"used": state.num_used_pages, "cached_free": cached, "free": state.num_free_pages - cached}
        return [dict(ph="C", cat="kv", name="KV pages", ts=ts, args=args)]
    if isinstance(e, StepScheduled):
        prefill = sum(n for n, p in zip(e.num_tokens, e.is_prefill) if p)
        queues = {"running": e.num_running, "waiting": e.num_waiting}
        tokens = {"prefill": prefill, "decode": sum(e.num_tokens) - prefill}
        return [
            dict(ph="C", cat="queue", name="requests", ts=ts, args=queues),
            dict(ph="C", cat="step", name="tokens per step", ts=ts, args=tokens),
        ]
    if isinstance(e, Preempted):
        return [dict(ph="i", s="t", cat="kv", name=f"preempt request {e.request_id}", ts=ts, tid=LANE_TIDS["cpu"])]
    if isinstance(e, Discarded):
        name = f"discard token of request {e.request_id}"
        return [dict(ph="i", s="t", cat="step", name=name, ts=ts, tid=LANE_TIDS["cpu"])]
    return []


def _tracks(lanes: dict, title: str) -> tuple[list[dict], list[dict]]:
    """(metadata naming the process and every track, the complete events): a lane's spans go on as many
    tracks as they need to nest."""
    meta = [dict(ph="M", name="process_name", pid=PID, tid=0, ts=0, args={"name": title})]
    out, next_tid = [], 20
    for lane in sorted(lanes, key=lambda n: (LANE_TIDS.get(n.split("/")[0], 99), n)):
        family, _, stage = lane.partition("/")  # "device/1": pipeline stage 1 of the device
        if lane in LANE_TIDS:
            base = LANE_TIDS[lane]
        elif family == "device" and stage.isdigit():
            base = 10 + int(stage)
        else:
            base, next_tid = next_tid, next_tid + 1
        lane_title = LANE_NAMES.get(lane) or (f"device stage {stage}" if family == "device" else lane)
        for k, track in enumerate(_place(lanes[lane])):
            tid = base if k == 0 else base + 100 * k
            name = lane_title + (f" ({k + 1})" if k else "")
            meta.append(dict(ph="M", name="thread_name", pid=PID, tid=tid, ts=0, args={"name": name}))
            meta.append(dict(ph="M", name="thread_sort_index", pid=PID, tid=tid, ts=0, args={"sort_index": tid}))
            for s, e, name, args in track:
                out.append(dict(ph="X", cat=family, name=name, ts=s, dur=e - s, tid=tid, args={**args, "lane": lane}))
    return meta, out


def write_perfetto(events, path):
    """Write `to_perfetto(events)` to `path` (`--trace run.json`)."""
    with open(path, "w") as f:
        json.dump(to_perfetto(events), f)
