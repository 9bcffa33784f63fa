"""Typed records of every state change, the EventSink port, the JSON-lines log and the
buffered writer that every consumer with I/O uses."""
