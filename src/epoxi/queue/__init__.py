"""Scheduled queues of jobs, the retry schedule and the one suspension registry."""
