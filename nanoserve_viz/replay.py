"""Replaying a step log (`--trace RUN.jsonl`): the recorded events cut into one frame per engine step.

Frame k holds the events up to the end of step k's update, the moment the live engine's generator
yielded after that step; frame 0 is the run before its first step. Events after the last update
that are no step (the finished run's last holds of the viewer) belong to the last frame, so a log of
N steps has frames 0..N, as the summary's `steps N` says. Seeking back rebuilds the state from the
start, so every frame is exactly what applying that prefix of the log gives, the same state a live
viewer showed at that step.

    >>> from nanoserve_viz.trace import RunInfo, Span, StepScheduled
    >>> ev = [RunInfo(0.0, 4, 2), StepScheduled(0.1, 0, [], [], []), Span(0.1, 0.2, "cpu", "update", 0)]
    >>> Replay(ev).frames
    [1, 3]
"""

from nanoserve_viz.state import RunState
from nanoserve_viz.trace import Pages, Preempted, Span, StepScheduled

STEPPING = (Pages, Preempted, StepScheduled, Span)  # the scheduler at work (not arrivals, not the run's info)


def is_update(e) -> bool:
    """The end of a step: its tokens reached their requests."""
    return isinstance(e, Span) and e.lane == "cpu" and e.name == "update"


def frame_ends(events) -> list[int]:
    """Event counts at which the replay can stop: before the first step, after each update, the end."""
    first = next((i for i, e in enumerate(events) if isinstance(e, STEPPING)), len(events))
    ends = [first] + [i + 1 for i, e in enumerate(events) if is_update(e) and i + 1 > first]
    trailing = events[ends[-1] :]
    if any(isinstance(e, StepScheduled) for e in trailing):  # a step begun, never updated (a stopped run)
        ends.append(len(events))
    ends[-1] = len(events)
    return ends


class Replay:
    """A cursor over a recorded run: `seek(frame)` gives the RunState at that frame.

    `state`: a RunState that has applied all of `events` already (a live run that just ended); the
    cursor then starts at the last frame without applying anything again.
    """

    def __init__(self, events: list, state: RunState | None = None):
        self.events = events
        self.frames = frame_ends(events)
        self.num_steps = sum(isinstance(e, StepScheduled) for e in events)
        if state is not None and state.num_events == len(events):
            self.state, self.frame = state, self.last
        else:
            self.frame = 0
            self.state = RunState()
            self.seek(0)

    @property
    def last(self) -> int:
        return len(self.frames) - 1

    def seek(self, frame: int) -> RunState:
        frame = max(0, min(frame, self.last))
        target = self.frames[frame]
        if target < self.state.num_events:  # backwards: rebuild from the start
            self.state = RunState()
        self.state.apply_all(self.events[self.state.num_events : target])
        self.state.done = frame == self.last
        self.frame = frame
        return self.state
