"""Outbound delivery: the dispatcher, its ready queues, the Transport port, the SMTP client."""
