# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 12 — Today's models: KV bytes per token, grouped-query attention and RoPE
#
# GPT-2 (2019) is the model the engine was written around. The models people serve today — Llama,
# Mistral, Qwen — are the same transformer with four changes, and nanoserve runs them in
# `nanoserve_models/llama.py` through the very serving step GPT-2 uses (`PagedLM` in `nanoserve.py`). Two of the
# changes matter to a serving engine, and this lesson is about them:
#
# - **grouped-query attention** shrinks what every token leaves in the KV cache, and the KV cache is
#   what decides how many requests fit on a device at once;
# - **rotary position embeddings (RoPE)** move positions out of the embedding and into attention, where
#   they turn q and k by an angle.
#
# (The other two, RMSNorm and the SwiGLU MLP, change a few lines of the forward pass and nothing else.)
#
# In this lesson you will:
#
# - count the KV bytes per token of GPT-2 124M and of Qwen3-0.6B from their real shapes, and how many
#   requests of 1,000 tokens fit in 1 GB for each;
# - see what grouped-query attention changes in the attention kernel: query heads that share a KV head;
# - serve a tiny random Qwen3 with the engine and check it against a plain loop and against `transformers`;
# - draw RoPE: the angles, why q . k then depends only on the distance between tokens, and what Llama 3's
#   rope scaling does to the slow channels.
#
# Everything runs on a CPU in seconds: the real models are built on torch's `meta` device (shapes, no
# memory), and the one we run is tiny.

# %%
import json
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from helpers import show  # lessons/helpers.py: puts the checkout on sys.path, shows figures

import nanoserve as ns
from nanoserve_kernels import reference
from nanoserve_models.llama import LLAMA_FAMILY, Llama, LlamaConfig, rope_frequencies, rotate
from nanoserve_sched import SamplingParams

torch.set_num_threads(1)

# %% [markdown]
# ## What one token leaves in the cache
#
# Every token a request has seen keeps, in every layer, one key and one value per **KV head**, each
# `head_dim` numbers. So the bytes per token are
#
# ```
# 2 (key and value) x n_layer x n_kv_heads x head_dim x bytes per number
# ```
#
# which is `ns.kv_bytes_per_token`. GPT-2 has as many KV heads as query heads. Qwen3-0.6B has 16 query
# heads but only 8 KV heads. The shapes come from the built-in tables that `--load-format dummy` uses
# (`ns.GPT2_FAMILY` and `LLAMA_FAMILY` in `nanoserve_models/llama.py`), and the parameter counts from the models
# themselves, built on the `meta` device. We count in bfloat16, 2 bytes a number, as a GPU serves them.

# %%
BF16 = 2
names = ["gpt2", "qwen3-0.6b"]
cfgs = {"gpt2": ns.GPT2_FAMILY["gpt2"], "qwen3-0.6b": LLAMA_FAMILY["qwen3-0.6b"]}
models = {n: ns.load_model(n, load_format="dummy", device="meta")[0] for n in names}  # shapes, no memory
params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
kv = {n: ns.kv_bytes_per_token(cfgs[n], BF16) for n in names}
print(f"{'model':12} {'params':>7} {'layers':>6} {'q heads':>7} {'KV heads':>8} {'head_dim':>8} {'KV bytes/token':>15}")
for n in names:
    c = cfgs[n]
    print(f"{n:12} {params[n] / 1e6:6.0f}M {c.n_layer:6} {c.n_head:7} {c.n_kv_heads:8} {c.head_dim:8} {kv[n]:15,}")

# %% [markdown]
# Qwen3-0.6B keeps **three times** GPT-2's bytes per token: it has more than twice the layers, and heads
# twice as wide. Grouped-query attention already halved it: with a KV head per query head it would
# keep six times as much.

# %% [markdown]
# ## How many requests fit in 1 GB
#
# The engine hands out the cache in pages (`--block-size`, 16 tokens by default), so a request of 1,000
# tokens holds ⌈1000 / 16⌉ = 63 pages, 1,008 token slots. How many such requests fit in 1 GB (10⁹ bytes)
# of cache?

# %%
GB, TOKENS, PAGE = 10**9, 1000, 16
slots = -(-TOKENS // PAGE) * PAGE  # 1008: whole pages
no_gqa = LlamaConfig(**{**vars(LLAMA_FAMILY["qwen3-0.6b"]), "n_kv_heads": 16})  # a KV head per query head
kv["qwen3-0.6b, no GQA"] = ns.kv_bytes_per_token(no_gqa, BF16)
fit = {n: GB // (slots * b) for n, b in kv.items()}
for n, f in fit.items():
    print(f"{n:20} {slots * kv[n] / 1e6:6.1f} MB per request -> {f:3d} requests of {TOKENS} tokens in 1 GB")

fig, ax = plt.subplots(figsize=(7, 2.6))
ax.barh(list(fit)[::-1], list(fit.values())[::-1], color=["#94a3b8", "#16a34a", "#3b82f6"])
for y, f in enumerate(list(fit.values())[::-1]):
    ax.text(f + 0.3, y, str(f), va="center")
ax.set_xlabel(f"requests of {TOKENS} tokens in 1 GB of KV cache (bfloat16)")
show(fig, "12_requests_per_gb")

# %% [markdown]
# Fewer requests in flight means smaller decode batches, and a decode step costs about the same whether
# it serves 8 requests or 26 (it reads every weight once either way): the cache size per token is why
# serving engines care so much about grouped-query attention, and why a 0.6B model of today serves fewer
# long requests per GB than the 124M GPT-2. Reading the cache is also each decode's memory traffic: at
# 1,000 tokens of context one decode token of Qwen3-0.6B reads 115 MB of keys and values, a tenth of its
# 1.2 GB of weights — and a batch of 10 such requests reads as much cache as weights.

# %% [markdown]
# ## Grouped-query attention in the kernel
#
# Nothing about the cache layout changes: each layer's pages are `(num_blocks, block_size, n_kv_heads,
# head_dim)`, with fewer heads. What changes is which keys a query head reads: with `group = n_heads //
# n_kv_heads`, query head `h` reads KV head `h // group`. Qwen3-0.6B's 16 query heads in groups of two:

# %%
c = LLAMA_FAMILY["qwen3-0.6b"]
group = c.n_head // c.n_kv_heads
fig, ax = plt.subplots(figsize=(9, 2.2))
for h in range(c.n_head):
    ax.plot([h, (h // group) * group + (group - 1) / 2], [1, 0], color="#64748b", lw=1)
    ax.add_patch(plt.Rectangle((h - 0.4, 1), 0.8, 0.3, color="#3b82f6"))
for j in range(c.n_kv_heads):
    ax.add_patch(plt.Rectangle((j * group - 0.4, -0.3), group - 0.2, 0.3, color="#16a34a"))
    ax.text(j * group + (group - 1) / 2, -0.15, f"KV {j}", ha="center", va="center", color="white", fontsize=8)
ax.text(-1, 1.15, "query heads", ha="right", va="center")
ax.text(-1, -0.15, "KV heads (cached)", ha="right", va="center")
ax.set_xlim(-6, c.n_head)
ax.set_ylim(-0.4, 1.4)
ax.axis("off")
show(fig, "12_gqa_heads")

# %% [markdown]
# The kernels read a KV head once for its whole group; they never copy it. To see that this is all GQA
# is, we give `reference.paged_attention` a cache of 2 KV heads and 4 query heads, and compare with
# plain multi-head attention over a cache where every KV head has been copied for each query head of
# its group (twice the memory, the same result). One request: 10 tokens in three pages of 4, the last
# 3 of them new in this step.

# %%
gen = torch.Generator().manual_seed(0)
H, H_kv, D, bs = 4, 2, 8, 4
k_cache, v_cache = torch.randn(5, bs, H_kv, D, generator=gen), torch.randn(5, bs, H_kv, D, generator=gen)
q = torch.randn(3, H, D, generator=gen)  # the 3 new tokens' queries
i32 = lambda x: torch.tensor(x, dtype=torch.int32)
step = dict(cu_seqlens_q=i32([0, 3]), context_lens=i32([10]), block_tables=i32([[3, 0, 4]]), max_q=3, max_ctx=10)
gqa = reference.paged_attention(q, k_cache, v_cache, scale=D**-0.5, **step)
copied = [t.repeat_interleave(H // H_kv, dim=2) for t in (k_cache, v_cache)]  # (5, 4, 4 heads, 8)
mha = reference.paged_attention(q, *copied, scale=D**-0.5, **step)
print("GQA over 2 KV heads vs MHA over the copied heads, largest difference:", (gqa - mha).abs().max().item())

# %% [markdown]
# ## A tiny Qwen3 through the engine
#
# `nanoserve_models/llama.py` reads a Hugging Face `config.json` (`LlamaConfig.from_hf`) and names its parameters as
# Hugging Face does, so a folder of `config.json` and `model.safetensors` is a checkpoint both nanoserve
# and `transformers` load. We write one with random weights, in Qwen3's architecture at a toy size: 4
# query heads on 2 KV heads, `head_dim` 32 (so `n_head x head_dim` is 128, not the model width 64, as in
# Qwen3), and the LM head tied to the embedding.

# %%
from safetensors.torch import save_file

config = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=255,
)  # fmt: skip
folder = Path(tempfile.mkdtemp()) / "tiny-qwen3"
folder.mkdir()
(folder / "config.json").write_text(json.dumps(config))
torch.manual_seed(0)
tiny = Llama(LlamaConfig.from_hf(config)).eval()
with torch.no_grad():
    for p in tiny.parameters():  # larger than the default init: distinct logits, no near-ties in argmax
        p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
save_file(tiny.state_dict(), folder / "model.safetensors")  # the rotary table is computed, not saved

llm = ns.LLM(str(folder), num_gpu_blocks_override=16, device="cpu")
k0, _ = llm.runner.kv_caches[0]
print("the engine's model:", type(llm.model).__name__, llm.model_config.architecture)
print("layer 0's key cache:", tuple(k0.shape), "= (pages, block_size, KV heads, head_dim)")
prompt = [3, 17, 42, 99, 7]
served = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
served = served.outputs[0].token_ids

seq = list(prompt)  # the slow loop of lesson 1: the whole sequence through the dense forward every step
with torch.no_grad():
    for _ in range(10):
        seq.append(int(tiny(torch.tensor([seq]))[0, -1].argmax()))
print("engine:", served)
print("loop:  ", seq[len(prompt) :])

# %% [markdown]
# The weights are random, so the tokens mean nothing (random models like to repeat themselves); what
# matters is that the paged engine and the plain loop agree. And the same checkpoint in `transformers`'
# own Qwen3: its logits must be ours.

# %%
with warnings.catch_warnings():  # transformers imports tqdm.auto, which warns in a notebook without ipywidgets
    warnings.simplefilter("ignore")
    import transformers

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = torch.tensor([seq])
with torch.no_grad():
    ours, theirs = tiny(ids), hf(ids).logits
print(type(hf).__name__, "- largest difference in logits:", (ours - theirs).abs().max().item())

# %% [markdown]
# ## RoPE in a picture
#
# GPT-2 adds a learned vector per position to the embedding. RoPE adds nothing: it splits each head's
# `head_dim` channels into pairs and turns pair `i` of q and of k, like a clock hand, by the angle
# `position x rope_theta ** (-2i / head_dim)`. The first pairs turn fast (about a radian per token), the
# last ones take tens of thousands of tokens for one turn. `rope_frequencies` gives the speeds, and the
# model keeps the cos and sin of every position in one table, looked up once per step
# (`Llama.layers`) for all the layers.
#
# Why turn? Rotating q by angle `m·ω` and k by `n·ω` leaves their dot product depending on `(m - n)·ω`
# only: attention sees how far apart two tokens are, whatever their absolute positions. Right: the same
# q and k placed at distance d, with q at three different positions — the three curves are one.

# %%
c = LlamaConfig(head_dim=64, rope_theta=10000.0, n_positions=256)
positions = torch.arange(256)
angles = positions[:, None].float() * rope_frequencies(c)[None, :]  # (positions, head_dim // 2)
qv, kvec = torch.randn(1, 1, 64, generator=gen), torch.randn(1, 1, 64, generator=gen)  # one head


def turned(x, pos):  # x (1, 1, head_dim) at position pos
    a = angles[pos : pos + 1]
    return rotate(x, a.cos(), a.sin())


dists = range(0, 60)
scores = {m: [float((turned(qv, m) * turned(kvec, m - d)).sum()) for d in dists] for m in (60, 120, 240)}

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
im = left.imshow(angles[:128].cos().T, aspect="auto", cmap="RdBu", origin="lower")
left.set_xlabel("position")
left.set_ylabel("channel pair i (fast to slow)")
left.set_title("cos of each pair's angle")
fig.colorbar(im, ax=left)
for m, s in scores.items():
    right.plot(list(dists), s, lw=3 if m == 60 else 1.5, ls="-" if m == 60 else "--", label=f"q at position {m}")
right.set_xlabel("distance d = position of q - position of k")
right.set_ylabel("q . k after rotation")
right.set_title("the score depends on the distance only")
right.legend(fontsize="small")
fig.tight_layout()
show(fig, "12_rope")

# %% [markdown]
# Llama 3 was trained on 8,192 tokens and then stretched to 131,072 without retraining how it reads
# nearby tokens: its `rope_scaling` of type `llama3` leaves the fast pairs alone (wavelength below
# 8192 / 4 tokens), slows by `factor` = 32 the pairs whose wavelength is longer than 8,192 (they had never
# seen a whole turn), and blends in between. Here are the wavelengths of Llama-3.2-1B's 32 pairs, with and
# without it (`rope_frequencies` in `nanoserve_models/llama.py` is the whole rule):

# %%
llama = LLAMA_FAMILY["llama-3.2-1b"]
plain = LlamaConfig(**{**vars(llama), "rope_scaling": None})
wavelength = {"rope_theta only": 2 * torch.pi / rope_frequencies(plain)}  # tokens per turn of each pair
wavelength["llama3"] = 2 * torch.pi / rope_frequencies(llama)
fig, ax = plt.subplots(figsize=(7, 3))
for name, w in wavelength.items():
    ax.semilogy(w, marker="o", ms=3, label=name)
for t, label in ((8192, "original context"), (8192 / 4, "8192 / high_freq_factor")):
    ax.axhline(t, color="grey", ls=":", lw=1)
    ax.text(0, t * 1.2, label, fontsize=8, color="grey")
ax.set_xlabel("channel pair i")
ax.set_ylabel("wavelength (tokens)")
ax.legend()
show(fig, "12_llama3_rope")

# %% [markdown]
# ## Checks
#
# These fail if the KV arithmetic, grouped-query attention, the engine's Llama-family path or RoPE break.

# %%
assert kv["gpt2"] == 2 * 12 * 12 * 64 * 2 == 36_864 and kv["qwen3-0.6b"] == 2 * 28 * 8 * 128 * 2 == 114_688
assert fit == {"gpt2": 26, "qwen3-0.6b": 8, "qwen3-0.6b, no GQA": 4}
assert 590e6 < params["qwen3-0.6b"] < 600e6 and params["gpt2"] == 124_439_808
torch.testing.assert_close(gqa, mha)
assert k0.shape[2:] == (2, 32), "the cache holds the KV heads only"
assert served == seq[len(prompt) :], "the engine's greedy tokens must equal the plain loop's"
torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
for s in scores.values():  # the score depends on the distance, not on where q is
    torch.testing.assert_close(torch.tensor(s), torch.tensor(scores[60]), atol=1e-4, rtol=1e-4)
w = wavelength
assert torch.equal(w["llama3"][:8], w["rope_theta only"][:8]), "fast pairs are left alone"
assert torch.allclose(w["llama3"][-8:], 32 * w["rope_theta only"][-8:]), "slow pairs are slowed by factor"
print("all checks passed")

# %% [markdown]
# **Where to go from here**: `nanoserve_models/llama.py` is the whole family in about 400 lines — read it beside
# GPT-2 in `nanoserve.py`. With the `hub` extra, `python nanoserve.py --model Qwen/Qwen3-0.6B` serves the
# real model; `--load-format dummy --model qwen3-0.6b` runs its shape with random weights, no download.
