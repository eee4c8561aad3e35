"""One engine config: every setting declared once, checked once, read where it is needed.

`EngineConfig` is what `LLM(**kwargs)` takes, what the command line fills from flags of the same names
(with dashes), what the scheduler and the runner read, and what `--output-json` writes. The engine
resolves it once when it starts (the model's name and context, the dtype and device, the number of KV
pages, the stop tokens) into a copy where nothing is left to choose. As nano-vllm's `Config` and vLLM's
`EngineArgs`: no setting is passed along by hand through the constructors.
"""

import re
from dataclasses import dataclass

from nanoserve_sched.request import MAX_SEED, as_float

LOAD_FORMATS = ("auto", "dummy")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTION = ("auto", "cpu", "reference", "triton")
SIM_DEVICES = ("h100", "h200", "a100", "h100-pcie", "h100-nvl", "h200-nvl")  # --device sim:NAME (nanoserve.GPUS)
DEVICE_NAME = re.compile(rf"cpu|cuda(:\d+)?|sim:({'|'.join(SIM_DEVICES)})")
FLAGS = {"attention": "attention-backend"}  # settings whose flag is not their name with dashes


@dataclass
class EngineConfig:
    """Every setting of an engine. Checked when made: a bad value raises ValueError naming the setting and
    its flag.

    >>> EngineConfig(block_size=0)
    Traceback (most recent call last):
    ValueError: block_size=0 (--block-size) must be at least 1
    """

    model: str | None = None  # a Hugging Face folder or hub id; None: the embedded nanoserve_models/shakespeare
    sched: str = "sync"
    load_format: str = "auto"  # "dummy": random weights of the model's shape
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on a GPU (a simulated one too)
    device: str | None = None  # cpu, cuda, cuda:N, sim:h100/h200/a100; None: cuda if there is one
    attention: str = "auto"  # --attention-backend: auto, cpu, reference, triton (nanoserve_kernels/)
    enforce_eager: bool = False  # no CUDA graphs
    cuda_graphs: bool | None = None  # None: on CUDA unless enforce_eager (True off CUDA runs their buffers eagerly)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context
    num_gpu_blocks_override: int | None = None  # None: as many KV pages as fit
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    pp: int = 1
    step_timeout_s: float | None = None  # a step running longer fails the run (a watchdog); None: wait forever
    # resolved by the engine when it starts, not set by hand:
    num_blocks: int | None = None  # KV pages in the cache
    eos_token_ids: tuple[int, ...] = ()  # the model's own stop tokens

    def __post_init__(self):
        from nanoserve_sched import SCHEDULERS

        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "pp"):
            self._int(name, lo=1)
        for name, lo in (("max_model_len", 2), ("num_gpu_blocks_override", 1), ("num_blocks", 1)):
            if getattr(self, name) is not None:
                self._int(name, lo)
        self._int("seed", lo=0)
        if self.seed >= MAX_SEED:
            raise ValueError(f"{self._flag('seed')} is outside [0, 2**64); pick a smaller seed")
        if self.sched not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.sched!r}; choose one of: {', '.join(SCHEDULERS)}")
        for name, choices in (("load_format", LOAD_FORMATS), ("dtype", DTYPES), ("attention", ATTENTION)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{self._flag(name)} is not one of: {', '.join(choices)}")
        for name in ("enforce_eager", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{self._flag(name)} must be True or False")
        self.gpu_memory_utilization = as_float(self.gpu_memory_utilization, "gpu_memory_utilization")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"{self._flag('gpu_memory_utilization')} must be in (0, 1]")
        if self.step_timeout_s is not None:
            self.step_timeout_s = as_float(self.step_timeout_s, "step_timeout_s")
            if self.step_timeout_s <= 0:
                raise ValueError(f"{self._flag('step_timeout_s')} must be positive, or None to wait forever")
        if self.device is not None and not DEVICE_NAME.fullmatch(str(self.device)):
            sims = ", ".join(f"sim:{s}" for s in SIM_DEVICES)
            raise ValueError(f"{self._flag('device')} is not a device; use cpu, cuda, cuda:N or one of {sims}")
        if self.pp > 1 and SCHEDULERS[self.sched].allow_placeholders:
            raise ValueError(
                f"--sched {self.sched} plans on tokens still in flight, which --pp {self.pp} microbatches do not "
                "allow; use --sched sync or balanced with --pp"
            )
        self.eos_token_ids = tuple(self.eos_token_ids)

    @property
    def simulated(self) -> bool:
        return str(self.device).startswith("sim:")

    def _flag(self, name: str) -> str:
        return f"{name}={getattr(self, name)!r} (--{FLAGS.get(name, name.replace('_', '-'))})"

    def _int(self, name: str, lo: int):
        value = getattr(self, name)
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ValueError(f"{self._flag(name)} must be an integer")
        if int(value) < lo:
            raise ValueError(f"{self._flag(name)} must be at least {lo}")
        setattr(self, name, int(value))
