"""Bad input, table by table: the Python API, prompts-file lines, command-line flags and model folders.

Each bad input gets a clear error naming the problem and the fix, and nothing else is lost: a bad request
fails alone while the others finish, a bad flag stops the run before anything is loaded (exit code 2), no
traceback reaches the user, and no page leaks. The three entry points share one set of rules
(nanoserve_sched/request.py and nanoserve.EngineConfig), so the same value gets the same message everywhere.
"""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import nanoserve as ns
from nanoserve_entrypoints import cli
from nanoserve_sched import SamplingParams

ROOT = ns.ROOT
GOOD = SamplingParams(temperature=0, max_tokens=5)


def mutated(**kw):
    """SamplingParams made good and changed afterwards: add_request checks them again."""
    sp = SamplingParams(temperature=0, max_tokens=5)
    for k, v in kw.items():
        setattr(sp, k, v)
    return sp


BAD_PROMPTS = {  # prompt -> the error of its request
    "too long": (list(range(200)), "prompt has 200 tokens but the model's context is 160"),
    "empty": ([], "prompt is empty"),
    "None": (None, r"prompt must be text \(a str\) or token ids \(a list of int\), got NoneType None"),
    "an int": (123, "prompt must be text .* got int 123"),
    "bytes": (b"abc", "prompt is bytes; decode it to text"),
    "a lone surrogate": ("\ud800", r"'\\ud800' at character 0 is half of a UTF-16 surrogate pair"),
    "ids as a string": ({"prompt_token_ids": "abc"}, "prompt_token_ids must be a list of token ids, got str"),
    "text that is not": ({"prompt": 5}, '"prompt" must be text'),
    "a dict of neither": ({"text": "x"}, 'needs exactly one key, "prompt" or "prompt_token_ids"'),
    "bools": ([True, False], r"prompt_token_ids\[0\] must be an integer, got bool True"),
    "floats": ([1.5], r"prompt_token_ids\[0\] must be an integer, got float 1.5"),
    "a float array": (np.array([1.0, 2.0]), r"prompt_token_ids\[0\] must be an integer, got float"),
    "a 2-d array": (np.array([[1, 2]]), "must be one-dimensional"),
    "negative id": ([1, -3], r"prompt_token_ids\[1\]=-3 must be at least 0"),
    "outside the vocabulary": ([1, 99999], r"prompt token 99999 is not an id in \[0, 384\)"),
    "text without a tokenizer": ("text", "has no tokenizer files; pass prompt_token_ids"),
}
BAD_PARAMS = {  # SamplingParams changed after they were made -> the error of the request
    "max_tokens 0": (mutated(max_tokens=0), "max_tokens=0: a request must generate at least 1 token"),
    "max_tokens '5'": (mutated(max_tokens="5"), "max_tokens must be an integer, got str '5'"),
    "top_k 2.5": (mutated(top_k=2.5), "top_k must be an integer, got float 2.5"),
    "stop_token_ids 5": (mutated(stop_token_ids=5), "stop_token_ids must be a list of token ids, got int 5"),
    "temperature NaN": (mutated(temperature=math.nan), "temperature=nan must be a finite number"),
    "temperature inf": (mutated(temperature=math.inf), "temperature=inf must be a finite number"),
    "temperature 'hot'": (mutated(temperature="hot"), "temperature must be a number, got str 'hot'"),
    "temperature None": (mutated(temperature=None), "temperature must be a number, got NoneType"),
    "top_p None": (mutated(top_p=None), "top_p must be a number, got NoneType"),
    "ignore_eos 'yes'": (mutated(ignore_eos="yes"), "ignore_eos must be true or false"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS) + list(BAD_PARAMS))
def test_a_bad_request_fails_alone(tiny_gpt2, case):
    if case in BAD_PARAMS:
        (params, message), prompt = BAD_PARAMS[case], [1, 2]
    else:
        (prompt, message), params = BAD_PROMPTS[case], GOOD
    llm = ns.LLM(str(tiny_gpt2))
    outs = llm.generate([[5, 6, 7], prompt, [8, 9]], [GOOD, params, GOOD], use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error" and re.search(message, outs[1].error), outs[1].error
    assert [o.outputs[0].finish_reason for o in (outs[0], outs[2])] == ["length", "length"]
    assert len(outs[0].outputs[0].token_ids) == 5 and len(outs[2].outputs[0].token_ids) == 5
    assert len({o.request_id for o in outs}) == 3
    assert llm.scheduler.blocks.num_free_blocks == llm.num_blocks


@pytest.mark.parametrize(
    "prompt", [np.array([5, 6, 7]), torch.tensor([5, 6, 7]), [np.int64(5), 6, torch.tensor(7)], (5, 6, 7)]
)
def test_integer_like_token_ids_are_accepted(tiny_gpt2, prompt):
    llm = ns.LLM(str(tiny_gpt2))
    want = llm.generate([[5, 6, 7]], GOOD, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate(prompt, GOOD, use_tqdm=False)[0].outputs[0].token_ids == want  # one prompt, not three


def test_a_string_is_one_prompt_and_a_list_of_ints_is_one_tokenized_prompt(tiny_gpt2, tmp_path):
    from tests.conftest import save_tiny_gpt2

    llm = ns.LLM(str(save_tiny_gpt2(tmp_path / "m", vocab_size=50257, with_tokenizer=True)))
    assert len(llm.generate("ROMEO:\n", GOOD, use_tqdm=False)) == 1
    assert len(llm.generate([1, 2, 3], GOOD, use_tqdm=False)) == 1
    assert len(llm.generate(["a", [1, 2]], GOOD, use_tqdm=False)) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(top_k=2.5), "top_k must be an integer, got float 2.5"),
        (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids"),
        (dict(temperature="0.5"), "temperature must be a number, got str '0.5'"),
        (dict(temperature=math.nan), "temperature=nan must be a finite number"),
        (dict(temperature=-1), "temperature=-1 is negative"),
        (dict(top_p=0), r"top_p=0 is outside \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 is outside \(0, 1\]"),
        (dict(max_tokens=0), "max_tokens=0: a request must generate at least 1 token"),
        (dict(max_tokens="5"), "max_tokens must be an integer, got str '5'"),
        (dict(seed=2**70), r"seed=\d+ is outside \[0, 2\*\*64\)"),
        (dict(seed=True), "seed must be an integer, got bool True"),
    ],
)
def test_sampling_params_are_checked_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_integer_like_sampling_params_are_accepted_and_stored_as_ints():
    sp = SamplingParams(max_tokens=np.int64(5), top_k=torch.tensor(3), stop_token_ids=None, temperature=np.float32(0.5))
    assert (sp.max_tokens, sp.top_k, sp.stop_token_ids) == (5, 3, ()) and type(sp.max_tokens) is int
    assert type(sp.temperature) is float and SamplingParams(top_k=-1).top_k == 0  # -1: off, as older vLLM


@pytest.mark.parametrize("params", [{"max_tokens": 5}, "greedy", [GOOD, {"max_tokens": 5}]])
def test_params_of_the_wrong_type_raise_before_anything_is_queued(tiny_gpt2, params):
    llm = ns.LLM(str(tiny_gpt2))
    with pytest.raises(TypeError, match="params must be a SamplingParams or a list of them"):
        llm.generate([[1, 2], [3, 4]], params, use_tqdm=False)
    assert not llm.has_unfinished()
    assert llm.generate([[1, 2]], GOOD, use_tqdm=False)[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("arrival", "message"),
    [
        (math.nan, "arrival_s=nan must be a finite number"),
        (math.inf, "arrival_s=inf must be a finite number"),
        (-1.0, "arrival_s=-1 must be between 0 and 86400"),
        (1e9, "arrival_s=1e[+]09 must be between 0 and 86400"),
        ("soon", "arrival_s must be a number, got str 'soon'"),
    ],
)
def test_bad_arrival_times_fail_alone(tiny_gpt2, arrival, message):
    llm = ns.LLM(str(tiny_gpt2))
    bad = llm.add_request([1, 2], GOOD, arrival_s=arrival)
    good = llm.add_request([3, 4], GOOD)
    t = time.perf_counter()
    for _ in llm.run():
        pass
    assert time.perf_counter() - t < 10 and good.finish_reason.value == "length"
    assert bad.finish_reason.value == "error" and re.search(message, bad.error), bad.error


def test_a_tokenizer_the_model_does_not_match(tiny_gpt2, tmp_path, capsys):
    """GPT-2's tokenizer on a 384-token model: a warning at load, and a text prompt whose ids the model lacks
    fails alone instead of crashing the device with an IndexError."""
    from tests.conftest import gpt2_tokenizer_dir

    folder = tmp_path / "m"
    shutil.copytree(tiny_gpt2, folder)
    shutil.copy(gpt2_tokenizer_dir() / "encoder.json", folder / "vocab.json")
    shutil.copy(gpt2_tokenizer_dir() / "vocab.bpe", folder / "merges.txt")
    llm = ns.LLM(str(folder))
    assert "the tokenizer has 50257 tokens but the model's vocabulary 384" in capsys.readouterr().err
    outs = llm.generate(["!", "Hello, world", [1, 2]], GOOD, use_tqdm=False)  # "!" is token 0
    assert outs[0].outputs[0].finish_reason == "length" and outs[2].outputs[0].finish_reason == "length"
    assert "outside the model's vocabulary of 384: the tokenizer and the model do not match" in outs[1].error


def test_a_huge_text_prompt_is_refused_before_it_is_tokenized(tiny_gpt2, tmp_path):
    from tests.conftest import save_tiny_gpt2

    llm = ns.LLM(str(save_tiny_gpt2(tmp_path / "m", vocab_size=50257, with_tokenizer=True)))
    t = time.perf_counter()
    out = llm.generate("x" * 50_000_000, GOOD, use_tqdm=False)[0]
    assert time.perf_counter() - t < 2.0
    assert "prompt has 50000000 characters, so at least" in out.error


def test_prompt_bigger_than_the_whole_cache(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2), num_gpu_blocks_override=2, block_size=4)
    outs = llm.generate([list(range(20)), [1, 2]], GOOD, use_tqdm=False)
    assert "needs 6 KV pages, but the cache has 2" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "length"


def test_request_that_outgrows_the_whole_cache(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2), num_gpu_blocks_override=2, block_size=4)
    outs = llm.generate([[1, 2, 3], [4]], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    assert any(o.outputs[0].finish_reason == "error" and "the whole cache has 2" in o.error for o in outs)
    llm.scheduler.blocks.check()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sched="fifo"), "unknown scheduler 'fifo'; choose one of: sync"),
        (dict(block_size=0), r"block_size=0 \(--block-size\) must be at least 1"),
        (dict(max_num_batched_tokens=0), r"max_num_batched_tokens=0 \(--max-num-batched-tokens\) must be at least 1"),
        (dict(max_num_seqs=0), r"max_num_seqs=0 \(--max-num-seqs\) must be at least 1"),
        (dict(num_gpu_blocks_override=0), r"num_gpu_blocks_override=0 .* must be at least 1"),
        (dict(seed=2**70), r"seed=.* is outside \[0, 2\*\*64\)"),
        (dict(block_size=2.5), "block_size=2.5 .* must be an integer"),
        (dict(device="bogus"), "device='bogus' .* is not a device; use cpu, cuda, cuda:N or one of sim:h100"),
        (dict(dtype="float64"), "dtype='float64' .* is not one of: auto, float32"),
        (dict(step_timeout_s=0), "step_timeout_s=0.0 .* must be positive"),
        (dict(sched="async", pp=2), "use --sched sync or balanced with --pp"),
    ],
)
def test_engine_settings_are_checked_before_anything_loads(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ns.LLM("distilgpt2", load_format="dummy", **kwargs)


def main(*argv):
    """The command line's main in this process: (exit code, stdout, stderr) without a subprocess per case."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def bad_folder(tiny_gpt2, tmp_path, name, text):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_gpt2, folder)
    (folder / name).write_text(text)
    return folder


FLAGS = {  # flags -> the message of the error (exit code 2, nothing run)
    "--block-size 0": (["--block-size", 0], r"block_size=0 \(--block-size\) must be at least 1"),
    "--max-num-batched-tokens 0": (["--max-num-batched-tokens", 0], "must be at least 1"),
    "--max-num-batched-tokens -1": (["--max-num-batched-tokens", -1], "must be at least 1"),
    "--max-num-seqs 0": (["--max-num-seqs", 0], r"max_num_seqs=0 \(--max-num-seqs\) must be at least 1"),
    "--num-gpu-blocks-override 0": (["--num-gpu-blocks-override", 0], "must be at least 1"),
    "--pp 0": (["--pp", 0], r"pp=0 \(--pp\) must be at least 1"),
    "--pp 9": (["--pp", 9], "need between 1 and the model's 3 layers"),
    "--threads -1": (["--threads", -1], "argument --threads: -1 must be at least 1"),
    "--num-prompts 0": (["--num-prompts", 0], "argument --num-prompts: 0 must be at least 1"),
    "--num-prompts -1": (["--num-prompts", -1], "argument --num-prompts: -1 must be at least 1"),
    "--request-rate 0": (["--request-rate", 0], "argument --request-rate: 0 must be positive"),
    "--request-rate nan": (["--request-rate", "nan"], "argument --request-rate: nan must be positive"),
    "--seed 2**70": (["--seed", 2**70], r"seed=\d+ \(--seed\) is outside \[0, 2\*\*64\)"),
    "--device bogus": (["--device", "bogus"], "is not a device; use cpu, cuda, cuda:N or one of sim:h100"),
    "--max-tokens 0": (["--max-tokens", 0], "max_tokens=0: a request must generate at least 1 token"),
    "--temperature nan": (["--temperature", "nan"], "temperature=nan must be a finite number"),
    "--top-p 2": (["--top-p", 2], r"top_p=2 is outside \(0, 1\]"),
    "--input-len 5:2": (["--input-len", "5:2"], "--input-len '5:2': need 1 <= MIN <= MAX"),
    "--sched fifo": (["--sched", "fifo"], "unknown scheduler 'fifo'; choose one of: sync"),
    "--compare sync,fifo": (["--compare", "sync,fifo"], "unknown scheduler 'fifo'"),
    "--output-json into a missing folder": (["--output-json", "{tmp}/no/such/out.json"], "does not exist; create it"),
    "--output-json onto a folder": (["--output-json", "{tmp}"], "is a folder; give a file name inside it"),
    "--trace into a missing folder": (["--trace", "{tmp}/no/run.jsonl"], "does not exist; create it first"),
}
if not torch.cuda.is_available():
    FLAGS["--device cuda without a GPU"] = (["--device", "cuda"], "no CUDA GPU is visible here")


@pytest.mark.parametrize("case", list(FLAGS))
def test_a_bad_flag_stops_before_the_run(tiny_gpt2, tmp_path, case):
    flags, message = FLAGS[case]
    flags = [str(f).replace("{tmp}", str(tmp_path)) for f in flags]
    code, out, err = main("--model", tiny_gpt2, "--workload", "random", "--num-prompts", 2, "--quiet", *flags)
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err and "Throughput" not in out


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        ("vocab.json", "not json at all", "the tokenizer files could not be read"),
        ("config.json", '{"n_layer": "2"}', "config.json: n_layer must be an integer, got str '2'"),
        ("config.json", "{", "config.json could not be read as JSON"),
        ("config.json", '{"activation_function": "relu"}', "is not GPT-2's tanh GELU"),
    ],
)
def test_a_broken_model_folder_names_the_file(tiny_gpt2, tmp_path, file, text, message):
    folder = bad_folder(tiny_gpt2, tmp_path, file, text)
    if file == "vocab.json":
        (folder / "merges.txt").write_text("#version: 0.2\n")
    code, _, err = main("--model", folder, "--quiet")
    assert code == 2 and message in err and "Traceback" not in err, err


def test_missing_model_folder_on_the_command_line(tmp_path):
    code, _, err = main("--model", tmp_path)
    assert code == 2 and "has no config.json" in err and "Traceback" not in err


LINES = {  # a prompts-file line -> the error of its request ("" for a good line)
    "good": ('{"prompt_token_ids": [1, 2, 3]}', ""),
    "every sampling field": ('{"prompt_token_ids": [4], "top_p": 0.9, "top_k": 3, "seed": 1, "max_tokens": 2}', ""),
    "truncated": ('{"prompt_token_ids": [4, 5', "not valid JSON"),
    "null": ("null", 'needs exactly one of "prompt" or "prompt_token_ids"'),
    "both prompts": ('{"prompt": "x", "prompt_token_ids": [1]}', 'needs exactly one of "prompt"'),
    "unknown key": ('{"prompt_token_ids": [8], "colour": 1}', r"unknown keys \['colour'\]"),
    "ids an int": ('{"prompt_token_ids": 5}', "prompt_token_ids must be a list of token ids, got int 5"),
    "ids null": ('{"prompt_token_ids": null}', "prompt_token_ids must be a list of token ids, got NoneType"),
    "ids as text": ('{"prompt_token_ids": "abc"}', "prompt_token_ids must be a list of token ids, got str"),
    "ids bools": ('{"prompt_token_ids": [true]}', r"prompt_token_ids\[0\] must be an integer, got bool"),
    "prompt an int": ('{"prompt": 123}', '"prompt" must be text'),
    "prompt null": ('{"prompt": null}', '"prompt" must be text'),
    "lone surrogate": ('{"prompt": "\\ud800"}', "half of a UTF-16 surrogate pair"),
    "temperature hot": ('{"prompt_token_ids": [1], "temperature": "hot"}', "temperature must be a number"),
    "temperature null": ('{"prompt_token_ids": [1], "temperature": null}', "temperature must be a number"),
    "max_tokens '5'": ('{"prompt_token_ids": [1], "max_tokens": "5"}', "max_tokens must be an integer"),
    "arrival NaN": ('{"prompt_token_ids": [1], "arrival_s": NaN}', "NaN is not a number JSON allows"),
    "arrival Infinity": ('{"prompt_token_ids": [1], "arrival_s": Infinity}', "Infinity is not a number JSON"),
    "arrival soon": ('{"prompt_token_ids": [1], "arrival_s": "soon"}', "arrival_s must be a number, got str"),
    "arrival 1e9": ('{"prompt_token_ids": [1], "arrival_s": 1e9}', "must be between 0 and 86400 s"),
    "huge line": ('{"prompt": "' + "x" * 5_000_000 + '"}', "longer than .* bytes, more than any prompt"),
}


def test_every_bad_prompts_file_line_fails_alone(tiny_gpt2, tmp_path):
    path, out = tmp_path / "p.jsonl", tmp_path / "out.json"
    path.write_text("\n".join(line for line, _ in LINES.values()) + "\n")
    t = time.perf_counter()
    code, _, err = main(
        "--model", tiny_gpt2, "--prompts-file", path, "--max-tokens", 3, "--output-json", out, "--quiet"
    )
    assert time.perf_counter() - t < 30, "no line may make the run hang or sleep"
    assert code == 1 and "Traceback" not in err
    reqs = json.loads(out.read_text())["requests"]
    assert len(reqs) == len(LINES) and len({q["id"] for q in reqs}) == len(LINES), "every request has its own id"
    for (case, (_, message)), q, lineno in zip(LINES.items(), reqs, range(1, len(LINES) + 1)):
        if message:
            assert q["outputs"][0]["finish_reason"] == "error", case
            assert re.search(message, q["error"]) and f"p.jsonl line {lineno}: " in q["error"], (case, q["error"])
            assert q["ttft_ms"] is None and q["e2e_ms"] is None, case
        else:
            assert q["outputs"][0]["finish_reason"] == "length" and q["error"] is None, case
    assert [len(q["outputs"][0]["token_ids"]) for q in reqs[:2]] == [3, 2]


def test_ctrl_c_stops_the_run_and_still_reports_what_finished(tiny_gpt2, tmp_path):
    out, log = tmp_path / "out.json", tmp_path / "err.txt"
    argv = ["--model", tiny_gpt2, "--workload", "random", "--num-prompts", 2000, "--input-len", "4:8"]
    argv += ["--output-len", "4", "--request-rate", 50, "--output-json", out, "--trace", tmp_path / "run.jsonl"]
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, ROOT / "nanoserve.py", *map(str, argv)], stdout=subprocess.PIPE, stderr=f)
        deadline = time.time() + 60
        while not re.search(r"requests [1-9]", log.read_text()) and time.time() < deadline:  # some finished
            time.sleep(0.1)
        t = time.perf_counter()
        p.send_signal(signal.SIGINT)
        stdout, _ = p.communicate(timeout=30)
    assert time.perf_counter() - t < 5, "it should stop promptly"
    err = log.read_text()
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "interrupted" in err and b"Throughput:" in stdout
    d = json.loads(out.read_text())
    reasons = {q["outputs"][0]["finish_reason"] for q in d["requests"]}
    assert "length" in reasons and "abort" in reasons and (tmp_path / "run.jsonl").stat().st_size > 0


def test_output_json_writes_what_actually_ran(tiny_gpt2, tmp_path):
    out = tmp_path / "out.json"
    code, _, _ = main("--model", tiny_gpt2, "--workload", "random", "--num-prompts", 2, "--output-json", out, "--quiet")
    cfg = json.loads(out.read_text())["config"]
    assert code == 0
    assert cfg["model"] == str(tiny_gpt2) and cfg["device"] == "cpu" and cfg["dtype"] == "float32"
    assert cfg["max_model_len"] == 160 and cfg["num_blocks"] > 0 and cfg["attention"] == "cpu"


def test_request_ids_count_per_engine_and_a_reused_id_is_refused(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2))
    assert [llm.add_request([1, 2]).request_id for _ in range(2)] == ["0", "1"]
    assert llm.add_request([1, 2], request_id="3").request_id == "3"
    assert llm.add_request([1, 2]).request_id == "2" and llm.add_request([1, 2]).request_id == "4"
    with pytest.raises(ValueError, match="request id '3' is already in use"):
        llm.add_request([1, 2], request_id="3")
    assert ns.LLM(str(tiny_gpt2)).add_request([1, 2]).request_id == "0"  # a second engine counts from 0
