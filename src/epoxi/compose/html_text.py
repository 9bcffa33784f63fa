"""A text part made from an HTML one, for mail whose template has no text part. Pure."""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCK_TAGS = (
    "address article aside blockquote dd div dl dt fieldset figcaption figure footer form"
    " h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section table tr ul"
)
_BLOCKS = frozenset(_BLOCK_TAGS.split(" "))
_SKIPPED = frozenset({"script", "style", "head", "title", "template"})
_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n{3,}")


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skipping = 0
        self._links: list[str | None] = []
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self._skipping += 1
        elif tag == "br":
            self.out.append("\n")
        elif tag == "li":
            self.out.append("\n- ")
        elif tag in ("td", "th"):
            self.out.append(" ")
        elif tag in _BLOCKS:
            self.out.append("\n\n" if tag in ("p", "h1", "h2", "h3", "table") else "\n")
        if tag == "pre":
            self._pre += 1
        if tag == "a":
            self._links.append(dict(attrs).get("href"))
        elif tag == "img" and (alt := dict(attrs).get("alt")):
            self.out.append(alt)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self._skipping = max(0, self._skipping - 1)
        elif tag == "a" and self._links:
            href = self._links.pop()
            if href and href.startswith(("http:", "https:", "mailto:")):
                self.out.append(f" ({href.removeprefix('mailto:')})")
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
        elif tag in _BLOCKS and tag != "li":
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skipping:
            return
        self.out.append(data if self._pre else _SPACES.sub(" ", data.replace("\n", " ")))


def html_to_text(source: str) -> str:
    """A readable text part from an HTML one: blocks on their own lines, list items as
    ``- ``, a link's address after its words, scripts and styles left out."""
    parser = _Text()
    parser.feed(source)
    parser.close()
    lines = [line.strip() for line in "".join(parser.out).split("\n")]
    text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
    return text + "\n" if text else ""
