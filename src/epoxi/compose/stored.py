"""Stored templates (issue 15), pure: checking them, previewing them, and the text part made
from the HTML when a template has none.

The templates are the same Jinja2 as a send request's (compose.render): the same sandbox,
strict variables, budgets. A preview reports the variables a template uses that were not
given, and shows each where it stands as ``{{ name }}`` instead of failing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import jinja2
import jinja2.meta

from epoxi.compose.render import ComposeError, compile_template, render_template

PREVIEW_LIMIT = 1024 * 1024  # characters of one rendered part in a preview


@dataclass(frozen=True)
class Parts:
    """A template version's sources, named as the API names them."""

    subject_template: str
    html_template: str = ""
    text_template: str | None = None


@dataclass(frozen=True)
class Preview:
    subject: str
    html: str
    text: str
    text_from_html: bool  # the text part was made from the HTML
    missing: list[str]  # variables the template uses that were not given, sorted


def check(parts: Parts) -> None:
    """Raise ComposeError naming the first part that does not compile, or when there is
    nothing to send."""
    compile_template(False, "subject_template", parts.subject_template)
    compile_template(True, "html_template", parts.html_template)
    if parts.text_template is not None:
        compile_template(False, "text_template", parts.text_template)
    if not parts.html_template and not parts.text_template:
        raise ComposeError("html_template", "give html_template, text_template or both")


def variables(parts: Parts) -> set[str]:
    """The top-level variables the parts use (a ``{% set %}`` or loop variable is not one)."""
    used: set[str] = set()
    for is_html, source in _sources(parts):
        env = compile_template(is_html, "template", source).environment
        used |= jinja2.meta.find_undeclared_variables(env.parse(source))
    return used - {"range", "dict", "namespace"}


def preview(parts: Parts, given: Mapping[str, Any]) -> Preview:
    """The rendered parts with ``given``; a missing variable shows as ``{{ name }}``."""
    check(parts)
    missing = sorted(variables(parts) - set(given))
    values = {**given, **{name: _Shown(name=name) for name in missing}}
    subject = _render(False, "subject_template", parts.subject_template, values)
    body = _render(True, "html_template", parts.html_template, values)
    if parts.text_template is not None:
        text = _render(False, "text_template", parts.text_template, values)
    else:
        text = html_to_text(body)
    return Preview(subject, body, text, parts.text_template is None, missing)


def _sources(parts: Parts) -> list[tuple[bool, str]]:
    found = [(False, parts.subject_template), (True, parts.html_template)]
    if parts.text_template is not None:
        found.append((False, parts.text_template))
    return found


def _render(is_html: bool, where: str, source: str, values: Mapping[str, Any]) -> str:
    template = compile_template(is_html, where, source)
    return render_template(template, where, "the preview", values, PREVIEW_LIMIT)


class _Shown(jinja2.ChainableUndefined, jinja2.DebugUndefined):
    """A variable the preview was not given: renders as ``{{ name }}``, chains quietly."""


# --------------------------------------------------------------------- HTML -> text

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
