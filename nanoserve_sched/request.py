"""Requests and their sampling parameters: the data every scheduler moves around.

Also the input boundary: every prompt and every set of sampling parameters, whether it comes from the
Python API, a line of a prompts file or a flag, is checked here, by the same rules, before it becomes a
request. A bad value raises ValueError naming the field, what was wrong and what to pass instead.
"""

import enum
import itertools
import math
import operator
from dataclasses import dataclass, field, fields

MAX_SEED = 2**64  # seeds are integers in [0, 2**64), what torch.Generator.manual_seed takes
MAX_N = 64  # samples of one prompt
MAX_LOGPROBS = 20  # top log-probabilities per token (vLLM's default limit)


def as_int(x, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer-like value (int, numpy integer, 0-d integer tensor) as an int; bools and floats are refused.

    >>> as_int(5, "max_tokens")
    5
    >>> as_int(True, "max_tokens")
    Traceback (most recent call last):
    ValueError: max_tokens must be an integer, got bool True
    """
    if isinstance(x, bool) or type(x).__name__ == "bool_":
        raise ValueError(f"{name} must be an integer, got bool {x!r}")
    try:
        v = operator.index(x)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(x).__name__} {_short(x)}") from None
    if lo is not None and v < lo or hi is not None and v > hi:
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ValueError(f"{name}={v} must be {bounds}")
    return v


def as_float(x, name: str) -> float:
    """A finite real number (int, float, numpy float) as a float; bools, strings, NaN and infinities are refused."""
    if isinstance(x, bool) or type(x).__name__ == "bool_" or not hasattr(x, "__float__") or isinstance(x, str):
        raise ValueError(f"{name} must be a number, got {type(x).__name__} {_short(x)}")
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{name}={v} must be a finite number")
    return v


def as_token_ids(x, name: str = "prompt_token_ids") -> list[int]:
    """A sequence of token ids (list, tuple, 1-d numpy array or tensor of integers) as a list of ints.

    >>> as_token_ids((1, 2))
    [1, 2]
    >>> as_token_ids("abc")
    Traceback (most recent call last):
    ValueError: prompt_token_ids must be a list of token ids, got str 'abc'
    """
    if hasattr(x, "ndim") and hasattr(x, "tolist"):  # numpy array or torch tensor, without importing either
        if x.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got an array of shape {tuple(x.shape)}")
        x = x.tolist()
    if not isinstance(x, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids, got {type(x).__name__} {_short(x)}")
    return [as_int(t, f"{name}[{i}]", lo=0) for i, t in enumerate(x)]


def as_strings(x, name: str) -> tuple[str, ...]:
    """A string or a list of strings (OpenAI's `stop`) as a tuple of non-empty strings; None is none.

    >>> as_strings("\\n\\n", "stop"), as_strings(None, "stop")
    (('\\n\\n',), ())
    """
    if x is None:
        return ()
    if isinstance(x, str):
        x = [x]
    if not isinstance(x, (list, tuple)) or not all(isinstance(v, str) and v for v in x):
        raise ValueError(f"{name} must be a string or a list of non-empty strings, got {_short(x)}")
    return tuple(x)


def _short(x, n=40) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 3] + "..."


def parse_prompt(prompt) -> tuple[str | None, list[int] | None]:
    """One prompt as the API and a prompts file take it: (text, None) or (None, token ids).

    Text is a str; token ids a list of ints (or an integer array); a dict {"prompt": text} or
    {"prompt_token_ids": ids} says which it is, as vLLM's TextPrompt and TokensPrompt do.

    >>> parse_prompt("ROMEO:"), parse_prompt([1, 2]), parse_prompt({"prompt_token_ids": [3]})
    (('ROMEO:', None), (None, [1, 2]), (None, [3]))
    """
    if isinstance(prompt, dict):
        keys = set(prompt)
        if keys == {"prompt"} and isinstance(prompt["prompt"], str):
            return parse_prompt(prompt["prompt"])
        if keys == {"prompt"}:
            raise ValueError(f'"prompt" must be text (a str), got {type(prompt["prompt"]).__name__}')
        if keys == {"prompt_token_ids"}:
            return None, as_token_ids(prompt["prompt_token_ids"])
        raise ValueError(f'a prompt dict needs exactly one key, "prompt" or "prompt_token_ids"; got {sorted(keys)}')
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"prompt is not valid text: {prompt[e.start : e.end]!r} at character {e.start} is half of a "
                "UTF-16 surrogate pair; send the whole character"
            ) from None
        return prompt, None
    if isinstance(prompt, (bytes, bytearray)):
        raise ValueError("prompt is bytes; decode it to text (a str) or pass a list of token ids")
    if isinstance(prompt, (list, tuple)) or hasattr(prompt, "ndim"):
        return None, as_token_ids(prompt)
    raise ValueError(
        f"prompt must be text (a str) or token ids (a list of int), got {type(prompt).__name__} {_short(prompt)}"
    )


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop. Checked when made (and again when a request
    is added, in case a field was changed since): a bad value raises ValueError naming it.

    >>> SamplingParams(temperature=0).greedy        # temperature 0 means argmax
    True
    >>> SamplingParams(top_k=2.5)
    Traceback (most recent call last):
    ValueError: top_k must be an integer, got float 2.5
    """

    n: int = 1  # samples of the prompt (they share its pages through the prefix cache)
    temperature: float = 1.0
    top_k: int = 0  # 0 (or -1, as older vLLM spells it): no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None  # a per-request seed makes its samples reproducible (sample i of n uses seed + i)
    max_tokens: int = 16
    min_tokens: int = 0  # no stop (EOS, stop tokens or strings) before this many tokens
    stop: tuple[str, ...] = ()  # strings that end the output, matched on the decoded text
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # return each sampled token's log-probability and the top `logprobs` others

    def __post_init__(self):
        self.validate()

    @property
    def greedy(self):
        return self.temperature == 0

    def validate(self):
        """Check every field and store it in its canonical type; raise ValueError naming the bad one and the fix."""
        self.n = as_int(self.n, "n")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n={self.n} must be between 1 and {MAX_N}")
        self.max_tokens = as_int(self.max_tokens, "max_tokens")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: a request must generate at least 1 token")
        self.min_tokens = as_int(self.min_tokens, "min_tokens")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must be between 0 and max_tokens={self.max_tokens}")
        self.temperature = as_float(self.temperature, "temperature")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature:g} is negative; use 0 for greedy or a positive value")
        self.top_p = as_float(self.top_p, "top_p")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p:g} is outside (0, 1]; use 1 to turn the nucleus cut off")
        self.top_k = as_int(self.top_k, "top_k")
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k} is negative; use 0 to turn top-k off")
        self.top_k = max(self.top_k, 0)
        if self.seed is not None:
            self.seed = as_int(self.seed, "seed")
            if not 0 <= self.seed < MAX_SEED:
                raise ValueError(f"seed={self.seed} is outside [0, 2**64); pick a smaller seed")
        self.stop = as_strings(self.stop, "stop")
        self.stop_token_ids = tuple(
            as_token_ids(() if self.stop_token_ids is None else self.stop_token_ids, "stop_token_ids")
        )
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                got = getattr(self, name)
                raise ValueError(f"{name} must be true or false, got {type(got).__name__} {got!r}")
        if self.logprobs is not None:
            self.logprobs = as_int(self.logprobs, "logprobs")
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs={self.logprobs} must be between 0 and {MAX_LOGPROBS}")

    @classmethod
    def from_dict(cls, d: dict, base: "SamplingParams | None" = None) -> "SamplingParams":
        """Parameters by name (a prompts-file line, a JSON body), on top of `base`'s; unknown names are refused.

        >>> SamplingParams.from_dict({"max_tokens": 4}, SamplingParams(temperature=0)).greedy
        True
        """
        names = [f.name for f in fields(cls)]
        if unknown := sorted(set(d) - set(names)):
            raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {names}")
        return cls(**{**({f: getattr(base, f) for f in names} if base else {}), **d})


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


@dataclass(eq=False, slots=True)
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
    t_added: float = 0.0  # when it was added (the engine's clock): it arrives no earlier
    num_computed_tokens: int = 0
    num_placeholders: int = 0  # tokens being sampled by a step still in flight (async scheduling)
    num_inflight: int = 0  # batches holding this request that the engine has not yet updated from
    num_pages_sent: int = 0  # of its page table, the entries the runner has been sent (ScheduledRequest)
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache when first scheduled (-1: not yet)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token or string that ended it (None: EOS, or not stopped)
    error: str | None = None
    prompt: str | None = None  # the prompt's text, when it came as text
    index: int = 0  # which of its prompt's n samples it is
    logprobs: list | None = None  # per output token, if asked: (its log-probability, [(token, logprob), ...])
    text: str = ""  # its output decoded so far, kept only for requests with stop strings
    detokenizer: object = None  # the engine's incremental decoder of `text`
    # times on the engine's clock (seconds): arrival, first scheduled, first token, finished
    times: list[float | None] = field(default_factory=lambda: [None] * 4, repr=False)
    token_ids: list[int] = field(init=False, repr=False)  # the prompt, then one more per generated token
    num_prompt_tokens: int = field(init=False)

    def __post_init__(self):
        self.set_prompt(self.prompt_token_ids)

    def set_prompt(self, ids: list[int]):
        self.prompt_token_ids, self.num_prompt_tokens, self.token_ids = ids, len(ids), list(ids)

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
