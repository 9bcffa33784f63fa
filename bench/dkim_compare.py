"""Epoxi signing every message against Postfix with OpenDKIM as its milter, on the yardstick.

    .venv/bin/python bench/dkim_compare.py [-n 20000] [--rounds 3] [--algorithms rsa,ed25519]

(``bench/relay.sh dkim-compare N ROUNDS`` runs this.) Both sides sign every message for
example.com, the yardstick's ``From:`` domain: Epoxi with ``EPOXI_BENCH_DKIM`` (its own signer,
``bench/epoxi_relay.sh``), Postfix through ``bench/postfix_opendkim.sh`` (the yardstick's
Postfix instance with Debian's OpenDKIM as a milter, RSA-2048 or Ed25519, relaxed/relaxed).

First the check: for each algorithm, one message through each MTA into a sink here, whose
DKIM-Signature must name that algorithm and verify (dkimpy, against the public half of the
key that side signed with). Then ``--rounds`` rounds of four yardstick runs (``relay_bench.py
run``: its own smtp-source, smtp-sink, workdir and CPU accounting; OpenDKIM is a child of the
Postfix start command, so its CPU counts on Postfix's side): Postfix+OpenDKIM and Epoxi for
each algorithm, the order reversed every other round against drift. Every run's JSON line is
printed as it ends, then one summary line: per algorithm, each side's msgs/s and MTA CPU
µs per message (min, median, max), ``ratio_epoxi_over_postfix`` (median msgs/s over median)
and ``cpu_ratio_postfix_over_epoxi``, and the yardstick's disk probe.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dkim
from harness import ROOT, emit, free_port, wait_for_port

from epoxi.dkim import load_key
from epoxi.testing.sink import Sink

POSTFIX, EPOXI = "postfix+opendkim", "epoxi"
SIGNATURE_ALGORITHM = {"rsa": b"a=rsa-sha256", "ed25519": b"a=ed25519-sha256"}
CHECK_MESSAGE = (
    b"From: <bench-sender@example.com>\r\nTo: <bench-rcpt@example.net>\r\n"
    b"Date: Tue, 1 Dec 2026 00:00:00 +0000\r\nMessage-Id: <check@example.com>\r\n"
    b"Subject: dkim check\r\n\r\n" + b"x" * 78 + b"\r\n" * 40
)


class Sides:
    """The two start commands, their environment, and where each keeps its signing key."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.instance = Path(args.yardstick).resolve().parent / "postfix_instance.sh"

    def command(self, side: str, algorithm: str) -> str:
        if side == POSTFIX:
            return f"{ROOT}/bench/postfix_opendkim.sh {algorithm}"
        return f"{ROOT}/bench/epoxi_relay.sh"

    def env(self, side: str, algorithm: str) -> dict[str, str]:
        env = dict(os.environ, EPOXI_POSTFIX_INSTANCE=str(self.instance))
        if side == EPOXI:
            env.update(EPOXI_BENCH_DKIM=algorithm, EPOXI_WORKERS=self.args.workers)
            env["EPOXI_HTTP_LISTEN"] = f"127.0.0.1:{self.args.http_port}"
        return env

    def key_file(self, side: str, algorithm: str, workdir: Path) -> Path:
        if side == POSTFIX:
            return workdir / "opendkim" / "key.pem"
        return workdir / f"dkim-{algorithm}.pem"


# ------------------------------------------------------------------ the check


def verify(message: bytes, key_file: Path) -> bool:
    record = load_key("example.com", "bench", key_file).txt_record().encode()
    try:
        return bool(dkim.DKIM(message).verify(dnsfunc=lambda name, timeout=5: record))
    except dkim.ValidationError:
        return False


def send_one(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail("bench-sender@example.com", ["bench-rcpt@example.net"], CHECK_MESSAGE)


def stop(command: str, env: dict[str, str], proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the start command's process group (Epoxi's supervisor and workers), then
    SIGKILL to what is left after 60 s; Postfix's master made itself a session leader, and
    OpenDKIM has a pid file: ``postfix_opendkim.sh --stop`` stops both."""
    if "postfix_opendkim.sh" in command:
        subprocess.run([*command.split(), "--stop"], env=env, timeout=60, check=False)
    deadline = time.monotonic() + 60
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        while time.monotonic() < deadline:
            proc.poll()
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def start(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            command, shell=True, env=env, stdout=out, stderr=out, start_new_session=True
        )


async def signed_message(sides: Sides, side: str, algorithm: str, workdir: Path) -> bytes:
    """One message through one MTA, as the sink got it (its log in ``workdir/mta.log``)."""
    port = free_port()
    async with Sink("127.0.0.1") as sink:
        command = sides.command(side, algorithm)
        env = sides.env(side, algorithm) | {"BENCH_WORKDIR": str(workdir)}
        env.update(LISTEN_PORT=str(port), RELAY_PORT=str(sink.port))
        log = workdir / "mta.log"
        proc = await asyncio.to_thread(start, command, env, log)
        try:
            await asyncio.to_thread(wait_for_port, port, proc, 60)
            await asyncio.to_thread(send_one, port)
            await sink.wait_for(1, timeout=30)
        finally:
            await asyncio.to_thread(stop, command, env, proc)
        return sink.messages[0].data


def check(sides: Sides, side: str, algorithm: str) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="dkim-check-", dir="/tmp"))
    workdir.chmod(0o755)  # Postfix's daemons drop privileges
    message = asyncio.run(signed_message(sides, side, algorithm, workdir))
    head = message.partition(b"\r\n\r\n")[0]
    signed = head.count(b"DKIM-Signature:") == 1 and SIGNATURE_ALGORITHM[algorithm] in head
    ok = signed and verify(message, sides.key_file(side, algorithm, workdir))
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"check": True, "side": side, "algorithm": algorithm, "verified": ok}


def check_all(sides: Sides) -> bool:
    good = True
    for algorithm in sides.args.algorithms:
        for side in (POSTFIX, EPOXI):
            result = check(sides, side, algorithm)
            emit(result)
            good = good and result["verified"]
    return good


# ------------------------------------------------------------------ the rounds


def run_once(sides: Sides, side: str, algorithm: str) -> dict[str, Any]:
    a = sides.args
    label = f"{side}-{algorithm}"
    command = [a.yardstick, "run", "--name", label, "--cmd", sides.command(side, algorithm)]
    command += ["-n", str(a.n), "--mta-port", str(a.mta_port), "--sink-port", str(a.sink_port)]
    done = subprocess.run(
        command, env=sides.env(side, algorithm), stdout=subprocess.PIPE, text=True, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {"ok": False}
    if not lines:
        result["error"] = f"yardstick rc={done.returncode}, no result"
    return result | {"side": side, "algorithm": algorithm}


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(results: list[dict[str, Any]], algorithms: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"summary": True, "n": results[0].get("n")}
    for algorithm in algorithms:
        per: dict[str, Any] = {}
        for side in (POSTFIX, EPOXI):
            runs = [r for r in results if (r["side"], r["algorithm"]) == (side, algorithm)]
            good = [r for r in runs if r.get("ok")]
            per[side] = {
                "msgs_per_s": spread([r["msgs_per_s"] for r in good]),
                "mta_cpu_us_per_msg": spread(
                    [r["mta_cpu_us_per_msg"] for r in good if r.get("mta_cpu_us_per_msg")]
                ),
                "failed_runs": len(runs) - len(good),
            }
        per["ratio_epoxi_over_postfix"] = ratio(per[EPOXI], per[POSTFIX], "msgs_per_s")
        per["cpu_ratio_postfix_over_epoxi"] = ratio(per[POSTFIX], per[EPOXI], "mta_cpu_us_per_msg")
        summary[algorithm] = per
    return summary


def ratio(top: dict[str, Any], bottom: dict[str, Any], key: str) -> float | None:
    if not top[key] or not bottom[key] or not bottom[key]["median"]:
        return None
    return round(top[key]["median"] / bottom[key]["median"], 3)


def disk_probe(yardstick: str) -> Any:
    """The yardstick's own disk probe, so figures from other machines can be read beside."""
    spec = importlib.util.spec_from_file_location("relay_bench", yardstick)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.disk_probe()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", type=int, default=20000, help="messages a run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--algorithms", default="rsa,ed25519", type=lambda s: s.split(","))
    p.add_argument("--workers", default=os.environ.get("EPOXI_BENCH_WORKERS", "auto"))
    p.add_argument("--yardstick", default=str(ROOT.parent / "shared/bench/relay_bench.py"))
    p.add_argument("--mta-port", type=int, default=2525)
    p.add_argument("--sink-port", type=int, default=2526)
    p.add_argument("--http-port", type=int, default=2580, help="Epoxi's HTTP listener")
    p.add_argument("--no-check", action="store_true", help="skip the signature check")
    p.add_argument("--check-only", action="store_true")
    a = p.parse_args()
    sides = Sides(a)
    if not a.no_check and not check_all(sides):
        sys.exit("a side's output is not signed as asked: no figures")
    if a.check_only:
        return
    plan = [(side, algorithm) for algorithm in a.algorithms for side in (POSTFIX, EPOXI)]
    results = []
    for round_ in range(a.rounds):
        for side, algorithm in plan if round_ % 2 == 0 else plan[::-1]:
            results.append(run_once(sides, side, algorithm) | {"round": round_ + 1})
            emit(results[-1])
    emit(summarize(results, a.algorithms) | {"disk": disk_probe(a.yardstick)})


if __name__ == "__main__":
    main()
