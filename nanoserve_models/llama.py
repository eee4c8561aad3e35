"""The Llama family for nanoserve's engine: Llama 2 and 3, Mistral (without a sliding window), Qwen2, Qwen3.

    python nanoserve.py --model Qwen/Qwen3-0.6B                   # a hub id (the hub extra) or a local folder
    python nanoserve.py --model qwen3-0.6b --load-format dummy    # its real shapes, random weights, no download

Read GPT-2 in nanoserve.py first. This is the same serving step, nanoserve.PagedLM (embed, the layers over
the paged KV cache, the LM head over the rows to sample), with what changed since GPT-2:

- RMSNorm instead of LayerNorm: divide by the root mean square; no mean subtracted, no bias.
- Rotary position embeddings (RoPE) instead of a learned position table: each pair of channels of q and k
  turns by an angle proportional to the token's position, so q . k depends on how far apart two tokens are,
  not on where they are. Nothing is added to the embedding.
- A SwiGLU MLP: down(silu(gate(x)) * up(x)), three matrices instead of two.
- Grouped-query attention: n_kv_heads < n_heads. The query heads come in groups that share one key and one
  value head, so the KV cache, which bounds how many requests fit, shrinks by n_heads / n_kv_heads. The
  attention kernels already handle it (nanoserve_kernels/reference.py); the model only makes k and v narrower.

The members differ by a flag each: Qwen2 adds biases to q, k and v; Qwen3 RMS-normalises each head of q and
k before rotating them; Llama 3 stretches RoPE's long wavelengths (rope_scaling "llama3"). The parameter
names are Hugging Face's, so a checkpoint loads without renaming. nanoserve.load_model comes here by
config.json's `architectures`; LlamaConfig.from_hf refuses what this file does not implement, naming the field.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoserve import AttnMetadata, PagedLM, plus_rowwise

# the architectures this file runs, with the model_type of each (a config.json without `architectures`)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",  # Llama's computation; refused when its sliding window would bite
    "Qwen2ForCausalLM": "qwen2",  # + biases on q, k and v
    "Qwen3ForCausalLM": "qwen3",  # + RMSNorm on each head of q and k
}
REQUIRED = object()


@dataclass
class LlamaConfig:
    """A Llama-family model's shape in the names the engine reads from every model's config (GPTConfig's too).

    >>> cfg = LlamaConfig.from_hf({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 100, "hidden_size": 32,
    ...     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    ...     "head_dim": 16, "max_position_embeddings": 128, "eos_token_id": [7, 8]})
    >>> cfg.n_head, cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm, cfg.eos_token_ids
    (4, 2, 16, True, (7, 8))
    """

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    n_positions: int = 2048  # max_position_embeddings: the context length
    n_embd: int = 4096  # hidden_size
    n_layer: int = 32  # num_hidden_layers
    n_head: int = 32  # num_attention_heads
    n_kv_heads: int = 32  # num_key_value_heads: n_head // n_kv_heads query heads read each
    head_dim: int = 128  # config.json's head_dim (Qwen3: n_head x head_dim != n_embd), else n_embd // n_head
    intermediate_size: int = 11008  # the MLP's width
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # RoPE's base: channel pair i turns by position * rope_theta ** (-2i / head_dim)
    rope_scaling: dict | None = None  # Llama 3's (factor, low/high_freq_factor, original_max_position_embeddings)
    tie_word_embeddings: bool = False  # the LM head is the embedding matrix, or a matrix of its own
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    eos_token_ids: tuple[int, ...] = ()  # every id that ends a request: config.json's and generation_config.json's

    @property
    def eos_token_id(self) -> int | None:
        """The first stop token, where one id is wanted (padding); `eos_token_ids` holds them all."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def from_hf(cls, d: dict, source="config.json", stop_ids=()):
        """Read a Hugging Face config.json dict; `stop_ids` are generation_config.json's end-of-sequence ids.
        Whatever this file does not implement raises ValueError naming `source` and the config.json field."""
        by_type = {t: a for a, t in ARCHITECTURES.items()}
        arch = (d.get("architectures") or [by_type.get(d.get("model_type"))])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"{source}: architectures {d.get('architectures')!r} is none of {', '.join(ARCHITECTURES)}"
            )
        refuse_unsupported(d, arch, source)
        get = lambda name, kind=int, default=REQUIRED: config_value(d, name, kind, source, default)
        n_embd, n_head = get("hidden_size"), get("num_attention_heads")
        cfg = cls(
            architecture=arch,
            vocab_size=get("vocab_size"),
            n_positions=get("max_position_embeddings"),
            n_embd=n_embd,
            n_layer=get("num_hidden_layers"),
            n_head=n_head,
            n_kv_heads=get("num_key_value_heads", default=n_head),
            head_dim=get("head_dim", default=0) or n_embd // max(n_head, 1),
            intermediate_size=get("intermediate_size"),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            qkv_bias=arch == "Qwen2ForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM",
            eos_token_ids=tuple(dict.fromkeys((*as_ids(d.get("eos_token_id"), "eos_token_id", source), *stop_ids))),
        )
        cfg.rope_theta, cfg.rope_scaling = read_rope(d, source, cfg.n_positions)
        names = dict(hidden_size="n_embd", num_attention_heads="n_head", num_key_value_heads="n_kv_heads")
        names |= dict(vocab_size="vocab_size", max_position_embeddings="n_positions", num_hidden_layers="n_layer")
        for hf, ours in (*names.items(), ("head_dim", "head_dim"), ("intermediate_size", "intermediate_size")):
            if getattr(cfg, ours) < 1:
                raise ValueError(f"{source}: {hf} must be at least 1, got {getattr(cfg, ours)}")
        if cfg.n_head % cfg.n_kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads={cfg.n_head} is not a multiple of num_key_value_heads="
                f"{cfg.n_kv_heads}: grouped-query attention gives every KV head the same number of query heads"
            )
        if "head_dim" not in d and n_embd % n_head:
            raise ValueError(f"{source}: hidden_size={n_embd} is not a multiple of num_attention_heads={n_head}")
        return cfg

    def to_hf(self) -> dict:
        """The config.json fields of this shape, from which transformers builds the same model (benchmarks
        compare the two on the same weights); from_hf(to_hf()) gives this config back."""
        d = dict(
            architectures=[self.architecture], model_type=ARCHITECTURES[self.architecture],
            vocab_size=self.vocab_size, max_position_embeddings=self.n_positions, hidden_size=self.n_embd,
            num_hidden_layers=self.n_layer, num_attention_heads=self.n_head, num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim, intermediate_size=self.intermediate_size, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu",
            eos_token_id=list(self.eos_token_ids) or None, use_sliding_window=False, sliding_window=None,
        )  # fmt: skip
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **self.rope_scaling}
        return d


def config_value(d: dict, name: str, kind: type, source, default=REQUIRED):
    """config.json's d[name] as an int, float or bool, or `default` when it is absent or null."""
    v = d.get(name)
    if v is None:
        if default is REQUIRED:
            raise ValueError(f"{source}: {name} is missing; a Llama-family config.json gives it")
        return default
    if kind is bool:
        ok = isinstance(v, bool)
    else:
        ok = not isinstance(v, bool) and isinstance(v, (int, float) if kind is float else int)
    if not ok:
        what = {int: "an integer", float: "a number", bool: "true or false"}[kind]
        raise ValueError(f"{source}: {name} must be {what}, got {type(v).__name__} {v!r}")
    return kind(v)


def as_ids(v, name: str, source) -> tuple[int, ...]:
    """An end-of-sequence field (null, an id or a list of ids) as a tuple of ids."""
    ids = () if v is None else tuple(v) if isinstance(v, list) else (v,)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{source}: {name} must be a token id or a list of them, got {v!r}")
    return ids


def refuse_unsupported(d: dict, arch: str, source):
    """Fields that would change the computation in ways this file does not implement: refused, not ignored."""
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not silu, the only SwiGLU activation here")
    for name in ("attention_bias", "mlp_bias"):  # Qwen2's q, k, v biases are its own, whatever the flag says
        if d.get(name) and not (arch == "Qwen2ForCausalLM" and name == "attention_bias"):
            raise ValueError(f"{source}: {name} is true, but nanoserve's {arch} has no such biases")
    no_window = "nanoserve has no sliding-window attention (every token attends to its whole context)"
    if d.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window is true; {no_window}")
    window, context = d.get("sliding_window"), d.get("max_position_embeddings", 0)
    if arch == "MistralForCausalLM" and window is not None and window < context:  # a window >= the context never bites
        raise ValueError(
            f"{source}: sliding_window {window} is shorter than max_position_embeddings {context}; {no_window}"
        )
    if any(t != "full_attention" for t in d.get("layer_types") or ()):
        raise ValueError(f"{source}: layer_types has {set(d['layer_types'])}; {no_window}")
    if d.get("quantization_config"):
        raise ValueError(f"{source}: quantization_config: the weights are quantized; nanoserve runs float checkpoints")
    if d.get("rope_interleaved"):  # nanotron's flag (SmolLM2 sets it false): pairs (2j, 2j+1), not (j, j + d/2)
        raise ValueError(f"{source}: rope_interleaved is true; here RoPE turns channel pairs (j, j + head_dim/2)")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor {d['partial_rotary_factor']}: here RoPE turns every channel")


def read_rope(d: dict, source, n_positions: int) -> tuple[float, dict | None]:
    """RoPE's base and Llama 3's scaling, from `rope_theta` + `rope_scaling` (checkpoints saved by transformers 4)
    or `rope_parameters` (transformers 5). Any scaling but "default" and "llama3" is refused."""
    name = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
    params = d.get(name) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: {name} must be one dict of RoPE settings, got {params!r}")
    theta = config_value({"rope_theta": 10000.0, **d, **params}, "rope_theta", float, source)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(
            f"{source}: {name} has rope_type {kind!r}; nanoserve implements plain RoPE and Llama 3's 'llama3' "
            "scaling only (a checkpoint scaled for a longer context may run within its original one without it)"
        )
    scaling = {"original_max_position_embeddings": n_positions, **params}
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    out = {k: config_value(scaling, k, float, f"{source}: {name}") for k in keys}
    if not 0 < out["low_freq_factor"] < out["high_freq_factor"] or out["factor"] <= 0:
        raise ValueError(f"{source}: {name} needs factor > 0 and 0 < low_freq_factor < high_freq_factor, got {out}")
    return theta, out


# Real shapes for `--load-format dummy` (random weights, no download), written as each checkpoint's own
# config.json fields and read by the same code; the end-of-sequence ids are those of its generation_config.json.
LLAMA_FAMILY = {
    name: LlamaConfig.from_hf(d, f"{name} (built in)")
    for name, d in {
        "qwen3-0.6b": dict(
            architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024, intermediate_size=3072,
            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
            max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000, tie_word_embeddings=True,
            attention_bias=False, use_sliding_window=False, sliding_window=None, eos_token_id=[151645, 151643],
        ),
        "qwen2.5-0.5b": dict(
            architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896, intermediate_size=4864,
            num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
            eos_token_id=151643,
        ),
        "llama-3.2-1b": dict(
            architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048, intermediate_size=8192,
            num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
            max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
            rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192),
            eos_token_id=128001,
        ),
        "smollm2-135m": dict(
            architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
            num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_theta=100000, tie_word_embeddings=True, eos_token_id=0,
        ),
    }.items()
}  # fmt: skip


# --- the model ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, in float32 whatever x's dtype (as transformers computes it)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """How fast each channel pair turns, in radians per position: (head_dim // 2,), fastest first.

    Llama 3 (rope_scaling "llama3") slows the pairs whose wavelength is longer than the original context
    by `factor`, keeps those shorter than a `high_freq_factor`-th of it, and blends in between: the model
    was stretched to a longer context without retraining how it reads nearby tokens.
    """
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    wavelen = 2 * math.pi / inv_freq
    old = s["original_max_position_embeddings"]
    slowed = torch.where(wavelen > old / s["low_freq_factor"], inv_freq / s["factor"], inv_freq)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * slowed / s["factor"] + smooth * slowed
    between = (wavelen >= old / s["high_freq_factor"]) & (wavelen <= old / s["low_freq_factor"])
    return torch.where(between, blended, slowed)


def rope_table(cfg: LlamaConfig) -> torch.Tensor:
    """cos and sin of every position's angles, (n_positions, head_dim): cos in the first half, sin in the second.

    Computed once in float32 (the angles of far positions need it) and cast with the model, as transformers
    casts its cos and sin; a step looks up the rows of its positions (`Llama.layers`)."""
    angles = torch.arange(cfg.n_positions, dtype=torch.float32)[:, None] * rope_frequencies(cfg)[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def rotate(x, cos, sin):
    """Turn channel pairs (j, j + head_dim/2) of every head by its position's angles: x (..., heads, head_dim),
    cos and sin (..., head_dim // 2), the same for every head. (transformers' rotate_half, written out.)"""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class RopeMetadata(AttnMetadata):
    """A step's AttnMetadata with its tokens' rotary cos and sin, (N, head_dim // 2) each: looked up once
    per step in `Llama.layers`, read by every layer (and kept by `planned()`, a dataclasses.replace)."""

    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = cfg.n_head, cfg.n_kv_heads, cfg.head_dim
        self.qk_norm = cfg.qk_norm
        kv_width = cfg.n_kv_heads * cfg.head_dim  # narrower than q's under grouped-query attention
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, kv_width, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, kv_width, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        if cfg.qk_norm:  # Qwen3: each head of q and k RMS-normalised (one weight of head_dim for all heads)
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps), RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, layer: int, meta: AttnMetadata | None, cos, sin):
        rows = x.shape[:-1]  # (N,) for a serving step, (B, T) for a dense batch
        q = self.q_proj(x).view(*rows, self.n_head, self.head_dim)
        k = self.k_proj(x).view(*rows, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*rows, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # positions enter here, and only here
        scale = self.head_dim**-0.5
        if meta is not None:  # serving: the new tokens' k and v go to the paged cache, q attends over it
            return self.o_proj(meta.attend(layer, q, k, v, scale).reshape(*rows, -1))
        # a dense (B, T) batch: each KV head repeated for the query heads of its group, then causal attention
        group = self.n_head // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=-2), v.repeat_interleave(group, dim=-2)  # (B, T, nh, hd)
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, scale=scale)
        return self.o_proj(y.transpose(1, 2).reshape(*rows, -1))  # y was (B, nh, T, hd)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):  # SwiGLU: the gate, through SiLU, scales the up projection channel by channel
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, layer: int, meta: RopeMetadata | None, cos=None, sin=None):
        if meta is not None:  # a serving step: the cos and sin of its positions came with the step (Llama.layers)
            cos, sin = meta.cos, meta.sin
        x = x + self.self_attn(self.input_layernorm(x), layer, meta, cos, sin)
        return plus_rowwise(x, lambda h: self.mlp(self.post_attention_layernorm(h)))


class Llama(PagedLM):
    """A Llama-family model. `forward(idx)` runs a dense (B, T) batch; `forward_paged` (PagedLM's) a serving step.

    >>> cfg = LlamaConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_kv_heads=1, head_dim=4,
    ...                   intermediate_size=16)
    >>> Llama(cfg)(torch.zeros(1, 3, dtype=torch.long)).shape                 # (B, T, vocab)
    torch.Size([1, 3, 10])
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(  # Hugging Face's names: model.embed_tokens, model.layers.N..., model.norm
            dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                norm=RMSNorm(cfg.n_embd, cfg.rms_norm_eps),
            )
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_table(cfg), persistent=False)  # (n_positions, head_dim): cos | sin
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # the dummy weights: transformers' initialisation (std 0.02, zero biases)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self):
        return self.model.norm

    def lm_head_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def embed(self, input_ids, positions):  # (N,) -> (N, C); the positions enter in attention instead (RoPE)
        return self.model.embed_tokens(input_ids)

    def rope_at(self, positions):
        """The cos and sin of these positions, (..., head_dim // 2) each."""
        return self.rope[positions].chunk(2, dim=-1)

    def layers(self, x, meta: AttnMetadata, start: int, end: int):
        """PagedLM's layer loop, with the cos and sin of the step's positions looked up once for its layers."""
        cos, sin = self.rope_at(meta.positions)
        meta = RopeMetadata(**{f.name: getattr(meta, f.name) for f in fields(AttnMetadata)}, cos=cos, sin=sin)
        return super().layers(x, meta, start, end)

    def forward(self, idx):  # (B, T) -> logits (B, T, vocab)
        cos, sin = self.rope_at(torch.arange(idx.shape[1], device=idx.device))  # (T, head_dim // 2)
        x = self.model.embed_tokens(idx)
        for i, block in enumerate(self.model.layers):
            x = block(x, i, None, cos, sin)
        return self.model.norm(x) @ self.lm_head_weight().T

    def hf_to_ours(self, state: dict) -> dict:
        """A Hugging Face checkpoint's tensors under our names: the same, less what is computed here (the
        rotary frequencies old checkpoints saved) or shared (a tied head saved as a copy of the embedding)."""
        skip = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if self.config.tie_word_embeddings else ())
        return {k: w for k, w in state.items() if not k.endswith(skip)}
