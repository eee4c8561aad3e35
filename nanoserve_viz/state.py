"""The visualizer's model of a run, rebuilt from the trace events alone. Pure Python, no Textual.

Live mode and replay feed the same events through `RunState.apply`, so a replayed run ends in exactly
the state the live run ended in: which request owns which KV page, what every request did at every
step (the timeline), the CPU and device spans (the lanes) and the metrics so far.

    >>> from nanoserve_viz.trace import Pages, RequestArrived, RunInfo, StepScheduled
    >>> st = RunState()
    >>> st.apply_all([RunInfo(0.0, num_blocks=4, block_size=2), RequestArrived(0.0, "a", 3),
    ...               Pages(0.0, "allocated", "a", [0, 1]), StepScheduled(0.0, 0, ["a"], [3], [True])])
    >>> st.page_map(), st.requests["a"].cells[0] == Cell.PREFILL, st.num_free_pages
    ({0: ('a',), 1: ('a',)}, True, 2)

A viewer that paces or pauses the engine records its holds as `Span(lane="viewer", name="paused")`;
the metrics and the lanes' time axis run on the engine's clock (`nanoserve_viz.trace.EngineClock`), which cuts
them out, so a slowed-down run still shows the engine's own gaps and throughput.
"""

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from nanoserve_viz.trace import (
    VIEWER_LANE,
    Discarded,
    FirstToken,
    Pages,
    Preempted,
    RequestArrived,
    RequestFinished,
    RunInfo,
    RunMetrics,
    Span,
    StepScheduled,
)

__all__ = ["VIEWER_LANE", "Cell", "RequestState", "RunState", "SpanList", "StepInfo"]


class Cell:
    """What a request did in one step (one timeline cell)."""

    NONE = 0  # not arrived yet, or finished
    WAITING = 1  # in the waiting queue
    IDLE = 2  # running (holds pages) but got no tokens this step
    PREFILL = 3  # computed a chunk of its prompt (or recomputed after preemption)
    DECODE = 4  # computed one new token
    PREEMPTED = 5  # lost its pages this step and went back to the queue


@dataclass(eq=False)
class RequestState:
    id: str
    index: int  # row in the timeline (arrival order)
    t_arrived: float | None
    num_prompt_tokens: int
    first_step: int  # the step its first timeline cell belongs to
    cells: bytearray = field(default_factory=bytearray)  # Cell codes, one per step from first_step
    status: str = "waiting"  # waiting | running | finished
    reason: str | None = None  # finish reason: stop, length, abort, error
    error: str | None = None
    finish_step: int | None = None  # the first step after it finished (where ✓ is drawn)
    t_first: float | None = None
    t_finished: float | None = None
    num_output_tokens: int = 0  # tokens received so far (exact once finished)
    num_preemptions: int = 0
    computed: int = 0  # tokens whose K/V are (being) written: tells which scheduled chunk samples
    known: int = 0  # prompt + outputs + tokens in flight

    @property
    def finished(self):
        return self.status == "finished"

    def cell(self, step: int, num_steps: int) -> int:
        """What it did in `step` of a run that has had `num_steps` steps so far."""
        i = step - self.first_step
        if 0 <= i < len(self.cells):
            return self.cells[i]
        if i >= 0 and step < num_steps and self.status == "waiting":
            return Cell.WAITING  # still queued: its cells are written when it is scheduled
        return Cell.NONE


@dataclass
class StepInfo:
    t: float
    step: int
    request_ids: list[str]
    num_tokens: list[int]
    is_prefill: list[bool]
    num_running: int
    num_waiting: int
    sampling: list[str]  # the requests that get a token from this step


class SpanList:
    """The spans of one lane in emission order, with a running max of ends for fast window queries."""

    def __init__(self):
        self.starts, self.ends, self.names, self.steps = [], [], [], []
        self.max_end = []  # max_end[i] = max(ends[: i + 1]), non-decreasing

    def __len__(self):
        return len(self.starts)

    def add(self, s: Span):
        self.starts.append(s.t)
        self.ends.append(s.end)
        self.names.append(s.name)
        self.steps.append(s.step)
        self.max_end.append(max(s.end, self.max_end[-1]) if self.max_end else s.end)

    def window(self, t0: float, t1: float) -> range:
        """Indices of spans that may overlap [t0, t1] (every one that does is in the range)."""
        return range(bisect_right(self.max_end, t0), bisect_left(self.starts, t1) if self.starts else 0)


class RunState:
    """Everything the panels draw, updated one event at a time.

    Pages: `page_owners[p]` is the tuple of requests holding page p (two or more: a shared prefix
    page); `page_cached[p]` is 1 when the page is named in the prefix cache, so a page with no owner
    but a name is *cached-free*: free to reuse, still worth a hit. `touched` is the range of pages the
    run has used so far: every page outside it is free and always was.
    """

    def __init__(self):
        self.version = 0  # bumped by every apply: the widgets redraw when it changes
        self.num_events = 0
        self.config: dict = {}
        self.block_size = 0
        self.page_owners: list[tuple[str, ...]] = []
        self.page_cached = bytearray()
        self.num_used_pages = 0
        self.num_cached_free_pages = 0
        self.num_shared_pages = 0
        self.touched = range(0)
        self.tables: dict[str, list[int]] = {}
        self.requests: dict[str, RequestState] = {}  # arrival order
        self.live: dict[str, RequestState] = {}  # arrived, not finished
        self.running: dict[str, RequestState] = {}  # holding pages (scheduled at least once since waiting)
        self.steps: list[StepInfo] = []
        self.steps_by_number: dict[int, StepInfo] = {}
        self.num_steps = 0  # the next step's number
        self.step_started: dict[int, float] = {}  # step -> when its schedule span began
        self.lanes: dict[str, SpanList] = {"cpu": SpanList(), "device": SpanList()}
        self.run_metrics = RunMetrics()  # the summary's computation, fed as the events come
        self.clock = self.run_metrics.clock  # the engine's time: the viewer's holds cut out
        self.preemptions = 0
        self.discarded = 0
        self.num_output_tokens = 0
        self.num_first_tokens = 0
        self.longest_id = 0  # characters of the longest request id
        self.t_start: float | None = None  # the first arrival
        self.t_now = 0.0  # the latest time any event mentions
        self.done = False  # set by the viewer when the run has ended (no more events will come)
        self._preempted_now: set[str] = set()
        self._discarded_at: dict[int, set[str]] = {}
        self._handlers = {
            RunInfo: self._run_info,
            RequestArrived: self._arrived,
            Pages: self._pages,
            Preempted: self._preempted,
            StepScheduled: self._step,
            Span: self._span,
            FirstToken: self._first_token,
            Discarded: self._discarded,
            RequestFinished: self._finished,
        }

    # --- applying events ----------------------------------------------------------------------

    def apply(self, event):
        self._handlers[type(event)](event)
        self.run_metrics.add(event)
        self.t_now = max(self.t_now, getattr(event, "end", event.t))
        self.num_events += 1
        self.version += 1

    def apply_all(self, events):
        for e in events:
            self.apply(e)

    def _run_info(self, e: RunInfo):
        self.config = dict(e.config)
        self.block_size = e.block_size
        self._grow_pages(e.num_blocks)

    def _grow_pages(self, n: int):
        if n > len(self.page_owners):
            self.page_owners += [()] * (n - len(self.page_owners))
            self.page_cached += bytes(n - len(self.page_cached))

    def _request(self, request_id: str, t: float | None = None, num_prompt_tokens: int = 0) -> RequestState:
        req = self.requests.get(request_id)
        if req is None:
            req = RequestState(request_id, len(self.requests), t, num_prompt_tokens, self.num_steps)
            req.known = num_prompt_tokens
            self.requests[request_id] = req
            self.longest_id = max(self.longest_id, len(request_id))
        return req

    def _arrived(self, e: RequestArrived):
        req = self._request(e.request_id, e.t, e.num_prompt_tokens)
        self.live[req.id] = req
        self.t_start = e.t if self.t_start is None else min(self.t_start, e.t)

    def _set_page(self, p: int, owners: tuple[str, ...], cached: int):
        was = self.page_owners[p]
        was_cached_free = self.page_cached[p] and not was
        self.page_owners[p], self.page_cached[p] = owners, cached
        self.num_used_pages += bool(owners) - bool(was)
        self.num_shared_pages += (len(owners) > 1) - (len(was) > 1)
        self.num_cached_free_pages += bool(cached and not owners) - bool(was_cached_free)
        if owners or cached:
            lo, hi = (p, p + 1) if not self.touched else (min(self.touched.start, p), max(self.touched.stop, p + 1))
            self.touched = range(lo, hi)

    def _pages(self, e: Pages):
        self._grow_pages(max(e.pages, default=-1) + 1)
        table, rid = self.tables.setdefault(e.request_id, []), e.request_id
        if e.kind == "allocated":  # fresh pages (a cached-free one taken here is evicted: its name is gone)
            for p in e.pages:
                self._set_page(p, (rid,), 0)
            table += e.pages
        elif e.kind == "shared":  # a prefix-cache hit: the request starts with these pages
            for p in e.pages:
                self._set_page(p, self.page_owners[p] + (rid,), self.page_cached[p])
            table += e.pages
            if rid in self.requests:
                self.requests[rid].computed = len(table) * self.block_size
        elif e.kind == "cached":
            for p in e.pages:
                self._set_page(p, self.page_owners[p], 1)
        elif e.kind == "freed":  # the request lets go of its whole table; `pages` lists the ones now free
            for p in self.tables.pop(rid, []):
                self._set_page(p, tuple(o for o in self.page_owners[p] if o != rid), self.page_cached[p])

    def _preempted(self, e: Preempted):
        req = self._request(e.request_id)
        self._fill(req, e.step)
        self.running.pop(req.id, None)
        req.status, req.computed = "waiting", 0
        req.num_preemptions += 1
        self.preemptions += 1
        self._preempted_now.add(e.request_id)

    def _fill(self, req: RequestState, step: int):
        """Pad req's cells up to `step` with what it was doing meanwhile: waiting in the queue, or
        running without tokens (a waiting request's cells are written only when it changes state)."""
        missing = step - req.first_step - len(req.cells)
        if missing > 0:
            req.cells += bytes([Cell.IDLE if req.status == "running" else Cell.WAITING]) * missing

    def _step(self, e: StepScheduled):
        for rid in self._preempted_now.difference(e.request_ids):
            req = self.requests[rid]
            if not req.finished:
                self._fill(req, e.step)
                req.cells.append(Cell.PREEMPTED)
        self._preempted_now.clear()
        sampling = []
        for rid, n, prefill in zip(e.request_ids, e.num_tokens, e.is_prefill):
            req = self._request(rid)
            self._fill(req, e.step)
            req.cells.append(Cell.PREFILL if prefill else Cell.DECODE)
            req.status = "running"
            self.running[rid] = req
            req.computed += n
            if req.computed >= req.known:  # the chunk reaches the last known token: it samples the next
                req.known += 1
                sampling.append(rid)
        for req in self.running.values():
            self._fill(req, e.step + 1)  # running, but no tokens this step: IDLE
        info = StepInfo(e.t, e.step, e.request_ids, e.num_tokens, e.is_prefill, e.num_running, e.num_waiting, sampling)
        self.steps.append(info)
        self.steps_by_number[e.step] = info
        self.num_steps = max(self.num_steps, e.step + 1)

    def _span(self, e: Span):
        if e.lane != VIEWER_LANE:  # the viewer's holds live in the clock
            self.lanes.setdefault(e.lane, SpanList()).add(e)
        if e.lane == "cpu" and e.name == "schedule":
            self.step_started[e.step] = e.t
        if e.lane == "cpu" and e.name == "update":  # the step's tokens reached their requests
            info = self.steps_by_number.get(e.step)
            dropped = self._discarded_at.pop(e.step, set())
            for rid in info.sampling if info else ():
                req = self.requests[rid]
                if not req.finished and rid not in dropped:
                    req.num_output_tokens += 1
                    self.num_output_tokens += 1

    def _first_token(self, e: FirstToken):
        self._request(e.request_id).t_first = e.t
        self.num_first_tokens += 1

    def _discarded(self, e: Discarded):
        self._discarded_at.setdefault(e.step, set()).add(e.request_id)
        self.discarded += 1

    def _finished(self, e: RequestFinished):
        req = self._request(e.request_id, None, e.num_prompt_tokens)
        if req.id in self.live or req.id in self.running:
            self._fill(req, self.num_steps)
        self.running.pop(req.id, None)
        req.status, req.reason, req.error, req.t_finished = "finished", e.reason, e.error, e.t
        req.finish_step = self.num_steps
        self.num_output_tokens += e.num_output_tokens - req.num_output_tokens
        req.num_output_tokens = e.num_output_tokens
        self.live.pop(req.id, None)

    # --- pages ----------------------------------------------------------------------------------

    @property
    def num_pages(self):
        return len(self.page_owners)

    @property
    def num_free_pages(self):
        """Pages a new allocation may take: free and cached-free (BlockManager.num_free_blocks)."""
        return self.num_pages - self.num_used_pages

    def page_map(self) -> dict[int, tuple[str, ...]]:
        """{page: sorted owners} of every page in use."""
        return {p: tuple(sorted(o)) for p, o in enumerate(self.page_owners) if o}

    def cached_free_pages(self) -> set[int]:
        return {p for p, (o, c) in enumerate(zip(self.page_owners, self.page_cached)) if c and not o}

    # --- queues ---------------------------------------------------------------------------------

    def with_status(self, status: str) -> list[RequestState]:
        pool = self.requests.values() if status == "finished" else self.live.values()
        return [r for r in pool if r.status == status]

    # --- time and metrics, on the engine's clock ------------------------------------------------

    def device_lanes(self) -> list[str]:
        """The device's lanes: "device", or "device/0", "device/1", ... one per pipeline stage."""
        return sorted(n for n, sl in self.lanes.items() if n.startswith("device") and len(sl)) or ["device"]

    def device_busy(self, t0: float, t1: float) -> float:
        """Seconds in [t0, t1] when the device (any pipeline stage of it) was busy."""
        return self.clock.device.within(t0, t1)

    def metrics(self) -> dict:
        """`nanoserve_viz.trace.compute_metrics` of the events applied so far, by the same computation: once the
        run is `done`, exactly the summary's numbers; before, those of the run so far (up to `t_now`,
        counting the tokens delivered to requests still running)."""
        if self.done:
            return self.run_metrics.result()
        return self.run_metrics.result(until=self.t_now, num_output_tokens=self.num_output_tokens)
