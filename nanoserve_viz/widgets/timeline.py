"""The scheduler timeline: one column per step, one row per request.

Each cell says what the request did in that step: a prefill chunk ▒, a decode token █, preempted ✖
(its pages taken back), waiting in the queue ·, or running but given nothing -. ✓ marks the step
after it finished (✗: failed or aborted). It follows the newest step unless you scroll away (f: follow).
"""

import re

from rich.segment import Segment
from textual.cache import LRUCache
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from nanoserve_viz.state import Cell, RunState
from nanoserve_viz.widgets.styled import CachedStyles

GLYPHS = {Cell.NONE: " ", Cell.WAITING: "·", Cell.IDLE: "-", Cell.PREFILL: "▒", Cell.DECODE: "█", Cell.PREEMPTED: "✖"}
CLASSES = {
    Cell.WAITING: "timeline--waiting",
    Cell.IDLE: "timeline--waiting",
    Cell.PREFILL: "timeline--prefill",
    Cell.DECODE: "timeline--decode",
    Cell.PREEMPTED: "timeline--preempted",
}
LEGEND = "▒ prefill  █ decode  ✖ preempted  · waiting  - idle  ✓ done"
MAX_LABEL_W = 18  # cells for a request's id
_RUNS = re.compile(rb"(.)\1*", re.DOTALL)  # runs of one cell code: one Segment each


class Timeline(CachedStyles, ScrollView, can_focus=False):
    COMPONENT_CLASSES = {
        "timeline--prefill",
        "timeline--decode",
        "timeline--preempted",
        "timeline--waiting",
        "timeline--done",
        "timeline--failed",
        "timeline--header",
    }
    DEFAULT_CSS = """
    Timeline {
        scrollbar-size: 1 1;
        .timeline--prefill { color: $warning; }
        .timeline--decode { color: $success; }
        .timeline--preempted { color: $error; text-style: bold; }
        .timeline--waiting { color: $text-muted; }
        .timeline--done { color: $success; text-style: bold; }
        .timeline--failed { color: $error; text-style: bold; }
        .timeline--header { color: $text-muted; }
    }
    """

    def __init__(self, **kw):
        super().__init__(**kw)
        self.state = RunState()
        self.rows: list = []  # RequestState in arrival order
        self.follow = True
        self._cache: LRUCache = LRUCache(1024)
        self._label_w = 4
        self.zoom = 1  # cells per step
        self.total_steps = 0  # a replay's length, when known: the zoom fits the whole run

    def show(self, state: RunState):
        """Point the timeline at a new state (called at most once per frame)."""
        if state is not self.state:  # a replay rebuilt from the start: rows may differ
            self._cache.clear()
        if state is not self.state or len(self.rows) != len(state.requests):
            self.rows = list(state.requests.values())  # requests only ever join, in arrival order
        self.state = state
        self._label_w = min(MAX_LABEL_W, max(5, state.longest_id + 2))
        # a short run gets wider columns (up to 3 cells a step); a replay sizes them for its whole length
        avail = max(1, self.scrollable_content_region.width - self._label_w)
        self.zoom = max(1, min(3, avail // (max(self.total_steps, state.num_steps) + 1)))
        self.virtual_size = Size(self._label_w + (state.num_steps + 1) * self.zoom, len(self.rows) + 1)
        if self.follow:
            self._scroll_to_now()
        self.refresh()

    def on_resize(self, _):
        self.show(self.state)

    def _scroll_to_now(self, again: bool = True):
        """The newest step at the right edge, the oldest unfinished request at the top."""
        live = [r.index for r in self.state.live.values()]
        y = min(min(live, default=len(self.rows)), self.max_scroll_y)
        self.scroll_to(self.max_scroll_x, y, animate=False, immediate=True, force=True)
        if again:  # scrollbars that appear with this frame shrink the view: follow once more after layout
            self.call_after_refresh(lambda: self.follow and self._scroll_to_now(again=False))

    def set_follow(self, follow: bool):
        self.follow = follow
        if follow:
            self._scroll_to_now()

    def on_mouse_scroll_up(self, _):
        self.follow = False

    def on_mouse_scroll_down(self, _):
        self.follow = False

    def on_mouse_scroll_left(self, _):
        self.follow = False

    def on_mouse_scroll_right(self, _):
        self.follow = False

    def notify_style_update(self):
        super().notify_style_update()
        self._cache.clear()

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        n = max(0, width - self._label_w)  # cells for steps
        z = self.zoom
        view = (scroll_x, n, z)
        if y == 0:  # the step ruler stays put
            key = ("ruler", view, self.state.num_steps, self._label_w)
        else:
            i = scroll_y + y - 1
            if i >= len(self.rows):
                return Strip.blank(width, self.style())
            r = self.rows[i]
            queued = self.state.num_steps if r.status == "waiting" else -1  # its cells are implicit
            key = (i, r.id, view, len(r.cells), r.finish_step, r.reason, queued, self._label_w)
        strip = self._cache.get(key)
        if strip is None:
            first, skip = divmod(scroll_x, z)
            nsteps = -(-(n + skip) // z)
            body = self._ruler(first, nsteps) if y == 0 else self._row(self.rows[scroll_y + y - 1], first, nsteps)
            label = self._label(None if y == 0 else self.rows[scroll_y + y - 1])
            strip = Strip.join([label, body.crop(skip, skip + n)]).adjust_cell_length(width, self.style())
            self._cache[key] = strip
        return strip

    def _label(self, r) -> Strip:
        if r is None:
            return Strip([Segment("step".ljust(self._label_w), self.style("timeline--header"))])
        w = self._label_w - 2
        label = r.id if len(r.id) <= w else r.id[: w - 1] + "…"  # a long id must not push the steps away
        return Strip([Segment(f"{label:>{w}}  ", self.request_style(r.index, bold=True))])

    def _ruler(self, first: int, nsteps: int) -> Strip:
        z = self.zoom
        line = [" "] * (nsteps * z)
        every = 10 if z < 3 else 5
        for s in range(first - first % every, min(first + nsteps, self.state.num_steps), every):
            for k, ch in enumerate(str(s)):
                if 0 <= (s - first) * z + k < len(line):
                    line[(s - first) * z + k] = ch
        return Strip([Segment("".join(line), self.style("timeline--header"))])

    def _row(self, r, first: int, nsteps: int) -> Strip:
        """Cells of steps first .. first + nsteps - 1, `zoom` cells each."""
        base, z = self.style(), self.zoom
        lo = first - r.first_step  # index into r.cells of the first step shown
        chunk = bytes(max(0, -lo)) + bytes(r.cells[max(0, lo) : max(0, lo + nsteps)])
        if r.status == "waiting":  # still queued: waiting up to the newest step
            chunk += bytes([Cell.WAITING]) * max(0, min(nsteps, self.state.num_steps - first) - len(chunk))
        chunk = chunk[:nsteps]
        segs = []
        for m in _RUNS.finditer(chunk):
            code = chunk[m.start()]
            segs.append(
                Segment(GLYPHS[code] * ((m.end() - m.start()) * z), self.style(CLASSES[code]) if code else base)
            )
        if r.finish_step is not None and first <= r.finish_step < first + nsteps:
            pad = r.finish_step - first - len(chunk)
            if pad >= 0:
                ok = r.reason in ("stop", "length")
                mark = self.style("timeline--done" if ok else "timeline--failed")
                segs += [Segment(" " * (pad * z), base), Segment("✓" if ok else "✗", mark)]
        return Strip(segs)
