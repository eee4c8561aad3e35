"""The KV cache's page pool as a grid: each page coloured by the request that owns it.

■ a page in use (the owner's colour), ◆ a page shared by several requests (a prefix-cache hit),
○ cached-free (no owner, but still named in the prefix cache: a later hit revives it, an allocation
may evict it), · free. The first line counts each kind.
"""

from rich.segment import Segment
from textual.cache import LRUCache
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from viz.state import RunState
from viz.widgets.styled import CachedStyles

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
        self._cache: LRUCache = LRUCache(512)
        self._shared = 0

    def show(self, state: RunState):
        self.state = state
        self._shared = sum(len(o) > 1 for o in state.page_owners)
        self._cache.clear()
        cols, _ = self._layout()
        self.virtual_size = Size(self._width(), 1 + -(-state.num_pages // cols))
        self.refresh()

    def notify_style_update(self):
        super().notify_style_update()
        self._cache.clear()

    def on_resize(self, _):
        if self.state.num_pages:
            self.show(self.state)

    def _width(self) -> int:
        return max(1, self.size.width - 1)  # keep a column for the scrollbar, so a long pool never reflows

    def _layout(self) -> tuple[int, int]:
        """(pages per row, cells per page): two cells a page when the pool fits that way."""
        w, h = self._width(), max(self.size.height - 1, 1)
        n = self.state.num_pages
        if -(-n // max(1, w // 2)) <= h:
            return max(1, w // 2), 2
        return w, 1

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if y == 0:
            return self._header().adjust_cell_length(width, self.style())
        row = self.scroll_offset.y + y - 1
        strip = self._cache.get(row)
        if strip is None:
            strip = self._row(row).adjust_cell_length(width, self.style())
            self._cache[row] = strip
        return strip

    def _header(self) -> Strip:
        st = self.state
        used, cached = st.num_used_pages, st.num_cached_free_pages
        free = st.num_free_pages - cached
        if self.size.width >= 44:
            text = f"■ {used} used  ◆ {self._shared} shared  ○ {cached} cached  · {free} free  of {st.num_pages}"
        else:
            text = f"■{used} ◆{self._shared} ○{cached} ·{free} of {st.num_pages}"
        return Strip([Segment(text, self.style("kv--header"))])

    def _row(self, row: int) -> Strip:
        st = self.state
        cols, cell = self._layout()
        pad = " " * (cell - 1)
        free, cached = self.style("kv--free"), self.style("kv--cached")
        segs, run, run_style = [], [], None
        for p in range(row * cols, min((row + 1) * cols, st.num_pages)):
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
