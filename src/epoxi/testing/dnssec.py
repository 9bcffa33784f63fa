"""A DNSSEC-signed zone behind a validating resolver, on loopback, for DANE tests.

:class:`ValidatingResolver` signs a zone with ``ldns-keygen`` and ``ldns-signzone`` (Debian
``ldnsutils``), serves it with NSD (Debian ``nsd``) and puts unbound (Debian ``unbound``) in
front, trusting the zone's key-signing key: answers from the zone come back with the AD bit,
as a real validating resolver gives them. Both servers run as the current user on free ports
of 127.0.0.1, with every file in a private temporary directory. A missing program raises
``RuntimeError`` naming the package (``scripts/bootstrap test`` installs them): tests that
need DNSSEC fail loudly, never skip.
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
import socket
import tempfile
import time
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message

from epoxi.testing._service import Service

PROGRAMS = {
    "ldns-keygen": "ldnsutils",
    "ldns-signzone": "ldnsutils",
    "nsd": "nsd",
    "unbound": "unbound",
}


def _program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        package = PROGRAMS[name]
        raise RuntimeError(f"{name} not found: install the Debian package {package}")
    return found


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1, as far as one can tell now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


class ValidatingResolver(Service):
    """``origin``'s zone (``records``: zone-file lines relative to it, without SOA and NS),
    signed, served by NSD and validated by unbound; ask ``nameserver``."""

    def __init__(self, origin: str, records: list[str]) -> None:
        self.origin = origin.rstrip(".")
        self.records = records
        self.directory = Path(tempfile.mkdtemp(prefix="epoxi-dnssec-"))
        self.port = 0
        self._processes: list[asyncio.subprocess.Process] = []

    @property
    def nameserver(self) -> str:
        """``127.0.0.1:<port>`` of the validating resolver."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        anchor = await self._sign()
        nsd_port, self.port = _free_port(), _free_port()
        nsd_conf = self._write("nsd.conf", self._nsd_conf(nsd_port))
        unbound_conf = self._write("unbound.conf", self._unbound_conf(anchor, nsd_port))
        await self._spawn(_program("nsd"), "-d", "-c", str(nsd_conf))
        await self._spawn(_program("unbound"), "-d", "-c", str(unbound_conf))
        await self._wait_validated()

    async def stop(self) -> None:
        for process in reversed(self._processes):
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
                    await process.wait()
        self._processes.clear()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        """What NSD and unbound wrote, for a failing test's message."""
        return "\n".join(
            path.read_text(errors="replace")
            for path in sorted(self.directory.glob("*.log"))
            if path.exists()
        )

    # ------------------------------------------------------------------ set-up

    async def _sign(self) -> Path:
        """Keys, the signed zone; returns the DS file of the key-signing key."""
        origin = self.origin
        zone = self._write(f"{origin}.zone", self._zone_text())
        zsk = await self._run(_program("ldns-keygen"), "-a", "ECDSAP256SHA256", origin)
        ksk = await self._run(_program("ldns-keygen"), "-k", "-a", "ECDSAP256SHA256", origin)
        yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        inception = yesterday.strftime("%Y%m%d")
        await self._run(_program("ldns-signzone"), "-i", inception, str(zone), zsk, ksk)
        return self.directory / f"{ksk}.ds"

    def _zone_text(self) -> str:
        head = [
            f"$ORIGIN {self.origin}.",
            "$TTL 300",
            f"@ IN SOA ns.{self.origin}. admin.{self.origin}. 1 3600 600 86400 300",
            f"@ IN NS ns.{self.origin}.",
            "ns IN A 127.0.0.1",
        ]
        return "\n".join([*head, *self.records]) + "\n"

    def _nsd_conf(self, port: int) -> str:
        d = self.directory
        return f"""server:
  ip-address: 127.0.0.1@{port}
  username: ""
  chroot: ""
  zonesdir: "{d}"
  database: ""
  zonelistfile: "{d}/zone.list"
  xfrdfile: "{d}/xfrd.state"
  xfrdir: "{d}"
  pidfile: "{d}/nsd.pid"
  logfile: "{d}/nsd.log"
  server-count: 1
remote-control:
  control-enable: no
zone:
  name: "{self.origin}"
  zonefile: "{d}/{self.origin}.zone.signed"
"""

    def _unbound_conf(self, anchor: Path, nsd_port: int) -> str:
        d = self.directory
        return f"""server:
  interface: 127.0.0.1@{self.port}
  do-ip6: no
  username: ""
  chroot: ""
  directory: "{d}"
  pidfile: "{d}/unbound.pid"
  use-syslog: no
  logfile: "{d}/unbound.log"
  do-not-query-localhost: no
  access-control: 127.0.0.0/8 allow
  trust-anchor-file: "{anchor}"
  module-config: "validator iterator"
  local-zone: "test." nodefault
  val-log-level: 2
stub-zone:
  name: "{self.origin}"
  stub-addr: 127.0.0.1@{nsd_port}
remote-control:
  control-enable: no
"""

    def _write(self, name: str, text: str) -> Path:
        path = self.directory / name
        path.write_text(text)
        return path

    async def _run(self, *command: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=self.directory,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {err.decode(errors='replace')}")
        return out.decode().strip()

    async def _spawn(self, *command: str) -> None:
        output = (self.directory / f"{Path(command[0]).name}.out").open("wb")
        process = await asyncio.create_subprocess_exec(
            *command, cwd=self.directory, stdout=output, stderr=output
        )
        output.close()
        self._processes.append(process)

    async def _wait_validated(self, timeout: float = 15.0) -> None:
        """Return once unbound answers the zone's SOA with AD set; raise after ``timeout``."""
        query = dns.message.make_query(f"{self.origin}.", "SOA", want_dnssec=True)
        query.flags |= dns.flags.AD
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self._processes:
                if process.returncode is not None:
                    raise RuntimeError(f"a DNS server exited early:\n{self.log()}")
            try:
                answer = await dns.asyncquery.udp(query, "127.0.0.1", timeout=1, port=self.port)
            except (dns.exception.DNSException, OSError):
                await asyncio.sleep(0.05)
                continue
            if answer.flags & dns.flags.AD:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"unbound gave no validated answer for {self.origin}:\n{self.log()}")
