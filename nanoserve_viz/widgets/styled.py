"""A mixin for Line API widgets: their Rich styles, computed once per theme instead of once per line."""

from rich.style import Style

from nanoserve_viz.colors import PALETTE, request_style


class CachedStyles:
    _styles: dict | None = None

    def style(self, component: str | None = None) -> Style:
        """The widget's own style, plus a component class's style when one is named."""
        if self._styles is None:
            self._styles = {}
        s = self._styles.get(component)
        if s is None:
            s = self.rich_style if component is None else self.style() + self.get_component_rich_style(component)
            self._styles[component] = s
        return s

    def request_style(self, index: int, bold: bool = False) -> Style:
        """A request's colour on top of the widget's style."""
        key = ("request", index % len(PALETTE), bold)
        if self._styles is None or key not in self._styles:
            self.style()
            self._styles[key] = self.style() + request_style(index, bold)
        return self._styles[key]

    def notify_style_update(self):
        super().notify_style_update()
        self._styles = None
