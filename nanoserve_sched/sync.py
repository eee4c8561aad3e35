"""The synchronous scheduler, vLLM's baseline: schedule a step, run it, read its tokens, repeat.

It is the base scheduler unchanged, with one step in flight: while the device runs, the CPU waits,
and while the CPU schedules, prepares inputs and appends tokens, the device waits.
"""

from nanoserve_sched.base import Scheduler


class SyncScheduler(Scheduler):
    depth = 1
