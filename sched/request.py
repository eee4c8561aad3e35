"""Requests and their sampling parameters: the data every scheduler moves around."""

import enum
import itertools
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    >>> SamplingParams(temperature=0).greedy        # temperature 0 means argmax
    True
    """

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None  # a per-request seed makes its samples reproducible
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self):
        return self.temperature == 0

    def validate(self):
        """Raise ValueError naming the bad field and the fix."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: a request must generate at least 1 token")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is negative; use 0 for greedy or a positive value")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is outside (0, 1]; use 1 to turn the nucleus cut off")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} is negative; use 0 to turn top-k off")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"
    ERROR = "error"


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One request. Its tokens are `token_ids` (prompt, then outputs); the first
    `num_computed_tokens` of them have their keys and values in the KV cache.

    >>> r = Request([1, 2, 3])
    >>> r.append_token(7); r.output_token_ids, r.num_tokens
    ([7], 4)
    """

    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: str(next(_ids)))
    arrival_time: float = 0.0  # seconds after the start of the run
    num_computed_tokens: int = 0
    num_placeholders: int = 0  # tokens being sampled by a step still in flight (async scheduling)
    num_inflight: int = 0  # batches holding this request that the engine has not yet updated from
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache when first scheduled (-1: not yet)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)  # grows by one per generated token

    @property
    def num_prompt_tokens(self):
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self):
        return len(self.token_ids)

    @property
    def output_token_ids(self):
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self):
        return len(self.token_ids) - self.num_prompt_tokens

    def append_token(self, token_id: int):
        self.token_ids.append(token_id)

    @property
    def finished(self):
        return self.status is Status.FINISHED
