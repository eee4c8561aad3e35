"""Trace events, exporters and the terminal visualizer. `viz.trace` is pure Python; only the app imports Textual."""
