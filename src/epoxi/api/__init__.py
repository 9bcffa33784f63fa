"""The HTTP API: send, message status, admin, health and metrics (Litestar on uvicorn)."""
