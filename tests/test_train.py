"""nanoserve_models/train.py end to end on a tiny slice: the loss falls and the folder is a Hugging Face GPT-2
checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from nanoserve import GPT, GPTConfig, hf_to_ours

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "nanoserve_models" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    text = CORPUS.read_text(encoding="utf-8")[:30_000]
    (tmp / "corpus.txt").write_text(text, encoding="utf-8")
    args = "--preset tiny --steps 40 --batch-size 8 --context-len 32 --vocab-size 300 --lr 3e-3 --warmup 5"
    cmd = [sys.executable, str(ROOT / "nanoserve_models" / "train.py"), "--corpus", "corpus.txt", "--out", "out"]
    # run from another directory, as a user would, to check the script finds nanoserve by itself
    proc = subprocess.run(cmd + args.split() + ["--eval-every", "20"], cwd=tmp, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


def test_loss_decreases(trained):
    history = json.loads((trained / "training.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 20, 40]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 1.0
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 1.0


def test_tokenizer_round_trips(trained):
    tok = Tokenizer.from_file(str(trained / "tokenizer.json"))
    config = json.loads((trained / "config.json").read_text())
    assert tok.get_vocab_size() == config["vocab_size"] == 300
    assert tok.token_to_id("<|endoftext|>") == config["eos_token_id"]
    text = "ROMEO:\n  Ünïcödé, tabs\tand emoji 🙂 never seen in training.\n\n"
    assert tok.decode(tok.encode(text).ids) == text


def test_transformers_loads_it_and_agrees_with_ours(trained):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(trained).float().eval()

    config = json.loads((trained / "config.json").read_text())
    ours = GPT(GPTConfig.from_hf(config)).eval()
    state = {k: v.float() for k, v in load_file(trained / "model.safetensors").items()}
    ours.load_state_dict(hf_to_ours(state))

    idx = torch.randint(config["vocab_size"], (2, config["n_positions"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)
