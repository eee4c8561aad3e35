"""What the viewer's keys do, live or in a replay: two controllers with one interface, so each key of
the app (nanoserve_viz/app.py) is one line. No Textual here.

    toggle()      pause / resume (a replay at its end plays again)
    step(n)       n steps on (n < 0: back; a live run only goes forward)
    seek(frame)   to a step (replay; END: the last)
    speed(d)      one notch faster (d > 0) or slower
    tick(dt)      the frame clock: dt seconds went by; True when the frame should be drawn
    label         what the status line says of play: "paused", "▶ 10 steps/s", "finished", ...
    position      the step shown: "12" live, "12/100" in a replay
    state         the RunState the panels draw

A command that cannot be done returns the reason, for the app to show.

    >>> from nanoserve_viz.trace import RunInfo, Span, StepScheduled
    >>> ev = [RunInfo(0.0, 4, 2)]
    >>> for k in range(3):
    ...     ev += [StepScheduled(k / 10, k, [], [], []), Span(k / 10, k / 10 + 0.01, "cpu", "update", k)]
    >>> c = ReplayControl(Replay(ev))
    >>> c.step(+2); c.position, c.label
    ('2/3', 'paused')
    >>> c.seek(END); c.position, c.label
    ('3/3', 'end of log')
"""

import math
import sys
import time

from nanoserve_viz.live import LIVE_SPEED, SPEEDS, EngineDriver, Pacer, Progress
from nanoserve_viz.replay import Replay
from nanoserve_viz.state import RunState

END = sys.maxsize  # seek(END): the last frame
REPLAY_SPEED = 20  # steps per second when a replay plays
UI_CPU_SHARE = 0.05  # at full speed, the UI may use this share of one core: the engine keeps the rest
ONLY_FORWARD = "a live run only goes forward; once it ends you can step back through it"


class ReplayControl:
    """A recorded run, or a live one that has ended: play at `rate` steps/s, step either way, seek.

    `ended`: the label at the last frame ("end of log"; "finished", "stopped" or "failed" for a live run).
    """

    can_seek = True

    def __init__(self, replay: Replay, *, speed: float | None = None, playing=False, at=None, ended="end of log"):
        self.replay = replay
        self.rate = REPLAY_SPEED if speed is None else speed
        self.playing = playing
        self.ended = ended
        self.total_steps = replay.num_steps
        self._due = 0.0  # frames owed to the play clock, a fraction of one
        if at is not None:
            replay.seek(at)

    @property
    def state(self) -> RunState:
        return self.replay.state

    def toggle(self):
        if self.replay.frame == self.replay.last:
            self.replay.seek(0)  # play it again from the start
            self.playing = True
        else:
            self.playing = not self.playing

    def step(self, n: int = 1):
        self.seek(self.replay.frame + n)

    def seek(self, frame: int):
        self.playing = False
        self.replay.seek(frame)

    def speed(self, d: int):
        finite = [s for s in SPEEDS if s < math.inf]
        i = min(range(len(finite)), key=lambda k: abs(finite[k] - self.rate))
        self.rate = finite[max(0, min(len(finite) - 1, i + d))]

    def tick(self, dt: float) -> bool:
        if self.playing:
            self._due += self.rate * dt
            whole = int(self._due)
            if whole:
                self._due -= whole
                self.replay.seek(self.replay.frame + whole)
                self.playing = self.replay.frame < self.replay.last
        return True

    def stop(self):
        self.playing = False

    @property
    def label(self) -> str:
        if self.playing:
            return f"▶ {self.rate:g} steps/s"
        return "paused" if self.replay.frame < self.replay.last else self.ended

    @property
    def position(self) -> str:
        return f"{self.replay.frame}/{self.replay.last}"


class LiveControl:
    """The engine running on a worker thread (`driver.run`), a Pacer deciding when it takes each step.

    `speed` None: LIVE_SPEED, a pace a person can follow; MAX (inf): as fast as the engine runs.
    `post(progress)` is how the worker tells the app about each step (from the worker's thread).
    """

    can_seek = False
    total_steps = 0  # not known until the run ends

    def __init__(self, llm, post, *, speed: float | None = None, paused=False, ui_cpu_share=UI_CPU_SHARE, steps=None):
        self.events = llm.recorder.events  # only grows; the worker says how far it is safe to read
        self.pacer = Pacer(LIVE_SPEED if speed is None else speed, paused)
        self.driver = EngineDriver(llm, self.pacer, post=post, steps=steps)
        self.progress = Progress(0, 0)
        self.state = RunState()
        self.ui_cpu_share = ui_cpu_share
        self._mark = (time.perf_counter(), time.thread_time())  # (wall, UI CPU) at the last frame drawn

    def toggle(self):
        self.pacer.toggle()

    def step(self, n: int = 1):
        if n < 0:
            return ONLY_FORWARD
        self.pacer.step()

    def seek(self, frame: int):
        return ONLY_FORWARD

    def speed(self, d: int):
        self.pacer.faster() if d > 0 else self.pacer.slower()

    def stop(self):
        self.pacer.stop()  # the worker returns at its next step boundary

    def tick(self, dt: float) -> bool:
        if self._over_budget():
            return False
        self._mark = (time.perf_counter(), time.thread_time())
        self.catch_up()
        self.driver.want()
        return True

    def _over_budget(self) -> bool:
        """At full speed, skip frames until the UI's CPU since the last frame (its drawing included) is
        within its share of the wall time: Python threads share one interpreter lock, and every cycle
        the UI spends is one the engine's Python side waits for."""
        if self.pacer.paused or self.pacer.speed < math.inf:
            return False
        wall, cpu = self._mark
        return time.thread_time() - cpu > self.ui_cpu_share * (time.perf_counter() - wall)

    def report(self, progress: Progress):
        """The worker finished a step, or the run."""
        self.progress = progress
        if progress.done:
            self.catch_up()

    def catch_up(self):
        """Apply the events the engine has reported so far."""
        n = self.progress.num_events
        if n > self.state.num_events:
            self.state.apply_all(self.events[self.state.num_events : n])
        self.state.done = self.progress.done

    def ended(self) -> ReplayControl:
        """The run is over: from here on it is a recorded run, explorable like a replay."""
        ended = "failed" if self.progress.error else "finished" if self.driver.finished else "stopped"
        return ReplayControl(Replay(self.events[: self.state.num_events], state=self.state), ended=ended)

    @property
    def label(self) -> str:
        return "paused" if self.pacer.paused else "▶ " + self.pacer.speed_label()

    @property
    def position(self) -> str:
        return str(self.progress.steps)  # steps completed (the timeline may show one more, in flight)
