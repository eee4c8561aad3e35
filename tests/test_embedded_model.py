"""The shipped default model (nanoserve_models/shakespeare): it is as good as its card says, and transformers
agrees with us."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from nanoserve import GPT, GPTConfig, hf_to_ours

MODELS = Path(__file__).resolve().parents[1] / "nanoserve_models"
MODEL = MODELS / "shakespeare"
CORPUS = MODELS / "tinyshakespeare.txt"  # shipped: the card is re-measured


@pytest.fixture(scope="module")
def card():
    return json.loads((MODEL / "training.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(MODEL / "tokenizer.json"))


@pytest.fixture(scope="module")
def ours():
    config = json.loads((MODEL / "config.json").read_text())
    model = GPT(GPTConfig.from_hf(config)).eval()
    model.load_state_dict(hf_to_ours({k: v.float() for k, v in load_file(MODEL / "model.safetensors").items()}))
    return model


@pytest.fixture(scope="module")
def split(tok, card):
    """The training and held-out token ids, split as nanoserve_models/train.py splits them (the last 10% of the
    characters)."""
    assert hashlib.sha256(CORPUS.read_bytes()).hexdigest() == card["corpus_sha256"], "not the corpus of the card"
    text = CORPUS.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return torch.tensor(tok.encode(text[:cut]).ids), torch.tensor(tok.encode(text[cut:]).ids)


@torch.no_grad()
def mean_loss(model, ids, T, batch=16):
    """Next-token loss over `ids` in non-overlapping windows of T tokens (each token after the first once)."""
    full = (len(ids) - 1) // T
    windows = list(zip(ids[: full * T].view(full, T).split(batch), ids[1 : full * T + 1].view(full, T).split(batch)))
    if len(ids) - 1 > full * T:
        windows.append((ids[full * T : -1][None], ids[full * T + 1 :][None]))
    total = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item() for x, y in windows)
    return total / (len(ids) - 1)


@pytest.fixture(scope="module")
def val_loss(ours, split):
    return mean_loss(ours, split[1], ours.config.n_positions)


def test_validation_loss_matches_the_card(val_loss, card):
    assert val_loss == pytest.approx(card["val_loss"], rel=0.01)
    assert f"{card['val_loss']:.3f}" in (MODEL / "MODEL_CARD.md").read_text()  # the card quotes the same number


def test_model_beats_the_unigram_baseline(val_loss, split, ours):
    train_ids, val_ids = split
    counts = torch.bincount(train_ids, minlength=ours.config.vocab_size).double() + 1  # add-one smoothing
    unigram = -(counts / counts.sum()).log()[val_ids[1:]].mean().item()
    assert val_loss < unigram - 1.0, f"val loss {val_loss:.3f} vs unigram baseline {unigram:.3f}"


def test_transformers_agrees_with_ours(ours, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(MODEL).float().eval()
    idx = torch.tensor([tok.encode("ROMEO:\nBut soft, what light through yonder window breaks?\n").ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_shipped_files_fit_the_engine(tok, ours):
    assert (MODEL / "model.safetensors").stat().st_size < 20e6
    assert tok.token_to_id("<|endoftext|>") == ours.config.eos_token_id
    text = "KING RICHARD III:\nNow is the winter of our discontent — ünïcödé 🙂\n\n"
    assert tok.decode(tok.encode(text).ids) == text
    for line in (MODEL / "demo_prompts.jsonl").read_text().splitlines():
        prompt = json.loads(line)["prompt"]
        assert 0 < len(tok.encode(prompt).ids) < ours.config.n_positions
