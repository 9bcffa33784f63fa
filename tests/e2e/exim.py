"""A private Exim 4 (Debian's package) that relays Epoxi's mail to the test sink and bounces
what the sink refuses, sending its DSNs back to Epoxi.

The binary is the one ``scripts/bootstrap test`` unpacks into ``.venv/peers`` (installing the
package would remove Postfix), or ``/usr/sbin/exim4``. It has its run-time user
``Debian-exim`` compiled in; when the system has no such user, Exim runs in a private mount
namespace where copies of /etc/passwd and /etc/group that add it are bind-mounted: nothing
system-wide changes. The directory is under /tmp, readable by that user.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import free_port, wait_for_port

CANDIDATES = (
    Path(__file__).parents[2] / ".venv/peers/exim4/usr/sbin/exim4",  # scripts/bootstrap test
    Path("/usr/sbin/exim4"),
)
USER = "Debian-exim"


def binary() -> Path | None:
    return next((path for path in CANDIDATES if path.is_file()), None)


class Exim:
    """``sink.test`` goes to ``sink`` (host, port); everything else to Epoxi on ``epoxi_port``."""

    def __init__(self, epoxi_port: int, sink: tuple[str, int]) -> None:
        self.epoxi_port = epoxi_port
        self.sink = sink
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="epoxi-exim-", dir="/tmp"))
        self.dir.chmod(0o755)
        self._daemon: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return binary() is not None and os.geteuid() == 0 and shutil.which("unshare") is not None

    def start(self) -> None:
        exim = binary()
        assert exim is not None
        etc = self.dir / "etc"
        etc.mkdir()
        uid = self._user(etc)
        for name in ("spool", "log"):
            (self.dir / name).mkdir(mode=0o750)
            os.chown(self.dir / name, uid, uid)
        (etc / "exim.conf").write_text(self._config(exim))
        script = self.dir / "run.sh"
        script.write_text(
            "#!/bin/sh\nset -e\n"
            + (
                f"mount --bind {etc}/passwd /etc/passwd\nmount --bind {etc}/group /etc/group\n"
                if (etc / "passwd").exists()
                else ""
            )
            + f"{exim} -C {etc}/exim.conf -bV >/dev/null\n"
            + f"exec {exim} -C {etc}/exim.conf -bdf -odi\n"
        )
        command = ["sh", str(script)]
        if (etc / "passwd").exists():
            command = ["unshare", "--mount", "--propagation", "private", "--", *command]
        self._daemon = subprocess.Popen(command)
        wait_for_port("127.0.0.1", self.port, proc=self._daemon)

    def stop(self) -> None:
        if self._daemon is not None:
            self._daemon.terminate()
            self._daemon.wait(timeout=20)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        path = self.dir / "log" / "mainlog"
        return path.read_text(errors="replace") if path.exists() else "(no Exim log)"

    def _user(self, etc: Path) -> int:
        """The uid of the run-time user; made in private copies of passwd/group if missing."""
        try:
            return pwd.getpwnam(USER).pw_uid
        except KeyError:
            pass
        used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
        uid = next(n for n in range(990, 100, -1) if n not in used)
        (etc / "passwd").write_text(
            Path("/etc/passwd").read_text()
            + f"{USER}:x:{uid}:{uid}:test exim:{self.dir}/spool:/usr/sbin/nologin\n"
        )
        (etc / "group").write_text(Path("/etc/group").read_text() + f"{USER}:x:{uid}:\n")
        return uid

    def _config(self, exim: Path) -> str:
        d = self.dir
        sink_host, sink_port = self.sink
        return f"""primary_hostname = ex.test
qualify_domain = ex.test
exim_path = {exim}
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
local_interfaces = <; 127.0.0.1
daemon_smtp_ports = {self.port}
disable_ipv6 = true
never_users = root
keep_environment =
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
acl_smtp_rcpt = acl_check_rcpt

begin acl
acl_check_rcpt:
  accept hosts = 127.0.0.1
  deny   message = relay not permitted

begin routers
to_sink:
  driver = manualroute
  domains = sink.test
  route_list = * {sink_host}
  self = send
  transport = to_sink
  no_more
to_epoxi:
  driver = manualroute
  route_list = * 127.0.0.1
  self = send
  transport = to_epoxi
  no_more

begin transports
to_sink:
  driver = smtp
  hosts_override
  hosts = {sink_host}
  port = {sink_port}
  allow_localhost
  hosts_avoid_tls = *
to_epoxi:
  driver = smtp
  hosts_override
  hosts = 127.0.0.1
  port = {self.epoxi_port}
  allow_localhost
  hosts_avoid_tls = *

begin retry
*   *   F,2h,15m
"""
