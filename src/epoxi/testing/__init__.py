"""Test tools shipped with Epoxi: a scriptable SMTP sink, a loopback DNS server, and fakes of
the ports (spool, transport, clock, event sink) for unit tests."""
