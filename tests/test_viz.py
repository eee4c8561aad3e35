"""The visualizer's behaviour: its model of a run (nanoserve_viz/state.py) against the engine's own bookkeeping,
live and replayed runs ending in the same state, the keys, the Perfetto export, and errors; one set
of numbers however the viewer held the engine; bad trace files refused (by `python -m nanoserve_viz`, in a
subprocess) and every accepted one drawable; the KV panel's zoom; the controllers and the code's shape.

The fixture log tests/viz_run.jsonl is a real run (sync, tiny model, preemptions and prefix hits)
with times rounded to 10 µs; regenerate it with `PYTHONPATH=. python tests/test_viz.py --regenerate`.
"""

import asyncio
import dataclasses
import importlib.util
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

import nanoserve as ns
from nanoserve_sched import SamplingParams
from nanoserve_viz.__main__ import main as viz_main
from nanoserve_viz.control import LiveControl, ReplayControl
from nanoserve_viz.live import MAX, EngineDriver, Pacer
from nanoserve_viz.perfetto import to_perfetto
from nanoserve_viz.replay import Replay, frame_ends
from nanoserve_viz.state import VIEWER_LANE, Cell, RunState
from nanoserve_viz.trace import (
    FirstToken,
    Pages,
    Preempted,
    RequestArrived,
    RequestFinished,
    RunInfo,
    Span,
    StepScheduled,
    compute_metrics,
    read_jsonl,
)

# The viewer itself needs Textual (a dependency of the project, but not of every machine the tests run on:
# the GPU image has none). Its state model, trace checks, metrics and exports are tested without it.
HAS_TEXTUAL = importlib.util.find_spec("textual") is not None
needs_textual = pytest.mark.skipif(not HAS_TEXTUAL, reason="the viewer needs Textual: pip install -e '.[dev]'")
if HAS_TEXTUAL:
    from nanoserve_viz.__main__ import render_svg
    from nanoserve_viz.app import VizApp, run_live
    from nanoserve_viz.widgets.error import ErrorScreen
    from nanoserve_viz.widgets.help import HelpScreen
    from nanoserve_viz.widgets.metrics import Metrics
    from nanoserve_viz.widgets.status import StatusBar

FIXTURE = Path(__file__).parent / "viz_run.jsonl"
ROOT = Path(__file__).resolve().parents[1]


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
    llm.queued = {}  # every request queued here, finished or not, by id
    for i in range(num_requests):
        prompt = (shared if i % 2 else []) + [rng.randrange(300) for _ in range(rng.randint(2, 12))]
        sp = SamplingParams(temperature=0, max_tokens=rng.randint(3, 12), ignore_eos=True)
        llm.queued[str(i)] = llm.add_request(prompt, sp, request_id=str(i))
    return llm


def engine_page_map(llm):
    bm = llm.scheduler.blocks
    owners = {}
    for rid, table in bm.tables.items():
        for p in table:
            owners.setdefault(p, []).append(rid)
    cached_free = {p for p in bm.free_queue if bm.pages[p].hash is not None}
    return {p: tuple(sorted(o)) for p, o in owners.items()}, cached_free


def run_ended(app) -> bool:
    """The live run is over and the app knows it: from here on it is explored like a replay."""
    return isinstance(app.control, ReplayControl)


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
        for req in llm.queued.values():  # tokens so far, counted from the steps alone
            assert st.requests[req.request_id].num_output_tokens == req.num_output_tokens
    st.apply_all(llm.recorder.events[n:])
    st.done = True
    assert st.preemptions > 0 and shared  # the run exercised both
    assert st.metrics() == compute_metrics(llm.recorder.events)  # the panel's numbers are the summary's
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


@needs_textual
def test_live_run_finishes_and_its_replay_ends_in_the_same_state(tiny_gpt2, tmp_path):
    llm = make_llm(tiny_gpt2, "async", num_blocks=14)
    shown = {}

    def look(app):
        shown["status"] = str(app.query_one(StatusBar).render())
        shown["metrics"] = str(app.query_one(Metrics).render())

    app = run_app(VizApp(llm, speed=MAX), until=run_ended, then=look)
    assert app.driver.finished and app.driver.error is None
    live = app.state
    # the live view showed every request finished
    assert all(r.finished for r in llm.queued.values())
    assert sum(r.finished for r in live.requests.values()) == len(llm.queued) == 10
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
    assert fin(replayed) == fin(live) == {r.request_id: ("length", r.num_output_tokens) for r in llm.queued.values()}
    assert {k: bytes(v.cells) for k, v in replayed.requests.items()} == {
        k: bytes(v.cells) for k, v in live.requests.items()
    }
    assert replayed.metrics() == live.metrics() == compute_metrics(llm.recorder.events)


# --- keys --------------------------------------------------------------------------------------------


@needs_textual
def test_live_keys_pause_step_and_change_speed(tiny_gpt2):
    llm = make_llm(tiny_gpt2, "sync", num_requests=4, num_blocks=64)
    app = VizApp(llm, speed=MAX, paused=True, exit_when_done=True)
    pacer = app.control.pacer

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
            assert pacer.speed == MAX
            await pilot.press("minus")  # slower: from full speed to 500 steps/s, then 200
            await pilot.press("minus")
            assert pacer.speed == 200
            await pilot.press("plus")
            assert pacer.speed == 500
            for _ in range(9):
                await pilot.press("minus")
            assert pacer.speed == 1  # the slowest
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
            assert pacer.speed == MAX
            await pilot.press("space")  # full speed to the end; exit_when_done closes the app
            t0 = time.monotonic()
            while app.is_running and time.monotonic() - t0 < 30:
                await pilot.pause(0.05)

    asyncio.run(go())
    assert app.driver.finished and all(r.finished for r in llm.queued.values())
    # the viewer's holds are in the log, and cut out of the metrics, the panel's and the summary's alike
    events = llm.recorder.events
    assert any(isinstance(e, Span) and e.lane == VIEWER_LANE for e in events)
    m = compute_metrics(events)
    arrived = min(e.t for e in events if isinstance(e, RequestArrived))
    window = max(e.t for e in events if isinstance(e, RequestFinished)) - arrived
    assert m["viewer_held_s"] > 2.0 and m["wall_s"] == pytest.approx(window - m["viewer_held_s"])
    assert app.state.metrics() == m


@needs_textual
def test_a_finished_live_run_can_be_stepped_back_through(tiny_gpt2):
    llm = make_llm(tiny_gpt2, "sync", num_requests=3, num_blocks=64)
    app = VizApp(llm, speed=MAX)

    async def go():
        async with app.run_test(size=(80, 24)) as pilot:
            t0 = time.monotonic()
            while not run_ended(app) and time.monotonic() - t0 < 30:
                await pilot.pause(0.05)
            await pilot.pause()
            final, replay = app.state, app.control.replay
            assert replay.frame == replay.last and "finished" in str(app.query_one(StatusBar).render())
            await pilot.press("b")
            assert replay.frame == replay.last - 1 and app.state.num_events < final.num_events
            await pilot.press("home")
            assert app.state.num_steps == 0 and not app.state.page_map()
            await pilot.press("end")
            assert app.state.page_map() == final.page_map() and app.state.num_events == final.num_events
            await pilot.press("q")

    asyncio.run(go())


@needs_textual
def test_replay_keys_seek_step_and_play():
    events = read_jsonl(FIXTURE)
    app = VizApp(events=events, paused=True)
    control = app.control

    async def go():
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert control.replay.frame == 0 and app.state.num_steps == 0
            await pilot.press("n", "n", "right")
            assert control.replay.frame == 3 and app.state.num_steps == 3
            await pilot.press("b", "left")
            assert control.replay.frame == 1
            await pilot.press("end")
            assert control.replay.frame == control.replay.last and app.state.done
            assert "end of log" in str(app.query_one(StatusBar).render())
            await pilot.press("home")
            assert control.replay.frame == 0
            await pilot.press("plus")
            assert control.rate == 50
            await pilot.press("minus", "minus")
            assert control.rate == 10
            await pilot.press("space")  # play: 10 steps/s takes about 3 s to the end of the log
            await pilot.pause(0.5)
            assert 0 < control.replay.frame < control.replay.last
            t0 = time.monotonic()
            while control.replay.frame < control.replay.last and time.monotonic() - t0 < 10:
                await pilot.pause(0.1)
            assert control.replay.frame == control.replay.last and not control.playing

    asyncio.run(go())
    final = RunState()
    final.apply_all(events)
    assert app.state.page_map() == final.page_map() and app.state.cached_free_pages() == final.cached_free_pages()


@needs_textual
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


@needs_textual
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


@needs_textual
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


@needs_textual
def test_quitting_midway_stops_the_engine_cleanly(tiny_gpt2):
    llm = make_llm(tiny_gpt2, num_requests=6)
    app = VizApp(llm, speed=20)

    async def go():
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.4)
            await pilot.press("q")

    asyncio.run(go())
    assert app.driver.stopped.wait(10) and not app.driver.finished and app.driver.error is None
    assert 0 < app.driver.steps < 20 and not all(r.finished for r in llm.queued.values())


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


# --- one run, one set of numbers: the viewer's holds are not the engine's time ----------------------


def hold_after_updates(events, every: int, seconds: float) -> list:
    """The same run as if a viewer had held the engine `seconds` after every `every`-th step's update:
    every later event shifted, a viewer span for each hold (sync: nothing is in flight across an update)."""
    out, shift, done = [], 0.0, 0
    for e in events:
        moved = {"t": e.t + shift} | ({"end": e.end + shift} if isinstance(e, Span) else {})
        out.append(dataclasses.replace(e, **moved))
        if isinstance(e, Span) and e.lane == "cpu" and e.name == "update":
            done += 1
            if done % every == 0:
                out.append(Span(e.end + shift, e.end + shift + seconds, VIEWER_LANE, "paused", done))
                shift += seconds
    return out


def flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def test_compute_metrics_cuts_out_exactly_the_time_the_viewer_held_the_engine():
    plain = read_jsonl(FIXTURE)
    held = hold_after_updates(plain, every=3, seconds=0.5)
    holds = sum(isinstance(e, Span) and e.lane == VIEWER_LANE for e in held)
    assert holds >= 10
    want, got = flat(compute_metrics(plain)), flat(compute_metrics(held))
    arrived = min(e.t for e in held if isinstance(e, RequestArrived))
    finished = max(e.t for e in held if isinstance(e, RequestFinished))
    held_s = got.pop("viewer_held_s")
    assert held_s == pytest.approx(finished - arrived - want["wall_s"]) and held_s >= 0.5 * (holds - 1)
    assert want.pop("viewer_held_s") == 0
    assert got.keys() == want.keys()
    for k in want:  # wall, throughputs, TTFT / TPOT / e2e, device busy, step times: as if never held
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k


def test_held_time_with_the_device_busy_counts_as_the_engines():
    # one request; the viewer held the engine 10 s between two steps, the device busy for 1 s of it
    ev = [
        RunInfo(0.0, 4, 2),
        RequestArrived(0.0, "a", 2),
        StepScheduled(0.0, 0, ["a"], [2], [True]),
        Span(0.0, 1.0, "device", "forward", 0),
        FirstToken(1.0, "a"),
        Span(1.0, 11.0, VIEWER_LANE, "paused", 1),
        Span(1.0, 2.0, "device", "forward", 1),  # the step in flight when the hold began
        Span(11.0, 12.0, "device", "forward", 2),
        RequestFinished(12.0, "a", "length", 2, 3),
    ]
    m = compute_metrics(ev)
    assert m["viewer_held_s"] == pytest.approx(9.0)  # 10 s held minus the 1 s the device worked
    assert m["wall_s"] == pytest.approx(3.0) and m["device_busy_frac"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(1.0) and m["tpot_ms"]["mean"] == pytest.approx(1000.0)
    assert m["e2e_ms"]["mean"] == pytest.approx(3000.0) and m["ttft_ms"]["mean"] == pytest.approx(1000.0)
    st = RunState()  # the viewer's clock is the same one
    st.apply_all(ev)
    assert st.clock.held_before(12.0) == pytest.approx(9.0) and st.clock.active(12.0) == pytest.approx(3.0)
    st.done = True
    assert st.metrics() == m
    # without the viewer's span the same run is 12 s long
    assert compute_metrics([e for e in ev if getattr(e, "lane", None) != VIEWER_LANE])["wall_s"] == pytest.approx(12)


@needs_textual
def test_a_paced_live_run_shows_the_numbers_of_the_summary(tiny_gpt2, tmp_path):
    llm = make_llm(tiny_gpt2, "sync", num_requests=3, num_blocks=64)
    shown = {}

    def look(app):
        shown["status"] = str(app.query_one(StatusBar).render())
        shown["metrics"] = str(app.query_one(Metrics).render())

    status = lambda a: str(a.query_one(StatusBar).render())
    run_app(VizApp(llm, speed=20), until=lambda a: "finished" in status(a), then=look)
    events = llm.recorder.events
    m = compute_metrics(events)
    held = sum(e.end - e.t for e in events if isinstance(e, Span) and e.lane == VIEWER_LANE)
    arrived = min(e.t for e in events if isinstance(e, RequestArrived))
    finished = max(e.t for e in events if isinstance(e, RequestFinished))
    assert held > 0.1 and m["viewer_held_s"] > 0.8 * held  # paced: the engine mostly waited for the viewer
    assert m["wall_s"] == pytest.approx(finished - arrived - m["viewer_held_s"])
    # the header and the panel say what the summary says
    assert f"step {m['steps']}/{m['steps']} " in shown["status"]
    for value in (
        f"{m['output_throughput']:.1f}",
        f"{m['ttft_ms']['mean']:.1f}",
        f"{m['tpot_ms']['mean']:.2f}",
        f"{100 * m['device_busy_frac']:.0f}%",
        f"{'steps':<10}{m['steps']:>8}",
    ):
        assert value in shown["metrics"].replace("\n", " "), value
    # and so does its replay
    llm.recorder.write_jsonl(tmp_path / "run.jsonl")
    replay = Replay(read_jsonl(tmp_path / "run.jsonl"))
    assert replay.last == m["steps"] == replay.num_steps


def test_a_trailing_hold_is_no_extra_step():
    events = read_jsonl(FIXTURE)
    end = max(getattr(e, "end", e.t) for e in events)
    r = Replay(events + [Span(end, end + 1.0, VIEWER_LANE, "paused", 33)])
    assert r.last == r.num_steps == compute_metrics(events)["steps"] == 33
    assert r.seek(r.last).num_events == len(events) + 1


# --- bad trace files: a clear message, an exit code, no traceback, no freeze ------------------------

HEAD = [
    '{"type": "RunInfo", "t": 0.0, "num_blocks": 16, "block_size": 4, "config": {"sched": "sync"}}',
    '{"type": "RequestArrived", "t": 0.0, "request_id": "0", "num_prompt_tokens": 5}',
    '{"type": "StepScheduled", "t": 0.1, "step": 0, "request_ids": ["0"], "num_tokens": [5], "is_prefill": [true]}',
]
SPAN = '{"type": "Span", "t": 0.1, "end": 0.2, "lane": "cpu", "name": "update", "step": 0}'
BAD_TRACES = {  # name: (the bad line, appended after HEAD, and what the message must say)
    "a null line": ("null", "not a JSON object"),
    "a list": ("[1, 2]", "not a JSON object"),
    "no type": ('{"t": 0.1}', 'no "type"'),
    "an unknown type": ('{"type": "Nope", "t": 1}', "Nope"),
    "a string for a time": (SPAN.replace('"end": 0.2', '"end": "soon"'), "end"),
    "true for a step": (SPAN.replace('"step": 0', '"step": true'), "step"),
    "strings for token counts": (HEAD[2].replace("[5]", '["5"]').replace('"step": 0', '"step": 1'), "num_tokens"),
    "NaN for a time": ('{"type": "FirstToken", "t": NaN, "request_id": "0"}', "t"),
    "an integer beyond 2**53": (HEAD[1].replace("5}", "100000000000000000000000}"), "num_prompt_tokens"),
    "a missing field": (SPAN.replace(', "step": 0', ""), "step"),
    "an unknown field": ('{"type": "FirstToken", "t": 0.1, "request_id": "0", "colour": 1}', "colour"),
    "step 1e9": (HEAD[2].replace('"step": 0', '"step": 1000000000'), "1000000000"),
    "step 1e9 as a float": (HEAD[2].replace('"step": 0', '"step": 1e9'), "step"),
    "a span of a step never scheduled": (SPAN.replace('"step": 0', '"step": 1000000000'), "1000000000"),
    "a page beyond the pool": (
        '{"type": "Pages", "t": 0.1, "kind": "allocated", "request_id": "0", "pages": [99999999]}',
        "99999999",
    ),
    "an unknown page event": (
        '{"type": "Pages", "t": 0.1, "kind": "stolen", "request_id": "0", "pages": [1]}',
        "stolen",
    ),
    "a lane of its own": (SPAN.replace('"cpu"', '"device/99999"'), "device/99999"),
    "a span ending before it begins": (SPAN.replace('"end": 0.2', '"end": 0.05'), "end"),
    "lists of different lengths": (HEAD[2].replace('"step": 0', '"step": 1').replace("[5]", "[5, 6]"), "num_tokens"),
    "an unknown finish reason": (
        '{"type": "RequestFinished", "t": 0.3, "request_id": "0", "reason": "bored", '
        '"num_prompt_tokens": 5, "num_output_tokens": 1}',
        "bored",
    ),
    "a second RunInfo": (HEAD[0], "RunInfo"),
    "bytes that are not text": ("\udcff\udcfe", "UTF-8"),
}


@pytest.mark.parametrize("bad, says", BAD_TRACES.values(), ids=BAD_TRACES.keys())
def test_python_m_viz_refuses_a_bad_trace_with_the_line_and_what_is_wrong(tmp_path, bad, says):
    path = tmp_path / "bad.jsonl"
    path.write_bytes("\n".join([*HEAD, bad, SPAN]).encode("utf-8", "surrogateescape") + b"\n")
    r = subprocess.run(
        [sys.executable, "-m", "nanoserve_viz", str(path)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{path}, line {len(HEAD) + 1}:" in r.stderr and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_a_pool_or_a_crowd_too_large_to_draw_is_refused(tmp_path, monkeypatch):
    import nanoserve_viz.trace

    path = tmp_path / "big.jsonl"
    path.write_text(HEAD[0].replace('"num_blocks": 16', '"num_blocks": 100000000') + "\n")
    with pytest.raises(ValueError, match="line 1: .*100000000 pages"):
        read_jsonl(path)
    monkeypatch.setattr(nanoserve_viz.trace, "MAX_REQUESTS", 3)
    arrivals = [HEAD[1].replace('"0"', f'"{i}"') for i in range(4)]
    path.write_text("\n".join([HEAD[0], *arrivals]) + "\n")
    with pytest.raises(ValueError, match="line 5: .*more than 3 requests"):
        read_jsonl(path)
    monkeypatch.setattr(nanoserve_viz.trace, "MAX_TIMELINE_CELLS", 100)
    step = '{"type": "StepScheduled", "t": 0.1, "step": %d, "request_ids": [], "num_tokens": [], "is_prefill": []}'
    steps = [step % k for k in range(60)]
    path.write_text("\n".join([*HEAD[:2], HEAD[1].replace('"0"', '"1"'), *steps]) + "\n")
    with pytest.raises(ValueError, match="timeline"):
        read_jsonl(path)


def test_real_traces_pass_the_checks(tiny_gpt2, tmp_path):
    for sched, pp in (("async", 1), ("balanced", 2)):
        llm = make_llm(tiny_gpt2, sched, num_blocks=14, pp=pp)
        for _ in llm.run():
            pass
        llm.recorder.write_jsonl(tmp_path / "run.jsonl")
        assert len(read_jsonl(tmp_path / "run.jsonl")) == len(llm.recorder.events)


# --- keys: ctrl+c, the pace, the footer ---------------------------------------------------------------


@needs_textual
def test_ctrl_c_quits_the_live_viewer_like_q(tiny_gpt2, monkeypatch):
    from textual.app import App

    llm = make_llm(tiny_gpt2, num_requests=6)
    ignored = []

    def run_then_ctrl_c(self, **kw):
        async def press(pilot):
            await pilot.pause(0.3)
            await pilot.press("ctrl+c")
            for _ in range(60):
                if not pilot.app.is_running:
                    return
                await asyncio.sleep(0.05)
            ignored.append(True)
            pilot.app.exit()

        return App.run(self, headless=True, size=(80, 24), auto_pilot=press)

    monkeypatch.setattr(VizApp, "run", run_then_ctrl_c)
    assert run_live(llm, speed=20) is False and not ignored
    assert not all(r.finished for r in llm.queued.values())


@needs_textual
def test_the_live_viewer_opens_at_a_pace_a_person_can_follow(tiny_gpt2):
    from nanoserve_viz.widgets.help import HELP

    llm = make_llm(tiny_gpt2, num_requests=2, num_blocks=64)
    app = VizApp(llm)  # as the CLI calls it without --viz-speed
    shown = {}

    async def go():
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause(0.6)
            shown["status"] = str(app.query_one(StatusBar).render())
            shown["steps"] = app.driver.steps
            await pilot.press("q")

    asyncio.run(go())
    assert "▶ 10 steps/s" in shown["status"] and 3 <= shown["steps"] <= 8
    assert "10 steps/s" in HELP and "--viz-speed" in HELP
    fast = VizApp(make_llm(tiny_gpt2, num_requests=1, num_blocks=64), speed=math.inf)  # --viz-speed inf
    run_app(fast, until=lambda a: a.driver.stopped.is_set())
    assert fast.driver.finished


def footer_keys(app) -> dict:
    from textual.widgets._footer import FooterKey

    return {k.key_display: k.description for k in app.query(FooterKey)}


@needs_textual
def test_the_footer_lists_the_keys_that_work_now(tiny_gpt2):
    app = VizApp(events=read_jsonl(FIXTURE), paused=True)
    keys = {}
    run_app(app, size=(160, 24), until=lambda a: True, then=lambda a: keys.update(footer_keys(a)))
    assert {"←/b", "n/→", "space", "+", "-", "q"} <= keys.keys()
    llm = make_llm(tiny_gpt2, num_requests=2, num_blocks=64)
    app = VizApp(llm, paused=True)
    live = {}
    run_app(app, size=(160, 24), until=lambda a: True, then=lambda a: (live.update(footer_keys(a)), a.exit()))
    assert "←/b" not in live and {"space", "n/→", "+", "-", "q"} <= live.keys()  # a live run only goes forward


@needs_textual
def test_every_glyph_the_lanes_draw_is_in_the_legend():
    from nanoserve_viz.widgets.help import HELP
    from nanoserve_viz.widgets.lanes import LEGEND

    for glyph in "░█▄":
        assert glyph in LEGEND and glyph in HELP


# --- the KV panel zooms to where the pages are used ---------------------------------------------------


@needs_textual
def test_kv_panel_zooms_to_the_pages_in_use_of_a_large_pool():
    from textual.app import App

    from nanoserve_viz.widgets.kv_pages import KVPages

    st = RunState()
    st.apply_all(
        [
            RunInfo(0.0, 4096, 16),
            RequestArrived(0.0, "a", 300),
            RequestArrived(0.0, "b", 100),
            Pages(0.0, "allocated", "a", list(range(20))),
            Pages(0.0, "allocated", "b", list(range(20, 27))),
        ]
    )

    class One(App):
        def compose(self):
            yield KVPages(id="kv")

        def on_mount(self):
            self.query_one(KVPages).show(st)

    lines = []

    async def go():
        app = One()
        async with app.run_test(size=(64, 12)) as pilot:
            await pilot.pause()
            kv = app.query_one(KVPages)
            lines.extend(kv.render_line(y).text for y in range(kv.size.height))
            lines.append(kv.virtual_size.height)

    asyncio.run(go())
    height, text = lines.pop(), "\n".join(lines)
    assert height <= 5  # the counts, the range shown, two rows of pages: not 4096 pages of grid
    assert "■ 27 used" in text and "· 4069 free  of 4096" in text and "pages 0–26 shown, the 4069 others free" in text
    assert "".join(lines[2:]).count("■") == 27  # every page in use, drawn


# --- structure: live and replay behind one controller; short functions; no private reads --------------


def test_live_and_replay_are_two_controllers_of_one_interface(tiny_gpt2):
    methods = ("toggle", "step", "seek", "speed", "tick", "stop")
    for cls in (LiveControl, ReplayControl):
        assert all(callable(getattr(cls, m, None)) for m in methods), cls
        assert isinstance(getattr(cls, "label", None), property) and isinstance(
            getattr(cls, "position", None), property
        )
    c = ReplayControl(Replay(read_jsonl(FIXTURE)))
    assert c.position == "0/33" and c.label == "paused"
    c.step(+3)
    c.step(-1)
    assert c.position == "2/33" and c.state.num_steps == 2
    c.seek(10**6)
    assert c.label == "end of log" and c.state.done
    c.toggle()  # at the end: plays again from the start
    assert c.position == "0/33" and c.label == "▶ 20 steps/s"
    c.speed(+1)
    assert c.label == "▶ 50 steps/s"
    c.tick(0.1)  # five frames' worth at 50 steps/s
    assert c.position == "5/33"
    c.tick(1.0)
    assert c.position == "33/33" and c.label == "end of log" and not c.playing


VIZ = ROOT / "nanoserve_viz"


def test_viz_functions_are_short_and_read_no_private_fields_of_other_objects():
    import ast

    for path in sorted(VIZ.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= 50, f"{path.relative_to(ROOT)}: {node.name} is {lines} lines"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                mine = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
                mine |= isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "super"
                assert mine, f"{path.relative_to(ROOT)}:{node.lineno} reads {ast.unparse(node)}"


def test_replay_frames_are_cut_by_event_type_not_by_name():
    text = (VIZ / "replay.py").read_text()
    assert "__name__" not in text


# --- any log the checks let through is one the viewer can show ----------------------------------------


@hs.composite
def checked_logs(draw) -> list:
    """Event records of every type, with fields in small ranges, that `read_jsonl`'s checks accept:
    steps count up, a lane's spans follow each other; anything else (order, ids, kinds) goes."""
    rids, records, steps, lane_end = ["a", "b", "c"], [], 0, {}
    if draw(hs.booleans()):
        records.append({"type": "RunInfo", "t": 0.0, "num_blocks": 8, "block_size": draw(hs.integers(1, 4))})
    t = hs.floats(0, 5, allow_nan=False)
    for _ in range(draw(hs.integers(0, 40))):
        kind = draw(hs.sampled_from(["arrive", "step", "span", "pages", "first", "finish", "preempt", "discard"]))
        rid = draw(hs.sampled_from(rids))
        if kind == "arrive":
            records.append(
                {
                    "type": "RequestArrived",
                    "t": draw(t),
                    "request_id": rid,
                    "num_prompt_tokens": draw(hs.integers(0, 9)),
                }
            )
        elif kind == "step":
            ids = draw(hs.lists(hs.sampled_from(rids), max_size=3))
            n = [draw(hs.integers(0, 9)) for _ in ids]
            records.append(
                {
                    "type": "StepScheduled",
                    "t": draw(t),
                    "step": steps,
                    "request_ids": ids,
                    "num_tokens": n,
                    "is_prefill": [draw(hs.booleans()) for _ in ids],
                }
            )
            steps += 1
        elif kind == "span":
            lane = draw(hs.sampled_from(["cpu", "device", "device/0", "device/1", VIEWER_LANE]))
            begin = lane_end.get(lane, 0.0) + draw(hs.floats(0, 1))
            lane_end[lane] = end = begin + draw(hs.floats(0, 1))
            name = draw(hs.sampled_from(["schedule", "update", "forward", "sample", "paused"]))
            records.append(
                {
                    "type": "Span",
                    "t": begin,
                    "end": end,
                    "lane": lane,
                    "name": name,
                    "step": draw(hs.integers(0, steps)),
                }
            )
        elif kind == "pages":
            pages = draw(hs.lists(hs.integers(0, 7), max_size=4))
            records.append(
                {
                    "type": "Pages",
                    "t": draw(t),
                    "kind": draw(hs.sampled_from(["allocated", "shared", "cached", "freed"])),
                    "request_id": rid,
                    "pages": pages,
                }
            )
        elif kind == "first":
            records.append({"type": "FirstToken", "t": draw(t), "request_id": rid})
        elif kind == "finish":
            reason = draw(hs.sampled_from(["stop", "length", "abort", "error"]))
            records.append(
                {
                    "type": "RequestFinished",
                    "t": draw(t),
                    "request_id": rid,
                    "reason": reason,
                    "num_prompt_tokens": 3,
                    "num_output_tokens": draw(hs.integers(0, 5)),
                }
            )
        else:
            records.append(
                {
                    "type": "Preempted" if kind == "preempt" else "Discarded",
                    "t": draw(t),
                    "step": draw(hs.integers(0, steps)),
                    "request_id": rid,
                }
            )
    return records


@settings(max_examples=150, deadline=None)
@given(checked_logs())
def test_every_log_the_checks_accept_replays_measures_and_exports(records):
    from nanoserve_viz.trace import LogLimits, check_record

    limits, events = LogLimits(), []
    for r in records:
        e = check_record(r)
        limits.check(e)
        events.append(e)
    replay = Replay(events)
    for frame in range(replay.last + 1):
        state = replay.seek(frame)
        m = state.metrics()
        assert all(math.isfinite(v) for v in flat(m).values())
    assert compute_metrics(events) == replay.seek(replay.last).metrics()
    json.dumps(to_perfetto(events))
