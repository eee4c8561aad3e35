"""Driving the engine for the live viewer, without Textual: a pacer (pause, step, speed) and the loop
that runs `llm.run()` on a worker thread and tells the viewer after every step.

The engine knows nothing of the viewer. The viewer calls `next()` on the engine's generator (one call =
engine work up to one step's update) and, between two calls, may hold the engine: paused, stepping one
step at a time, or paced to a speed a human can follow. Those holds are recorded as
`Span(lane="viewer", name="paused")`, so the lanes and metrics can cut them out of the time axis.

    >>> p = Pacer(speed=MAX)
    >>> p.wait(), p.speed_label()                     # at full speed nothing waits
    (True, 'max')
    >>> p.slower(); p.speed_label()
    '500 steps/s'
"""

import math
import threading
import time
import traceback
from dataclasses import dataclass

from nanoserve_viz.trace import VIEWER_LANE, Span

MAX = math.inf  # steps per second: as fast as the engine runs
SPEEDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, MAX)  # what + and - step through
LIVE_SPEED = 10  # a live run opens at this pace, one a person can follow, unless told otherwise


class Pacer:
    """When may the engine take its next step? Thread-safe: the UI sets, the engine thread waits."""

    def __init__(self, speed: float = MAX, paused: bool = False):
        if not speed > 0:  # NaN too
            raise ValueError(f"a speed of {speed} steps/s; give a positive number, or inf for as fast as it runs")
        self.speed = speed
        self.paused = paused
        self.stopped = False
        self._steps = 0  # steps granted while paused
        self._last = None  # when the previous step began
        self._cv = threading.Condition()

    def wait(self) -> bool:
        """Block until the next step may begin; False when the viewer has quit."""
        with self._cv:
            while True:
                if self.stopped:
                    return False
                if self.paused:
                    if self._steps:
                        self._steps -= 1
                        break
                    self._cv.wait()
                    continue
                if self._last is not None:
                    left = self._last + 1.0 / self.speed - time.perf_counter()  # 1 / MAX: no wait
                    if left > 0:
                        self._cv.wait(left)  # woken early when the speed or pause changes
                        continue
                break
            self._last = time.perf_counter()
            return True

    def _set(self, **kw):
        with self._cv:
            for k, v in kw.items():
                setattr(self, k, v)
            self._cv.notify_all()

    def toggle(self):
        self._set(paused=not self.paused, _steps=0)

    def step(self):
        """Pause (if running) and let exactly one more step through."""
        with self._cv:
            self.paused = True
            self._steps += 1
            self._cv.notify_all()

    def stop(self):
        self._set(stopped=True)

    def faster(self):
        self._set(speed=SPEEDS[min(SPEEDS.index(self._nearest()) + 1, len(SPEEDS) - 1)])

    def slower(self):
        self._set(speed=SPEEDS[max(SPEEDS.index(self._nearest()) - 1, 0)])

    def _nearest(self):
        return next(s for s in SPEEDS if s >= self.speed)

    def speed_label(self) -> str:
        return "max" if self.speed == MAX else f"{self.speed:g} steps/s"


@dataclass(frozen=True)
class Progress:
    """What the engine thread tells the viewer after each step (immutable: it crosses threads).

    The events themselves stay in `llm.recorder.events`, a list that only grows: the viewer reads
    `events[:num_events]`, which never changes once written.
    """

    num_events: int
    steps: int  # engine steps completed (next() calls that returned)
    done: bool = False  # the run is over (finished, failed or stopped)
    error: str | None = None  # the engine's exception, formatted, when it failed


class EngineDriver:
    """Runs `llm.run()` step by step under a Pacer, reporting Progress through `post` after each step.

    `run()` is what the viewer's worker thread executes. An exception from the engine is kept in
    `error` (and reported), never swallowed: the caller re-raises it once the viewer has closed.
    A step's Progress is posted only when the viewer has asked for one (`want()`, once per frame it
    draws), so a fast engine does not flood the UI with messages it would drop anyway; the last
    Progress (done) is always posted.
    """

    MIN_HOLD_S = 1e-4  # shorter holds are not worth a span

    def __init__(self, llm, pacer: Pacer, post=lambda progress: None, steps=None):
        self.llm, self.pacer, self.post = llm, pacer, post
        self.engine_steps = steps  # the engine loop to drive: llm.run(), or a server's, which never ends
        self.steps = 0
        self.error: BaseException | None = None
        self.finished = False  # the engine ran to completion (not stopped by the viewer, no error)
        self.latest = Progress(0, 0)
        self._wanted = threading.Event()
        self._wanted.set()
        self.started = threading.Event()
        self.stopped = threading.Event()  # set when run() has returned, whatever the reason

    def want(self):
        """The viewer is ready for the next Progress."""
        self._wanted.set()

    def run(self):
        self.started.set()
        rec = self.llm.recorder
        try:
            gen = self.engine_steps if self.engine_steps is not None else self.llm.run()
            while True:
                t0 = rec.now()
                go = self.pacer.wait()
                t1 = rec.now()
                if t1 - t0 >= self.MIN_HOLD_S:
                    rec.emit(Span(t0, t1, VIEWER_LANE, "paused", self.steps))
                if not go:
                    gen.close()
                    break
                try:
                    next(gen)
                except StopIteration:
                    self.finished = True
                    break
                self.steps += 1
                self.latest = Progress(len(rec.events), self.steps)
                if self._wanted.is_set():
                    self._wanted.clear()
                    self.post(self.latest)
        except Exception as e:
            self.error = e
        finally:
            err = "".join(traceback.format_exception(self.error)) if self.error else None
            self.latest = Progress(len(rec.events), self.steps, done=True, error=err)
            self.post(self.latest)
            self.stopped.set()
