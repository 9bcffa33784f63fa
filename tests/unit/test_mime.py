"""The small MIME reader of inbound reports (epoxi.bounce.mime)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from epoxi.bounce import mime

NESTED = (
    b"From: a@b\r\nContent-Type: multipart/mixed; boundary=outer\r\n\r\npreamble\r\n"
    b"--outer\r\nContent-Type: text/plain; charset=latin-1\r\n\r\ncaf\xe9\r\n"
    b"--outer\r\nContent-Type: message/rfc822\r\n\r\n"
    b'Subject: inner\r\nContent-Type: multipart/report; report-type="delivery-status";\r\n'
    b' boundary="in ner"\r\n\r\n'
    b"--in ner\r\n\r\nno fields here\r\n"
    b"--in ner\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n"
    b"--in ner--\r\n"
    b"--outer--\r\nepilogue\r\n"
)


def test_walks_multiparts_and_messages_inside() -> None:
    parts = list(mime.walk(mime.split(NESTED)))
    assert [p.content_type for p in parts] == [
        "multipart/mixed",
        "text/plain",
        "message/rfc822",
        "multipart/report",
        "text/plain",
        "message/delivery-status",
    ]
    assert parts[1].text() == "café"
    assert parts[3].param("report-type") == "delivery-status"
    assert parts[4].body == b"no fields here"
    assert parts[5].body == b"Reporting-MTA: dns; x"


def test_fields_unfold_and_keep_the_first() -> None:
    found = mime.fields("Subject: a\n  b\nsubject: second\nnot a field\nX-Y:z\n")
    assert found == {"subject": "a b", "x-y": "z"}


def test_field_blocks_split_on_blank_lines_with_spaces() -> None:
    assert mime.field_blocks("A: 1\n \nB: 2\n\n\nC: 3\n") == [{"a": "1"}, {"b": "2"}, {"c": "3"}]


@given(st.binary(max_size=400))
def test_any_bytes_are_read_without_error(data: bytes) -> None:
    for part in mime.walk(mime.split(data)):
        part.text()
