"""Traffic shaping: per domain / site / source limits and the throttles that enforce them."""
