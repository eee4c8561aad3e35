"""Queues and metrics so far: running / waiting / finished requests, output tokens/s, TTFT, TPOT,
device busy share, preemptions. Computed by RunState.metrics() from the events, like the summary the
engine prints at the end (the viewer's pauses excluded)."""

from rich.text import Text
from textual.widgets import Static

from viz.colors import request_style
from viz.state import RunState


def _ids(reqs, width: int) -> Text:
    """Request ids in their colours, as many as fit in `width` cells, then +N."""
    out = Text()
    for k, r in enumerate(reqs):
        more = f" +{len(reqs) - k}"
        if out.cell_len + len(r.id) + 1 + (len(more) if k < len(reqs) - 1 else 0) > width:
            out.append(more, "dim")
            break
        out.append(" " + r.id, request_style(r.index))
    return out


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


class Metrics(Static, can_focus=False):
    state: RunState | None = None

    def on_resize(self, _):
        if self.state is not None:
            self.show(self.state)

    def show(self, state: RunState):
        self.state = state
        m = state.metrics()
        width = max(10, self.size.width)
        running, waiting = state.with_status("running"), state.with_status("waiting")
        finished = state.with_status("finished")
        t = Text(no_wrap=True, overflow="ellipsis")
        rows = [
            ("running", running),
            ("waiting", waiting),
            ("finished", finished),
        ]
        for label, reqs in rows:
            t.append(f"{label:<9}{len(reqs):>4}", "bold")
            if reqs:
                t.append(" ·", "dim")
                t.append_text(_ids(reqs if label != "finished" else reqs[-8:][::-1], width - 15))
            t.append("\n")
        if m["num_errors"]:
            t.append(f"  {m['num_errors']} failed\n", "bold")
        has_device = any(len(state.lanes[n]) for n in state.device_lanes())
        stats = [
            ("out tok/s", _num(m["output_throughput"] if m["num_output_tokens"] else None, ".1f")),
            ("TTFT ms", _num(m["ttft_ms"], ".1f")),
            ("TPOT ms", _num(m["tpot_ms"], ".2f")),
            ("dev. busy", f"{100 * m['device_busy_frac']:.0f}%" if has_device else "–"),
            ("steps", f"{m['steps']}"),
            ("preempted", f"{m['preemptions']}"),
        ]
        for label, value in stats:
            t.append(f"{label:<10}", "dim")
            t.append(f"{value:>8}\n")
        if m["paused_s"] > 0.0005:
            t.append(f"(held {m['paused_s']:.1f} s, not counted)", "dim")
        t.rstrip()
        self.update(t)
