"""The three brokers a sink speaks to, behind one small port: connect, publish a batch and
wait for the broker's acknowledgements, close. Their errors become BrokerUnavailable here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import nats
import nats.errors
import nats.js
import nats.js.errors
import redis.asyncio
import redis.exceptions

from epoxi.config import hidden_url
from epoxi.errors import BrokerUnavailable
from epoxi.sinks.backlog import Event

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

    from epoxi.config import SinkSettings

log = logging.getLogger(__name__)

_FOREIGN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
    aio_pika.exceptions.ChannelInvalidStateError,  # the channel closed under a publish
    nats.errors.Error,
    redis.exceptions.RedisError,
)

DEFAULT_STREAM = {"nats": "EPOXI_EVENTS", "redis": "epoxi:events"}


class Broker(Protocol):
    async def connect(self) -> None:
        """Connect (and declare what the events go to); BrokerUnavailable if it cannot."""
        ...

    async def publish(self, events: Sequence[Event]) -> None:
        """Return once the broker has acknowledged every one; BrokerUnavailable if not."""
        ...

    async def close(self) -> None: ...


def broker_for(settings: SinkSettings) -> Broker:
    kinds: dict[str, type[RabbitMq | Nats | RedisStreams]] = {
        "rabbitmq": RabbitMq,
        "nats": Nats,
        "redis": RedisStreams,
    }
    return kinds[settings.kind](settings)


@contextlib.asynccontextmanager
async def _translated(settings: SinkSettings, doing: str) -> AsyncIterator[None]:
    """Foreign errors (and a broker slower than ``timeout``) as BrokerUnavailable."""
    try:
        async with asyncio.timeout(settings.timeout):
            yield
    except _FOREIGN as exc:
        reason = hidden_url(str(exc)) or type(exc).__name__  # a url in it: no password
        raise BrokerUnavailable(
            f"sink {settings.name}: cannot {doing} {settings.shown_url}: {reason}"
        ) from exc


def _lost(settings: SinkSettings) -> BrokerUnavailable:
    return BrokerUnavailable(f"sink {settings.name}: lost its connection to {settings.shown_url}")


class RabbitMq:
    """AMQP 0-9-1: a durable topic exchange; each event a persistent message, routed by
    ``routing_key``, with publisher confirms."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def connect(self) -> None:
        async with _translated(self.settings, "connect to"):
            self._connection = await aio_pika.connect(self.settings.url)
            channel = await self._connection.channel(publisher_confirms=True)
            self._exchange = await channel.declare_exchange(
                self.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )

    async def publish(self, events: Sequence[Event]) -> None:
        exchange = self._exchange
        if exchange is None or self._connection is None or self._connection.is_closed:
            raise _lost(self.settings)
        key = self.settings.routing_key
        async with _translated(self.settings, "publish to"):
            await asyncio.gather(
                *(
                    exchange.publish(
                        _amqp_message(event), key.replace("{type}", event.type), mandatory=False
                    )
                    for event in events
                )
            )

    async def close(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(*_FOREIGN):
                await connection.close()


def _amqp_message(event: Event) -> aio_pika.Message:
    return aio_pika.Message(
        event.body,
        content_type="application/json",
        message_id=event.id,
        type=event.type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


class Nats:
    """NATS JetStream: the stream is created if missing; each event published on
    ``subject`` with its id as ``Nats-Msg-Id`` (JetStream drops a duplicate), acknowledged."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.stream = settings.stream or DEFAULT_STREAM["nats"]
        self._client: NatsClient | None = None
        self._js: nats.js.JetStreamContext | None = None

    async def connect(self) -> None:
        async with _translated(self.settings, "connect to"):
            self._client = client = await nats.connect(
                self.settings.url,
                allow_reconnect=False,  # the sink reconnects, with its backoff
                connect_timeout=self.settings.timeout,
                error_cb=self._on_error,
            )
            self._js = js = client.jetstream(timeout=self.settings.timeout)
            try:
                await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                subjects = [self.settings.subject.replace("{type}", "*")]
                await js.add_stream(name=self.stream, subjects=subjects)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("sink %s: %s", self.settings.name, exc)

    async def publish(self, events: Sequence[Event]) -> None:
        js = self._js
        if js is None or self._client is None or not self._client.is_connected:
            raise _lost(self.settings)
        subject = self.settings.subject
        async with _translated(self.settings, "publish to"):
            await asyncio.gather(
                *(
                    js.publish(
                        subject.replace("{type}", event.type),
                        event.body,
                        stream=self.stream,
                        headers={"Nats-Msg-Id": event.id},
                    )
                    for event in events
                )
            )

    async def close(self) -> None:
        client, self._client, self._js = self._client, None, None
        if client is not None:
            with contextlib.suppress(*_FOREIGN):
                await client.close()


class RedisStreams:
    """Redis Streams: XADD of each event (fields ``id``, ``type``, ``event``: the JSON) to
    the ``stream`` key, trimmed to about ``maxlen`` entries, one pipeline per batch."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.stream = settings.stream or DEFAULT_STREAM["redis"]
        self._client: redis.asyncio.Redis | None = None

    async def connect(self) -> None:
        timeout = self.settings.timeout
        client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            self.settings.url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=None,  # the sink retries, with its backoff
        )
        try:
            async with _translated(self.settings, "connect to"):
                await client.ping()
        except BrokerUnavailable:
            await client.aclose()
            raise
        self._client = client

    async def publish(self, events: Sequence[Event]) -> None:
        client = self._client
        if client is None:
            raise _lost(self.settings)
        async with _translated(self.settings, "publish to"):
            pipe = client.pipeline(transaction=False)
            for event in events:
                fields: dict[Any, Any] = {"id": event.id, "type": event.type, "event": event.body}
                pipe.xadd(self.stream, fields, maxlen=self.settings.maxlen, approximate=True)
            await pipe.execute()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*_FOREIGN):
                await client.aclose()
