"""The command line as a user runs it: from another working directory, writing --output-json and --trace."""

import json
import subprocess
import sys

import pytest

import nanoserve as ns
from nanoserve_entrypoints.cli import main
from nanoserve_viz.trace import compute_metrics, read_jsonl

METRICS = {
    "num_requests",
    "wall_s",
    "output_throughput",
    "total_throughput",
    "ttft_ms",
    "tpot_ms",
    "device_busy_frac",
    "steps",
    "preemptions",
}


def test_cli_from_another_directory_writes_the_json_contract(tiny_gpt2, tmp_path):
    out, trace = tmp_path / "out.json", tmp_path / "run.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            str(ns.ROOT / "nanoserve.py"),
            "--model",
            str(tiny_gpt2),
            "--workload",
            "random",
            "--num-prompts",
            "12",
            "--input-len",
            "5:40",
            "--output-len",
            "3:9",
            "--ignore-eos",
            "--output-json",
            str(out),
            "--trace",
            str(trace),
            "--block-size",
            "8",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Throughput:" in r.stdout and "requests/s" in r.stdout and "output tokens/s" in r.stdout
    d = json.loads(out.read_text())
    assert d["config"]["sched"] == "sync" and d["config"]["block_size"] == 8
    assert d["metrics"].keys() >= METRICS
    assert {"mean", "p50", "p99"} <= d["metrics"]["ttft_ms"].keys()
    m = d["metrics"]
    assert m["num_requests"] == 12 and 0 < m["device_busy_frac"] <= 1 and m["steps"] > 0
    assert len(d["requests"]) == 12
    for q in d["requests"]:
        assert {
            "id",
            "prompt_token_ids",
            "prompt",
            "outputs",
            "error",
            "num_cached_tokens",
            "ttft_ms",
            "e2e_ms",
        } <= q.keys()
        [o] = q["outputs"]
        assert {"index", "text", "token_ids", "finish_reason", "stop_reason"} <= o.keys()
        assert 5 <= len(q["prompt_token_ids"]) <= 40 and 3 <= len(o["token_ids"]) <= 9
        assert o["finish_reason"] == "length" and 0 < q["ttft_ms"] <= q["e2e_ms"]
    # the step log replays into the same metrics: one source of truth
    again = compute_metrics(read_jsonl(trace))
    assert again["num_output_tokens"] == sum(len(q["outputs"][0]["token_ids"]) for q in d["requests"])
    assert again["steps"] == m["steps"] and abs(again["output_throughput"] - m["output_throughput"]) < 1e-6


def test_request_rate_spreads_arrivals(tiny_gpt2, tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ns.ROOT / "nanoserve.py"),
            "--model",
            str(tiny_gpt2),
            "--workload",
            "random",
            "--num-prompts",
            "6",
            "--input-len",
            "4:8",
            "--output-len",
            "2",
            "--request-rate",
            "20",
            "--output-json",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())["metrics"]
    assert m["wall_s"] > 0.1  # six Poisson arrivals at 20/s take ~0.25 s on average


def test_truncated_trace_names_the_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"type": "FirstToken", "t": 0.1, "request_id": "0"}\n{"type": "Span", "t": 0.')
    import pytest

    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)


def test_viz_flag_runs_the_live_viewer_and_trace_json_writes_perfetto(tiny_gpt2, tmp_path, monkeypatch, capsys):
    pytest.importorskip("textual", reason="the viewer needs Textual: pip install -e '.[dev]'")
    import nanoserve_viz.app

    seen, run_live = {}, nanoserve_viz.app.run_live

    def headless(llm, **kw):  # the real viewer, without a terminal, closing when the run ends
        seen["llm"] = llm
        return run_live(llm, exit_when_done=True, headless=True, **kw)

    monkeypatch.setattr(nanoserve_viz.app, "run_live", headless)
    out = tmp_path / "run.json"
    argv = ["--model", str(tiny_gpt2), "--workload", "random", "--num-prompts", "6", "--output-len", "2:5"]
    assert main([*argv, "--ignore-eos", "--viz", "--trace", str(out), "--quiet"]) == 0
    assert seen["llm"].metrics()["num_requests"] == 6 and not seen["llm"].has_unfinished()
    trace = json.loads(out.read_text())
    assert trace["displayTimeUnit"] and {e["ph"] for e in trace["traceEvents"]} >= {"X", "b", "e", "C"}
    assert "Throughput:" in capsys.readouterr().out
