"""A private Postfix instance (Debian's package) that bounces Epoxi's mail, for real DSNs.

It takes mail for ``pf.test`` on ``port`` from loopback and bounces it as Postfix does:

- ``nosuchuser@pf.test``: local(8) finds no such user (5.1.1);
- ``nobody@pf.test``: the mailbox is over ``mailbox_size_limit`` (5.2.2, mailbox full);
- ``anyone@far.test``: relayed (Epoxi is in ``mynetworks``) to its own second listener, where
  Epoxi's address is not, which refuses to relay (``554 5.7.1 Relay access denied`` in the DSN).

Its DSNs, like all its outbound mail, go to ``relay_port`` (Epoxi). The directory is under
/tmp, readable by the postfix user (pytest's own temporary directories are not).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import free_port, wait_for_port

MAILBOX_LIMIT = 8000


class Postfix:
    def __init__(self, relay_port: int) -> None:
        self.relay_port = relay_port
        self.port = free_port()
        self.refusing_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="epoxi-postfix-", dir="/tmp"))
        self.dir.chmod(0o755)
        self._master: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("postfix") is not None and os.geteuid() == 0

    def start(self) -> None:
        etc = self.dir / "etc"
        for name in ("etc", "spool", "data", "mail"):
            (self.dir / name).mkdir()
        shutil.chown(self.dir / "data", "postfix", "postfix")
        (self.dir / "mail").chmod(0o1777)
        self._full_mailbox("nobody")
        (etc / "main.cf").write_text(self._main_cf())
        (etc / "master.cf").write_text(self._master_cf())
        (etc / "transport").write_text(f"far.test smtp:[127.0.0.1]:{self.refusing_port}\n")
        log = self.dir / "maillog"
        log.touch()
        shutil.chown(log, "postfix")
        subprocess.run(["postfix", "-c", str(etc), "check"], check=True)
        self._master = subprocess.Popen(["postfix", "-c", str(etc), "start-fg"])
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        """Stop master (by its pid file: start-fg's shell waits for it, and a signal to the
        shell would leave master running), then wait for the shell."""
        if self._master is not None:
            pid_file = self.dir / "spool" / "pid" / "master.pid"
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                self._master.terminate()
            self._master.wait(timeout=20)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        return (self.dir / "maillog").read_text(errors="replace")

    def _full_mailbox(self, user: str) -> None:
        mailbox = self.dir / "mail" / user
        mailbox.write_bytes(b"x" * (MAILBOX_LIMIT - 200))
        entry = pwd.getpwnam(user)
        os.chown(mailbox, entry.pw_uid, entry.pw_gid)

    def _main_cf(self) -> str:
        d = self.dir
        return f"""compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
myhostname = pf.test
mydomain = pf.test
myorigin = pf.test
mydestination = pf.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
transport_maps = texthash:{d}/etc/transport
relayhost = [127.0.0.1]:{self.relay_port}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
mail_spool_directory = {d}/mail
mailbox_size_limit = {MAILBOX_LIMIT}
message_size_limit = {MAILBOX_LIMIT}
biff = no
smtp_tls_security_level = none
delay_warning_time = 0
maillog_file_prefixes = /tmp
maillog_file = {d}/maillog
"""

    def _master_cf(self) -> str:
        lines = []
        for line in Path("/etc/postfix/master.cf.proto").read_text().splitlines():
            fields = line.split()
            if line.startswith(("#", " ", "\t")) or len(fields) < 8:
                lines.append(line)
                continue
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{self.port}"
            fields[4] = "n"  # no chroot
            lines.append(" ".join(fields))
        lines.append(
            f"127.0.0.1:{self.refusing_port} inet n - n - - smtpd"
            " -o mynetworks=127.0.0.254/32 -o smtpd_relay_restrictions=reject_unauth_destination"
        )
        return "\n".join(lines) + "\n"
