"""DNS resolution for delivery: a TTL-honouring cache, MX resolution and site names."""
