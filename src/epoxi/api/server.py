"""uvicorn serving the API on sockets we bind, in the same event loop as SMTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from epoxi.config import parse_hostport

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # SIGTERM/SIGINT belong to Epoxi, which stops us in order


class HttpServer:
    """Binds every ``host:port`` in ``listen`` (port 0 picks one), then serves ``app``.

    A worker process serves the sockets its supervisor bound (``bound``) instead, and its
    peers on the unix socket ``unix`` (the other workers' fan-out reaches it there).
    """

    def __init__(
        self,
        app: Any,
        listen: tuple[str, ...],
        *,
        bound: list[socket.socket] | None = None,
        unix: Path | None = None,
    ) -> None:
        self.app = app
        self.listen = listen
        self.unix = unix
        self._bound = bound or []
        self._sockets: list[socket.socket] = []
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        inet = (sock for sock in self._sockets if sock.family != socket.AF_UNIX)
        return [sock.getsockname()[:2] for sock in inet]

    @property
    def is_serving(self) -> bool:
        return self._server is not None and self._server.started and not self._server.should_exit

    async def start(self) -> None:
        if self._bound:
            self._sockets = list(self._bound)
        else:
            for address in self.listen:
                host, port = parse_hostport(address, 4000)
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                self._sockets.append(
                    socket.create_server((host, port), family=family, backlog=1024)
                )
        if self.unix is not None:
            self.unix.unlink(missing_ok=True)  # left by a worker that was killed
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind(str(self.unix))
            unix.listen(128)
            self._sockets.append(unix)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=self._sockets)
        )
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what went wrong
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP API on %s", ", ".join(f"{h}:{p}" for h, p in self.addresses))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await self._task
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if self.unix is not None:
            self.unix.unlink(missing_ok=True)
