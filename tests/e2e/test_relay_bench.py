"""The shared yardstick runs Epoxi end to end: every message injected reaches the sink."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RELAY_BENCH = ROOT.parent / "shared" / "bench" / "relay_bench.py"


@pytest.mark.slow
def test_relay_bench_run_delivers_every_message() -> None:
    assert RELAY_BENCH.exists(), f"{RELAY_BENCH} is missing: CI runs with ../shared beside"
    result = subprocess.run(
        [
            sys.executable,
            str(RELAY_BENCH),
            "run",
            "--name",
            "epoxi",
            "--cmd",
            str(ROOT / "bench" / "epoxi_relay.sh"),
            "-n",
            "2000",
            "--mta-port",
            "2625",
            "--sink-port",
            "2626",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert run["ok"] and run["delivered"] == 2000 and run["extra_at_sink"] == 0, run
