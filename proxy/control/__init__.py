"""Fleet-wide control loops: adaptive concurrency, circuit breakers, batch pauses, fleet stats."""
