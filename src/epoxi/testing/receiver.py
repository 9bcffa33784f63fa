"""A webhook receiver for tests: a real HTTP server on loopback that records each POST.

It answers 200, or what ``answers`` says for the next calls ("500", or "hang": no answer
until the test ends, as a receiver that timed out), and can be stopped and started again on
the same port (an endpoint that is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered; 0 for none (it hung until the client gave up)

    @property
    def events(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(self.body)["events"]
        return found


@dataclass
class Receiver:
    host: str = "127.0.0.1"
    port: int = 0
    calls: list[Call] = field(default_factory=list)
    answers: deque[str] = field(default_factory=deque)  # "500" or "hang" for the next calls
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hooks"

    def events(self) -> list[dict[str, Any]]:
        """The events of the POSTs answered 200 (those Epoxi counts as delivered)."""
        return [event for call in self.calls if call.status == 200 for event in call.events]

    async def start(self) -> None:
        if not self.port:
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="off",
            interface="asgi3",
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._release.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server, self._task = None, None
        self._release = asyncio.Event()

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        answer = self.answers.popleft() if self.answers else "200"
        if answer == "hang":
            self.calls.append(Call(headers, body, 0))  # 0: no answer
            await self._release.wait()  # the client gives up first
            status = 503
        else:
            status = int(answer)
            self.calls.append(Call(headers, body, status))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def main() -> None:
    """``python -m epoxi.testing.receiver PORT``: a receiver that answers 200 to every POST
    (the relay bench's webhook endpoint)."""
    import sys

    async def serve(port: int) -> None:
        receiver = Receiver(port=port)
        await receiver.start()
        assert receiver._task is not None
        await receiver._task

    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
