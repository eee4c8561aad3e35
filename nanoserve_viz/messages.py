"""The messages the engine's worker thread posts to the viewer."""

from textual.message import Message

from nanoserve_viz.live import Progress


class EngineProgress(Message):
    """The engine finished a step (or the run ended): an immutable Progress, posted from the worker.

    A newer one supersedes any still queued, so a busy UI skips straight to the latest step.
    """

    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EngineProgress) and not self.progress.done
