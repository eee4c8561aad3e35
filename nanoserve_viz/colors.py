"""One colour per request, the same in every panel (timeline labels, KV pages, queues).

Mid-luminance hues, readable on the dark and on the light theme alike; the states of the timeline and
the lanes use the theme's own colours ($success, $warning, $error...) instead.

    >>> request_color(0) == request_color(len(PALETTE))
    True
"""

from rich.style import Style

PALETTE = (
    "#3b82f6",  # blue
    "#f97316",  # orange
    "#16a34a",  # green
    "#a855f7",  # purple
    "#0891b2",  # cyan
    "#db2777",  # pink
    "#ca8a04",  # ochre
    "#6366f1",  # indigo
    "#65a30d",  # lime
    "#be123c",  # crimson
    "#0d9488",  # teal
    "#c2410c",  # rust
)


def request_color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


_styles = {}


def request_style(index: int, bold: bool = False) -> Style:
    key = (index % len(PALETTE), bold)
    if key not in _styles:
        _styles[key] = Style(color=PALETTE[key[0]], bold=bold)
    return _styles[key]
