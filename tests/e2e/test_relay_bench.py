"""The shared yardstick runs Epoxi end to end: every message injected reaches the sink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RELAY_BENCH = ROOT.parent / "shared" / "bench" / "relay_bench.py"


def yardstick(mode: str, count: int) -> dict[str, object]:
    assert RELAY_BENCH.exists(), f"{RELAY_BENCH} is missing: CI runs with ../shared beside"
    result = subprocess.run(
        [
            sys.executable,
            str(RELAY_BENCH),
            mode,
            "--name",
            "epoxi",
            "--cmd",
            str(ROOT / "bench" / "epoxi_relay.sh"),
            "-n",
            str(count),
            "--mta-port",
            "2625",
            "--sink-port",
            "2626",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "EPOXI_HTTP_LISTEN": "127.0.0.1:2627"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcome: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcome


@pytest.mark.slow
def test_relay_bench_run_delivers_every_message() -> None:
    run = yardstick("run", 2000)
    assert run["ok"] and run["delivered"] == 2000 and run["extra_at_sink"] == 0, run


@pytest.mark.slow
def test_relay_bench_killtest_loses_no_acknowledged_message() -> None:
    run = yardstick("killtest", 4000)
    assert run["ok"] and run["acked_lost"] == 0, run
