"""Pure SMTP protocol code: commands, replies, addresses. No I/O lives here."""
