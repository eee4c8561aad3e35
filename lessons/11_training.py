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
# # Lesson 11 — Training the tiny model
#
# The model every lesson used, `nanoserve_models/shakespeare`, was trained by this repository's
# `nanoserve_models/train.py`: a byte-level BPE tokenizer and a 4-million-parameter GPT-2, on Tiny
# Shakespeare, in about 30 minutes on a 2-core CPU (`nanoserve_models/shakespeare/MODEL_CARD.md`). The model it
# trains is nanoserve's own `GPT` class, and it saves a plain Hugging Face folder, so what comes out
# is exactly what the engine serves.
#
# Here we run the same script on a smaller scale, in seconds:
#
# - make a training text with the engine itself: the shipped model writes ten thousand tokens;
# - train a tokenizer on it and look at the pieces it learns;
# - train a tiny GPT-2 (2 layers, 64 channels) for 200 steps and plot the loss;
# - load the result into the engine and generate from it.

# %%
import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from helpers import show

import nanoserve as ns
from nanoserve_models import train
from nanoserve_sched import SamplingParams

torch.set_num_threads(1)

# %% [markdown]
# ## A corpus, written by the engine
#
# The real run trained on Tiny Shakespeare, a 1 MB text that does not ship with the repository. So
# the teacher writes the student's textbook: the embedded model continues 48 play openings, 220
# tokens each, with temperature 0.8 and top-k 40 (its recommended sampling), a seed per request so
# the corpus is the same every time.

# %%
teacher = ns.LLM(num_gpu_blocks_override=1024, device="cpu")
speakers = ["ROMEO:\n", "JULIET:\n", "First Citizen:\n", "DUKE VINCENTIO:\n", "QUEEN MARGARET:\n"]
speakers += ["GLOUCESTER:\n", "LADY ANNE:\n", "KING RICHARD III:\n"]
openings = speakers * 6
params = [SamplingParams(temperature=0.8, top_k=40, max_tokens=220, seed=i) for i in range(len(openings))]
outputs = teacher.generate(openings, params, use_tqdm=False)
corpus = "\n\n".join(opening + out.outputs[0].text for opening, out in zip(openings, outputs))
print(f"{len(corpus):,} characters, {sum(len(o.outputs[0].token_ids) for o in outputs):,} generated tokens")
print(corpus[:400])

# %% [markdown]
# ## The tokenizer
#
# `train.train_tokenizer` follows GPT-2's recipe: start from all 256 bytes and merge the most
# frequent adjacent pair into a new token, again and again, until the vocabulary has the size asked
# for. With 512 tokens, frequent words and names become single tokens. The script trains it on the
# first 90% of the text only: the last 10% is held out to measure the model on text it never saw.

# %%
tokenizer = train.train_tokenizer(corpus[: int(0.9 * len(corpus))], vocab_size=512)
line = "KING RICHARD III:\nNow, my lord, what say you?"
pieces = tokenizer.encode(line)
print(f"vocabulary {tokenizer.get_vocab_size()}; {len(line)} characters -> {len(pieces.ids)} tokens")
print([tokenizer.decode([i]) for i in pieces.ids])

# %% [markdown]
# ## Training
#
# `train.main` takes the same arguments as the command line (`python nanoserve_models/train.py --help`):
# it trains the tokenizer, builds the `GPT`, and runs AdamW on random windows of the training
# tokens, the learning rate warming up linearly and then decaying along a cosine (`train.lr_at`).
# Every `--eval-every` steps it measures the loss on a fixed slice of the training text and on the
# whole held-out text, and keeps the best weights. At the end it saves the folder: `config.json`,
# `model.safetensors` (float16), `tokenizer.json`, and `training.json` with the whole record.
#
# The loss is the cross-entropy of the next token, in nats: `ln(512) ≈ 6.2` for a model that knows
# nothing, lower as it learns. A useful baseline: predicting every token from its frequency alone
# (the *unigram* loss, which the script computes too).

# %%
folder = Path(tempfile.mkdtemp(prefix="nanoserve-lesson11-"))
(folder / "corpus.txt").write_text(corpus, encoding="utf-8")
args = ["--corpus", str(folder / "corpus.txt"), "--out", str(folder / "model"), "--preset", "tiny"]
args += ["--steps", "200", "--batch-size", "16", "--context-len", "64", "--vocab-size", "512"]
args += ["--lr", "3e-3", "--warmup", "10", "--dropout", "0", "--eval-every", "20", "--threads", "1"]
with contextlib.redirect_stderr(io.StringIO()):  # the script's progress bar; its log lines still print
    summary = train.main(args)

# %%
history = summary["history"]
steps = [h["step"] for h in history]
schedule = argparse.Namespace(lr=3e-3, warmup=10, steps=200)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.2), width_ratios=[2, 1])
ax1.plot(steps, [h["train_loss"] for h in history], "o-", label="training text")
ax1.plot(steps, [h["val_loss"] for h in history], "o-", label="held-out text")
ax1.axhline(summary["unigram_val_loss"], color="grey", ls="--", label="unigram baseline")
ax1.set_xlabel("training step")
ax1.set_ylabel("loss (nats per token)")
ax1.set_title(f"a {summary['parameters']:,}-parameter GPT-2 learning")
ax1.legend()
ax2.plot(range(200), [train.lr_at(s, schedule) for s in range(200)], color="#a855f7")
ax2.set_xlabel("training step")
ax2.set_title("learning rate: warmup, then cosine")
fig.tight_layout()
show(fig, "11_loss")

# %% [markdown]
# Both losses fall, and the held-out loss drops below the unigram baseline: the model learned more
# than word frequencies. (Both are measured on small slices — the training loss on the first 1,000
# tokens, the held-out loss on 1,400 — so which of the two is lower says little.)
#
# ## Serving what we trained
#
# The output folder is a Hugging Face GPT-2 checkpoint like `nanoserve_models/shakespeare`, so the engine
# loads it by path, with everything of the previous lessons: paged cache, batching, schedulers.

# %%
student = ns.LLM(str(folder / "model"), num_gpu_blocks_override=64, device="cpu")
print(student.model_config)
openings = ["ROMEO:\n", "JULIET:\n"]
params = [SamplingParams(temperature=0.8, top_k=40, max_tokens=60, seed=i) for i in range(len(openings))]
sampled = student.generate(openings, params, use_tqdm=False)
for opening, out in zip(openings, sampled):
    print("-" * 60)
    print(opening + out.outputs[0].text)

# %% [markdown]
# Speaker names, line breaks, some words: 200 steps on 13,000 tokens teach the form before the
# sense. The shipped model saw 3.3 million tokens, in 800 steps of a model 30 times larger.
#
# Greedy decoding through the engine must agree with the plain loop of lesson 1 on the new model:

# %%
prompt = student.tokenizer.encode("GLOUCESTER:\n")
greedy = student.generate([prompt], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
seq = list(prompt)
with torch.no_grad():
    for _ in range(20):
        seq.append(int(student.model(torch.tensor([seq]))[0, -1].argmax()))
print("engine:", repr(greedy.outputs[0].text))
print("same as the plain loop:", greedy.outputs[0].token_ids == seq[len(prompt) :])

# %% [markdown]
# ## Checks

# %%
first, last = history[0], history[-1]
assert last["train_loss"] < first["train_loss"] - 1.5, "training must lower the loss"
assert last["val_loss"] < first["val_loss"] - 1.5 and summary["val_loss"] < summary["unigram_val_loss"]
assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= {
    p.name for p in (folder / "model").iterdir()
}
assert student.tokenizer.decode(student.tokenizer.encode(line)) == line
assert all(len(o.outputs[0].token_ids) == 60 for o in sampled)
assert greedy.outputs[0].token_ids == seq[len(prompt) :], "the engine must serve the trained model exactly"
print("all checks passed")

# %% [markdown]
# That is the whole path: text, tokens, a forward pass, a paged cache, batches, schedulers, kernels,
# traces — and a model of your own to serve. `python nanoserve.py --model <folder>` serves it from
# the command line.
