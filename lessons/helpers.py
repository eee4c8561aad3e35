"""What the lessons share: the repository root on `sys.path`, figures that show in a notebook and are
saved as PNG files when a lesson runs as a plain script, and three drawings of a recorded run.

    from helpers import ROOT, show

The drawings read the engine's own trace events through `nanoserve_viz.state.RunState`, the model the
terminal visualizer draws from, so a plot here and the visualizer always agree.
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # `sched`, `kernels` and `viz` are top-level packages of the checkout; `sched` must win over the
    # standard library's module of the same name, so the checkout goes first
    sys.path.insert(0, str(ROOT))

import matplotlib

IN_NOTEBOOK = "ipykernel" in sys.modules
if not IN_NOTEBOOK:
    matplotlib.use("Agg")  # a plain script saves its figures instead of opening windows

import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from nanoserve_viz.colors import request_color
from nanoserve_viz.state import Cell, RunState

FIGURES = Path(tempfile.gettempdir()) / "nanoserve-lessons"  # where a plain script's figures go


def show(fig, name: str):
    """Show a matplotlib figure inline in a notebook; as a script, save it as FIGURES/name.png."""
    if IN_NOTEBOOK:
        plt.show()
        return
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"[figure saved to {path}]")


def show_svg(svg: str, name: str):
    """Show an SVG image inline in a notebook; as a script, save it as FIGURES/name.svg."""
    if IN_NOTEBOOK:
        from IPython.display import SVG, display

        display(SVG(svg))
        return
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / f"{name}.svg"
    path.write_text(svg)
    print(f"[image saved to {path}: open it in a browser]")


# --- drawings of a run ------------------------------------------------------------------------

CELL_COLORS = {
    Cell.WAITING: "#e5e7eb",
    Cell.IDLE: "#cbd5e1",
    Cell.PREFILL: "#f59e0b",
    Cell.DECODE: "#16a34a",
    Cell.PREEMPTED: "#dc2626",
}
CELL_NAMES = {Cell.WAITING: "waiting", Cell.IDLE: "running, no tokens", Cell.PREFILL: "prefill chunk"}
CELL_NAMES |= {Cell.DECODE: "decode", Cell.PREEMPTED: "preempted"}


def plot_timeline(ax, events, title="timeline"):
    """The visualizer's timeline: one row per request, one column per step, coloured by what it did."""
    state = RunState()
    state.apply_all(events)
    rows = list(state.requests.values())
    for y, req in enumerate(rows):
        for step in range(state.num_steps):
            cell = req.cell(step, state.num_steps)
            if cell != Cell.NONE:
                ax.add_patch(plt.Rectangle((step - 0.45, y - 0.4), 0.9, 0.8, color=CELL_COLORS[cell], lw=0))
    ax.set_xlim(-0.6, state.num_steps - 0.4)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yticks(range(len(rows)), [f"req {r.id}" for r in rows])
    ax.set_xlabel("engine step")
    ax.set_title(title)
    ax.legend(
        handles=[Patch(color=CELL_COLORS[c], label=n) for c, n in CELL_NAMES.items()],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize="small",
    )
    return state


def plot_lanes(ax, events, t0=None, t1=None, title="CPU and device lanes"):
    """CPU spans (schedule, prepare, update) and device spans (forward, sample) on a time axis, in ms.

    The white gaps in a device lane are the time the device sat idle."""
    from nanoserve_viz.trace import Span

    spans = [e for e in events if isinstance(e, Span) and e.lane != "viewer"]
    lanes = sorted({s.lane for s in spans}, key=lambda n: (n != "cpu", n))
    start = min(s.t for s in spans) if t0 is None else t0
    end = max(s.end for s in spans) if t1 is None else t1
    colors = {"schedule": "#6366f1", "prepare": "#0891b2", "update": "#a855f7", "forward": "#16a34a"}
    colors["sample"] = "#65a30d"
    for y, lane in enumerate(lanes):
        for s in spans:
            if s.lane == lane and s.end > start and s.t < end:
                a, b = (max(s.t, start) - start) * 1e3, (min(s.end, end) - start) * 1e3
                ax.broken_barh([(a, b - a)], (y - 0.35, 0.7), color=colors.get(s.name, "grey"))
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, (end - start) * 1e3)
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    ax.legend(
        handles=[Patch(color=c, label=n) for n, c in colors.items()],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize="small",
    )


def plot_pages(ax, owners, cached=(), columns=16, title="KV pages", request_ids=None):
    """The page pool as a grid. `owners[p]` is the tuple of requests holding page p: one colour per
    request, hatched when several share it; cached-free pages (no owner, still named) are outlined.
    `request_ids` fixes the colours (the i-th id gets colour i), to keep them across several plots."""
    present = {o for os in owners for o in os}
    order = list(request_ids or sorted(present, key=lambda r: (len(r), r)))
    color = {r: request_color(i) for i, r in enumerate(order)}
    names = [r for r in order if r in present]
    rows = -(-len(owners) // columns)
    shared_color = "#334155"
    for p, os in enumerate(owners):
        x, y = p % columns, p // columns
        if len(os) > 1:
            face, edge, hatch = shared_color, "white", "//"
        elif os:
            face, edge, hatch = color[os[0]], "white", None
        else:
            face, edge, hatch = ("white", "black", None) if p in cached else ("#f3f4f6", "white", None)
        ax.add_patch(plt.Rectangle((x, y), 0.92, 0.92, facecolor=face, edgecolor=edge, hatch=hatch, lw=0.8))
        label = f"{p}" if len(os) < 2 else f"{p}\n×{len(os)}"
        ax.text(x + 0.46, y + 0.46, label, ha="center", va="center", fontsize=7, color="white" if os else "grey")
    ax.set_xlim(-0.1, columns)
    ax.set_ylim(rows, -0.1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title)
    handles = [Patch(color=color[r], label=f"req {r}") for r in names]
    if any(len(os) > 1 for os in owners):
        handles.append(Patch(facecolor=shared_color, edgecolor="white", hatch="//", label="shared (×owners)"))
    if cached:
        handles.append(Patch(facecolor="white", edgecolor="black", label="cached-free"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
