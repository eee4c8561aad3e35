"""CPU vs device: what each was doing over the last few steps, on one time axis.

The CPU lane shows the engine thread's schedule / prepare / update spans, the device lane its forward
and sample; ░ marks the device sitting idle, the gap a better scheduler closes. The title gives the
device's busy share of the window. Time the viewer held the engine (paused, paced) with the device
idle is cut out and marked ┊, so a slowed-down run shows the engine's own gaps.
"""

from rich.segment import Segment
from textual.strip import Strip
from textual.widget import Widget

from viz.state import VIEWER_LANE, RunState
from viz.widgets.styled import CachedStyles

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
    "[#4c8dff]█[/]schedule [#b07cd8]█[/]prepare [#1fb5c4]█[/]update"
)


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

    def _window(self, width: int):
        """(first step, t_begin, t_end) of the window, or None before the first step."""
        st = self.state
        if not st.num_steps:
            return None
        first = max(0, st.num_steps - max(1, width // COLUMNS_PER_STEP))
        t_begin = st.step_started.get(first, st.steps_by_number[first].t if first in st.steps_by_number else None)
        if t_begin is None or st.t_now <= t_begin:
            return None
        return first, t_begin, st.t_now

    def _lane_rows(self) -> list[tuple[str, str]]:
        """(lane, label) of each row under the ruler: the CPU, then the device or its pipeline stages."""
        devices = self.state.device_lanes()
        if devices == ["device"]:
            return [("cpu", "cpu"), ("device", "device")]
        return [("cpu", "cpu")] + [(d, "stage " + d.rsplit("/", 1)[-1]) for d in devices]

    def _layout(self):
        st, base, style = self.state, self.style(), self.style
        width = self.size.width
        W = max(1, width - LABEL_W)
        lane_rows = self._lane_rows()
        if self.styles.height is None or self.styles.height.value != len(lane_rows) + 3:
            self.styles.height = len(lane_rows) + 3  # the ruler, the lanes, two border lines
        labels = [
            Segment(s.ljust(LABEL_W)[:LABEL_W], style("lanes--label")) for s in ["step"] + [lb for _, lb in lane_rows]
        ]
        win = self._window(W)
        if win is None:
            self.rows = [Strip([lab]).adjust_cell_length(width, base) for lab in labels]
            self.busy_frac, self.window_steps, self.window_ms = None, 0, 0.0
            self._title()
            return
        first, t0, t1 = win
        a0 = st.active(t0)
        span = max(st.active(t1) - a0, 1e-12)
        dt = span / W
        col = lambda t: (st.active(t) - a0) / dt  # time -> fractional column

        cuts = set()  # columns where the viewer's hold was cut out of the axis
        pace = st.lanes[VIEWER_LANE]
        for i in pace.window(t0, t1):
            if st._pause_cut(i) > 0:
                cuts.add(min(W - 1, max(0, int(col(max(pace.starts[i], t0))))))

        ruler = [" "] * W
        free_from = 0
        for s in range(first, st.num_steps):
            t = st.step_started.get(s)
            if t is None or t < t0:
                continue
            x, label = int(col(t)), str(s)
            if x >= free_from and x + len(label) <= W:
                ruler[x : x + len(label)] = label
                free_from = x + len(label) + 1
        for c in cuts:
            if ruler[c] == " ":
                ruler[c] = "┊"
        rows = [[labels[0], Segment("".join(ruler), style("lanes--label"))]]

        for (lane, _), label in zip(lane_rows, labels[1:]):
            spans = st.lanes.get(lane)
            if lane != "cpu" and not spans:  # e.g. a trace whose device spans were not recorded
                rows.append([label, Segment("(no device spans in this trace)", style("lanes--label"))])
                continue
            cover = [dict() for _ in range(W)]  # per column: span name -> how much of the column it covers
            for i in spans.window(t0, t1):
                s, e = max(spans.starts[i], t0), min(spans.ends[i], t1)
                if e <= s:
                    continue
                x0, x1 = col(s), col(e)
                for c in range(int(x0), min(int(x1), W - 1) + 1):
                    part = min(x1, c + 1) - max(x0, c)
                    if part > 0:
                        name = spans.names[i]
                        cover[c][name] = cover[c].get(name, 0.0) + part
            segs, cells = [label], []
            for c, cov in enumerate(cover):
                total = sum(cov.values())
                if total > 0:  # mostly busy: a full block; a sliver (short CPU spans stay visible): half
                    name = max(cov, key=cov.get)
                    cells.append(("█" if total >= 0.5 else "▄", NAME_CLASSES.get(name, "lanes--other")))
                elif c in cuts:
                    cells.append(("┊", "lanes--cut"))
                elif lane != "cpu":
                    cells.append(("░", "lanes--idle"))
                else:
                    cells.append((" ", None))
            run, run_cls = "", None
            for glyph, cls in cells + [("", "end")]:
                if cls != run_cls and run:
                    segs.append(Segment(run, style(run_cls) if run_cls else base))
                    run = ""
                run_cls = cls
                run += glyph
            rows.append(segs)

        has_device = any(len(st.lanes.get(lane, ())) for lane, _ in lane_rows[1:])
        self.busy_frac = min(1.0, st.device_busy(t0, t1) / span) if has_device else None
        self.window_steps = st.num_steps - first
        self.window_ms = span * 1e3
        self.rows = [Strip(r).adjust_cell_length(width, base) for r in rows]
        self._title()

    def _title(self):
        if self.busy_frac is None:
            self.border_title = "CPU vs device" + (f" · {self.window_steps} steps" if self.window_steps else "")
        else:
            self.border_title = (
                f"CPU vs device · device busy {100 * self.busy_frac:.0f}% · "
                f"{self.window_steps} steps · {self.window_ms:.0f} ms"
            )
        self.border_subtitle = LEGEND
