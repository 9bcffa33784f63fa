"""Broker sinks: the node's events to RabbitMQ, NATS JetStream and Redis Streams, each
through a bounded durable backlog, so a broker that is away never holds up mail."""
