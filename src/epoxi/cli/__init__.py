"""The ``epoxi`` command: the server, local tools, and a client of the HTTP API."""

from epoxi.cli.main import app, main

__all__ = ["app", "main"]
