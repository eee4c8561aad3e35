"""Bad input: each gets a clear error naming the problem and the fix; the other requests still finish."""

import json
import subprocess
import sys

import pytest

import nanoserve as ns
from sched import SamplingParams

ROOT = ns.ROOT
GOOD = SamplingParams(temperature=0, max_tokens=5)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        (list(range(200)), GOOD, "prompt has 200 tokens but the model's context is 160"),
        ([], GOOD, "prompt is empty"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens=0: a request must generate at least 1 token"),
        ([1, 2], SamplingParams(temperature=-1), "temperature=-1 is negative"),
        ([1, 2], SamplingParams(top_p=0), r"top_p=0 is outside \(0, 1\]"),
        ([1, 2], SamplingParams(top_p=1.5), r"top_p=1.5 is outside \(0, 1\]"),
        ([1, 99999], GOOD, r"prompt token 99999 is not an id in \[0, 384\)"),
        ("text", GOOD, "has no tokenizer files; pass prompt_token_ids"),
    ],
)
def test_bad_request_fails_alone(tiny_gpt2, prompt, params, message):
    llm = ns.LLM(str(tiny_gpt2))
    outs = llm.generate([[5, 6, 7], prompt, [8, 9]], [GOOD, params, GOOD], use_tqdm=False)
    assert outs[1].finish_reason == "error"
    assert pytest.importorskip("re").search(message, outs[1].error), outs[1].error
    assert [o.finish_reason for o in (outs[0], outs[2])] == ["length", "length"]
    assert len(outs[0].output_token_ids) == 5 and len(outs[2].output_token_ids) == 5


def test_prompt_bigger_than_the_whole_cache(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2), num_gpu_blocks_override=2, block_size=4)
    outs = llm.generate([list(range(20)), [1, 2]], GOOD, use_tqdm=False)
    assert "needs 6 KV pages, but the cache has 2" in outs[0].error
    assert outs[1].finish_reason == "length"


def test_request_that_outgrows_the_whole_cache(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2), num_gpu_blocks_override=2, block_size=4)
    outs = llm.generate([[1, 2, 3], [4]], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    assert any(o.finish_reason == "error" and "the whole cache has 2" in o.error for o in outs)
    llm.scheduler.blocks.check()


def test_unknown_scheduler_in_python():
    with pytest.raises(ValueError, match="unknown scheduler 'fifo'; choose one of: sync"):
        ns.LLM("distilgpt2", sched="fifo", load_format="dummy")


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "nanoserve.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_unknown_scheduler_on_the_command_line(tiny_gpt2):
    r = cli("--model", str(tiny_gpt2), "--sched", "fifo")
    assert r.returncode == 2 and "unknown scheduler 'fifo'; choose one of: sync" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_model_folder_on_the_command_line(tmp_path):
    r = cli("--model", str(tmp_path))
    assert r.returncode == 2 and "has no config.json" in r.stderr and "Traceback" not in r.stderr


def test_malformed_prompts_file_line(tiny_gpt2, tmp_path):
    lines = [
        '{"prompt_token_ids": [1, 2, 3]}',
        '{"prompt_token_ids": [4, 5',
        '{"prompt_token_ids": [6, 7]}',
        '{"prompt": "x", "prompt_token_ids": [1]}',
        '{"prompt_token_ids": [8], "colour": 1}',
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    r = cli(
        "--model",
        str(tiny_gpt2),
        "--prompts-file",
        str(tmp_path / "p.jsonl"),
        "--max-tokens",
        "3",
        "--output-json",
        str(tmp_path / "out.json"),
        "--quiet",
    )
    assert r.returncode == 1, r.stderr
    assert "p.jsonl line 2: " in r.stderr
    assert 'p.jsonl line 4: needs exactly one of "prompt" or "prompt_token_ids"' in r.stderr
    assert "p.jsonl line 5: unknown keys ['colour']" in r.stderr
    reqs = json.loads((tmp_path / "out.json").read_text())["requests"]
    assert [q["finish_reason"] for q in reqs] == ["length", "error", "length", "error", "error"]
    assert len(reqs[2]["output_token_ids"]) == 3


def test_max_tokens_zero_on_the_command_line_is_an_error_not_the_default(tiny_gpt2, capsys):
    assert ns.main(["--model", str(tiny_gpt2), "--workload", "random", "--num-prompts", "2", "--max-tokens", "0"]) == 1
    assert "max_tokens=0: a request must generate at least 1 token" in capsys.readouterr().err


def test_request_ids_count_per_engine_and_a_reused_id_is_refused(tiny_gpt2):
    llm = ns.LLM(str(tiny_gpt2))
    assert [llm.add_request([1, 2]).request_id for _ in range(2)] == ["0", "1"]
    assert llm.add_request([1, 2], request_id="3").request_id == "3"
    assert llm.add_request([1, 2]).request_id == "2" and llm.add_request([1, 2]).request_id == "4"
    with pytest.raises(ValueError, match="request id '3' is already in use"):
        llm.add_request([1, 2], request_id="3")
    assert ns.LLM(str(tiny_gpt2)).add_request([1, 2]).request_id == "0"  # a second engine counts from 0
