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
# # Lesson 1 — The GPT-2 forward pass and the tokenizer
#
# A serving engine exists to run one function many times, fast: the model's forward pass, which
# turns a sequence of token ids into a score for every possible next token. Before we look at how
# nanoserve schedules that work, we look at the work itself.
#
# In this lesson you will:
#
# - turn text into token ids with the model's byte-level BPE tokenizer, and back;
# - run the GPT-2 forward pass of `nanoserve.py` piece by piece and check it against the model's own `forward`;
# - generate text the slow way (the whole sequence through the model at every step), and see that the
#   engine produces the same tokens;
# - check that nanoserve's GPT computes what Hugging Face `transformers` computes for the same weights.
#
# The model is the one that ships in `nanoserve_models/shakespeare`: a 4-million-parameter GPT-2 trained on
# Tiny Shakespeare (its card is `nanoserve_models/shakespeare/MODEL_CARD.md`). Everything runs on a CPU.

# %%
import matplotlib.pyplot as plt
import torch
from helpers import show  # lessons/helpers.py: puts the checkout on sys.path, shows figures

import nanoserve as ns
from nanoserve_sched import SamplingParams

torch.set_num_threads(1)  # a small model: one thread is fast enough, and keeps timings steady

# %% [markdown]
# ## Text to tokens
#
# A model never sees characters. The tokenizer cuts text into pieces from a fixed vocabulary and
# replaces each piece by its id. GPT-2's recipe, which our model follows, is *byte-level BPE*: start
# from the 256 bytes and repeatedly merge the most frequent pair into a new token. Frequent words
# become one token; rare ones are spelled out in smaller pieces. Since every byte is in the
# vocabulary, any text can be encoded, and decoding gives it back exactly.

# %%
tok = ns.Tokenizer.from_folder(ns.DEFAULT_MODEL)
text = "ROMEO:\nBut soft, what light through yonder window breaks?"
ids = tok.encode(text)
print(f"{len(text)} characters -> {len(ids)} tokens")
for i in ids:
    print(f"{i:5d}  {tok.decode([i])!r}")

# %% [markdown]
# Common words (`ROMEO`, ` what`, ` light`) are single tokens; `yonder` and `window` are rarer in the
# training text and are spelled in pieces. Note the leading space inside tokens like `' what'`: the
# space belongs to the word after it.

# %% [markdown]
# ## The model
#
# `ns.load_model()` reads `config.json` and `model.safetensors` from a Hugging Face GPT-2 folder and
# builds nanoserve's `GPT` module. With no argument it loads the embedded model.

# %%
model, tok, name = ns.load_model()
cfg = model.config
n_params = sum(p.numel() for p in model.parameters())
print(name, cfg)
print(f"{n_params:,} parameters, head_dim = {cfg.head_dim}")

# %% [markdown]
# ## The forward pass, piece by piece
#
# GPT-2 reads like this (`GPT.forward` in `nanoserve.py`):
#
# 1. **Embed**: each token's vector from the token embedding `wte`, plus its position's vector from
#    `wpe`. Shape `(B, T, C)`: batch, tokens, channels (`n_embd`).
# 2. **Blocks**, `n_layer` of them. Each adds to the running vector `x` (the *residual stream*) the
#    output of causal self-attention (every token looks at itself and the tokens before it), then the
#    output of an MLP; each sub-layer reads a LayerNorm of `x`.
# 3. **Head**: a final LayerNorm, then a product with the token embedding matrix itself (the LM head is
#    *tied* to `wte`), giving one score (*logit*) per vocabulary entry at every position.
#
# We run the three parts by hand and check that they give exactly `model(idx)`.

# %%
idx = torch.tensor([ids])  # (B, T): one sequence of 16 tokens
T = idx.shape[1]
with torch.no_grad():
    x = model.wte(idx) + model.wpe(torch.arange(T))  # (1, T, C)
    print("embedded   ", tuple(x.shape))
    for layer, block in enumerate(model.h):
        x = block(x, layer, None)  # None: a dense batch, no paged KV cache (that is lesson 2)
    print("after blocks", tuple(x.shape))
    logits = model.ln_f(x) @ model.wte.weight.T  # (1, T, vocab)
    print("logits     ", tuple(logits.shape))
    assert torch.equal(logits, model(idx))

# %% [markdown]
# The logits at position *t* score the token that comes *after* token *t*. Training (lesson 11) makes
# them predict the text; generation only needs the last position's. A softmax turns them into
# probabilities. Here are the likeliest next tokens at two positions of our line:

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for ax, pos in zip(axes, (8, 9)):  # after "... what light through" and after "... through y"
    top = logits[0, pos].softmax(-1).topk(8)
    labels = [repr(tok.decode([i])) for i in top.indices.tolist()]
    ax.barh(labels[::-1], top.values.tolist()[::-1], color="#3b82f6")
    ax.set_xlabel("probability")
    ax.set_title(f"after {tok.decode(ids[: pos + 1])[-22:]!r}")
fig.tight_layout()
show(fig, "01_next_token")

# %% [markdown]
# The model has learned that after `' y'` in this line comes `'onder'`: it read *yonder* in its
# training text.

# %% [markdown]
# ## Generating, the slow way
#
# To generate, pick a next token (greedy decoding takes the most likely one), append it, and run the
# model again. Written plainly, every step pushes the *whole* sequence through the model, although
# only the last position's logits are used: step *n* recomputes the keys and values of all earlier
# tokens, which have not changed.

# %%
prompt = "JULIET:\nO Romeo, Romeo!"
prompt_ids = tok.encode(prompt)
seq = list(prompt_ids)
tokens_computed = []  # how many token positions each step runs through the model
with torch.no_grad():
    for _ in range(30):
        step_logits = model(torch.tensor([seq]))
        tokens_computed.append(len(seq))
        seq.append(int(step_logits[0, -1].argmax()))
dense_output = seq[len(prompt_ids) :]
print(prompt + tok.decode(dense_output))

# %% [markdown]
# The engine does the same computation, but keeps every token's keys and values in a cache so that
# each step after the first only computes the one new token. Its greedy tokens must be exactly the
# same. (The lessons pass `device="cpu"`: in float32 on the CPU, every comparison with a reference
# is exact. Without it the engine takes a GPU when there is one, and bfloat16 there.)

# %%
llm = ns.LLM(num_gpu_blocks_override=64, device="cpu")  # the embedded model, 64 KV pages of 16 tokens
engine_output = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
print(prompt + engine_output.outputs[0].text)
print("same tokens as the slow loop:", engine_output.outputs[0].token_ids == dense_output)

# %%
cached = [len(prompt_ids)] + [1] * (len(tokens_computed) - 1)  # with a cache: the prompt once, then one token
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(tokens_computed, label="no cache: the whole sequence every step")
ax.plot(cached, label="KV cache: only the new token")
ax.set_xlabel("generation step")
ax.set_ylabel("token positions computed")
ax.legend()
show(fig, "01_work_per_step")
print(f"positions computed for 30 tokens: {sum(tokens_computed)} without a cache, {sum(cached)} with one")

# %% [markdown]
# ## The same model as `transformers`
#
# The embedded model is a plain Hugging Face GPT-2 checkpoint, so `transformers` loads it unchanged.
# Its logits must match ours: same architecture, same weights, in float32.

# %%
import warnings

with warnings.catch_warnings():  # transformers imports tqdm.auto, which warns in a notebook without ipywidgets
    warnings.simplefilter("ignore")
    import transformers
    from transformers import GPT2LMHeadModel

transformers.utils.logging.disable_progress_bar()
hf = GPT2LMHeadModel.from_pretrained(ns.DEFAULT_MODEL).float().eval()
with torch.no_grad():
    ours, theirs = model(idx), hf(idx).logits
print("largest difference in logits:", (ours - theirs).abs().max().item())

# %% [markdown]
# ## Checks
#
# These fail if the tokenizer, the forward pass or the engine's generation breaks.

# %%
assert tok.decode(tok.encode(text)) == text, "the tokenizer must round-trip text"
assert logits.shape[-1] == cfg.vocab_size
assert engine_output.outputs[0].token_ids == dense_output, "the engine's greedy tokens must equal the plain loop's"
torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
assert sum(cached) < sum(tokens_computed) / 5
print("all checks passed")

# %% [markdown]
# **Next**: lesson 2 stores those keys and values in a *paged* cache, so that many requests of
# unknown lengths can share one pool of memory.
