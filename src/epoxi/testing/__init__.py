"""Test tools shipped with Epoxi: a scriptable SMTP sink and a loopback DNS server."""
