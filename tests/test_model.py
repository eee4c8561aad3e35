"""Our GPT-2 and its loader against transformers' GPT2LMHeadModel, and the loader's error messages."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoserve as ns
from tests.conftest import gpt2_tokenizer_dir, save_tiny_gpt2


def hf_logits(folder, ids):
    from transformers import GPT2LMHeadModel

    with torch.no_grad():
        return GPT2LMHeadModel.from_pretrained(folder).eval()(ids).logits


def test_logits_match_transformers(tiny_gpt2):
    ids = torch.randint(0, 384, (2, 37))
    model, _, _ = ns.load_model(str(tiny_gpt2))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(ours, hf_logits(tiny_gpt2, ids), atol=1e-5, rtol=1e-5)


def test_loads_weights_without_transformer_prefix(tiny_gpt2, tmp_path):
    state = load_file(tiny_gpt2 / "model.safetensors")
    assert any(k.startswith("transformer.") for k in state)
    save_file(
        {k.removeprefix("transformer."): v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors"
    )
    (tmp_path / "config.json").write_text((tiny_gpt2 / "config.json").read_text())
    ids = torch.randint(0, 384, (1, 20))
    model, *_ = ns.load_model(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(tiny_gpt2, ids), atol=1e-5, rtol=1e-5)


def test_paged_forward_matches_dense_forward(tiny_gpt2):
    """The serving path (paged cache, flat batch of two requests) gives the dense forward's last logits."""
    llm = ns.LLM(str(tiny_gpt2), num_gpu_blocks_override=32, block_size=4)
    a, b = torch.randint(0, 384, (13,)).tolist(), torch.randint(0, 384, (6,)).tolist()
    from nanoserve_sched import SamplingParams

    out = llm.generate([a, b], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    with torch.no_grad():
        for prompt, o in zip((a, b), out):
            assert o.outputs[0].token_ids == [llm.model(torch.tensor([prompt]))[0, -1].argmax().item()]


def test_gpt2_tokenizer_from_vocab_and_merges(tmp_path):
    folder = save_tiny_gpt2(tmp_path, vocab_size=50257, with_tokenizer=True)
    tok = ns.Tokenizer.from_folder(folder)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    llm = ns.LLM(str(folder), num_gpu_blocks_override=16)
    out = llm.generate(["Hello world"], ns.SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert out.prompt_token_ids == [15496, 995] and len(out.outputs[0].token_ids) == 3
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)


def test_dummy_gpt2_family_needs_no_files():
    for name, n_layer in (("distilgpt2", 6), ("gpt2", 12)):
        model, tok, _ = ns.load_model(name, load_format="dummy")
        cfg = model.config
        assert cfg.n_layer == n_layer and cfg.vocab_size == 50257
        if gpt2_tokenizer_dir(required=False):
            assert tok.encode("Hello world") == [15496, 995]


# --- the loader's errors name the problem and the fix -----------------------------------------


def copy_model(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_weights_file(tiny_gpt2, tmp_path):
    copy_model(tiny_gpt2, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        ns.load_model(str(tmp_path))


def test_missing_config(tiny_gpt2, tmp_path):
    copy_model(tiny_gpt2, tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        ns.load_model(str(tmp_path))


def test_truncated_safetensors(tiny_gpt2, tmp_path):
    copy_model(tiny_gpt2, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ns.load_model(str(tmp_path))


def test_config_weights_shape_mismatch(tiny_gpt2, tmp_path):
    copy_model(tiny_gpt2, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_embd"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"has shape .* but config.json implies"):
        ns.load_model(str(tmp_path))


def test_unknown_model_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="local folder"):
        ns.load_model(str(tmp_path / "no-such-model"))


def test_cache_slots_a_request_did_not_write_cannot_leak_in(tiny_gpt2, hf_greedy):
    """On CPU the cache is allocated uninitialised, and each page is zeroed by the step that first writes
    it: NaN anywhere else must not reach an output, nor the stale values of pages used before."""
    from nanoserve_sched import SamplingParams

    llm = ns.LLM(str(tiny_gpt2), num_gpu_blocks_override=40, block_size=8)
    for k, v in llm.runner.kv_caches:  # what uninitialised memory may hold; page 0 pads block tables
        k[1:], v[1:] = float("nan"), float("nan")
    prompts = [list(range(3, 20)), list(range(50, 53))]
    params = SamplingParams(temperature=0, max_tokens=6)
    want = [hf_greedy(p, 6) for p in prompts]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    assert [o.outputs[0].token_ids for o in llm.generate(prompts[::-1], params, use_tqdm=False)] == want[::-1]
