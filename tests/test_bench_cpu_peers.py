"""benchmarks/bench_cpu_peers.py end to end on a tiny random GPT-2: every installed system runs in its own
process in both orders, the report holds what a reader needs, and the peers' greedy tokens are nanoserve's."""

import json
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, save_tiny_gpt2

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_cpu_peers as bench  # noqa: E402


def test_a_missing_peer_is_skipped_with_the_install_command(monkeypatch):
    monkeypatch.setitem(bench.PEERS, "ct2", ("no_such_package_here", "transformers"))
    assert bench.missing("ct2") == 'no_such_package_here not installed: pip install -e ".[bench]"'
    assert bench.missing("nanoserve") is None


def test_token_ids_reads_both_output_shapes():
    assert bench.token_ids(SimpleNamespace(output_token_ids=[1, 2])) == [1, 2]  # nanoserve's RequestOutput today
    assert bench.token_ids(SimpleNamespace(outputs=[SimpleNamespace(token_ids=[3])])) == [3]  # vLLM's shape


@pytest.mark.slow  # ~30 s on a shared 2-core machine: 8 processes, each importing torch
def test_smoke_run_on_a_tiny_gpt2(tmp_path, capsys):
    model = save_tiny_gpt2(tmp_path / "tiny")
    out = tmp_path / "peers.json"
    argv = ["--models", str(model), "--num-prompts", "4", "--input-len", "4:12", "--output-len", "5"]
    argv += ["--repeats", "1", "--warmup-prompts", "1", "--retry-disturbed", "0", "--output-json", str(out), "--phases"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())

    installed = [s for s in bench.SYSTEMS if bench.missing(s) is None]
    assert {"nanoserve", "hf-static", "hf-cb"} <= set(installed)  # transformers is a dev dependency
    assert {"cpu", "cpus", "threads", "torch", "transformers", "ctranslate2"} <= d["env"].keys()
    assert set(d["skipped"]) == set(bench.SYSTEMS) - set(installed)
    (w,) = d["workloads"].values()
    assert w["workload"]["requests"] == 4 and w["workload"]["output_len"] == 5
    assert w["reference"] == "nanoserve" and list(w["summary"]) == installed
    for name, s in w["summary"].items():
        assert s["runs"] == 2 and s["failed"] == 0, (name, s["error"])
        assert s["tok_s"] > 0 and s["cpu_s_per_1k"] > 0 and s["peak_rss_mib"] > 0, name
        assert {r["pass"] for r in w["runs"][name]} == {0, 1}
        assert all(r["output_tokens"] == 4 * 5 for r in w["runs"][name])
    summary = w["summary"]
    assert summary["nanoserve"]["same_tokens"] == 1.0  # its second run gave its first run's tokens
    for peer in ("hf-static", "hf-cb"):
        assert summary[peer]["same_tokens"] == 1.0, peer  # float32 greedy: transformers' tokens are nanoserve's
        assert summary[peer]["pairs"] == 2 and summary[peer]["ratio_tok_s"][0] > 0
    if "ct2" in summary:  # a wrong conversion would agree on almost nothing; near-ties may flip a request
        assert summary["ct2"]["same_tokens"] >= 0.5 and summary["ct2"]["same_first_token"] >= 0.75

    # the second pass runs the systems in the reverse order of the first
    order = [line.split()[4] for line in printed.splitlines() if " pass " in line]
    assert order == installed + installed[::-1]
    assert "same tokens as nanoserve" in printed and "nanoserve / hf-cb:" in printed
    assert printed.startswith("CPU ") and "thread(s) per system" in printed

    # --phases: the systems that split their time into a prefill and decode steps, and only those
    for name, s in summary.items():
        split = {"first_prefill_s", "prefill_s", "decode_step_ms"} <= s.keys()
        assert split == (name in bench.PHASES), name
        assert not split or s["first_prefill_s"] > 0 and s["prefill_s"] > 0
    assert "phases: the first prefill of 4 prompts" in printed
    if "ct2" in summary:
        assert "nanoserve / ct2: " in printed and "x a decode step's" in printed
