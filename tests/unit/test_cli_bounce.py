"""``epoxi bounce parse``: the contract's JSON lines, human output, unreadable files."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from epoxi.bounce.verp import Verp, load_key
from epoxi.cli import app
from tests.unit.test_inbound import corpus

ARF = (
    b"From: <staff@isp.example>\n"
    b"MIME-Version: 1.0\n"
    b'Content-Type: multipart/report; report-type=feedback-report; boundary="B"\n'
    b"\n--B\nContent-Type: text/plain\n\nAn abuse report.\n"
    b"--B\nContent-Type: message/feedback-report\n\n"
    b"Feedback-Type: abuse\nUser-Agent: FBL/1\nVersion: 1\n"
    b"Original-Rcpt-To: <ann@mail.example>\n"
    b"\n--B\nContent-Type: text/rfc822-headers\n\n"
    b"Message-ID: <m1@shop.example>\nTo: ann@mail.example\n"
    b"\n--B--\n"
)


def test_json_line_per_file(tmp_path: Path) -> None:
    complaint = tmp_path / "complaint.eml"
    complaint.write_bytes(ARF)
    postfix = corpus() / "postfix_01.txt"
    result = CliRunner().invoke(app, ["bounce", "parse", str(postfix), str(complaint), "--json"])
    assert result.exit_code == 0, result.output
    bounce, arf = (json.loads(line) for line in result.output.splitlines())
    assert bounce == {
        "file": str(postfix),
        "kind": "dsn",
        "recipients": [
            {
                "address": "xxxxx@local.ie",
                "action": "failed",
                "status": "5.1.1",
                "diagnostic": bounce["recipients"][0]["diagnostic"],
                "class": "InvalidRecipient",
            }
        ],
        "feedback_type": None,
        "original_message_id": "",
    }
    assert "550 5.1.1" in bounce["recipients"][0]["diagnostic"]
    assert arf["kind"] == "arf" and arf["feedback_type"] == "abuse"
    assert arf["recipients"][0]["address"] == "ann@mail.example"
    assert arf["original_message_id"] == "<m1@shop.example>"


def test_human_output_and_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.eml"
    result = CliRunner().invoke(
        app, ["bounce", "parse", str(corpus() / "yahoo_11.txt"), str(missing)]
    )
    assert result.exit_code == 1
    assert "yahoo_11.txt: dsn" in result.output
    assert "bad_user@aol.com failed 5.1.1 InvalidRecipient" in result.output
    assert f"epoxi: {missing}:" in result.output


def test_with_a_config_the_verp_token_names_the_message(tmp_path: Path) -> None:
    config = tmp_path / "epoxi.toml"
    config.write_text(f'bounce_domain = "bounce.example"\ndata_dir = "{tmp_path / "data"}"\n')
    verp = Verp("bounce.example", load_key("", tmp_path / "data"))
    good = verp.sender("01HZX3T8M2QK7R9V5W4Y", ["ann@mail.example"])
    forged = good[:10] + ("a" if good[10] != "a" else "b") + good[11:]
    files = []
    for name, address in (("good.eml", good), ("forged.eml", forged)):
        files.append(tmp_path / name)
        files[-1].write_bytes(
            ARF.replace(b"From: <staff", f"To: <{address}>\nFrom: <staff".encode())
        )
    result = CliRunner().invoke(
        app, ["bounce", "parse", "-c", str(config), "--json", *map(str, files)]
    )
    assert result.exit_code == 0, result.output
    first, second = (json.loads(line) for line in result.output.splitlines())
    assert (first["message_id"], first["verp"]) == ("01HZX3T8M2QK7R9V5W4Y", "verified")
    assert (second["message_id"], second["verp"]) == (None, "forged")
