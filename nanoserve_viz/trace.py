"""The events an engine run emits, the Recorder that collects them, and the metrics computed from them.

One source of truth: the printed summary, `--output-json`, the JSONL step log (`--trace FILE.jsonl`)
and the visualizer all read the same recorded events. Times are seconds since the recorder started.

    >>> rec = Recorder()
    >>> rec.emit(RequestArrived(t=0.0, request_id="0", num_prompt_tokens=5))
    >>> rec.emit(FirstToken(t=0.5, request_id="0"))
    >>> rec.emit(RequestFinished(t=1.5, request_id="0", reason="length", num_prompt_tokens=5, num_output_tokens=3))
    >>> m = compute_metrics(rec.events); m["ttft_ms"]["mean"], m["tpot_ms"]["mean"]
    (500.0, 500.0)

A viewer that pauses or paces the engine records each hold as `Span(lane="viewer")`. That time is
the viewer's, not the engine's: the metrics run on the engine's clock (`EngineClock`), which cuts it out.
"""

import dataclasses
import json
import math
import statistics
import threading
import time
import types
from bisect import bisect_left, bisect_right
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import get_args, get_origin

VIEWER_LANE = "viewer"  # spans the visualizer itself records: the engine was held (paused, paced)


@dataclass(slots=True)
class RequestArrived:
    t: float
    request_id: str
    num_prompt_tokens: int


@dataclass(slots=True)
class StepScheduled:
    """One step's batch: per request the number of tokens and whether it is a prefill chunk."""

    t: float
    step: int
    request_ids: list[str]
    num_tokens: list[int]
    is_prefill: list[bool]
    num_running: int = 0
    num_waiting: int = 0


@dataclass(slots=True)
class Preempted:
    t: float
    step: int
    request_id: str


@dataclass(slots=True)
class Span:
    """A stretch of work on one lane: "cpu" (schedule, prepare, update), "device" (forward, sample;
    "device/k" per pipeline stage) or "viewer" (the visualizer held the engine)."""

    t: float
    end: float
    lane: str
    name: str
    step: int


@dataclass(slots=True)
class Pages:
    """Pages changing hands: allocated, shared (a prefix hit), cached (named for reuse), freed."""

    t: float
    kind: str
    request_id: str
    pages: list[int]


@dataclass(slots=True)
class Discarded:
    """A token sampled for a request that had already stopped (async scheduling sees EOS a step late)."""

    t: float
    step: int
    request_id: str


@dataclass(slots=True)
class FirstToken:
    t: float
    request_id: str


@dataclass(slots=True)
class RequestFinished:
    t: float
    request_id: str
    reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None


@dataclass(slots=True)
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

    def __init__(self, keep_events: bool = True):
        self.t0 = time.perf_counter()
        self.events: list = []
        # False: listeners see every event, none is kept (a server that runs for days keeps no history)
        self.keep_events = keep_events
        self.listeners: list = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def emit(self, event):
        if self.keep_events:
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


# --- reading a step log back, checked ----------------------------------------------------------------
# A log may come from anywhere (edited, truncated, written by another program): every record is checked
# against its event's fields, and against what the viewer would have to allocate or draw for it.

MAX_TIME_S = 1e9  # times are seconds since the run began
MAX_INT = 2**53  # counts and ids: exact as JSON numbers everywhere
MAX_PAGES = 1 << 20  # the viewer keeps a cell per page of the pool
MAX_STAGES = 64  # device lanes "device/0" ... one per pipeline stage
MAX_REQUESTS = 100_000  # a timeline row each
MAX_ID_LEN = 200
MAX_STEPS = 1_000_000
MAX_SPANS_PER_STEP = 32  # on one lane (a real step has at most three)
MAX_TIMELINE_CELLS = 1 << 26  # each request's steps from its arrival to its finish, all requests together
PAGE_KINDS = ("allocated", "shared", "cached", "freed")
REASONS = ("stop", "length", "abort", "error")
LANES = ("cpu", "device", VIEWER_LANE, *(f"device/{k}" for k in range(MAX_STAGES)))


class BadRecord(ValueError):
    """One record of a step log that is not what the events are."""


def read_jsonl(path) -> list:
    """Read a step log back into events, every record checked (`check_record`, `LogLimits`).

    A bad line raises ValueError naming the file, the line and what is wrong with it, e.g.
    `run.jsonl, line 7: Span.end should be a number of seconds (at most 1e9), not "soon"`.
    """
    events, limits = [], LogLimits()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                event = check_record(json.loads(text))
                limits.check(event)
            except UnicodeDecodeError:
                raise ValueError(
                    f"{path}, line {lineno}: not UTF-8 text; is it a step log (--trace FILE.jsonl)?"
                ) from None
            except (ValueError, RecursionError) as e:  # JSONDecodeError and BadRecord are ValueErrors
                raise ValueError(
                    f"{path}, line {lineno}: {e if isinstance(e, BadRecord) else f'not JSON ({e})'}; "
                    "was the file written by --trace FILE.jsonl, and not truncated or edited?"
                ) from None
            events.append(event)
    return events


def check_record(record):
    """The event a decoded JSON line describes, its every field checked; BadRecord says what is wrong.

    >>> check_record({"type": "FirstToken", "t": 0.5, "request_id": "0"})
    FirstToken(t=0.5, request_id='0')
    >>> check_record({"type": "FirstToken", "t": "soon", "request_id": "0"})
    Traceback (most recent call last):
    nanoserve_viz.trace.BadRecord: FirstToken.t should be a number of seconds (at most 1e9), not "soon"
    """
    if not isinstance(record, dict):
        raise BadRecord(f"not a JSON object but {_short(record)}")
    name = record.get("type")
    cls = EVENT_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise BadRecord(f'no "type" of trace event ({_short(name)}); the types are {", ".join(EVENT_TYPES)}')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in record.items() if k != "type"}
    for key in values.keys() - fields.keys():
        raise BadRecord(f"{name} has no field {key!r}; its fields are {', '.join(fields)}")
    for key, f in fields.items():
        if key not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BadRecord(f"{name} lacks its field {key!r}")
        elif not _fits(values[key], f.type):
            raise BadRecord(f"{name}.{key} should be {_describe(f.type)}, not {_short(values[key])}")
    return cls(**values)


def _fits(value, tp) -> bool:
    """Whether a JSON value is of a field's type (bool is not an int here, a count is never negative)."""
    if tp is float:
        return type(value) in (int, float) and -MAX_TIME_S <= value <= MAX_TIME_S  # NaN fails the test too
    if tp is int:
        return type(value) is int and 0 <= value <= MAX_INT
    if tp in (str, bool, dict, type(None)):
        return type(value) is tp
    if get_origin(tp) is list:
        return type(value) is list and all(_fits(v, get_args(tp)[0]) for v in value)
    return isinstance(tp, types.UnionType) and any(_fits(value, a) for a in get_args(tp))


def _describe(tp) -> str:
    words = {float: "a number of seconds (at most 1e9)", int: "a whole number from 0 to 2**53", str: "a string"}
    words |= {bool: "true or false", dict: "an object", type(None): "null"}
    if get_origin(tp) is list:
        return f"a list, each {_describe(get_args(tp)[0])}"
    return words.get(tp) or " or ".join(_describe(a) for a in get_args(tp))


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:39] + "…"


class LogLimits:
    """What a record may ask of the viewer, given the records before it: steps count up from 0 one at a
    time, pages lie inside the pool, a lane does one thing at a time, and the pool, the requests, the
    steps and the timeline stay within what the viewer can hold and draw (`check` raises BadRecord)."""

    def __init__(self):
        self.records = 0
        self.num_blocks = MAX_PAGES  # until a RunInfo says
        self.steps = 0  # StepScheduled so far: the next step's number
        self.requests: set[str] = set()
        self.unfinished: set[str] = set()
        self.cells = 0  # timeline cells so far: a request has one per step from its arrival to its finish
        self.lane_end: dict[str, float] = {}
        self.spans_in_step: dict[tuple[str, int], int] = {}
        self._checks = {
            RunInfo: self._run_info,
            StepScheduled: self._step,
            Span: self._span,
            Pages: self._pages,
            RequestFinished: self._finished,
        }

    def check(self, e):
        self.records += 1
        for rid in e.request_ids if isinstance(e, StepScheduled) else [getattr(e, "request_id", None)]:
            if rid is not None:
                self._request(rid)
        if isinstance(e, (Preempted, Discarded, Span)) and e.step > self.steps:
            raise BadRecord(f"{type(e).__name__} of step {e.step}, a step not scheduled yet (the next is {self.steps})")
        if check := self._checks.get(type(e)):
            check(e)

    def _request(self, rid: str):
        if len(rid) > MAX_ID_LEN:
            raise BadRecord(f"a request id of {len(rid)} characters; at most {MAX_ID_LEN}")
        if rid not in self.requests:
            if len(self.requests) >= MAX_REQUESTS:
                raise BadRecord(f"request {rid!r} makes more than {MAX_REQUESTS} requests, more than the viewer draws")
            self.requests.add(rid)
            self.unfinished.add(rid)

    def _run_info(self, e: RunInfo):
        if self.records > 1:
            raise BadRecord("a RunInfo after the first record: a log holds one run, and begins with its RunInfo")
        if e.num_blocks > MAX_PAGES:
            raise BadRecord(f"a pool of {e.num_blocks} pages, more than the {MAX_PAGES} the viewer draws")
        if not 0 < e.block_size <= MAX_INT:
            raise BadRecord(f"a page of {e.block_size} tokens")
        self.num_blocks = e.num_blocks

    def _step(self, e: StepScheduled):
        if e.step != self.steps:
            raise BadRecord(f"StepScheduled of step {e.step} where step {self.steps} was due: steps count 0, 1, 2, ...")
        if not len(e.request_ids) == len(e.num_tokens) == len(e.is_prefill):
            raise BadRecord(
                f"StepScheduled with {len(e.request_ids)} request_ids, {len(e.num_tokens)} num_tokens and "
                f"{len(e.is_prefill)} is_prefill: one of each per request"
            )
        self.steps += 1
        self.cells += len(self.unfinished)
        if self.steps > MAX_STEPS or self.cells > MAX_TIMELINE_CELLS:
            raise BadRecord(
                f"{self.steps} steps of {len(self.unfinished)} unfinished requests: more than the viewer's timeline "
                f"holds ({MAX_STEPS} steps, {MAX_TIMELINE_CELLS} cells of requests x steps)"
            )

    def _span(self, e: Span):
        if e.lane not in LANES:
            raise BadRecord(f"a span on lane {e.lane!r}; the lanes are cpu, device, device/0 ... device/63, viewer")
        if e.end < e.t:
            raise BadRecord(f"a span that ends (end {e.end}) before it begins (t {e.t})")
        # one lane is one thread or stream, doing one thing at a time (the viewer relies on it to draw
        # only the spans in view); a millisecond of slack for clocks that round
        if e.t < self.lane_end.get(e.lane, -MAX_TIME_S) - 1e-3:
            raise BadRecord(f"a span on lane {e.lane!r} beginning at {e.t}, before the one before it ended")
        self.lane_end[e.lane] = e.end
        n = self.spans_in_step[e.lane, e.step] = self.spans_in_step.get((e.lane, e.step), 0) + 1
        if n > MAX_SPANS_PER_STEP:
            raise BadRecord(f"more than {MAX_SPANS_PER_STEP} spans of step {e.step} on lane {e.lane!r}")

    def _pages(self, e: Pages):
        if e.kind not in PAGE_KINDS:
            raise BadRecord(f"Pages of kind {e.kind!r}; the kinds are {', '.join(PAGE_KINDS)}")
        beyond = [p for p in e.pages if p >= self.num_blocks]
        if beyond:
            raise BadRecord(f"page {beyond[0]} in a pool of {self.num_blocks} pages (the RunInfo's num_blocks)")

    def _finished(self, e: RequestFinished):
        if e.reason not in REASONS:
            raise BadRecord(f"a request finished for reason {e.reason!r}; the reasons are {', '.join(REASONS)}")
        self.unfinished.discard(e.request_id)


# --- metrics, on the engine's clock ----------------------------------------------------------------


class Busy:
    """A union of time intervals, merged as they are added; the busy time in any window in O(log n).
    Overlapping spans count once (two pipeline stages busy at once are one busy device).

    >>> b = Busy(); b.add(0, 2); b.add(1, 3); b.add(5, 6)
    >>> b.within(0, 10), b.within(2.5, 5.5)
    (4.0, 1.0)
    """

    def __init__(self):
        self.starts: list[float] = []
        self.ends: list[float] = []  # disjoint and sorted, so both lists are sorted
        self._cum = [0.0]  # _cum[k]: total length of the first k intervals (cut back where one changes)

    def add(self, s: float, e: float):
        if e <= s:
            return
        i, j = bisect_left(self.ends, s), bisect_right(self.starts, e)  # [i, j): the intervals it meets
        if i < j:
            s, e = min(s, self.starts[i]), max(e, self.ends[j - 1])
        self.starts[i:j], self.ends[i:j] = [s], [e]
        del self._cum[i + 1 :]  # spans arrive in about time order: this is near the end

    def _length_of_first(self, k: int) -> float:
        while len(self._cum) <= k:
            n = len(self._cum) - 1
            self._cum.append(self._cum[-1] + self.ends[n] - self.starts[n])
        return self._cum[k]

    def within(self, t0: float, t1: float) -> float:
        """Busy seconds inside [t0, t1]."""
        i, j = bisect_right(self.ends, t0), bisect_left(self.starts, t1)  # [i, j): the intervals inside, cut
        if i >= j:
            return 0.0
        inside = self._length_of_first(j) - self._length_of_first(i)
        return inside - max(0.0, t0 - self.starts[i]) - max(0.0, self.ends[j - 1] - t1)

    @property
    def total(self) -> float:
        return self._length_of_first(len(self.starts))


def busy_time(spans) -> float:
    """Length of the union of (start, end) intervals: overlapping spans count once.

    >>> busy_time([(0, 2), (1, 3), (5, 6)])
    4.0
    """
    b = Busy()
    for s, e in spans:
        b.add(s, e)
    return b.total


class EngineClock:
    """The engine's time: the wall clock less the stretches a viewer held the engine while the device
    sat idle too. (While the viewer holds, the device may still finish the step in flight: that part
    is the engine's time.)

    >>> c = EngineClock()
    >>> c.add_device("device", 0.0, 1.0); c.add_hold(1.0, 11.0); c.add_device("device", 1.0, 2.0)
    >>> c.held_before(12.0), c.active(12.0)
    (9.0, 3.0)
    """

    def __init__(self):
        self.device = Busy()  # all the device's lanes (pipeline stages) together
        self.hold_starts: list[float] = []
        self.hold_ends: list[float] = []
        self._lane_start: dict[str, float] = {}  # device lane -> the start of its latest span
        self._settled = [0.0]  # cut of the first k holds, once no device span can still fall into them

    def add_device(self, lane: str, t0: float, t1: float):
        self.device.add(t0, t1)
        self._lane_start[lane] = max(t0, self._lane_start.get(lane, t0))

    def add_hold(self, t0: float, t1: float):
        self.hold_starts.append(t0)
        self.hold_ends.append(t1)

    def cut(self, i: int, upto: float = math.inf) -> float:
        """Seconds hold i took from the engine (up to time `upto`): its length less the device's busy time."""
        a, b = self.hold_starts[i], min(self.hold_ends[i], upto)
        return max(0.0, b - a - self.device.within(a, b)) if b > a else 0.0

    def held_before(self, t: float) -> float:
        """Seconds before t that the viewer held the engine and the device was idle (0 without a viewer)."""
        n = bisect_right(self.hold_ends, t)  # holds over by t
        # a hold's cut is final once every device lane has begun a span after it: none can fall into it now
        quiet = min(self._lane_start.values(), default=-math.inf)  # no device span yet: nothing is final
        while len(self._settled) <= n and self.hold_ends[len(self._settled) - 1] <= quiet:
            self._settled.append(self._settled[-1] + self.cut(len(self._settled) - 1))
        k = min(n, len(self._settled) - 1)
        held = self._settled[k] + sum(self.cut(i) for i in range(k, n))
        if n < len(self.hold_starts) and self.hold_starts[n] < t:
            held += self.cut(n, t)
        return held

    def active(self, t: float) -> float:
        """Time t on the engine's clock."""
        return t - self.held_before(t)

    def holds_in(self, t0: float, t1: float) -> list[tuple[float, float]]:
        """(start, seconds cut) of each hold that overlaps [t0, t1]."""
        i, j = bisect_right(self.hold_ends, t0), bisect_left(self.hold_starts, t1)
        return [(self.hold_starts[k], self.cut(k)) for k in range(i, j)]


def _stats(xs):
    if not xs:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]
    return {"mean": statistics.fmean(xs), "p50": pick(0.5), "p99": pick(0.99)}


class RunMetrics:
    """`compute_metrics`, one event at a time: the summary printed at the end and the live viewer's
    panel are this one computation. `result()` gives the metrics of the events added so far.

    >>> m = RunMetrics()
    >>> m.add(RequestArrived(0.0, "0", 4)); m.add(RequestFinished(2.0, "0", "length", 4, 8))
    >>> m.result()["output_throughput"]
    4.0
    """

    def __init__(self):
        self.clock = EngineClock()
        self.stages: dict[str, Busy] = {}  # "device/k" -> its busy time, one per pipeline stage
        self.arrived: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.finished: list[RequestFinished] = []
        self.steps = self.preemptions = self.discarded = 0
        self._decode: dict[int, bool] = {}  # step -> scheduled decodes only
        self._early: dict[int, list] = {}  # spans of a step not scheduled yet: (name, ms)
        self._span_ms = {"all": {}, "decode": {}}  # span name -> [total ms, count]
        self._batch = [0, 0.0, 0.0]  # tokens per step, running count, mean, sum of squares (Welford)

    def add(self, e):
        if isinstance(e, RequestArrived):
            self.arrived[e.request_id] = e.t
        elif isinstance(e, FirstToken):
            self.first[e.request_id] = e.t
        elif isinstance(e, RequestFinished):
            self.finished.append(e)
        elif isinstance(e, StepScheduled):
            self._step(e)
        elif isinstance(e, Span):
            self._span(e)
        else:
            self.preemptions += isinstance(e, Preempted)
            self.discarded += isinstance(e, Discarded)

    def _step(self, e: StepScheduled):
        self.steps += 1
        self._decode[e.step] = decode = not any(e.is_prefill)
        for name, ms in self._early.pop(e.step, []) if decode else ():
            self._add_ms("decode", name, ms)
        n, mean, m2 = self._batch
        x = sum(e.num_tokens)
        n, delta = n + 1, x - mean
        mean += delta / n
        self._batch = [n, mean, m2 + delta * (x - mean)]

    def _span(self, e: Span):
        if e.lane == VIEWER_LANE:  # the viewer's, not the engine's
            self.clock.add_hold(e.t, e.end)
            return
        if e.lane.startswith("device"):  # "device", or "device/k" for pipeline stage k
            self.clock.add_device(e.lane, e.t, e.end)
            if "/" in e.lane:
                self.stages.setdefault(e.lane, Busy()).add(e.t, e.end)
        ms = (e.end - e.t) * 1e3
        self._add_ms("all", e.name, ms)
        if self._decode.get(e.step):
            self._add_ms("decode", e.name, ms)
        elif e.step not in self._decode:
            self._early.setdefault(e.step, []).append((e.name, ms))

    def _add_ms(self, label: str, name: str, ms: float):
        total = self._span_ms[label].setdefault(name, [0.0, 0])
        total[0] += ms
        total[1] += 1

    def result(self, until: float | None = None, num_output_tokens: int | None = None) -> dict:
        """The metrics (the `metrics` object of `--output-json`). With `until`, of the run so far, as a
        live viewer shows it: the window ends at `until`, TTFT counts requests still running, and
        `num_output_tokens` are the tokens delivered so far (the finished requests' otherwise)."""
        ok = [e for e in self.finished if e.reason != "error"]
        start = min(self.arrived.values(), default=0.0)
        end = max(until, start) if until is not None else max((e.t for e in self.finished), default=start)
        act = self.clock.active
        wall = max(act(end) - act(start), 1e-9)
        ms = lambda rid, t, since: (act(t) - act(since[rid])) * 1e3
        with_first = [rid for rid in self.first if rid in self.arrived]
        if until is None:
            with_first = [e.request_id for e in ok if e.request_id in self.first and e.request_id in self.arrived]
        errors = {e.request_id for e in self.finished if e.reason == "error"}
        out_tokens = sum(e.num_output_tokens for e in ok) if num_output_tokens is None else num_output_tokens
        in_tokens = sum(e.num_prompt_tokens for e in ok)
        tpot = [ms(e.request_id, e.t, self.first) / (e.num_output_tokens - 1) for e in ok if self._decoded(e)]
        busy = lambda b: b.within(start, end) / wall
        n, mean, m2 = self._batch
        return {
            "num_requests": len(ok),
            "num_errors": len(self.finished) - len(ok),
            "wall_s": wall,
            "viewer_held_s": self.clock.held_before(end) - self.clock.held_before(start),
            "num_prompt_tokens": in_tokens,
            "num_output_tokens": out_tokens,
            "request_throughput": len(ok) / wall,
            "output_throughput": out_tokens / wall,
            "total_throughput": (in_tokens + out_tokens) / wall,
            "ttft_ms": _stats([ms(rid, self.first[rid], self.arrived) for rid in with_first if rid not in errors]),
            "tpot_ms": _stats(tpot),
            "e2e_ms": _stats([ms(e.request_id, e.t, self.arrived) for e in ok if e.request_id in self.arrived]),
            "device_busy_frac": busy(self.clock.device),
            "stage_busy_frac": {lane: busy(self.stages[lane]) for lane in sorted(self.stages)},
            "steps": self.steps,
            "preemptions": self.preemptions,
            "discarded_tokens": self.discarded,
            "step_ms": {label: {k: t / c for k, (t, c) in d.items()} for label, d in self._span_ms.items()},
            "microbatch_tokens": {"mean": mean, "sd": math.sqrt(m2 / n) if n else 0.0},
        }

    def _decoded(self, e: RequestFinished) -> bool:
        return e.request_id in self.first and e.num_output_tokens > 1

    def request_latencies(self) -> dict[str, dict]:
        """Per request, on the engine's clock: {"ttft_ms": ..., "e2e_ms": ...} (None where unknown)."""
        act, done = self.clock.active, {e.request_id: e.t for e in self.finished}
        ms = lambda rid, t: round((act(t[rid]) - act(self.arrived[rid])) * 1e3, 3) if rid in t else None
        return {rid: {"ttft_ms": ms(rid, self.first), "e2e_ms": ms(rid, done)} for rid in self.arrived}


def compute_metrics(events) -> dict:
    """The run's metrics (the `metrics` object of `--output-json`), from its events alone, on the
    engine's clock: time the viewer held the engine is in `viewer_held_s`, and nowhere else."""
    m = RunMetrics()
    for e in events:
        m.add(e)
    return m.result()


def request_latencies(events) -> dict[str, dict]:
    """{request id: {"ttft_ms", "e2e_ms"}} on the engine's clock, for `--output-json`'s request records.

    >>> request_latencies([RequestArrived(0.0, "0", 4), FirstToken(0.25, "0")])
    {'0': {'ttft_ms': 250.0, 'e2e_ms': None}}
    """
    m = RunMetrics()
    for e in events:
        m.add(e)
    return m.request_latencies()
