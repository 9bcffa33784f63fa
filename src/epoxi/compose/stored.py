"""Stored templates (issue 15), pure: checking them, previewing them, and the text part made
from the HTML when a template has none.

The templates are the same Jinja2 as a send request's (compose.render): the same sandbox,
strict variables, budgets. A preview reports the variables a template uses that were not
given, and shows each where it stands as ``{{ name }}`` instead of failing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta

from epoxi.compose.html_text import html_to_text
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
