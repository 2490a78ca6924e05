"""Operating a fleet: policy versions in Redis, hot reload, the fleet view and dashboard."""
