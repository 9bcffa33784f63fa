"""Event webhooks: records out to applications' HTTP endpoints, signed, durable, retried."""
