"""Fixtures that start real things live in plugin modules, one per concern."""

pytest_plugins = [
    "tests.support.redis_fixtures",
    "tests.support.process_fixtures",
]
