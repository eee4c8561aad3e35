"""The nanoserve visualizer: a Textual app showing a run step by step, live or replayed.

    python nanoserve.py --sched sync --viz        # live: the engine runs in a worker thread
    python -m viz run.jsonl                       # replay a step log written with --trace run.jsonl

Both modes feed the same recorded events into one RunState (viz/state.py), which the panels draw:
the scheduler timeline, the KV page pool, CPU vs device lanes, queues and metrics. Live, the engine's
worker posts an immutable Progress after every step (a newer one replaces a queued older one) and the
UI redraws on a timer, at most `fps` times a second; the engine never waits for the UI.
"""

import time
from pathlib import Path

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer

from viz.live import SPEEDS, EngineDriver, Pacer, Progress
from viz.messages import EngineProgress
from viz.replay import Replay
from viz.state import RunState
from viz.widgets.error import ErrorScreen
from viz.widgets.help import HelpScreen
from viz.widgets.kv_pages import KVPages
from viz.widgets.lanes import Lanes
from viz.widgets.metrics import Metrics
from viz.widgets.status import StatusBar
from viz.widgets.timeline import LEGEND as TIMELINE_LEGEND
from viz.widgets.timeline import Timeline

REPLAY_SPEED = 20  # steps per second when a replay plays
UI_CPU_SHARE = 0.05  # at full speed, the UI may use this share of one core: the engine keeps the rest


class VizApp(App):
    """Give it `llm` (live: requests already added, the app drives `llm.run()`) or `events` (replay).

    A live run that has ended can be explored like a replay: step back, jump to the start, play it again.
    """

    CSS_PATH = "app.tcss"
    TITLE = "nanoserve viz"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("space", "toggle_pause", "pause"),
        Binding("n", "step", "step"),
        Binding("b,left", "back", "back", show=False, priority=True),
        Binding("right", "step", "step", show=False, priority=True),
        Binding("home,g", "seek_start", "start", show=False),
        Binding("end,G", "seek_end", "end", show=False),
        Binding("plus,equals_sign", "faster", "faster", key_display="+"),
        Binding("minus,underscore", "slower", "slower", key_display="-"),
        Binding("f", "follow", "follow", show=False),
        Binding("s", "screenshot", "shot"),
        Binding("d", "toggle_dark", "theme", show=False),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "quit", "quit"),
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
        fps: float = 30,
        ui_cpu_share: float = UI_CPU_SHARE,
        screenshot_dir: str | Path = ".",
    ):
        super().__init__()
        if (llm is None) == (events is None):
            raise ValueError("VizApp needs either llm (live) or events (replay)")
        self.live = llm is not None
        self.source_name = name
        self.fps = fps
        self.ui_cpu_share = ui_cpu_share
        self._mark = (time.perf_counter(), time.thread_time())  # (wall, UI CPU) at the last frame drawn
        self.exit_when_done = exit_when_done
        self.screenshot_dir = Path(screenshot_dir)
        self.replay: Replay | None = None  # set for a replay, and for a live run once it has ended
        self.playing = False  # a replay playing itself
        self.speed = REPLAY_SPEED if speed is None else speed  # a replay's steps/s
        self._frames_due = 0.0
        if self.live:
            self.events = llm.recorder.events  # only grows; the worker says how far it is safe to read
            self.pacer = Pacer(speed, paused)
            self.driver = EngineDriver(llm, self.pacer, post=lambda p: self.post_message(EngineProgress(p)))
            self.progress = Progress(0, 0)
            self.state = RunState()
        else:
            self.events = events
            self.replay = Replay(events)
            self.playing = not paused
            frame = self.replay.last if at == "end" else 0 if at == "start" else int(at)
            self.state = self.replay.seek(frame)
        self._shown = None  # what was drawn last: (state, version, play label)

    @property
    def engine_running(self) -> bool:
        return self.live and not self.progress.done

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
        if self.replay is not None:
            timeline.total_steps = self.replay.num_steps
        self.query_one(Metrics).border_title = "Queues & metrics"
        self.query_one(KVPages).border_title = "KV pages"
        self._draw()
        self.set_interval(1 / self.fps, self._tick)
        if self.live:
            self.run_worker(self.driver.run, name="engine", thread=True, exit_on_error=False)

    # --- the frame loop ---------------------------------------------------------------------------

    def on_engine_progress(self, message: EngineProgress):
        self.progress = message.progress
        if not self.progress.done:
            return
        self._catch_up()
        # the run is over: from here on it is a recorded run, explorable like a replay
        self.replay = Replay(self.events[: self.state.num_events], state=self.state)
        self._draw()
        if self.exit_when_done:
            self.exit()
        elif self.progress.error:
            self.push_screen(ErrorScreen(self.progress.error))

    def _catch_up(self):
        """Apply the events the engine has reported so far (live)."""
        n = self.progress.num_events
        if n > self.state.num_events:
            self.state.apply_all(self.events[self.state.num_events : n])
        self.state.done = self.progress.done

    def _over_budget(self) -> bool:
        """While the engine runs at full speed, skip frames until the UI's CPU since the last frame (its
        drawing included) is within its share of the wall time: Python threads share one interpreter lock,
        and every cycle the UI spends is one the engine's Python side waits for."""
        if not self.engine_running or self.pacer.paused or self.pacer.speed is not None:
            return False
        wall, cpu = self._mark
        return time.thread_time() - cpu > self.ui_cpu_share * (time.perf_counter() - wall)

    def _tick(self):
        if self.engine_running:
            if self._over_budget():
                return
            self._mark = (time.perf_counter(), time.thread_time())
            self._catch_up()
            self.driver.want()
        elif self.playing:
            self._frames_due += self.speed / self.fps
            if self._frames_due >= 1:
                whole = int(self._frames_due)
                self._frames_due -= whole
                self._seek(self.replay.frame + whole)
                if self.replay.frame == self.replay.last:
                    self.playing = False
        self._draw()

    def _seek(self, frame: int):
        self.state = self.replay.seek(frame)

    def _draw(self):
        key = (id(self.state), self.state.version, self._play_label())
        if key == self._shown:
            return
        self._shown = key
        for widget in (self.query_one(Timeline), self.query_one(Lanes), self.query_one(KVPages)):
            widget.show(self.state)
        self.query_one(Metrics).show(self.state)
        self._status()

    def _play_label(self) -> str:
        if self.engine_running:
            return "paused" if self.pacer.paused else "▶ " + self.pacer.speed_label()
        if self.playing:
            return f"▶ {self.speed:g} steps/s"
        if self.replay.frame < self.replay.last:
            return "paused"
        if self.live:
            return "failed" if self.progress.error else "finished" if self.driver.finished else "stopped"
        return "end of log"

    def _status(self):
        st = self.state
        done = f"{sum(r.finished for r in st.requests.values())}/{len(st.requests)} done"
        mode = "live" if self.live else f"replay {self.source_name}".rstrip()
        # live: steps completed (their tokens appended; the timeline may show one more in flight)
        step = f"{self.progress.steps}" if self.engine_running else f"{self.replay.frame}/{self.replay.last}"
        self.query_one(StatusBar).set_status(mode=mode, config=st.config, step=step, play=self._play_label(), done=done)

    # --- keys -------------------------------------------------------------------------------------

    def action_toggle_pause(self):
        if self.engine_running:
            self.pacer.toggle()
        elif self.replay.frame == self.replay.last:
            self._seek(0)  # play it again from the start
            self.playing = True
        else:
            self.playing = not self.playing
        self._draw()

    def action_step(self):
        if self.engine_running:
            self.pacer.step()
        else:
            self.playing = False
            self._seek(self.replay.frame + 1)
        self._draw()

    def action_back(self):
        if self.engine_running:
            self.notify("a live run only goes forward; once it ends you can step back through it")
            return
        self.playing = False
        self._seek(self.replay.frame - 1)
        self._draw()

    def action_seek_start(self):
        if not self.engine_running:
            self.playing = False
            self._seek(0)
            self._draw()

    def action_seek_end(self):
        if not self.engine_running:
            self.playing = False
            self._seek(self.replay.last)
            self._draw()
        self.query_one(Timeline).set_follow(True)

    def action_faster(self):
        self._change_speed(+1)

    def action_slower(self):
        self._change_speed(-1)

    def _change_speed(self, d: int):
        if self.engine_running:
            self.pacer.faster() if d > 0 else self.pacer.slower()
        else:
            finite = [s for s in SPEEDS if s is not None]
            i = min(range(len(finite)), key=lambda k: abs(finite[k] - self.speed))
            self.speed = finite[max(0, min(len(finite) - 1, i + d))]
        self._shown = None
        self._draw()

    def action_follow(self):
        timeline = self.query_one(Timeline)
        timeline.set_follow(not timeline.follow)

    def action_screenshot(self):
        self.screenshot_dir.mkdir(parents=True, exist_ok=True)
        name = f"nanoserve-{'live' if self.live else 'replay'}-step{self.state.num_steps}.svg"
        path = self.save_screenshot(name, str(self.screenshot_dir))
        self.notify(f"screenshot saved: {path}")

    def action_help(self):
        self.push_screen(HelpScreen())

    async def action_quit(self):
        if self.live:
            self.pacer.stop()  # the worker returns at its next step boundary
        self.exit()

    def on_unmount(self):
        if self.live:
            self.pacer.stop()  # however the app ends, a paused engine thread must not wait forever


def run_live(
    llm, *, speed: float | None = None, paused: bool = False, exit_when_done: bool = False, headless: bool = False, **kw
) -> bool:
    """Run `llm`'s queued requests under the live visualizer; returns True if the run finished.

    Call it after `llm.add_request(...)`, instead of iterating `llm.run()`: the app drives the engine in
    a thread worker, one step per `next()`, paced by `speed` (steps/s, None: full speed) and the keys.
    Returns when the user quits (or, with `exit_when_done`, as soon as the run ends). An exception from
    the engine is shown, then raised here. Returns False if the user quit before the run finished.

        llm = LLM(...); [llm.add_request(p, sp) for p in prompts]
        finished = run_live(llm)        # then llm.metrics(), llm.recorder.write_jsonl(...) as usual
    """
    app = VizApp(llm, speed=speed, paused=paused, exit_when_done=exit_when_done, **kw)
    app.run(headless=headless)
    app.pacer.stop()
    if app.driver.started.is_set():
        app.driver.stopped.wait()  # the engine thread is off llm before the caller touches it
    if app.driver.error is not None:
        raise app.driver.error
    return app.driver.finished
