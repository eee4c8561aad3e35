"""The visualizer's behaviour: its model of a run (viz/state.py) against the engine's own bookkeeping,
live and replayed runs ending in the same state, the keys, the Perfetto export, and errors.

The fixture log tests/viz_run.jsonl is a real run (sync, tiny model, preemptions and prefix hits)
with times rounded to 10 µs; regenerate it with `PYTHONPATH=. python tests/test_viz.py --regenerate`.
"""

import asyncio
import json
import random
import time
from pathlib import Path

import pytest
import torch

import nanoserve as ns
from sched import SamplingParams
from viz.__main__ import main as viz_main
from viz.__main__ import render_svg
from viz.app import VizApp, run_live
from viz.live import EngineDriver, Pacer
from viz.perfetto import to_perfetto
from viz.replay import Replay, frame_ends
from viz.state import VIEWER_LANE, Cell, RunState
from viz.trace import (
    FirstToken,
    Preempted,
    RequestArrived,
    RequestFinished,
    RunInfo,
    Span,
    StepScheduled,
    compute_metrics,
    read_jsonl,
)
from viz.widgets.error import ErrorScreen
from viz.widgets.help import HelpScreen
from viz.widgets.metrics import Metrics
from viz.widgets.status import StatusBar

FIXTURE = Path(__file__).parent / "viz_run.jsonl"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One thread: the live tests run the engine thread and the app together on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_llm(model_dir, sched="sync", num_requests=10, num_blocks=24, seed=0, **kw):
    """A tiny engine with requests queued that share a prefix, chunk their prompts and run out of pages."""
    llm = ns.LLM(
        str(model_dir),
        sched=sched,
        block_size=4,
        num_gpu_blocks_override=num_blocks,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        **kw,
    )
    rng = random.Random(seed)
    shared = [rng.randrange(300) for _ in range(9)]
    for i in range(num_requests):
        prompt = (shared if i % 2 else []) + [rng.randrange(300) for _ in range(rng.randint(2, 12))]
        sp = SamplingParams(temperature=0, max_tokens=rng.randint(3, 12), ignore_eos=True)
        llm.add_request(prompt, sp, request_id=str(i))
    return llm


def engine_page_map(llm):
    bm = llm.scheduler.blocks
    owners = {}
    for rid, table in bm.tables.items():
        for p in table:
            owners.setdefault(p, []).append(rid)
    cached_free = {p for p in bm.free_queue if bm.pages[p].hash is not None}
    return {p: tuple(sorted(o)) for p, o in owners.items()}, cached_free


def run_app(app, size=(100, 30), until=None, then=None, timeout=60.0):
    """Run `app` headless until `until(app)` (or it exits), then call `then(app)` while it still runs."""

    async def go():
        async with app.run_test(size=size) as pilot:
            t0 = time.monotonic()
            while app.is_running and not (until and until(app)):
                assert time.monotonic() - t0 < timeout, "the app did not get there in time"
                await pilot.pause(0.02)
            if then:
                await pilot.pause()
                then(app)

    asyncio.run(go())
    return app


# --- the state model against the engine ------------------------------------------------------------


@pytest.mark.parametrize("sched, pp", [("sync", 1), ("async", 1), ("page-aligned", 1), ("balanced", 2)])
def test_state_rebuilds_the_engines_pages_and_tokens_at_every_step(tiny_gpt2, sched, pp):
    llm = make_llm(tiny_gpt2, sched, num_blocks=14, pp=pp)
    st, n, shared = RunState(), 0, False
    for _ in llm.run():
        events = llm.recorder.events
        st.apply_all(events[n : len(events)])
        n = len(events)
        pages, cached_free = engine_page_map(llm)
        assert st.page_map() == pages
        assert st.cached_free_pages() == cached_free
        assert st.num_used_pages == len(pages) and st.num_cached_free_pages == len(cached_free)
        assert st.num_free_pages == llm.scheduler.blocks.num_free_blocks
        shared |= any(len(o) > 1 for o in pages.values())
        for req in llm.requests.values():  # tokens so far, counted from the steps alone
            assert st.requests[req.request_id].num_output_tokens == req.num_output_tokens
    st.apply_all(llm.recorder.events[n:])
    st.done = True
    assert st.preemptions > 0 and shared  # the run exercised both
    m, want = st.metrics(), compute_metrics(llm.recorder.events)
    for k in ("output_throughput", "device_busy_frac", "wall_s"):
        assert m[k] == pytest.approx(want[k])
    assert m["ttft_ms"] == pytest.approx(want["ttft_ms"]["mean"])
    assert m["tpot_ms"] == pytest.approx(want["tpot_ms"]["mean"])
    assert (m["steps"], m["preemptions"]) == (want["steps"], want["preemptions"])
    assert st.device_lanes() == (["device"] if pp == 1 else [f"device/{k}" for k in range(pp)])


def expected_cell(events, rid, step):
    """What request `rid` did in `step`, read straight off the events (the timeline's meaning)."""
    arrived = next(i for i, e in enumerate(events) if isinstance(e, RequestArrived) and e.request_id == rid)
    sched_at = {e.step: i for i, e in enumerate(events) if isinstance(e, StepScheduled)}
    i = sched_at[step]
    if i < arrived or any(isinstance(e, RequestFinished) and e.request_id == rid for e in events[:i]):
        return Cell.NONE
    e = events[i]
    if rid in e.request_ids:
        return Cell.PREFILL if e.is_prefill[e.request_ids.index(rid)] else Cell.DECODE
    if any(isinstance(p, Preempted) and p.request_id == rid and p.step == step for p in events[:i]):
        return Cell.PREEMPTED
    last = max((k for k, p in enumerate(events[:i]) if isinstance(p, Preempted) and p.request_id == rid), default=-1)
    ran = any(isinstance(s, StepScheduled) and rid in s.request_ids for s in events[last + 1 : i])
    return Cell.IDLE if ran else Cell.WAITING


def test_timeline_cells_say_what_each_request_did_in_each_step():
    events = read_jsonl(FIXTURE)
    st = RunState()
    st.apply_all(events)
    seen = set()
    for rid, req in st.requests.items():
        for step in range(st.num_steps):
            got = req.cell(step, st.num_steps)
            assert got == expected_cell(events, rid, step), (rid, step)
            seen.add(got)
    assert {Cell.PREFILL, Cell.DECODE, Cell.PREEMPTED, Cell.WAITING} <= seen


def test_viewer_pauses_are_cut_out_of_time_and_metrics():
    # one request; the viewer held the engine 10 s between two steps, the device busy for 1 s of it
    ev = [
        RunInfo(0.0, 4, 2),
        RequestArrived(0.0, "a", 2),
        StepScheduled(0.0, 0, ["a"], [2], [True]),
        Span(0.0, 1.0, "device", "forward", 0),
        FirstToken(1.0, "a"),
        Span(1.0, 11.0, VIEWER_LANE, "paused", 1),
        Span(1.0, 2.0, "device", "forward", 1),  # the step in flight when the pause began
        Span(11.0, 12.0, "device", "forward", 2),
        RequestFinished(12.0, "a", "length", 2, 3),
    ]
    st = RunState()
    st.apply_all(ev)
    st.done = True
    assert st.paused_before(12.0) == pytest.approx(9.0)  # 10 s held minus the 1 s the device worked
    assert st.active(12.0) == pytest.approx(3.0)
    m = st.metrics()
    assert m["wall_s"] == pytest.approx(3.0) and m["device_busy_frac"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(1.0) and m["tpot_ms"] == pytest.approx(1000.0)
    # without the viewer's span the same run is 12 s long, as compute_metrics says
    plain = RunState()
    plain.apply_all([e for e in ev if getattr(e, "lane", None) != VIEWER_LANE])
    plain.done = True
    assert plain.metrics()["wall_s"] == pytest.approx(compute_metrics(ev)["wall_s"]) == pytest.approx(12.0)


# --- replay ----------------------------------------------------------------------------------------


def test_replay_frames_seek_back_and_forth_to_identical_states():
    events = read_jsonl(FIXTURE)
    r = Replay(events)
    assert r.frames == frame_ends(events) and r.frames[-1] == len(events)
    assert r.last == r.num_steps  # a frame before the first step, then one per step
    at_20 = r.seek(20)
    pages, cells = at_20.page_map(), {k: bytes(v.cells) for k, v in at_20.requests.items()}
    r.seek(r.last)
    again = r.seek(20)  # rebuilt from the start
    assert again.page_map() == pages and {k: bytes(v.cells) for k, v in again.requests.items()} == cells
    assert again.num_steps == 20 and not again.done and r.seek(10**6).done


def test_live_run_finishes_and_its_replay_ends_in_the_same_state(tiny_gpt2, tmp_path):
    llm = make_llm(tiny_gpt2, "async", num_blocks=14)
    shown = {}

    def look(app):
        shown["status"] = str(app.query_one(StatusBar).render())
        shown["metrics"] = str(app.query_one(Metrics).render())

    app = run_app(VizApp(llm), until=lambda a: a.progress.done, then=look)
    assert app.driver.finished and app.driver.error is None
    live = app.state
    # the live view showed every request finished
    assert all(r.finished for r in llm.requests.values())
    assert sum(r.finished for r in live.requests.values()) == len(llm.requests) == 10
    assert "10/10 done" in shown["status"] and "finished" in shown["status"]
    assert "running     0" in shown["metrics"] and "finished   10" in shown["metrics"]
    # its pages are the engine's, and the step log replays into exactly that state
    assert live.page_map() == engine_page_map(llm)[0] == {}  # everything freed
    assert live.cached_free_pages() == engine_page_map(llm)[1]
    llm.recorder.write_jsonl(tmp_path / "run.jsonl")
    replayed = Replay(read_jsonl(tmp_path / "run.jsonl")).seek(10**6)
    assert replayed.page_map() == live.page_map()
    assert replayed.cached_free_pages() == live.cached_free_pages()
    fin = lambda st: {r.id: (r.reason, r.num_output_tokens) for r in st.requests.values() if r.finished}
    assert fin(replayed) == fin(live) == {r.request_id: ("length", r.num_output_tokens) for r in llm.requests.values()}
    assert {k: bytes(v.cells) for k, v in replayed.requests.items()} == {
        k: bytes(v.cells) for k, v in live.requests.items()
    }
    assert replayed.metrics() == pytest.approx(live.metrics())


# --- keys --------------------------------------------------------------------------------------------


def test_live_keys_pause_step_and_change_speed(tiny_gpt2):
    llm = make_llm(tiny_gpt2, "sync", num_requests=4, num_blocks=64)
    app = VizApp(llm, paused=True, exit_when_done=True)

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            status = lambda: str(app.query_one(StatusBar).render())
            await pilot.pause(0.3)
            assert app.driver.steps == 0 and "paused" in status()  # paused: the engine waits
            await pilot.press("n")
            await pilot.pause(0.3)
            assert app.driver.steps == 1  # n: exactly one step
            await pilot.press("n", "n")
            await pilot.pause(0.3)
            assert app.driver.steps == 3 and app.state.num_steps >= 3 and "step 3" in status()
            assert app.pacer.speed is None
            await pilot.press("minus")  # slower: from full speed to 500 steps/s, then 200
            await pilot.press("minus")
            assert app.pacer.speed == 200
            await pilot.press("plus")
            assert app.pacer.speed == 500
            for _ in range(9):
                await pilot.press("minus")
            assert app.pacer.speed == 1  # the slowest
            await pilot.press("space")  # resume at 1 step/s: about one step in the next second
            await pilot.pause(1.2)
            assert 4 <= app.driver.steps <= 6 and "▶ 1 steps/s" in status()
            await pilot.press("space")  # pause again
            await pilot.pause(0.2)
            held = app.driver.steps
            await pilot.pause(1.2)
            assert app.driver.steps == held
            for _ in range(10):
                await pilot.press("plus")
            assert app.pacer.speed is None
            await pilot.press("space")  # full speed to the end; exit_when_done closes the app
            t0 = time.monotonic()
            while app.is_running and time.monotonic() - t0 < 30:
                await pilot.pause(0.05)

    asyncio.run(go())
    assert app.driver.finished and all(r.finished for r in llm.requests.values())
    # the viewer's holds are in the log, and cut out of the metrics it shows
    assert any(isinstance(e, Span) and e.lane == VIEWER_LANE for e in llm.recorder.events)
    assert app.state.metrics()["wall_s"] < compute_metrics(llm.recorder.events)["wall_s"] - 1.0


def test_a_finished_live_run_can_be_stepped_back_through(tiny_gpt2):
    llm = make_llm(tiny_gpt2, "sync", num_requests=3, num_blocks=64)
    app = VizApp(llm)

    async def go():
        async with app.run_test(size=(80, 24)) as pilot:
            t0 = time.monotonic()
            while not app.progress.done and time.monotonic() - t0 < 30:
                await pilot.pause(0.05)
            await pilot.pause()
            final = app.state
            assert app.replay.frame == app.replay.last and "finished" in str(app.query_one(StatusBar).render())
            await pilot.press("b")
            assert app.replay.frame == app.replay.last - 1 and app.state.num_events < final.num_events
            await pilot.press("home")
            assert app.state.num_steps == 0 and not app.state.page_map()
            await pilot.press("end")
            assert app.state.page_map() == final.page_map() and app.state.num_events == final.num_events
            await pilot.press("q")

    asyncio.run(go())


def test_replay_keys_seek_step_and_play():
    events = read_jsonl(FIXTURE)
    app = VizApp(events=events, paused=True)

    async def go():
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert app.replay.frame == 0 and app.state.num_steps == 0
            await pilot.press("n", "n", "right")
            assert app.replay.frame == 3 and app.state.num_steps == 3
            await pilot.press("b", "left")
            assert app.replay.frame == 1
            await pilot.press("end")
            assert app.replay.frame == app.replay.last and app.state.done
            assert "end of log" in str(app.query_one(StatusBar).render())
            await pilot.press("home")
            assert app.replay.frame == 0
            await pilot.press("plus")
            assert app.speed == 50
            await pilot.press("minus", "minus")
            assert app.speed == 10
            await pilot.press("space")  # play: 10 steps/s takes about 3 s to the end of the log
            await pilot.pause(0.5)
            assert 0 < app.replay.frame < app.replay.last
            t0 = time.monotonic()
            while app.replay.frame < app.replay.last and time.monotonic() - t0 < 10:
                await pilot.pause(0.1)
            assert app.replay.frame == app.replay.last and not app.playing

    asyncio.run(go())
    final = RunState()
    final.apply_all(events)
    assert app.state.page_map() == final.page_map() and app.state.cached_free_pages() == final.cached_free_pages()


def test_screenshot_help_and_theme_keys(tmp_path):
    app = VizApp(events=read_jsonl(FIXTURE), paused=True, at="end", screenshot_dir=tmp_path)

    async def go():
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("s")
            await pilot.pause()
            (svg,) = tmp_path.glob("*.svg")
            assert svg.read_text().startswith("<svg") and "Timeline" in svg.read_text()
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)
            theme = app.theme
            await pilot.press("d")
            assert app.theme != theme
            await pilot.press("q")

    asyncio.run(go())
    assert not app.is_running


def test_render_svg_works_inside_a_running_event_loop_as_in_a_notebook():
    async def cell():  # a Jupyter cell runs inside the kernel's event loop
        app = VizApp(events=read_jsonl(FIXTURE), paused=True, at="end")
        return render_svg(app, (100, 30))

    svg = asyncio.run(cell())
    assert svg.startswith("<svg") and "Timeline" in svg
    assert svg == render_svg(VizApp(events=read_jsonl(FIXTURE), paused=True, at="end"), (100, 30))


# --- errors ------------------------------------------------------------------------------------------


def failing_run(llm):
    def run():
        yield from ()
        raise RuntimeError("step 0 failed on the device: boom")

    llm.run = lambda: (x for x in run())
    return llm


def test_an_engine_error_is_shown_then_raised(tiny_gpt2):
    llm = failing_run(make_llm(tiny_gpt2, num_requests=1))
    shown = []
    app = run_app(
        VizApp(llm), until=lambda a: isinstance(a.screen, ErrorScreen), then=lambda a: shown.append(a.screen.text)
    )
    assert "boom" in shown[0] and "Traceback" in shown[0] and isinstance(app.driver.error, RuntimeError)
    # run_live re-raises it once the viewer has closed (never swallowed, never a hang)
    llm = failing_run(make_llm(tiny_gpt2, num_requests=1))
    with pytest.raises(RuntimeError, match="boom"):
        run_live(llm, exit_when_done=True, headless=True)


def test_quitting_midway_stops_the_engine_cleanly(tiny_gpt2):
    llm = make_llm(tiny_gpt2, num_requests=6)
    app = VizApp(llm, speed=20)

    async def go():
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.4)
            await pilot.press("q")

    asyncio.run(go())
    assert app.driver.stopped.wait(10) and not app.driver.finished and app.driver.error is None
    assert 0 < app.driver.steps < 20 and not all(r.finished for r in llm.requests.values())


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"type": "RunInfo", "t": 0.0, "num_blocks": 4, "block_size": 2}\n{"type": "Span", "t": 0.', "line 2"),
        ('{"type": "RunInfo", "t": 0.0, "num_blocks": 4, "block_size": 2}\n{"type": "Nope", "t": 1}\n', "line 2"),
        ("", "holds no events"),
    ],
)
def test_a_bad_trace_file_gives_a_clear_error_naming_the_line(tmp_path, capsys, content, says):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    assert viz_main([str(p)]) == 2
    err = capsys.readouterr().err
    assert says in err and str(p) in err and "Traceback" not in err
    assert viz_main([str(tmp_path / "missing.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err


# --- the pacer -----------------------------------------------------------------------------------------


def test_pacer_paces_pauses_and_steps():
    p = Pacer(speed=50)
    t0 = time.perf_counter()
    for _ in range(6):
        assert p.wait()
    assert time.perf_counter() - t0 >= 5 / 50 * 0.95  # 6 steps at 50/s: 5 intervals
    p = Pacer(paused=True)
    p.step()
    assert p.wait()  # one step granted while paused
    import threading

    done = threading.Event()
    threading.Thread(target=lambda: (p.wait(), done.set()), daemon=True).start()
    assert not done.wait(0.2)  # paused: the engine waits
    p.toggle()
    assert done.wait(2)  # resumed
    p.stop()
    assert p.wait() is False


def test_driver_reports_progress_and_keeps_the_engines_error(tiny_gpt2):
    llm = make_llm(tiny_gpt2, num_requests=2, num_blocks=64)
    got = []
    d = EngineDriver(llm, Pacer(), post=got.append)
    d.run()
    assert d.finished and got[-1].done and got[-1].num_events == len(llm.recorder.events)
    assert got[0].steps == 1 and len(got) == 2  # want() not called again: one step's report, then the end
    d = EngineDriver(failing_run(make_llm(tiny_gpt2, num_requests=1)), Pacer(), post=got.append)
    d.run()
    assert isinstance(d.error, RuntimeError) and "boom" in got[-1].error and got[-1].done


# --- Perfetto ------------------------------------------------------------------------------------------


def check_perfetto(trace: dict, events: list):
    """The structure Chrome/Perfetto needs: fields, µs times, nesting per track, a span per request."""
    evs = trace["traceEvents"]
    json.dumps(trace)  # plain JSON
    for e in evs:
        assert {"name", "ph", "ts", "pid", "tid"} <= e.keys(), e
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] == "X":
            assert e["dur"] >= 0 and "cat" in e
        if e["ph"] == "C":
            assert e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values())
    # microseconds: the last event is at the run's last time x 1e6
    t_end = max(getattr(e, "end", e.t) for e in events)
    assert max(e["ts"] + e.get("dur", 0) for e in evs) == pytest.approx(t_end * 1e6, abs=1e-3)
    # complete events on one track nest or are disjoint
    tracks = {}
    for e in evs:
        if e["ph"] == "X":
            tracks.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in tracks.values():
        stack = []
        for s, end in sorted(spans, key=lambda x: (x[0], -x[1])):
            while stack and stack[-1] <= s + 1e-6:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-6, "overlapping spans on one track"
            stack.append(end)
    # CPU and device on separate tracks, named
    names = {e["tid"]: e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    cpu = {e["tid"] for e in evs if e["ph"] == "X" and e["cat"] == "cpu"}
    device = {e["tid"] for e in evs if e["ph"] == "X" and e["cat"] == "device"}
    assert cpu and device and not cpu & device and all(t in names for t in cpu | device)
    # one async span per request, begin before end
    requests = {e.request_id for e in events if isinstance(e, (RequestArrived, RequestFinished))}
    for ph in "be":
        ids = [e["id"] for e in evs if e["ph"] == ph and e["cat"] == "request"]
        assert sorted(ids) == sorted(requests)
    begin = {e["id"]: e["ts"] for e in evs if e["ph"] == "b"}
    assert all(e["ts"] >= begin[e["id"]] for e in evs if e["ph"] == "e")
    counters = {e["name"] for e in evs if e["ph"] == "C"}
    assert {"KV pages", "requests"} <= counters
    preempts = [e for e in evs if e["ph"] == "i" and e["name"].startswith("preempt")]
    assert len(preempts) == sum(isinstance(e, Preempted) for e in events)


def test_perfetto_export_of_the_fixture_and_of_an_async_run(tiny_gpt2, tmp_path):
    events = read_jsonl(FIXTURE)
    check_perfetto(to_perfetto(events), events)
    kv = [e for e in to_perfetto(events)["traceEvents"] if e["name"] == "KV pages"]
    final = Replay(events).seek(10**6)
    assert kv[-1]["args"] == {
        "used": 0,
        "cached_free": final.num_cached_free_pages,
        "free": 16 - len(final.cached_free_pages()),
    }
    llm = make_llm(tiny_gpt2, "async", num_blocks=14)
    for _ in llm.run():
        pass
    check_perfetto(to_perfetto(llm.recorder.events), llm.recorder.events)
    out = tmp_path / "run.json"
    llm.recorder.write_jsonl(tmp_path / "run.jsonl")
    assert viz_main([str(tmp_path / "run.jsonl"), "--perfetto", str(out)]) == 0
    check_perfetto(json.loads(out.read_text()), llm.recorder.events)


# --- the fixture ---------------------------------------------------------------------------------------


def regenerate_fixture(model_dir):
    """Write tests/viz_run.jsonl from a fresh tiny run, times rounded to 10 µs (then re-accept the snapshots)."""
    from dataclasses import asdict

    torch.set_num_threads(1)
    for _ in range(2):  # the first run warms torch up; keep the second
        llm = make_llm(model_dir, "sync", num_requests=10, num_blocks=16, seed=1)
        for _ in llm.run():
            pass
    with open(FIXTURE, "w") as f:
        for e in llm.recorder.events:
            d = {"type": type(e).__name__, **asdict(e)}
            for k in ("t", "end"):
                if k in d:
                    d[k] = round(d[k], 5)
            if d["type"] == "RunInfo":
                d["config"] = {**d["config"], "model": "tiny-gpt2"}
            f.write(json.dumps(d) + "\n")


if __name__ == "__main__":
    import sys
    import tempfile

    from conftest import save_tiny_gpt2

    if sys.argv[1:] == ["--regenerate"]:
        with tempfile.TemporaryDirectory() as d:
            regenerate_fixture(save_tiny_gpt2(Path(d) / "tiny"))
        print(f"wrote {FIXTURE}")
