"""Scheduling policies and what they own: requests and the KV cache's block manager. Pure Python, no torch."""

from sched.balanced import BalancedScheduler
from sched.base import Batch, Scheduler, SchedulerConfig
from sched.nanoflow import AsyncScheduler
from sched.page_aligned import PageAlignedScheduler
from sched.request import FinishReason, Request, SamplingParams
from sched.sync import SyncScheduler

SCHEDULERS = {
    "sync": SyncScheduler,
    "async": AsyncScheduler,
    "balanced": BalancedScheduler,
    "page-aligned": PageAlignedScheduler,
}


def make_scheduler(name: str, config: SchedulerConfig, recorder=None, pp: int = 1) -> Scheduler:
    """The scheduler called `name` (`--sched`).

    >>> make_scheduler("sync", SchedulerConfig(num_blocks=8)).depth
    1
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](config, recorder, pp)


__all__ = [
    "SCHEDULERS",
    "Batch",
    "FinishReason",
    "Request",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "make_scheduler",
]
