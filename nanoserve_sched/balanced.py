"""The batch-balanced scheduler (vLLM #19873): equal-token microbatches for pipeline stages.

With `--pp N` the model's layers are split into N stages and N microbatches are in flight, one per
stage. The base scheduler fills the first microbatch up to the whole token budget and leaves the
next ones whatever is left, often nothing: the later stages then idle (pipeline bubbles) and the
step time is set by the fattest microbatch.

This policy first collects everything schedulable, with each microbatch's budget estimated from the
pending load divided among the free pipeline slots, then deals the requests out largest first into
the lightest microbatch (LPT). A request is never in two microbatches in flight, so the token counts
of the microbatches differ by at most one request's chunk.

Dealing reorders work: a request can land in a microbatch that runs before the one computing the
pages its prompt shares with another request of the same collect. So here a prefix hit never uses a
page written in the same collect (nanoserve_sched/base.py: the order of work); it computes it instead.
"""

from nanoserve_sched.base import Scheduler


class BalancedScheduler(Scheduler):
    hits_within_collect = False  # a request may land in an earlier microbatch than the one writing its hit

    def free_slots(self) -> int:
        return max(1, self.depth - self.num_inflight_batches)

    def token_budget(self) -> int:
        wanted = sum(self.num_wanted(r) for r in self.running)
        waiting = list(self.waiting)[: self.config.max_num_seqs]
        wanted += sum(min(r.num_tokens, self.config.max_num_batched_tokens) for r in waiting)
        per_microbatch = -(-wanted // self.free_slots())  # the pending load, shared out
        self.microbatch_budget = max(1, min(self.config.max_num_batched_tokens, per_microbatch))
        return self.microbatch_budget * self.free_slots()

    def chunk_size(self, req, budget):
        return min(super().chunk_size(req, budget), self.microbatch_budget)

    def form_batches(self, scheduled):
        bins, loads = [[] for _ in range(self.free_slots())], [0] * self.free_slots()
        for r in sorted(scheduled, key=lambda r: -len(r.token_ids)):  # largest first, into the lightest
            i = loads.index(min(loads))
            bins[i].append(r)
            loads[i] += len(r.token_ids)
        return bins
