"""Durable message store: records, the group-commit writer, start-up enumeration."""
