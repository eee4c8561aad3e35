"""The top line: what is shown (live or replay, scheduler, model), the step, play state and speed."""

from rich.text import Text
from textual.widgets import Static


class StatusBar(Static, can_focus=False):
    DEFAULT_CSS = """
    StatusBar { height: 1; background: $panel; color: $foreground; padding: 0 1; }
    """

    def set_status(self, *, mode: str, config: dict, step: str, play: str, done: str, note: str = ""):
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append("nanoserve ", "bold")
        t.append(mode)
        if config.get("sched"):
            t.append(f" · {config['sched']}", "bold")
        if config.get("simulated"):  # a run on --device sim:NAME: its device lane is a model, not a measurement
            t.append(f" · SIMULATED {str(config.get('device', ''))[4:].upper()}", "bold reverse")
        t.append(f" · step {step} · ")
        t.append(play, "bold")
        t.append(f" · {done}")
        if note:
            t.append(f" · {note}", "bold reverse")
        if config.get("model"):
            t.append(f" · {config['model']}", "dim")
        self.update(t)
