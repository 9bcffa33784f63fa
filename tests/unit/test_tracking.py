"""Tracked links (compose/tracking.py): tokens that only this node's secret makes, links and
a pixel in the HTML, and the RFC 8058 header fields."""

from __future__ import annotations

from pathlib import Path

from epoxi.compose.tracking import Kind, Tracked, Tracker

TRACKER = Tracker("https://t.example.com/", b"k" * 32)


def test_a_token_says_what_it_was_made_with_and_nothing_else_passes() -> None:
    token = TRACKER.token(Kind.CLICK, "M1", "a@x.test", "https://shop.test/?q=1")
    assert TRACKER.read(token) == Tracked(Kind.CLICK, "M1", "a@x.test", "https://shop.test/?q=1")
    payload, mac = token.split(".")
    assert TRACKER.read(payload + "." + mac[:-1] + ("A" if mac[-1] != "A" else "B")) is None
    other = TRACKER.token(Kind.CLICK, "M1", "b@x.test", "https://evil.test/")
    assert TRACKER.read(other.split(".")[0] + "." + mac) is None  # a payload changed
    assert Tracker("https://t.example.com", b"z" * 32).read(token) is None  # another secret
    for junk in ("", ".", "abc", "a.b.c", "!!!.???", "e30.AAAA"):
        assert TRACKER.read(junk) is None


def test_links_go_through_click_links_and_a_pixel_ends_the_body() -> None:
    html = (
        '<p><a class="x" href="https://shop.test/a?b=1&amp;c=2">A</a>'
        "<a href='http://shop.test/b'>B</a> <a href=\"mailto:x@y\">M</a></p></BODY></html>"
    )
    tracked = TRACKER.html(html, "M1", "a@x.test")
    links = [
        part.split('"')[0].split("'")[0] for part in tracked.split("https://t.example.com/t/")[1:]
    ]
    first, second, pixel = (TRACKER.read(link) for link in links)
    assert first == Tracked(Kind.CLICK, "M1", "a@x.test", "https://shop.test/a?b=1&c=2")
    assert second is not None and second.url == "http://shop.test/b"
    assert pixel == Tracked(Kind.OPEN, "M1", "a@x.test", "")
    assert 'href="mailto:x@y"' in tracked and tracked.index('width="1"') < tracked.index("</BODY>")
    assert TRACKER.html("<p>no body tag</p>", "M1", "a").endswith('style="display:none">')


def test_unsubscribe_headers_and_the_key_file(tmp_path: Path) -> None:
    headers = TRACKER.unsubscribe_headers("M1", "a@x.test").decode()
    assert headers.startswith("List-Unsubscribe: <https://t.example.com/u/")
    assert headers.endswith(">\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    made = Tracker.load("https://t.example.com", "", tmp_path)
    again = Tracker.load("https://t.example.com", "", tmp_path)  # another worker, a restart
    token = made.token(Kind.OPEN, "M1", "a@x.test")
    assert again.read(token) is not None
    assert (tmp_path / "tracking.key").stat().st_mode & 0o777 == 0o600
