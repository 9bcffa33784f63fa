"""Reply classification into bounce categories, and DSN (RFC 3464) generation."""
