"""Snapshot tests of the visualizer (pytest-textual-snapshot): the whole app at 80x24 and 200x50, the
light theme, the help screen, and each panel alone at a fixed size (the KV pages also in a pool of 4096
pages, zoomed to the ones in use), all replaying the committed
fixture log tests/viz_run.jsonl (fixed timestamps) at a step with preemptions, shared pages and
device gaps in view.

After an intended change of the look: `pytest tests/test_viz_snapshots.py --snapshot-update`, then
look at the SVGs under tests/__snapshots__/ (or the HTML report pytest writes on failure).
"""

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("textual", reason="the snapshot tests need Textual: pip install -e '.[dev]'")
pytest.importorskip("pytest_textual_snapshot", reason="the snapshot tests need the dev extra")
from textual.app import App  # noqa: E402

from nanoserve_viz.app import VizApp
from nanoserve_viz.replay import Replay
from nanoserve_viz.trace import read_jsonl
from nanoserve_viz.widgets.kv_pages import KVPages
from nanoserve_viz.widgets.lanes import Lanes
from nanoserve_viz.widgets.metrics import Metrics
from nanoserve_viz.widgets.timeline import Timeline

FIXTURE = Path(__file__).parent / "viz_run.jsonl"
AT = 19  # the step shown: request 8 just preempted, two pages shared, two cached-free


def replay_app(**kw) -> VizApp:
    return VizApp(events=read_jsonl(FIXTURE), name="viz_run.jsonl", paused=True, at=AT, **kw)


def test_app_80x24(snap_compare):
    assert snap_compare(replay_app(), terminal_size=(80, 24))


def test_app_200x50(snap_compare):
    assert snap_compare(replay_app(), terminal_size=(200, 50))


def test_app_light_theme_end_of_run(snap_compare):
    app = VizApp(events=read_jsonl(FIXTURE), name="viz_run.jsonl", paused=True, at="end")

    def light(pilot):
        pilot.app.theme = "textual-light"

    assert snap_compare(app, terminal_size=(120, 32), run_before=light)


def test_help_screen(snap_compare):
    assert snap_compare(replay_app(), terminal_size=(110, 36), press=["question_mark"])


class PanelApp(App):
    """One panel alone, bordered as in the app, showing the fixture at step AT (in a pool of `num_blocks`)."""

    CSS = "#panel { border: round $primary; height: 1fr; }"

    def __init__(self, panel, num_blocks: int | None = None):
        super().__init__()
        self.panel = panel(id="panel")
        self.num_blocks = num_blocks

    def compose(self):
        yield self.panel

    def on_mount(self):
        events = read_jsonl(FIXTURE)
        if self.num_blocks:
            events[0] = dataclasses.replace(events[0], num_blocks=self.num_blocks)
        replay = Replay(events)
        if isinstance(self.panel, Timeline):
            self.panel.total_steps = replay.num_steps
        self.panel.show(replay.seek(AT))


@pytest.mark.parametrize(
    "panel, size",
    [(Timeline, (60, 14)), (KVPages, (34, 7)), (Lanes, (90, 5)), (Metrics, (32, 11))],
    ids=["timeline", "kv_pages", "lanes", "metrics"],
)
def test_panel(snap_compare, panel, size):
    assert snap_compare(PanelApp(panel), terminal_size=size)


def test_kv_pages_of_a_large_pool_zoom_to_the_pages_in_use(snap_compare):
    assert snap_compare(PanelApp(KVPages, num_blocks=4096), terminal_size=(34, 8))
