"""benchmarks/bench_serving.py end to end: it starts a server on a free port, streams a bounded load at two
rates, stops the server, runs the offline comparison, and reports what every request measured."""

import json
import sys

import pytest

from tests.conftest import ROOT, save_tiny_gpt2

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_serving as bench  # noqa: E402


def test_summary_of_hand_made_requests():
    ok = dict(start=0.0, end=1.0, chunks=[0.1, 0.3, 0.6], tokens=3, error=None)
    bad = dict(start=0.5, end=2.0, chunks=[], tokens=0, error="HTTP 503: busy")
    s = bench.summarise([ok, bad], cpu_s=0.3)
    assert (s["completed"], s["failed"], s["errors"], s["duration_s"]) == (1, 1, ["HTTP 503: busy"], 2.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(100) and s["tpot_ms"]["mean"] == pytest.approx(250)
    assert s["itl_ms"]["median"] == pytest.approx(250) and s["e2e_ms"]["p99"] == pytest.approx(1000)
    assert s["output_tok_s"] == pytest.approx(1.5) and s["server_cpu_s_per_1k"] == pytest.approx(100)


@pytest.mark.slow  # ~20 s: a server process and an offline process, each importing torch
def test_smoke_run_against_a_server_it_starts(tmp_path, capsys):
    model = save_tiny_gpt2(tmp_path / "tiny", n_positions=128)
    out = tmp_path / "serving.json"
    argv = ["--num-prompts", "12", "--input-len", "4:12", "--output-len", "6", "--request-rate", "40,inf"]
    argv += ["--output-json", str(out), "--", "--model", str(model), "--sched", "async", "--block-size", "8"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    assert set(d["rates"]) == {"40.0", "inf"}
    for s in d["rates"].values():
        assert (s["completed"], s["failed"]) == (12, 0)
        assert 0 < s["ttft_ms"]["median"] <= s["e2e_ms"]["median"] and s["server_cpu_s_per_1k"] > 0
    assert d["offline"]["output_tok_s"] > 0 and d["served_over_offline"] > 0
    assert "request rate inf/s: 12 completed, 0 failed" in printed and "served (all at once) / offline" in printed
