"""The nanoserve visualizer: a Textual app showing a run step by step, live or replayed.

    python nanoserve.py --sched sync --viz        # live: the engine runs in a worker thread
    python -m nanoserve_viz run.jsonl                       # replay a step log written with --trace run.jsonl

Both modes feed the same recorded events into one RunState (nanoserve_viz/state.py), which the panels draw:
the scheduler timeline, the KV page pool, CPU vs device lanes, queues and metrics. Live, the engine's
worker posts an immutable Progress after every step (a newer one replaces a queued older one) and the
UI redraws on a timer, at most `fps` times a second; the engine never waits for the UI.

What a key does is the controller's (nanoserve_viz/control.py): LiveControl while the engine runs, ReplayControl
for a log, and for a live run once it has ended; each action below is one call to it.
"""

from pathlib import Path

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer

from nanoserve_viz.control import END, UI_CPU_SHARE, LiveControl, ReplayControl
from nanoserve_viz.messages import EngineProgress
from nanoserve_viz.replay import Replay
from nanoserve_viz.state import RunState
from nanoserve_viz.widgets.error import ErrorScreen
from nanoserve_viz.widgets.help import HelpScreen
from nanoserve_viz.widgets.kv_pages import KVPages
from nanoserve_viz.widgets.lanes import Lanes
from nanoserve_viz.widgets.metrics import Metrics
from nanoserve_viz.widgets.status import StatusBar
from nanoserve_viz.widgets.timeline import LEGEND as TIMELINE_LEGEND
from nanoserve_viz.widgets.timeline import Timeline


class VizApp(App):
    """Give it `llm` (live: requests already added, the app drives `llm.run()`) or `events` (replay).

    `speed` in steps/s: live, None opens at a pace a person can follow (nanoserve_viz.live.LIVE_SPEED) and
    math.inf runs as fast as the engine can; a replay plays at 20 steps/s unless told otherwise.
    A live run that has ended can be explored like a replay: step back, jump to the start, play it again.
    """

    CSS_PATH = "app.tcss"
    TITLE = "nanoserve viz"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("space", "toggle_pause", "pause"),
        Binding("n,right", "step", "step", key_display="n/→", priority=True),
        Binding("left,b", "back", "back", key_display="←/b", priority=True),  # shown where one can go back
        Binding("home,g", "seek_start", "start", show=False),
        Binding("end,G", "seek_end", "end", show=False),
        Binding("plus,equals_sign", "faster", "faster", key_display="+"),
        Binding("minus,underscore", "slower", "slower", key_display="-"),
        Binding("f", "follow", "follow", show=False),
        Binding("s", "screenshot", "shot"),
        Binding("d", "toggle_dark", "theme", show=False),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
    ]

    def __init__(
        self,
        llm=None,
        events: list | None = None,
        *,
        name: str = "",
        speed: float | None = None,
        paused: bool = False,
        at: str | int = "start",
        exit_when_done: bool = False,
        steps=None,  # live: the engine loop to drive (default llm.run(); a server's never ends)
        fps: float = 30,
        ui_cpu_share: float = UI_CPU_SHARE,
        screenshot_dir: str | Path = ".",
    ):
        super().__init__()
        if (llm is None) == (events is None):
            raise ValueError("VizApp needs either llm (live) or events (replay)")
        self.fps = fps
        self.exit_when_done = exit_when_done
        self.screenshot_dir = Path(screenshot_dir)
        self.mode = "live" if llm is not None else f"replay {name}".rstrip()
        self.driver = None  # live: the engine's driver, which run_live asks how the run went
        if llm is not None:
            post = lambda progress: self.post_message(EngineProgress(progress))
            self.control = LiveControl(llm, post, speed=speed, paused=paused, ui_cpu_share=ui_cpu_share, steps=steps)
            self.driver = self.control.driver
        else:
            replay = Replay(events)
            frame = END if at == "end" else 0 if at == "start" else int(at)
            self.control = ReplayControl(replay, speed=speed, playing=not paused, at=frame)
        self._shown = None  # what was drawn last: (state, version, play label)

    @property
    def state(self) -> RunState:
        return self.control.state

    # --- layout -----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield Timeline(id="timeline")
                yield Lanes(id="lanes")
            with Vertical(id="right"):
                yield Metrics(id="metrics")
                yield KVPages(id="kv")
        yield Footer()

    def on_mount(self):
        timeline = self.query_one(Timeline)
        timeline.border_title, timeline.border_subtitle = "Timeline: steps →, requests ↓", TIMELINE_LEGEND
        timeline.total_steps = self.control.total_steps
        self.query_one(Metrics).border_title = "Queues & metrics"
        self.query_one(KVPages).border_title = "KV pages"
        self._draw()
        self.set_interval(1 / self.fps, self._tick)
        if self.driver is not None:
            self.run_worker(self.driver.run, name="engine", thread=True, exit_on_error=False)

    # --- the frame loop ---------------------------------------------------------------------------

    def on_engine_progress(self, message: EngineProgress):
        progress = message.progress
        self.control.report(progress)
        if not progress.done:
            return
        self.control = self.control.ended()  # a recorded run from here on: seek back, play it again
        self.refresh_bindings()
        self._draw()
        if self.exit_when_done:
            self.exit()
        elif progress.error:
            self.push_screen(ErrorScreen(progress.error))

    def _tick(self):
        if self.control.tick(1 / self.fps):
            self._draw()

    def _draw(self):
        key = (id(self.state), self.state.version, self.control.label)
        if key == self._shown:
            return
        self._shown = key
        for widget in (self.query_one(Timeline), self.query_one(Lanes), self.query_one(KVPages)):
            widget.show(self.state)
        self.query_one(Metrics).show(self.state)
        st, c = self.state, self.control
        done = f"{sum(r.finished for r in st.requests.values())}/{len(st.requests)} done"
        self.query_one(StatusBar).set_status(mode=self.mode, config=st.config, step=c.position, play=c.label, done=done)

    # --- keys: each one command of the controller, live or replay ---------------------------------

    def _do(self, command, *args):
        note = command(*args)
        if note:
            self.notify(note)
        self._draw()

    def check_action(self, action: str, parameters) -> bool:
        return action != "back" or self.control.can_seek  # the footer offers going back where one can

    def action_toggle_pause(self):
        self._do(self.control.toggle)

    def action_step(self):
        self._do(self.control.step, +1)

    def action_back(self):
        self._do(self.control.step, -1)

    def action_seek_start(self):
        self._do(self.control.seek, 0)

    def action_seek_end(self):
        self._do(self.control.seek, END)
        self.query_one(Timeline).set_follow(True)

    def action_faster(self):
        self._do(self.control.speed, +1)

    def action_slower(self):
        self._do(self.control.speed, -1)

    def action_follow(self):
        timeline = self.query_one(Timeline)
        timeline.set_follow(not timeline.follow)

    def action_screenshot(self):
        self.screenshot_dir.mkdir(parents=True, exist_ok=True)
        name = f"nanoserve-{self.mode.split()[0]}-step{self.state.num_steps}.svg"
        path = self.save_screenshot(name, str(self.screenshot_dir))
        self.notify(f"screenshot saved: {path}")

    def action_help(self):
        self.push_screen(HelpScreen())

    async def action_quit(self):
        self.control.stop()
        self.exit()

    def on_unmount(self):
        if self.driver is not None:
            self.driver.pacer.stop()  # however the app ends, a paused engine thread must not wait forever


def run_live(
    llm, *, speed: float | None = None, paused: bool = False, exit_when_done: bool = False, headless: bool = False, **kw
) -> bool:
    """Run `llm`'s queued requests under the live visualizer; returns True if the run finished.

    Call it after `llm.add_request(...)`, instead of iterating `llm.run()`: the app drives the engine in
    a thread worker, one step per `next()`, paced by `speed` (steps/s; None: LIVE_SPEED, a pace a person
    can follow; math.inf: full speed) and the keys. The metrics are the engine's whatever the pace: the
    time the viewer held the engine is not counted. Returns when the user quits (q or ctrl+c) or, with
    `exit_when_done`, as soon as the run ends. An exception from the engine is shown, then raised here.
    Returns False if the user quit before the run finished.

        llm = LLM(...); [llm.add_request(p, sp) for p in prompts]
        finished = run_live(llm)        # then llm.metrics(), llm.recorder.write_jsonl(...) as usual
    """
    app = VizApp(llm, speed=speed, paused=paused, exit_when_done=exit_when_done, **kw)
    app.run(headless=headless)
    driver = app.driver
    driver.pacer.stop()
    if driver.started.is_set():
        driver.stopped.wait()  # the engine thread is off llm before the caller touches it
    if driver.error is not None:
        raise driver.error
    return driver.finished
