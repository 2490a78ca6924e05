"""A metered route always names its model (the type says so, not an assert at each use)."""

from __future__ import annotations

import pytest

from proxy.routes import MeteredRoute, Route, match


@pytest.mark.parametrize(
    "action", ["invoke", "invoke-with-response-stream", "converse", "converse-stream"]
)
def test_model_invocations_are_metered_routes_with_their_model(action: str) -> None:
    route = match("POST", f"/model/us.anthropic.claude-3-haiku-20240307-v1%3A0/{action}")
    assert isinstance(route, MeteredRoute) and route.metered
    assert route.model_id == "us.anthropic.claude-3-haiku-20240307-v1:0"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/model/anthropic.claude-3-haiku-20240307-v1%3A0/count-tokens"),
        ("POST", "/guardrail/g1/version/1/apply"),
        ("GET", "/async-invoke"),
    ],
)
def test_unmetered_operations_are_plain_routes(method: str, path: str) -> None:
    route = match(method, path)
    assert type(route) is Route and not route.metered
