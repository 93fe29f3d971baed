"""`HtmlPage`: what every HTML view shares, a standalone document and `save`."""

from __future__ import annotations

import html
from pathlib import Path


class HtmlPage:
    """A view whose `page_body()` is an HTML fragment; `title` names the page."""

    title: str = "moe_hooked"

    def page_body(self) -> str:
        raise NotImplementedError

    def to_html(self) -> str:
        """A complete HTML document (no external requests)."""
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title></head>\n<body>\n{self.page_body()}\n</body></html>\n"
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_html(), encoding="utf-8")
        return path
