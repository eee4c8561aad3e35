"""The events an engine run emits, the Recorder that collects them, and the metrics computed from them.

One source of truth: the printed summary, `--output-json`, the JSONL step log (`--trace FILE.jsonl`)
and the visualizer all read the same recorded events. Times are seconds since the recorder started.

    >>> rec = Recorder()
    >>> rec.emit(RequestArrived(t=0.0, request_id="0", num_prompt_tokens=5))
    >>> rec.emit(FirstToken(t=0.5, request_id="0"))
    >>> rec.emit(RequestFinished(t=1.5, request_id="0", reason="length", num_prompt_tokens=5, num_output_tokens=3))
    >>> m = compute_metrics(rec.events); m["ttft_ms"]["mean"], m["tpot_ms"]["mean"]
    (500.0, 500.0)
"""

import json
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


@dataclass
class RequestArrived:
    t: float
    request_id: str
    num_prompt_tokens: int


@dataclass
class StepScheduled:
    """One step's batch: per request the number of tokens and whether it is a prefill chunk."""

    t: float
    step: int
    request_ids: list[str]
    num_tokens: list[int]
    is_prefill: list[bool]
    num_running: int = 0
    num_waiting: int = 0


@dataclass
class Preempted:
    t: float
    step: int
    request_id: str


@dataclass
class Span:
    """A stretch of work on one lane: "cpu" (schedule, prepare, update) or "device" (forward, sample)."""

    t: float
    end: float
    lane: str
    name: str
    step: int


@dataclass
class Pages:
    """Pages changing hands: allocated, shared (a prefix hit), cached (named for reuse), freed."""

    t: float
    kind: str
    request_id: str
    pages: list[int]


@dataclass
class Discarded:
    """A token sampled for a request that had already stopped (async scheduling sees EOS a step late)."""

    t: float
    step: int
    request_id: str


@dataclass
class FirstToken:
    t: float
    request_id: str


@dataclass
class RequestFinished:
    t: float
    request_id: str
    reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None


@dataclass
class RunInfo:
    """The first event of a log: what the run was (for the viewer and for replay)."""

    t: float
    num_blocks: int
    block_size: int
    config: dict = field(default_factory=dict)


EVENT_TYPES = {
    c.__name__: c
    for c in (RunInfo, RequestArrived, StepScheduled, Preempted, Span, Pages, Discarded, FirstToken, RequestFinished)
}


class Recorder:
    """Collects events; listeners (the live viewer) see each one as it is emitted.

    `emit` is safe from any thread: the device thread records its own spans.
    """

    def __init__(self):
        self.t0 = time.perf_counter()
        self.events: list = []
        self.listeners: list = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def emit(self, event):
        with self._lock:
            self.events.append(event)
        for fn in self.listeners:
            fn(event)

    @contextmanager
    def span(self, lane: str, name: str, step: int):
        t = self.now()
        try:
            yield
        finally:
            self.emit(Span(t, self.now(), lane, name, step))

    def write_jsonl(self, path):
        with open(path, "w") as f:
            for e in self.events:
                f.write(json.dumps({"type": type(e).__name__, **asdict(e)}) + "\n")


def read_jsonl(path) -> list:
    """Read a step log back into events; a bad line raises ValueError naming it."""
    events = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                events.append(EVENT_TYPES[d.pop("type")](**d))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}, line {lineno}: not a nanoserve trace event ({e}); "
                    "was the file written by --trace and not truncated?"
                ) from None
    return events


def busy_time(spans) -> float:
    """Length of the union of (start, end) intervals: overlapping spans count once."""
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted(spans):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def _stats(xs):
    if not xs:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]
    return {"mean": statistics.fmean(xs), "p50": pick(0.5), "p99": pick(0.99)}


def _spread(xs):
    return {"mean": statistics.fmean(xs) if xs else 0.0, "sd": statistics.pstdev(xs) if xs else 0.0}


def compute_metrics(events) -> dict:
    """The run's metrics (the `metrics` object of `--output-json`), from its events alone."""
    arrived = {e.request_id: e.t for e in events if isinstance(e, RequestArrived)}
    first = {e.request_id: e.t for e in events if isinstance(e, FirstToken)}
    done = [e for e in events if isinstance(e, RequestFinished)]
    ok = [e for e in done if e.reason != "error"]
    start = min(arrived.values(), default=0.0)
    end = max((e.t for e in done), default=start)
    wall = max(end - start, 1e-9)
    ttft = [(first[e.request_id] - arrived[e.request_id]) * 1e3 for e in ok if e.request_id in first]
    tpot = [
        (e.t - first[e.request_id]) * 1e3 / (e.num_output_tokens - 1)
        for e in ok
        if e.request_id in first and e.num_output_tokens > 1
    ]
    spans = [e for e in events if isinstance(e, Span) and e.end > start and e.t < end]  # inside the run's window
    clip = lambda ss: [(max(s.t, start), min(s.end, end)) for s in ss]
    device = clip(s for s in spans if s.lane.startswith("device"))  # "device", or "device/k" per pipeline stage
    stages = sorted({s.lane for s in spans if s.lane.startswith("device/")})
    out_tokens = sum(e.num_output_tokens for e in ok)
    in_tokens = sum(e.num_prompt_tokens for e in ok)
    return {
        "num_requests": len(ok),
        "num_errors": len(done) - len(ok),
        "wall_s": wall,
        "num_prompt_tokens": in_tokens,
        "num_output_tokens": out_tokens,
        "request_throughput": len(ok) / wall,
        "output_throughput": out_tokens / wall,
        "total_throughput": (in_tokens + out_tokens) / wall,
        "ttft_ms": _stats(ttft),
        "tpot_ms": _stats(tpot),
        "e2e_ms": _stats([(e.t - arrived[e.request_id]) * 1e3 for e in ok if e.request_id in arrived]),
        "device_busy_frac": busy_time(device) / wall,
        "stage_busy_frac": {lane: busy_time(clip(s for s in spans if s.lane == lane)) / wall for lane in stages},
        "steps": sum(isinstance(e, StepScheduled) for e in events),
        "preemptions": sum(isinstance(e, Preempted) for e in events),
        "discarded_tokens": sum(isinstance(e, Discarded) for e in events),
        "step_ms": step_breakdown(events),
        "microbatch_tokens": _spread([sum(e.num_tokens) for e in events if isinstance(e, StepScheduled)]),
    }


def step_breakdown(events) -> dict:
    """Mean milliseconds per step of each span name (schedule, prepare, forward, sample, update),
    over all steps and over decode-only steps."""
    decode_steps = {e.step for e in events if isinstance(e, StepScheduled) and not any(e.is_prefill)}
    out = {}
    for label, keep in (("all", lambda s: True), ("decode", lambda s: s in decode_steps)):
        per = {}
        for e in events:
            if isinstance(e, Span) and keep(e.step):
                per.setdefault(e.name, []).append((e.end - e.t) * 1e3)
        out[label] = {name: statistics.fmean(v) for name, v in per.items()}
    return out
