"""What ``epoxi serve`` logs of a stranger's address is printable: bidi controls spelled out."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from tests.conftest import EpoxiProcess


def refused_relay(port: int, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("a@sender.test", ["SMTPUTF8"])
        return smtp.rcpt(address)


async def test_an_address_with_a_bidi_override_is_logged_escaped(
    epoxi_process: EpoxiProcess, tmp_path: Path
) -> None:
    config = tmp_path / "epoxi.toml"  # an untrusted listener, so the relay attempt is logged
    config.write_text('[[smtp.listeners]]\naddress = "127.0.0.1:0"\ntrusted_networks = []\n')
    await asyncio.to_thread(epoxi_process.start, config)
    code, _ = await asyncio.to_thread(
        refused_relay, epoxi_process.port, "evil\u202eexe.txt@remote.test"
    )
    assert code == 550
    await asyncio.to_thread(epoxi_process.stop)  # the log is complete once it has exited
    log = epoxi_process.log()
    assert "relay denied to evil\\u202eexe.txt@remote.test" in log, log
    assert "\u202e" not in log
