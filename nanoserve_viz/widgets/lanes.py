"""CPU vs device: what each was doing over the last few steps, on one time axis.

The CPU lane shows the engine thread's schedule / prepare / update spans, the device lane its forward
and sample; ░ marks the device sitting idle, the gap a better scheduler closes. A column is drawn █
in the colour of the span that covers most of it, ▄ when spans cover less than half of it (a short
CPU span stays visible). The title gives the device's busy share of the window. Time the viewer held
the engine (paused, paced) with the device idle is cut out and marked ┊, so a slowed-down run shows
the engine's own gaps.
"""

from rich.segment import Segment
from textual.strip import Strip
from textual.widget import Widget

from nanoserve_viz.state import RunState, SpanList
from nanoserve_viz.trace import EngineClock
from nanoserve_viz.widgets.styled import CachedStyles

LABEL_W = 8
COLUMNS_PER_STEP = 12  # how many steps fit: the window is the last width / 12 steps
NAME_CLASSES = {
    "schedule": "lanes--schedule",
    "prepare": "lanes--prepare",
    "update": "lanes--update",
    "forward": "lanes--forward",
    "sample": "lanes--sample",
}
LEGEND = (
    "[$error]░[/]idle [$success]█[/]forward [#e0a030]█[/]sample "
    "[#4c8dff]█[/]schedule [#b07cd8]█[/]prepare [#1fb5c4]█[/]update ▄short"
)


class Axis:
    """The window's time axis: `width` columns from t0 to t1 on the engine's clock (holds cut out)."""

    def __init__(self, clock: EngineClock, t0: float, t1: float, width: int):
        self.clock, self.t0, self.t1, self.width = clock, t0, t1, width
        self.a0 = clock.active(t0)
        self.seconds = max(clock.active(t1) - self.a0, 1e-12)  # the window's length, engine time

    def col(self, t: float) -> float:
        """Time t as a fractional column."""
        return (self.clock.active(t) - self.a0) / self.seconds * self.width

    def cell(self, t: float) -> int:
        """The column time t falls in, kept on the axis."""
        return min(self.width - 1, max(0, int(self.col(t))))


class Lanes(CachedStyles, Widget, can_focus=False):
    COMPONENT_CLASSES = {*NAME_CLASSES.values(), "lanes--other", "lanes--idle", "lanes--label", "lanes--cut"}
    DEFAULT_CSS = """
    Lanes {
        .lanes--schedule { color: #4c8dff; }
        .lanes--prepare { color: #b07cd8; }
        .lanes--update { color: #1fb5c4; }
        .lanes--forward { color: $success; }
        .lanes--sample { color: #e0a030; }
        .lanes--other { color: $foreground; }
        .lanes--idle { color: $error; }
        .lanes--label { color: $text-muted; }
        .lanes--cut { color: $text-muted; }
    }
    """

    def __init__(self, **kw):
        super().__init__(**kw)
        self.state = RunState()
        self.rows: list[Strip] = []
        self.busy_frac: float | None = None  # the device's busy share of the window shown
        self.window_steps = 0
        self.window_ms = 0.0
        self._stale = False

    def show(self, state: RunState):
        self.state = state
        self._layout()
        self.refresh()

    def on_resize(self, _):
        self._layout()

    def notify_style_update(self):
        super().notify_style_update()
        self._stale = True  # new theme colours: lay out again at the next render (styles may not exist yet)
        self.refresh()

    def render_line(self, y: int) -> Strip:
        if self._stale:
            self._stale = False
            self._layout()
        if y < len(self.rows):
            return self.rows[y]
        return Strip.blank(self.size.width, self.style())

    # --- laying out the rows ----------------------------------------------------------------------

    def _layout(self):
        """Draw every row: the step ruler, then a row per lane; and the title's numbers."""
        width, lane_rows = self.size.width, self._lane_rows()
        if self.styles.height is None or self.styles.height.value != len(lane_rows) + 3:
            self.styles.height = len(lane_rows) + 3  # the ruler, the lanes, two border lines
        labels = [self._label(s) for s in ["step"] + [label for _, label in lane_rows]]
        win = self._window(max(1, width - LABEL_W))
        self.busy_frac, self.window_steps, self.window_ms = None, 0, 0.0
        if win is None:  # before the first step: the labels alone
            rows = [[label] for label in labels]
        else:
            first, axis = win
            cuts = self._cut_columns(axis)
            rows = [[labels[0], self._ruler(first, axis, cuts)]]
            rows += [[label, *self._lane(lane, axis, cuts)] for (lane, _), label in zip(lane_rows, labels[1:])]
            self._measure(first, axis, lane_rows)
        self.rows = [Strip(r).adjust_cell_length(width, self.style()) for r in rows]
        self._title()

    def _lane_rows(self) -> list[tuple[str, str]]:
        """(lane, label) of each row under the ruler: the CPU, then the device or its pipeline stages."""
        devices = self.state.device_lanes()
        if devices == ["device"]:
            return [("cpu", "cpu"), ("device", "device")]
        return [("cpu", "cpu")] + [(d, "stage " + d.rsplit("/", 1)[-1]) for d in devices]

    def _label(self, text: str) -> Segment:
        return Segment(text.ljust(LABEL_W)[:LABEL_W], self.style("lanes--label"))

    def _window(self, width: int) -> tuple[int, Axis] | None:
        """(first step, the axis) of the window: the last steps that fit; None before the first step."""
        st = self.state
        if not st.num_steps:
            return None
        first = max(0, st.num_steps - max(1, width // COLUMNS_PER_STEP))
        scheduled = st.steps_by_number.get(first)
        t_begin = st.step_started.get(first, scheduled.t if scheduled else None)
        if t_begin is None or st.t_now <= t_begin:
            return None
        return first, Axis(st.clock, t_begin, st.t_now, width)

    def _cut_columns(self, axis: Axis) -> set[int]:
        """Columns where a hold of the viewer was cut out of the axis."""
        return {axis.cell(max(start, axis.t0)) for start, cut in self.state.clock.holds_in(axis.t0, axis.t1) if cut}

    def _ruler(self, first: int, axis: Axis, cuts: set[int]) -> Segment:
        """Step numbers where each step's schedule span begins, ┊ at the cuts."""
        ruler, free_from = [" "] * axis.width, 0
        for s in range(first, self.state.num_steps):
            t = self.state.step_started.get(s)
            if t is None or t < axis.t0:
                continue
            x, label = int(axis.col(t)), str(s)
            if x >= free_from and x + len(label) <= axis.width:
                ruler[x : x + len(label)] = label
                free_from = x + len(label) + 1
        for c in cuts:
            if ruler[c] == " ":
                ruler[c] = "┊"
        return Segment("".join(ruler), self.style("lanes--label"))

    def _lane(self, lane: str, axis: Axis, cuts: set[int]) -> list[Segment]:
        """One lane's row: per column the span covering most of it, idle (device), or a cut."""
        spans = self.state.lanes.get(lane)
        if lane != "cpu" and not spans:  # e.g. a trace whose device spans were not recorded
            return [Segment("(no device spans in this trace)", self.style("lanes--label"))]
        cells = []
        for c, cov in enumerate(_coverage(spans or SpanList(), axis)):
            if cov:  # mostly busy: a full block; a sliver: half, so short CPU spans stay visible
                name = max(cov, key=cov.get)
                cells.append(("█" if sum(cov.values()) >= 0.5 else "▄", NAME_CLASSES.get(name, "lanes--other")))
            elif c in cuts:
                cells.append(("┊", "lanes--cut"))
            else:
                cells.append(("░", "lanes--idle") if lane != "cpu" else (" ", None))
        return self._segments(cells)

    def _segments(self, cells: list[tuple[str, str | None]]) -> list[Segment]:
        """(glyph, component class) per column, as one Segment per run of a class."""
        segs, run, run_cls = [], "", None
        for glyph, cls in cells + [("", "end")]:
            if cls != run_cls and run:
                segs.append(Segment(run, self.style(run_cls) if run_cls else self.style()))
                run = ""
            run_cls = cls
            run += glyph
        return segs

    def _measure(self, first: int, axis: Axis, lane_rows):
        st = self.state
        has_device = any(len(st.lanes.get(lane, ())) for lane, _ in lane_rows[1:])
        self.busy_frac = min(1.0, st.device_busy(axis.t0, axis.t1) / axis.seconds) if has_device else None
        self.window_steps = st.num_steps - first
        self.window_ms = axis.seconds * 1e3

    def _title(self):
        if self.busy_frac is None:
            self.border_title = "CPU vs device" + (f" · {self.window_steps} steps" if self.window_steps else "")
        else:
            self.border_title = (
                f"CPU vs device · device busy {100 * self.busy_frac:.0f}% · "
                f"{self.window_steps} steps · {self.window_ms:.0f} ms"
            )
        self.border_subtitle = LEGEND


def _coverage(spans: SpanList, axis: Axis) -> list[dict[str, float]]:
    """Per column of the axis: span name -> how much of the column (0..1) its spans cover."""
    cover = [{} for _ in range(axis.width)]
    for i in spans.window(axis.t0, axis.t1):
        s, e = max(spans.starts[i], axis.t0), min(spans.ends[i], axis.t1)
        if e <= s:
            continue
        x0, x1 = axis.col(s), axis.col(e)
        for c in range(max(0, int(x0)), min(int(x1), axis.width - 1) + 1):
            part = min(x1, c + 1) - max(x0, c)
            if part > 0:
                name = spans.names[i]
                cover[c][name] = cover[c].get(name, 0.0) + part
    return cover
