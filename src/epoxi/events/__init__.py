"""Typed records of every state change, and the JSON-lines log they are written to."""
