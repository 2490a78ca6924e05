"""With Redis an instance follows its fleet's stored policy by default (issue #8's contract)."""

from __future__ import annotations

import pytest

from proxy.cli import _fleet, _parser


@pytest.mark.parametrize(
    ("argv", "fleet"),
    [
        (["serve", "--redis-url", "redis://127.0.0.1:6379/0"], "default"),
        (["serve", "--redis-url", "redis://127.0.0.1:6379/0", "--fleet", "eu"], "eu"),
        (["serve", "--redis-url", "redis://127.0.0.1:6379/0", "--no-fleet"], None),
        (["serve"], None),  # embedded store: the --config file is the only source
        (["serve", "--fleet", "eu"], None),
    ],
)
def test_an_instance_with_redis_follows_the_default_fleet_unless_told_otherwise(
    argv: list[str], fleet: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("SLUICE_FLEET", "SLUICE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    assert _fleet(_parser().parse_args(argv)) == fleet
