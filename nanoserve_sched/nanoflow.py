"""The async scheduler (NanoFlow; vLLM's --async-scheduling): plan step i+1 while the device runs step i.

The sync loop leaves the device idle while the CPU schedules, prepares inputs and appends tokens.
Here two steps are in flight: as soon as step i is launched, step i+1 is scheduled. A decoding
request in step i has not got its next token yet, so step i+1 takes a *placeholder* in its place;
the runner feeds it the token step i sampled, on the device, without a round trip through the CPU.

The price: a request's EOS is seen one step late, after step i+1 already computed one more token for
it. That token is discarded, and the request is retired (its pages freed) when step i's result is read.
Scheduling past `max_tokens` never happens: the base's `chunk_size` counts the in-flight token.
"""

from nanoserve_sched.base import Scheduler


class AsyncScheduler(Scheduler):
    depth = 2  # the device runs step i while the CPU plans step i + 1
    allow_placeholders = True  # a decode may start before the previous token is back on the CPU
