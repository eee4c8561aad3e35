"""The Llama family (nanoserve_models/llama.py) against transformers: logits, greedy tokens under every scheduler,
and the loader (shards, tied heads, bfloat16, generation_config.json, tokenizer.json, dummy shapes) with its
refusals."""

import json
import shutil

import pytest
import torch

import nanoserve as ns
from nanoserve_models.llama import LLAMA_FAMILY, Llama, LlamaConfig
from nanoserve_sched import SCHEDULERS, SamplingParams
from tests.test_greedy import CASES, check_greedy, workload

transformers = pytest.importorskip("transformers")

SHAPE = dict(
    vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=160, bos_token_id=383, eos_token_id=383,
    initializer_range=0.2,  # peaked logits: greedy ties between implementations are out of reach
)  # fmt: skip
LLAMA3_ROPE = dict(  # all three bands: wavelengths below 16 kept, above 64 slowed 8x, in between blended
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=64,
)  # fmt: skip
# name -> (transformers class prefix, config overrides, save_pretrained options): each checks a feature
ARCHS = {
    "llama": ("Llama", {}, {}),  # untied head, plain RoPE
    "llama3_rope": ("Llama", dict(rope_parameters=LLAMA3_ROPE), {}),
    "mistral": ("Mistral", dict(sliding_window=None, head_dim=8), {}),
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True), {}),  # q, k, v biases; the LM head is the embedding
    "qwen3_sharded": ("Qwen3", dict(head_dim=32), dict(max_shard_size="100KB")),  # q/k norms; 4 x 32 != 64
}


def save_tiny(folder, arch="llama", dtype=torch.float32, seed=0, **overrides):
    """A random transformers model of `arch` saved with save_pretrained (safetensors). The norm weights and the
    biases, which transformers starts at 1 and 0, are perturbed: a model that skipped one would not match."""
    prefix, arch_overrides, save = ARCHS[arch]
    config = getattr(transformers, f"{prefix}Config")(**{**SHAPE, **arch_overrides, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder, safe_serialization=True, **save)
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """arch -> its tiny model's folder, saved once per session."""
    folders = {}

    def get(arch: str):
        if arch not in folders:
            folders[arch] = save_tiny(tmp_path_factory.mktemp(arch), arch)
        return folders[arch]

    return get


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="session")
def hf_greedy(tiny):
    """arch -> transformers' greedy tokens for the workload of tests/test_greedy.py, one prompt at a time."""
    cache = {}

    def get(arch: str) -> list[list[int]]:
        if arch not in cache:
            model = hf_model(tiny(arch))
            cache[arch] = [hf_generate(model, p, m) for p, m in zip(*workload())]
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(tiny, arch):
    ids = torch.randint(0, 384, (2, 37), generator=torch.Generator().manual_seed(1))
    model, _, _ = ns.load_model(str(tiny(arch)))
    assert isinstance(model, Llama) and model.config.architecture == f"{ARCHS[arch][0]}ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(tiny(arch))(ids).logits, atol=1e-5, rtol=1e-5)


def test_the_features_under_test_change_the_logits(tiny):
    """Each tiny model exercises what it is named for: without it, the logits would differ."""
    ids = torch.randint(0, 384, (1, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for arch, change in (
            ("llama3_rope", dict(rope_scaling=None)),
            ("qwen2_tied", dict(qkv_bias=False)),
            ("qwen3_sharded", dict(qk_norm=False)),
        ):
            model, _, _ = ns.load_model(str(tiny(arch)))
            other = Llama(LlamaConfig(**{**vars(model.config), **change})).eval()
            other.load_state_dict(model.state_dict(), strict=False)
            assert not torch.allclose(model(ids), other(ids), atol=1e-3), arch


def test_old_rope_fields_read_like_new_ones(tiny, tmp_path):
    """transformers 4 saved `rope_theta` + `rope_scaling` (as the hub's Llama 3 checkpoints have them); 5 saves
    `rope_parameters`. Both give the same model."""
    shutil.copytree(tiny("llama3_rope"), tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old, new = ns.load_model(str(tmp_path))[0].config, ns.load_model(str(tiny("llama3_rope")))[0].config
    assert old == new and new.rope_theta == 500000.0 and new.rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_matches_transformers(tiny, hf_greedy, arch, case, sched):
    check_greedy(tiny(arch), sched, case, hf_greedy(arch))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_rows_in_slices_change_no_token(tiny, hf_greedy, monkeypatch, arch):
    """The Llama block's MLP goes through nanoserve.plus_rowwise too: in slices of 5 rows, transformers' tokens."""
    monkeypatch.setattr(ns, "CPU_ROWS", 5)
    check_greedy(tiny(arch), "sync", "default", hf_greedy(arch))


def test_the_cache_holds_the_kv_heads_only(tiny):
    """Grouped-query attention end to end: 4 query heads, 2 KV heads of 32 channels in every page."""
    llm = ns.LLM(str(tiny("qwen3_sharded")), num_gpu_blocks_override=20, block_size=4)
    k_cache, v_cache = llm.runner.kv_caches[0]
    assert k_cache.shape == v_cache.shape == (20, 4, 2, 32) and len(llm.runner.kv_caches) == 3
    assert ns.kv_bytes_per_token(llm.model_config, 4) == 2 * 3 * 2 * 32 * 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "decode-graphs"])
@pytest.mark.parametrize("sched", ["sync", "async"])
def test_triton_and_cuda_graphs_match_transformers(tiny, hf_greedy, graphs, sched):
    """On a GPU: the Triton kernels over 2 KV heads of 32 channels, and decode steps replayed from CUDA graphs
    (the rotary cos and sin are looked up inside the captured step)."""
    llm = ns.LLM(
        str(tiny("qwen3_sharded")), sched=sched, attention="triton", cuda_graphs=graphs, device="cuda",
        dtype="float32", max_num_seqs=12, block_size=8, num_gpu_blocks_override=200,
    )  # fmt: skip
    assert llm.runner.ops.__name__ == "nanoserve_kernels.paged_attention" and (llm.runner.graphs is not None) == graphs
    prompts, max_tokens = workload()
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy("qwen3_sharded")


def test_every_eos_of_generation_config_stops(tmp_path, tiny):
    """generation_config.json lists two end-of-sequence ids (as Qwen3's does): each ends a request, as in
    transformers' generate."""
    folder = shutil.copytree(tiny("llama"), tmp_path / "m")
    prompts, _ = workload()
    llm = ns.LLM(str(folder))
    full = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    full = [o.outputs[0].token_ids for o in full]
    # two ids greedy decoding emits: `a` ends request 0, `b` another request before any `a` there
    a = full[0][3]
    b = next(
        t
        for ids in full[1:]
        for i, t in enumerate(ids)
        if t != a and a not in ids[:i] and ids.index(t) == i and t not in full[0][:4]
    )
    for name, ids in (("config.json", a), ("generation_config.json", [a, b])):  # as Qwen3 ships them
        d = json.loads((folder / name).read_text())
        d["eos_token_id"] = ids
        (folder / name).write_text(json.dumps(d))
    llm = ns.LLM(str(folder))
    assert llm.model_config.eos_token_ids == (a, b) and llm.model_config.eos_token_id == a
    got = [o.outputs[0] for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)]
    stopped = {o.token_ids[-1] for o in got if o.finish_reason == "stop"}
    assert stopped == {a, b}, f"each of {a} and {b} should have ended a request, got {stopped}"
    model = hf_model(folder)
    for o, ids, prompt in zip(got, full, prompts):
        cut = next((i + 1 for i, t in enumerate(ids) if t in (a, b)), 30)
        assert o.token_ids == ids[:cut] == hf_generate(model, prompt, 30)


def test_bfloat16_checkpoint_runs_in_float32_on_cpu(tmp_path):
    from safetensors.torch import load_file

    folder = save_tiny(tmp_path, "qwen2_tied", dtype=torch.bfloat16)
    assert load_file(folder / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16
    model, _, _ = ns.load_model(str(folder))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.randint(0, 384, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(folder)(ids).logits, atol=1e-5, rtol=1e-5)
    llm = ns.LLM(str(folder), dtype="auto")  # on CPU: float32
    prompts, _ = workload()
    outs = llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert llm.config.dtype == "float32"
    hf = hf_model(folder)
    assert [o.outputs[0].token_ids for o in outs] == [hf_generate(hf, p, 8) for p in prompts[:4]]


def test_text_in_and_out_through_tokenizer_json(tmp_path):
    """A Llama folder with a tokenizer.json (the embedded model's, 3072 tokens): text prompts are encoded, the
    tokens are transformers', the text is their decoding."""
    folder = save_tiny(tmp_path, "llama", vocab_size=3072)
    shutil.copy(ns.DEFAULT_MODEL / "tokenizer.json", folder / "tokenizer.json")
    llm = ns.LLM(str(folder), num_gpu_blocks_override=32)
    out = llm.generate(["ROMEO:\nBut soft"], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    tok = ns.Tokenizer.from_folder(folder)
    assert out.prompt_token_ids == tok.encode("ROMEO:\nBut soft")
    assert out.outputs[0].token_ids == hf_generate(hf_model(folder), out.prompt_token_ids, 6)
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)


# --- real shapes, no download ----------------------------------------------------------------------------


def test_dummy_shapes_are_the_real_models():
    """The built-in shapes give each checkpoint's parameter count (as its model card states it) and KV size."""
    want = {  # parameters; KV bytes per token in bfloat16 = 2 x layers x KV heads x head_dim x 2
        "qwen3-0.6b": (596_049_920, 2 * 28 * 8 * 128 * 2),
        "qwen2.5-0.5b": (494_032_768, 2 * 24 * 2 * 64 * 2),
        "llama-3.2-1b": (1_235_814_400, 2 * 16 * 8 * 64 * 2),
        "smollm2-135m": (134_515_008, 2 * 30 * 3 * 64 * 2),
    }
    assert set(want) <= set(LLAMA_FAMILY)
    for name, (params, kv) in want.items():
        model, tok, got_name = ns.load_model(name, load_format="dummy", device="meta")
        assert isinstance(model, Llama) and tok is None and got_name == name and model.folder is None
        assert sum(p.numel() for p in model.parameters()) == params, name
        assert ns.kv_bytes_per_token(model.config, 2) == kv, name
    assert LLAMA_FAMILY["qwen3-0.6b"].eos_token_ids == (151645, 151643)
    assert LLAMA_FAMILY["llama-3.2-1b"].rope_scaling["factor"] == 32.0


def test_dummy_with_a_llama_folder_builds_the_llama(tmp_path, tiny):
    """--load-format dummy reads config.json (no weights needed) and builds the architecture it names."""
    shutil.copy(tiny("qwen3_sharded") / "config.json", tmp_path / "config.json")
    model, _, _ = ns.load_model(str(tmp_path), load_format="dummy")
    assert isinstance(model, Llama) and model.config.qk_norm and model.config.head_dim == 32
    llm = ns.LLM(str(tmp_path), load_format="dummy", num_gpu_blocks_override=16)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_a_real_shape_on_the_simulated_gpu():
    llm = ns.LLM("qwen3-0.6b", device="sim:h200", num_gpu_blocks_override=256)
    out = llm.generate([[1, 2, 3]] * 4, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [5] * 4


def test_hub_download_asks_for_shards_and_generation_config(monkeypatch, tiny):
    """A hub id fetches what the loader reads (one weights file or the shards and their index, the generation
    config), and no other copy of the weights; --load-format dummy fetches no weights at all."""
    import fnmatch

    hub = pytest.importorskip("huggingface_hub")
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append(allow_patterns)
        return str(tiny("qwen3_sharded"))

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    model, _, name = ns.load_model("Qwen/Qwen3-tiny")
    assert isinstance(model, Llama) and name == "Qwen/Qwen3-tiny"
    fetched = lambda files, patterns: [f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)]
    files = sorted(p.name for p in tiny("qwen3_sharded").iterdir())
    assert fetched(files + ["model.safetensors"], asked[0]) == files + ["model.safetensors"]
    assert not fetched(["consolidated.safetensors", "pytorch_model.bin"], asked[0])  # the same weights again
    ns.load_model("Qwen/Qwen3-tiny", load_format="dummy")
    assert fetched(files, asked[1]) == ["config.json", "generation_config.json"]


# --- refusals: at load time, naming the config.json field ---------------------------------------------------

REFUSED = {  # arch, config.json changes, the message
    "unknown architecture": ("llama", dict(architectures=["GemmaForCausalLM"]), r"architectures \['GemmaForC"),
    "unknown model_type": ("llama", dict(architectures=None, model_type="gemma"), "model_type 'gemma' is not a"),
    "rope_parameters yarn": (
        "llama", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), "rope_parameters has rope_"
    ),
    "rope_scaling linear": (
        "llama", dict(rope_parameters=None, rope_scaling=dict(type="linear", factor=2.0)), "rope_scaling has rope_type"
    ),
    "llama3 without factor": (
        "llama3_rope", dict(rope_parameters={**LLAMA3_ROPE, "factor": None}), "rope_parameters: factor is missing"
    ),
    "mistral sliding window": ("mistral", dict(sliding_window=32), "sliding_window 32 is shorter than max_position_"),
    "qwen2 sliding window": ("qwen2_tied", dict(use_sliding_window=True), "use_sliding_window is true"),
    "qwen3 sliding layers": ("qwen3_sharded", dict(layer_types=["sliding_attention"] * 3), "layer_types has"),
    "llama attention_bias": ("llama", dict(attention_bias=True), "attention_bias is true, but nanoserve's Llama"),
    "llama mlp_bias": ("llama", dict(mlp_bias=True), "mlp_bias is true"),
    "qwen3 attention_bias": ("qwen3_sharded", dict(attention_bias=True), "attention_bias is true"),
    "gelu": ("llama", dict(hidden_act="gelu"), "hidden_act 'gelu' is not silu"),
    "uneven groups": ("llama", dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_v"),
    "quantized": ("qwen3_sharded", dict(quantization_config={"quant_method": "awq"}), "quantization_config"),
    "interleaved rope": ("llama", dict(rope_interleaved=True), "rope_interleaved is true"),
    "partial rotary": ("llama", dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    "string size": ("llama", dict(hidden_size="64"), "hidden_size must be an integer, got str '64'"),
    "no layers": ("llama", dict(num_hidden_layers=None), "num_hidden_layers is missing"),
    "zero heads": ("llama", dict(num_key_value_heads=0), "num_key_value_heads must be at least 1"),
    "bad eos": ("llama", dict(eos_token_id="</s>"), "eos_token_id must be a token id or a list of them"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_configs_are_refused_naming_the_field(tmp_path, tiny, case):
    arch, changes, message = REFUSED[case]
    shutil.copytree(tiny(arch), tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for load_format in ("auto", "dummy"):
        with pytest.raises(ValueError, match=message) as e:
            ns.load_model(str(tmp_path), load_format=load_format)
        assert "config.json" in str(e.value)


def test_a_window_as_long_as_the_context_is_no_window(tmp_path, tiny):
    shutil.copytree(tiny("mistral"), tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["sliding_window"] = cfg["max_position_embeddings"]  # never bites: every token sees its whole context
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert isinstance(ns.load_model(str(tmp_path))[0], Llama)


def test_a_llama_config_is_not_read_as_gpt2(tiny):
    d = json.loads((tiny("llama") / "config.json").read_text())
    with pytest.raises(ValueError, match=r"architectures \['LlamaForCausalLM'\] is not GPT-2's"):
        ns.GPTConfig.from_hf(d)
    del d["architectures"]
    with pytest.raises(ValueError, match="model_type 'llama' is not GPT-2's"):
        ns.GPTConfig.from_hf(d)


def test_bad_generation_config_is_refused(tmp_path, tiny):
    shutil.copytree(tiny("llama"), tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, "x"]}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be a token id"):
        ns.load_model(str(tmp_path))


def test_a_missing_shard_is_named(tmp_path, tiny):
    shutil.copytree(tiny("qwen3_sharded"), tmp_path, dirs_exist_ok=True)
    (tmp_path / "model-00002-of-00008.safetensors").unlink()
    with pytest.raises(ValueError, match="lists model-00002-of-00008.safetensors, which is missing"):
        ns.load_model(str(tmp_path))


def test_weights_of_another_member_are_refused(tmp_path, tiny):
    """Qwen2 weights under a config that says Llama: the biases have nowhere to go."""
    shutil.copytree(tiny("qwen2_tied"), tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not match a LlamaForCausalLM of this config: .*unexpected .*bias"):
        ns.load_model(str(tmp_path))


def test_config_and_weights_of_different_shapes(tmp_path, tiny):
    shutil.copytree(tiny("llama"), tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp.down_proj.weight has shape \[64, 96\] but config.json implies"):
        ns.load_model(str(tmp_path))


def test_docstring_examples():
    import doctest

    import nanoserve_models.llama

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for obj in (nanoserve_models.llama, ns.load_model) for t in finder.find(obj) if t.examples]
    assert len(tests) >= 3
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, runner.summarize()


@pytest.mark.parametrize("arch", ["qwen2_tied", "qwen3_sharded"])
def test_bench_e2e_builds_the_same_model_in_transformers(tmp_path, tiny, arch, monkeypatch):
    """benchmarks/bench_e2e.py times a Llama-family model against transformers on the same weights: its own
    check (logits and greedy tokens, float32) passes before any timing, and transformers' tokens agree."""
    monkeypatch.syspath_prepend(str(ns.ROOT / "benchmarks"))
    import bench_e2e

    out = tmp_path / "e2e.json"
    argv = ["--device", "cpu", "--model", str(tiny(arch)), "--load-format", "auto", "--num-prompts", "3"]
    argv += ["--input-len", "6:12", "--output-len", "3:5", "--warmup-prompts", "1", "--systems", "nanoserve,hf-static"]
    bench_e2e.main(argv + ["--output-json", str(out)])
    d = json.loads(out.read_text())
    assert d["check"]["tokens_match"] and d["check"]["max_abs_logit_diff"] < 1e-3
    assert d["systems"]["hf-static"]["agreement"]["same_tokens"] == 1.0
