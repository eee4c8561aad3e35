"""Trace events, exporters and the terminal visualizer. Only the app and its widgets import Textual.

trace.py      the events every run records, the Recorder, reading a log back (checked), and the
              metrics on the engine's clock (the one source of truth: summary, --output-json, panel)
state.py      RunState: pages, timeline, lanes and metrics rebuilt from events (live and replay alike)
replay.py     a recorded run cut into one frame per step, with seeking
live.py       the pacer (pause, step, speed) and the loop that drives llm.run() on a worker thread
control.py    what the keys do: LiveControl and ReplayControl, one interface
perfetto.py   Chrome/Perfetto traceEvents export
app.py        the Textual app (run_live, VizApp); app.tcss its layout; widgets/ one panel per file
__main__.py   python -m nanoserve_viz RUN.jsonl: replay, --perfetto, --screenshot
"""
