"""The SMTP server: listeners, sessions, AUTH, STARTTLS, relay rules and limits."""
