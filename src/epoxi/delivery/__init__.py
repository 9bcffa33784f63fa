"""Outbound delivery: the pipelined SMTP client, dispatchers and TLS policy."""
