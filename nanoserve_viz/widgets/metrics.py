"""Queues and metrics so far: running / waiting / finished requests, output tokens/s, TTFT, TPOT,
device busy share, preemptions. The numbers are `nanoserve_viz.trace.compute_metrics`'s, computed by the same
code as the summary the engine prints at the end (RunState.metrics), on the engine's clock: the time
the viewer held the engine is shown apart and counted nowhere else."""

from rich.text import Text
from textual.widgets import Static

from nanoserve_viz.colors import request_style
from nanoserve_viz.state import RunState


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


def _num(x, fmt: str, known: bool = True) -> str:
    return format(x, fmt) if known else "–"


class Metrics(Static, can_focus=False):
    state: RunState | None = None

    def on_resize(self, _):
        if self.state is not None:
            self.show(self.state)

    def show(self, state: RunState):
        self.state = state
        t = Text(no_wrap=True, overflow="ellipsis")
        self._queues(t, state, max(10, self.size.width))
        m = state.metrics()
        if m["num_errors"]:
            t.append(f"  {m['num_errors']} failed\n", "bold")
        has_device = any(len(state.lanes[n]) for n in state.device_lanes())
        stats = [
            ("out tok/s", _num(m["output_throughput"], ".1f", m["num_output_tokens"] > 0)),
            ("TTFT ms", _num(m["ttft_ms"]["mean"], ".1f", state.num_first_tokens > 0)),
            ("TPOT ms", _num(m["tpot_ms"]["mean"], ".2f", m["num_requests"] > 0)),
            ("dev. busy", _num(100 * m["device_busy_frac"], ".0f", has_device) + "%" * has_device),
            ("steps", f"{m['steps']}"),
            ("preempted", f"{m['preemptions']}"),
        ]
        for label, value in stats:
            t.append(f"{label:<10}", "dim")
            t.append(f"{value:>8}\n")
        if m["viewer_held_s"] > 0.0005:
            t.append(f"(held {m['viewer_held_s']:.1f} s, not counted)", "dim")
        t.rstrip()
        self.update(t)

    def _queues(self, t: Text, state: RunState, width: int):
        for label in ("running", "waiting", "finished"):
            reqs = state.with_status(label)
            t.append(f"{label:<9}{len(reqs):>4}", "bold")
            if reqs:
                t.append(" ·", "dim")
                t.append_text(_ids(reqs if label != "finished" else reqs[-8:][::-1], width - 15))
            t.append("\n")
