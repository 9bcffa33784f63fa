"""Stored templates, pure: checks, previews with missing variables, the text made from HTML."""

from __future__ import annotations

import pytest

from epoxi.compose import ComposeError
from epoxi.compose.html_text import html_to_text
from epoxi.compose.stored import Parts, check, preview, variables


@pytest.mark.parametrize(
    ("source", "text"),
    [
        ("<h1>Hi</h1><p>one</p><p>two</p>", "Hi\n\none\n\ntwo\n"),
        ("<p>a<br>b</p>", "a\nb\n"),
        ("<ul><li>x</li><li>y</li></ul>", "- x\n- y\n"),
        ('<p><a href="https://x.test/a?b=1">see</a></p>', "see (https://x.test/a?b=1)\n"),
        ('<a href="mailto:a@x.test">write</a>', "write (a@x.test)\n"),
        ('<a href="javascript:alert(1)">no</a>', "no\n"),
        ("<style>p {}</style><script>x()</script><p>kept</p>", "kept\n"),
        ("<p>Tom &amp; Jerry &lt;3</p>", "Tom & Jerry <3\n"),
        ("<p>  many \n  spaces  </p>", "many spaces\n"),
        ('<img alt="Logo"><table><tr><td>a</td><td>b</td></tr></table>', "Logo\n\na b\n"),
        ("", ""),
    ],
)
def test_html_becomes_readable_text(source: str, text: str) -> None:
    assert html_to_text(source) == text


def test_a_preview_lists_missing_variables_and_shows_them_in_place() -> None:
    parts = Parts("Hi {{ name }}", "<p>{{ name }}: {{ order.id }}</p>{% set x = 1 %}{{ x }}")
    assert variables(parts) == {"name", "order"}
    shown = preview(parts, {"name": "Ann"})
    assert shown.missing == ["order"]
    assert shown.subject == "Hi Ann"
    assert shown.html == "<p>Ann: {{ order }}</p>1"
    assert (shown.text, shown.text_from_html) == ("Ann: {{ order }}\n1\n", True)
    full = preview(parts, {"name": "<Ann>", "order": {"id": 7}})
    assert (full.missing, full.html) == ([], "<p>&lt;Ann&gt;: 7</p>1")


def test_a_text_template_is_used_as_it_is() -> None:
    shown = preview(Parts("s", "<p>h</p>", "plain {{ a }}"), {"a": 1})
    assert (shown.text, shown.text_from_html) == ("plain 1", False)


@pytest.mark.parametrize(
    ("parts", "field"),
    [
        (Parts("{{", "<p></p>"), "subject_template"),
        (Parts("s", "{% for %}"), "html_template"),
        (Parts("s", "<p></p>", "{{ a.__class__ }}{% endif %}"), "text_template"),
        (Parts("s", ""), "html_template"),
    ],
)
def test_a_part_that_cannot_be_used_is_named(parts: Parts, field: str) -> None:
    with pytest.raises(ComposeError) as caught:
        check(parts)
    assert caught.value.field == field
