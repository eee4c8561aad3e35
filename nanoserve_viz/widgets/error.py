"""Shown when the engine raised: the exception, so nothing is swallowed. q quits (and the caller
re-raises it); esc closes the box to look at the panels as the run left them."""

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class ErrorScreen(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("q", "app.quit", "Quit")]
    DEFAULT_CSS = """
    ErrorScreen { align: center middle; }
    ErrorScreen > VerticalScroll {
        width: 90%; height: auto; max-height: 90%;
        border: heavy $error; background: $surface; padding: 0 1;
    }
    """

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll() as box:
            box.border_title = "the engine failed — q quits (the error is raised again), esc looks at the panels"
            yield Static(Text(self.text))
