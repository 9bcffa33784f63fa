"""Scheduled and ready queues, retry schedule, expiry, suspend/resume."""
