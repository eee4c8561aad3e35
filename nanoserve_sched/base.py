"""The scheduler every policy shares: vLLM v1's rule, *schedule tokens, not phases*.

Each request wants its `num_computed_tokens` to reach `num_tokens` (prompt plus outputs so far).
Each step hands out one budget of `max_num_batched_tokens`: running requests first (a decode needs
one token, an unfinished prompt gets a chunk), then waiting ones, oldest first, up to `max_num_seqs`.
A long prompt is thus chunked, and prefill chunks and decodes share a step. When the KV cache runs
out of pages, the newest running request is preempted: its pages are freed and it goes back to the
front of the queue, to be recomputed later (its own pages often come back as prefix-cache hits).

A step that samples a request's next token leaves a *placeholder* for it until `update` appends
the real token. With one step in flight (`depth = 1`) placeholders are gone before the next
`schedule`; a policy that plans ahead (`depth = 2`, `allow_placeholders`) schedules the placeholder
itself as the next step's input, and the runner fills it in on the device.

Prefix hits and the order of work: a page may serve as a prefix-cache hit only to work that runs in
the same batch as the step that writes it (each layer writes all of a batch's keys before any of them
attends) or after it. Every batch handed out runs after the ones handed out before it, on every device
and pipeline stage, so a hit on a page written by an earlier batch is always safe. A policy that cuts
one `collect` into several batches (`hits_within_collect = False`: balanced) cannot promise the first
case, so there a request hits no page that another request of the same collect writes; it computes
that page itself. When a step fails, the prefix cache forgets its names (`fail`).

Policies subclass `Scheduler` and override a few hooks: `depth` (batches in flight at once),
`allow_placeholders` (may a request be in two of them), `token_budget` and `chunk_size` (how many
tokens a step, and a request in it, may take), `charge` (what those tokens cost of the budget) and
`form_batches` (how the scheduled work is cut into the batches sent to the device).
"""

import functools
import itertools
from collections import deque
from dataclasses import dataclass, field

from nanoserve_sched.blocks import BlockManager
from nanoserve_sched.config import EngineConfig
from nanoserve_sched.request import FinishReason, Request, Status
from nanoserve_viz.trace import Discarded, FirstToken, Pages, Preempted, Recorder, RequestFinished, StepScheduled


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step, frozen at schedule time (the request itself moves on)."""

    request: Request
    start: int  # position of the first new token
    token_ids: list[int]  # the new tokens, positions start .. start + len - 1
    sample: bool  # this step computes the request's last known token: sample the next one
    num_outputs: int  # outputs before this step's sample (seeds the per-request sampler)
    # the request's page table, as the runner keeps it: entries from pages_from on are new_pages (the pages
    # added since the request was last scheduled; all of them after a preemption): no table is copied
    pages_from: int
    new_pages: list[int]
    is_prefill: bool  # a chunk of the prompt (or of a recomputation), not a single decode


@dataclass
class Batch:
    step: int
    requests: list[ScheduledRequest] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # requests finished since the previous batch (the runner
    # frees their rows)

    @property
    def num_tokens(self):
        return sum(len(r.token_ids) for r in self.requests)

    @functools.cached_property
    def sampled(self):
        """The scheduled requests that get a token from this step, in the runner's output order."""
        return [r for r in self.requests if r.sample]


PLACEHOLDER = -1  # the token id of a token still being sampled on the device


class Scheduler:
    depth = 1  # batches in flight at once (docs/ARCHITECTURE.md: the one engine loop)
    allow_placeholders = False  # may a request already in an in-flight batch be scheduled again?
    hits_within_collect = True  # may a request hit pages written by another request of the same collect?

    def __init__(self, config: EngineConfig, recorder: Recorder | None = None):
        if config.num_blocks is None or config.max_model_len is None:
            raise ValueError("the scheduler needs a resolved config: set num_blocks and max_model_len")
        self.config, self.pp, self.max_model_len = config, config.pp, config.max_model_len
        if self.pp > 1:
            self.depth = max(self.depth, self.pp)  # one microbatch in flight per pipeline stage
        self.ready: list[list[ScheduledRequest]] = []  # batches formed but not yet handed out
        self.num_inflight_batches = 0  # handed out by schedule(), not yet back through update()
        self.recorder = recorder or Recorder()
        self.blocks = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching, on_event=self._on_pages
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.step = 0
        self.written: set[int] = set()  # pages named by this collect (see hits_within_collect)
        self.finished_ids: list[str] = []  # finished since the engine last asked (take_finished)
        self.released: list[str] = []  # finished since the last batch was handed out (Batch.finished)
        self.eos = frozenset(config.eos_token_ids)

    def _on_pages(self, kind, request_id, pages):
        self.recorder.emit(Pages(self.recorder.now(), kind, request_id, pages))

    # --- requests in and out ---------------------------------------------------------------

    def add_request(self, request: Request):
        """Queue a validated request (the engine checks prompt length and parameters first)."""
        need = self.blocks.pages_needed(request.num_prompt_tokens + 1)
        if need > self.config.num_blocks:
            raise ValueError(
                f"prompt has {request.num_prompt_tokens} tokens and needs {need} KV pages, but the "
                f"cache has {self.config.num_blocks}; raise --num-gpu-blocks-override or shorten it"
            )
        self.waiting.append(request)

    def has_work(self):
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        for r in [*self.running, *self.waiting]:
            if r.request_id == request_id:
                self.finish(r, FinishReason.ABORT)
                return r
        return None

    def finish(self, req: Request, reason: FinishReason, error: str | None = None):
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.request_id)
        req.status, req.finish_reason, req.error = Status.FINISHED, reason, error
        req.times[3] = self.recorder.now()
        self.finished_ids.append(req.request_id)
        self.released.append(req.request_id)
        self.recorder.emit(
            RequestFinished(
                self.recorder.now(), req.request_id, reason.value, req.num_prompt_tokens, req.num_output_tokens, error
            )
        )

    def take_finished(self) -> list[str]:
        """Ids of the requests finished since the last call."""
        ids, self.finished_ids = self.finished_ids, []
        return ids

    def preempt(self, req: Request):
        """Free the request's pages and send it back to the front of the queue, to recompute."""
        self.running.remove(req)
        self.blocks.free(req.request_id)
        req.status, req.num_computed_tokens, req.num_pages_sent = Status.WAITING, 0, 0
        self.waiting.appendleft(req)
        self.recorder.emit(Preempted(self.recorder.now(), self.step, req.request_id))

    # --- hooks the policies override -------------------------------------------------------

    def num_wanted(self, req: Request) -> int:
        """Tokens the request could be scheduled now, at most one step's budget (no policy applied)."""
        return Scheduler.chunk_size(self, req, self.config.max_num_batched_tokens)

    def token_budget(self) -> int:
        """Tokens one call of `schedule` may hand out (before `form_batches` cuts them)."""
        return self.config.max_num_batched_tokens

    def chunk_size(self, req: Request, budget: int) -> int:
        """How many of the request's uncomputed tokens to schedule now, given the budget left."""
        if req.num_inflight and not self.allow_placeholders:
            return 0  # already in a batch in flight
        known = len(req.token_ids) + req.num_placeholders  # tokens it has, the one in flight included
        if known - req.num_prompt_tokens >= req.params.max_tokens or known >= self.max_model_len:
            return 0  # the in-flight token is its last: never schedule past the end
        n = known - req.num_computed_tokens
        return n if n < budget else budget

    def charge(self, req: Request, n: int) -> int:
        """What scheduling n tokens of req costs of the budget."""
        return n

    def form_batches(self, scheduled: list[ScheduledRequest]) -> list[list[ScheduledRequest]]:
        """Cut the scheduled work into the batches handed out, one per `schedule` call."""
        return [scheduled]

    # --- one step ----------------------------------------------------------------------------

    def schedule(self) -> Batch | None:
        """The next batch to run; None when nothing can run now."""
        if not self.ready:
            scheduled = self.collect()
            self.ready = [b for b in self.form_batches(scheduled) if b] if scheduled else []
        if not self.ready:
            return None
        batch = Batch(self.step, self.ready.pop(0), self.released)
        self.released = []
        self.num_inflight_batches += 1
        self.recorder.emit(
            StepScheduled(
                self.recorder.now(),
                batch.step,
                [r.request.request_id for r in batch.requests],
                [len(r.token_ids) for r in batch.requests],
                [r.is_prefill for r in batch.requests],
                len(self.running),
                len(self.waiting),
            )
        )
        self.step += 1
        return batch

    def collect(self) -> list[ScheduledRequest]:
        """Choose work under the token budget: running requests first, then waiting ones."""
        budget = self.token_budget()
        scheduled, preempted = [], False
        self.written = set()

        # 1. running requests, oldest first; when pages run out, preempt from the newest end
        chunk_size, allocate, take, charge = self.chunk_size, self.blocks.allocate, self._take, self.charge
        tables, bs = self.blocks.tables, self.config.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = chunk_size(req, budget)
            if n <= 0:
                i += 1
                continue
            table = tables.get(req.request_id)
            if table is None or req.num_computed_tokens + n > len(table) * bs:  # it needs more pages
                while not allocate(req.request_id, req.num_computed_tokens + n):
                    victim = self.running[-1]
                    if victim is req and len(self.running) == 1 and not scheduled:
                        # alone and still too big: no preemption can ever make room
                        self.finish(req, FinishReason.ERROR, self._too_big(req))
                        break
                    self.preempt(victim)
                    preempted = True
                    if victim is req:
                        break
                if req.status is not Status.RUNNING:  # it failed, or was preempted itself: the next one is at i
                    continue
                table = tables[req.request_id]
            scheduled.append(take(req, n, table))
            budget -= charge(req, n)
            i += 1

        # 2. waiting requests, unless this step already had to preempt
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_inflight:  # preempted while in a batch in flight: wait for that batch
                break
            prefix = self.prefix_hit(req)
            req.num_computed_tokens = len(prefix) * self.config.block_size
            n = self.chunk_size(req, budget)
            if n <= 0 or not self.blocks.allocate(req.request_id, req.num_computed_tokens + n, prefix):
                req.num_computed_tokens = 0
                if n > 0 and self.blocks.num_free_blocks == self.config.num_blocks:  # empty cache: never fits
                    self.waiting.popleft()
                    self.running.append(req)
                    self.finish(req, FinishReason.ERROR, self._too_big(req))
                    continue
                break
            self.waiting.popleft()
            self.running.append(req)
            if req.num_cached_tokens < 0:  # first scheduled: what the prefix cache saved it (as vLLM reports)
                req.num_cached_tokens = req.num_computed_tokens
                req.times[1] = self.recorder.now()
            req.status = Status.RUNNING
            scheduled.append(self._take(req, n))
            budget -= self.charge(req, n)
        return scheduled

    def prefix_hit(self, req: Request) -> list[int]:
        """The cached pages that start req's tokens and that it may use (module docstring: the order of work)."""
        pages = self.blocks.lookup_prefix(req.token_ids)
        if not self.hits_within_collect:
            pages = list(itertools.takewhile(lambda p: p not in self.written, pages))
        return pages

    def _take(self, req: Request, n: int, table: list[int] | None = None) -> ScheduledRequest:
        """Schedule n tokens of req: they count as computed from now on (the step will write them). `table`
        is its page table, if the caller has it at hand."""
        start, token_ids = req.num_computed_tokens, req.token_ids
        end, num_tokens = start + n, len(token_ids)
        req.num_computed_tokens = end
        req.num_inflight += 1
        if end <= num_tokens:
            tokens, computed = token_ids[start:end], end
        elif start >= num_tokens:  # the token being sampled by the step in flight: a placeholder (async decodes)
            tokens, computed = [PLACEHOLDER] * n, num_tokens
        else:  # known tokens, then placeholders
            tokens, computed = token_ids[start:] + [PLACEHOLDER] * (end - num_tokens), num_tokens
        # name full pages for the prefix cache, but never one holding a token still in flight
        if named := self.blocks.cache_pages(req.request_id, token_ids, computed):
            self.written.update(named)
        num_outputs = num_tokens - req.num_prompt_tokens + req.num_placeholders  # index of the token it samples
        if sample := end == num_tokens + req.num_placeholders:
            req.num_placeholders += 1
        if table is None:
            table = self.blocks.tables[req.request_id]
        if (sent := req.num_pages_sent) < len(table):
            new_pages, req.num_pages_sent = table[sent:], len(table)
        else:
            new_pages = ()
        prefill = n > 1 or start < req.num_prompt_tokens
        return ScheduledRequest(req, start, tokens, sample, num_outputs, sent, new_pages, prefill)

    def _too_big(self, req: Request) -> str:
        return (
            f"request {req.request_id} needs {self.blocks.pages_needed(req.num_computed_tokens + 1)} KV pages "
            f"but the whole cache has {self.config.num_blocks}; raise --num-gpu-blocks-override or lower "
            "max_tokens"
        )

    def fail(self, batches: list[Batch], error: str):
        """A step failed: finish every request of `batches` (every batch in flight: the engine drained them) and
        of the batches formed but not handed out, with `error`. Pages those batches were to write may hold
        nothing, so the prefix cache forgets every page's name (a failure is rare; a cache that can never
        serve a page that was not written is worth its refilling)."""
        for r in [r for b in batches for r in b.requests] + [r for b in self.ready for r in b]:
            req = r.request
            req.num_inflight = req.num_placeholders = 0
            if not req.finished:
                self.finish(req, FinishReason.ERROR, error)
        self.blocks.forget_names()
        self.ready, self.num_inflight_batches = [], 0

    def fail_all(self, error: str):
        """Finish every request the scheduler holds with `error` (after `fail`: nothing is in flight)."""
        for req in [*self.running, *self.waiting]:
            req.num_inflight = req.num_placeholders = 0
            self.finish(req, FinishReason.ERROR, error)
        self.ready, self.num_inflight_batches = [], 0

    def update(self, batch: Batch, sampled_ids: list[int], logprobs: list | None = None) -> list[Request]:
        """Append each sampled token (and its log-probabilities, for a request that asked), stop finished
        requests and free their pages. Returns the requests that received a token this step."""
        got = []
        self.num_inflight_batches -= 1
        for r in batch.requests:
            r.request.num_inflight -= 1
        for i, (sr, token) in enumerate(zip(batch.sampled, sampled_ids, strict=True)):
            req = sr.request
            if req.finished:  # stopped or aborted while this step ran: its token is discarded
                self.recorder.emit(Discarded(self.recorder.now(), batch.step, req.request_id))
                continue
            req.num_placeholders -= 1
            req.token_ids.append(token)
            got.append(req)
            if req.logprobs is not None and logprobs is not None:
                req.logprobs.append(logprobs[i])
            if len(req.token_ids) == req.num_prompt_tokens + 1:
                req.times[2] = self.recorder.now()
                self.recorder.emit(FirstToken(req.times[2], req.request_id))
            if reason := self.stop_reason(req, token):
                self.finish(req, reason)
        return got

    def stop_reason(self, req: Request, token: int) -> FinishReason | None:
        p, n = req.params, len(req.token_ids)
        outputs = n - req.num_prompt_tokens
        if outputs >= p.min_tokens:
            if token in p.stop_token_ids:
                req.stop_reason = token
                return FinishReason.STOP
            if not p.ignore_eos and token in self.eos:
                return FinishReason.STOP
        if outputs >= p.max_tokens or n >= self.max_model_len:
            return FinishReason.LENGTH
        return None
