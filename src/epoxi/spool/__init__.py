"""Durable message store: records, the group-commit writer, start-up enumeration."""

from epoxi.spool.sqlite import Spool

__all__ = ["Spool"]
