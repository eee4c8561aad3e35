"""The help screen (?): the keys, and how to read each panel."""

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from nanoserve_viz.live import LIVE_SPEED
from nanoserve_viz.widgets.kv_pages import LEGEND as KV_LEGEND
from nanoserve_viz.widgets.timeline import LEGEND as TIMELINE_LEGEND

TITLE = "nanoserve viz — one engine step at a time"
CLOSE = "esc, ? or q closes this help"
HELP = f"""\
[b]Keys[/b]
  space  pause / resume        n  one step (pauses first)
  + / -  faster / slower       f  follow the newest step
  s      screenshot (SVG)      d  dark / light theme
  ?      this help             q  quit (or ctrl+c)
  replay, or a live run once it ended: b or ← one step back, → on,
  home / end the first / last step, space plays it again
  A live run opens at {LIVE_SPEED} steps/s, a pace to follow (--viz-speed N; inf: max)

[b]Timeline[/b]  a column per step, a row per request (its colour everywhere)
  {TIMELINE_LEGEND}
  Prefill chunks and decodes share a step: the scheduler hands out tokens,
  not phases. After a preemption the request recomputes (prefill again).

[b]KV pages[/b]  the pool; a page holds K and V of block_size tokens
  {KV_LEGEND}
  Shared pages are prefix-cache hits. Cached-free pages are free, but keep
  their contents: a later hit revives them, an allocation may evict them.
  A pool too large for the panel shows the pages used so far; the rest are free.

[b]CPU vs device[/b]  the last few steps on one time axis
  [#4c8dff]█[/] schedule  [#b07cd8]█[/] prepare  [#1fb5c4]█[/] update   (CPU)
  [$success]█[/] forward  [#e0a030]█[/] sample   [$error]░[/] idle     (device)
  ▄ short: spans cover under half the column (its colour: the longest one)
  ┊ where the viewer held the engine (paused, paced): cut out of the axis
  With --sched sync the device waits while the CPU schedules and updates;
  --sched async plans step i+1 while the device runs step i: gaps close.

[b]Queues & metrics[/b]  so far, the summary's numbers by the summary's code;
  at any pace: time the viewer held the engine is not counted."""


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: auto; max-width: 100%; height: auto; max-height: 100%;
        border: round $primary; background: $surface; padding: 0 1;
    }
    HelpScreen Static { width: auto; }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll() as box:
            box.border_title, box.border_subtitle = TITLE, CLOSE
            yield Static(HELP)
