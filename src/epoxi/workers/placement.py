"""A process's place among the workers: its index, its sockets, its peers and supervisor.

The supervisor describes it in one environment variable, ``EPOXI_WORKER`` (JSON: the index,
the count, the file descriptors it passed down, the directory of the workers' API sockets);
:meth:`Placement.from_env` turns that back into sockets in the worker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

ENV: Final = "EPOXI_WORKER"


class _Described(msgspec.Struct, kw_only=True):
    index: int
    count: int
    smtp: dict[str, list[int]]  # listener address -> descriptors bound for it
    http: list[int]
    control: int
    handoff: int
    peer_dir: str
    supervisor: int  # its process id


@dataclass(frozen=True)
class Placement:
    """Worker ``index`` of ``count``. The default is the single process of ``--workers 1``,
    which binds its own sockets and has neither peers nor supervisor."""

    index: int = 0
    count: int = 1
    smtp_sockets: Mapping[str, list[socket.socket]] = field(default_factory=dict)
    http_sockets: list[socket.socket] = field(default_factory=list)
    control: socket.socket | None = None  # the channel to the supervisor
    handoff: socket.socket | None = None  # SMTP connections the supervisor accepted for us
    peer_dir: Path | None = None  # holds worker-<i>.sock, each worker's API
    supervisor_pid: int = 0

    @property
    def supervised(self) -> bool:
        return self.control is not None

    def api_socket(self, index: int) -> Path | None:
        """Where worker ``index`` serves its API to its peers."""
        return self.peer_dir / f"worker-{index}.sock" if self.peer_dir is not None else None

    def peer_sockets(self) -> list[Path]:
        """The API sockets of every other worker."""
        found = (self.api_socket(i) for i in range(self.count) if i != self.index)
        return [path for path in found if path is not None]

    @staticmethod
    def describe(
        *,
        index: int,
        count: int,
        smtp: Mapping[str, list[int]],
        http: list[int],
        control: int,
        handoff: int,
        peer_dir: Path,
    ) -> str:
        """The ``EPOXI_WORKER`` value for a child that inherits these descriptors."""
        described = _Described(
            index=index,
            count=count,
            smtp=dict(smtp),
            http=http,
            control=control,
            handoff=handoff,
            peer_dir=str(peer_dir),
            supervisor=os.getpid(),
        )
        return msgspec.json.encode(described).decode()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Placement | None:
        """This process's placement when a supervisor started it, else None."""
        text = (os.environ if env is None else env).get(ENV)
        if not text:
            return None
        described = msgspec.json.decode(text, type=_Described)
        return cls(
            index=described.index,
            count=described.count,
            smtp_sockets={
                address: [socket.socket(fileno=fd) for fd in fds]
                for address, fds in described.smtp.items()
            },
            http_sockets=[socket.socket(fileno=fd) for fd in described.http],
            control=socket.socket(fileno=described.control),
            handoff=socket.socket(fileno=described.handoff),
            peer_dir=Path(described.peer_dir),
            supervisor_pid=described.supervisor,
        )


_PR_SET_PDEATHSIG: Final = 1


def die_with_supervisor(placement: Placement) -> None:
    """Have the kernel kill this worker when its supervisor dies (even by SIGKILL), so no
    orphan keeps the sockets and the shard; exit now if that already happened."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != placement.supervisor_pid:
        os._exit(1)
