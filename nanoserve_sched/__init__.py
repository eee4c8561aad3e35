"""Scheduling policies and what they own: requests and the KV cache's block manager. Pure Python, no torch."""

from nanoserve_sched.balanced import BalancedScheduler
from nanoserve_sched.base import Batch, Scheduler
from nanoserve_sched.config import EngineConfig
from nanoserve_sched.nanoflow import AsyncScheduler
from nanoserve_sched.page_aligned import PageAlignedScheduler
from nanoserve_sched.request import FinishReason, Request, SamplingParams
from nanoserve_sched.sync import SyncScheduler

SCHEDULERS = {
    "sync": SyncScheduler,
    "async": AsyncScheduler,
    "balanced": BalancedScheduler,
    "page-aligned": PageAlignedScheduler,
}


def make_scheduler(config: EngineConfig, recorder=None) -> Scheduler:
    """The scheduler `config.sched` names (`--sched`), for a resolved config (its page count and context set).

    >>> make_scheduler(EngineConfig(sched="async", num_blocks=8, max_model_len=64)).depth
    2
    """
    return SCHEDULERS[config.sched](config, recorder)


__all__ = [
    "SCHEDULERS",
    "Batch",
    "FinishReason",
    "Request",
    "SamplingParams",
    "Scheduler",
    "EngineConfig",
    "make_scheduler",
]
