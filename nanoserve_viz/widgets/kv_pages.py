"""The KV cache's page pool as a grid: each page coloured by the request that owns it.

■ a page in use (the owner's colour), ◆ a page shared by several requests (a prefix-cache hit),
○ cached-free (no owner, but still named in the prefix cache: a later hit revives it, an allocation
may evict it), · free. The first line counts each kind.

A pool too large for the panel (the default 4096 pages, of which a small run uses a few dozen) is
zoomed to the pages the run has used so far; a second line says which, and that the rest are free.
"""

from rich.segment import Segment
from textual.cache import LRUCache
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from nanoserve_viz.state import RunState
from nanoserve_viz.widgets.styled import CachedStyles

LEGEND = "■ used  ◆ shared  ○ cached-free  · free"


class KVPages(CachedStyles, ScrollView, can_focus=False):
    COMPONENT_CLASSES = {"kv--free", "kv--cached", "kv--header"}
    DEFAULT_CSS = """
    KVPages {
        scrollbar-size-vertical: 1;
        overflow-x: hidden;
        .kv--free { color: $text-muted; }
        .kv--cached { color: $text; }
        .kv--header { color: $text; }
    }
    """

    def __init__(self, **kw):
        super().__init__(**kw)
        self.state = RunState()
        self.shown = range(0)  # the pages drawn: the whole pool, or the part the run has used
        self._cache: LRUCache = LRUCache(512)

    def show(self, state: RunState):
        self.state = state
        self._cache.clear()
        self.shown = self._pages_shown()
        cols, _ = self._layout()
        self.virtual_size = Size(self._width(), self._header_lines() + -(-len(self.shown) // cols))
        self.refresh()

    def notify_style_update(self):
        super().notify_style_update()
        self._cache.clear()

    def on_resize(self, _):
        if self.state.num_pages:
            self.show(self.state)

    def _width(self) -> int:
        return max(1, self.size.width - 1)  # keep a column for the scrollbar, so a long pool never reflows

    def _pages_shown(self) -> range:
        """The whole pool if it fits the panel a cell a page; else the range of pages used so far."""
        n = self.state.num_pages
        if n <= self._width() * max(1, self.size.height - 1):
            return range(n)
        return self.state.touched

    @property
    def zoomed(self) -> bool:
        return len(self.shown) < self.state.num_pages

    def _header_lines(self) -> int:
        return 1 + self.zoomed

    def _layout(self) -> tuple[int, int]:
        """(pages per row, cells per page): two cells a page when the pages shown fit that way."""
        w, h = self._width(), max(self.size.height - self._header_lines(), 1)
        if -(-len(self.shown) // max(1, w // 2)) <= h:
            return max(1, w // 2), 2
        return w, 1

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if y < self._header_lines():
            return Strip([Segment(self._header(y), self.style("kv--header"))]).adjust_cell_length(width, self.style())
        row = self.scroll_offset.y + y - self._header_lines()
        strip = self._cache.get(row)
        if strip is None:
            strip = self._row(row).adjust_cell_length(width, self.style())
            self._cache[row] = strip
        return strip

    def _header(self, y: int) -> str:
        """Line 0 counts the pages of each kind; line 1 (zoomed) says which pages the grid shows."""
        st = self.state
        if y == 1 and not self.shown:
            return f"all {st.num_pages} pages free"
        if y == 1:
            lo, hi, rest = self.shown.start, self.shown.stop - 1, st.num_pages - len(self.shown)
            forms = f"pages {lo}–{hi} shown, the {rest} others free", f"{lo}–{hi} of {st.num_pages} shown"
        else:
            used, shared, cached = st.num_used_pages, st.num_shared_pages, st.num_cached_free_pages
            free = st.num_free_pages - cached
            forms = (
                f"■ {used} used  ◆ {shared} shared  ○ {cached} cached  · {free} free  of {st.num_pages}",
                f"■{used} ◆{shared} ○{cached} ·{free} of {st.num_pages}",
            )
        return forms[0] if len(forms[0]) <= self._width() else forms[1]

    def _row(self, row: int) -> Strip:
        st = self.state
        cols, cell = self._layout()
        pad = " " * (cell - 1)
        free, cached = self.style("kv--free"), self.style("kv--cached")
        segs, run, run_style = [], [], None
        first = self.shown.start + row * cols
        for p in range(first, min(first + cols, self.shown.stop)):
            owners = st.page_owners[p]
            if not owners:
                glyph, style = ("○", cached) if st.page_cached[p] else ("·", free)
            else:
                owner = st.requests.get(owners[0])
                style = self.request_style(owner.index if owner else hash(owners[0]), len(owners) > 1)
                glyph = "◆■"[len(owners) == 1]
            if style is not run_style and run:
                segs.append(Segment("".join(run), run_style))
                run = []
            run_style = style
            run.append(glyph + pad)
        if run:
            segs.append(Segment("".join(run), run_style))
        return Strip(segs)
