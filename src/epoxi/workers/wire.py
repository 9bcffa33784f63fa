"""The control channel between a worker and its supervisor: one JSON object per line.

Worker to supervisor: :class:`Ready` once it serves, :class:`Acquire` / :class:`Cancel` /
:class:`Release` for connection slots, :class:`Backlog` for rate shares. Supervisor to
worker: :class:`Granted`, :class:`Wanted` and :class:`Shares`. A worker whose channel closes
has died (or its supervisor has): the supervisor frees its slots, a worker stops.
"""

from __future__ import annotations

from typing import Final

import msgspec


class Ready(msgspec.Struct, tag=True):
    """The worker serves (the supervisor knows which worker by its channel)."""


class Acquire(msgspec.Struct, tag=True):
    id: int
    key: str  # the ready queue, "source->site"
    limit: int  # its connection_limit
    connection_rate: str | None  # its max_connection_rate, "10/s"


class Cancel(msgspec.Struct, tag=True):
    """An Acquire no longer wanted. If the supervisor granted it meanwhile (the Granted is on
    its way), the slot is given back as a Release would."""

    id: int
    key: str


class Release(msgspec.Struct, tag=True):
    key: str


class Backlog(msgspec.Struct, tag=True):
    queues: dict[str, tuple[str, int]]  # rate-limited ready queue -> (its rate, its backlog)


class Granted(msgspec.Struct, tag=True):
    id: int


class Wanted(msgspec.Struct, tag=True):
    """Other workers wait for this queue's slots: keep at most ``keep`` connections open
    (idle ones close now, busy ones after their message)."""

    key: str
    keep: int


class Shares(msgspec.Struct, tag=True):
    shares: dict[str, float]  # ready queue -> this worker's part of its message rate


ToSupervisor = Ready | Acquire | Cancel | Release | Backlog
ToWorker = Granted | Shares | Wanted

MAX_LINE: Final = 1 << 24  # a Backlog of many rate-limited queues stays far below this

encode = msgspec.json.Encoder().encode
_to_supervisor: msgspec.json.Decoder[ToSupervisor] = msgspec.json.Decoder(ToSupervisor)
_to_worker: msgspec.json.Decoder[ToWorker] = msgspec.json.Decoder(ToWorker)


def line(message: ToSupervisor | ToWorker) -> bytes:
    return encode(message) + b"\n"


def from_worker(data: bytes) -> ToSupervisor:
    return _to_supervisor.decode(data)


def from_supervisor(data: bytes) -> ToWorker:
    return _to_worker.decode(data)
