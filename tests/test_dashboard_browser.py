"""The dashboard in a real browser: headless Chromium (Debian's) driven by Selenium
against a fleet under load. Values must change without a page reload, a policy apply
must show up, and the page is saved as a screenshot for the README.

Selenium rather than Playwright: it drives Debian's own chromedriver, built from the same
source as Debian's chromium, whereas Playwright pins its protocol to the Chromium it
downloads itself (no download is allowed here) and ships a Node driver in its wheel.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from tests.support.fleet_ops import (
    Traffic,
    load,
    rate_policy,
    secret_policy,
    sluice_cli,
    write_policy,
)
from tests.support.processes import ROOT, Simulator, Sluice
from tests.support.redis_fixtures import RedisServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="headless browser test needs Debian's chromium and chromium-driver "
        "(apt-get install chromium chromium-driver; .ci/run installs them)",
    ),
]
# Into bench/results (the README's picture) only when asked: a test run leaves the tree clean.
SCREENSHOT = (
    ROOT / "bench" / "results"
    if os.environ.get("SLUICE_WRITE_RESULTS")
    else Path(tempfile.gettempdir()) / f"sluice-results-{os.getpid()}"
) / "dashboard.png"


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sluice-chromium-")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1500,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def loaded_fleet(
    tmp_path: Path, simulator: Simulator, make_sluice: Callable[..., Sluice],
    redis_server: RedisServerProcess,
) -> Iterator[tuple[str, str, list[Sluice]]]:  # fmt: skip
    """Two instances in one fleet, called ≈ 50 times a second each until the test ends."""
    name, pool = f"browser-{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:6]}"
    policy = rate_policy(pool, 60000, 1000)
    policy["models"][pool]["requests_per_minute"] = 50000
    policy["priorities"] = {"interactive": {"target_p99_ms": 800}}
    policy["workloads"]["w"]["priority"] = "interactive"
    first = write_policy(tmp_path, policy)
    fleet = [
        make_sluice(upstream=simulator.url, policy=str(first), redis_url=redis_server.url,
                    extra_args=["--fleet", name])
        for _ in range(2)
    ]  # fmt: skip
    traffic = Traffic()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(load(fleet, traffic),))
    thread.start()
    yield name, pool, fleet
    loop.call_soon_threadsafe(traffic.stop.set)
    thread.join(30)
    loop.close()


def wait_until(driver: Any, predicate: Callable[[Any], Any], timeout: float = 20) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(predicate)


def text_of(driver: Any, css: str, attribute: str | None = None) -> str:
    """The element's text (or ``attribute``), "" when absent, read in one step in the page.

    The page re-renders its rows on every poll: an element found by one WebDriver call is
    stale by the next (StaleElementReferenceException under load), so find and read happen
    in one script.
    """
    script = (
        "const e = document.querySelector(arguments[0]);"
        "if (!e) return '';"
        "return arguments[1] ? (e.getAttribute(arguments[1]) || '') : e.innerText;"
    )
    return str(driver.execute_script(script, css, attribute))


def cell(driver: Any, table: str, row: str, field: str) -> str:
    return text_of(driver, f'#{table} tr[data-name="{row}"] td[data-field="{field}"]')


def test_dashboard_updates_live_in_a_real_browser(
    browser: Any, loaded_fleet: tuple[str, str, list[Sluice]], redis_server: RedisServerProcess,
    tmp_path: Path,
) -> None:  # fmt: skip
    name, pool, fleet = loaded_fleet
    browser.get(fleet[0].url + "/dashboard")
    browser.execute_script("window.sluiceMarker = 'same page';")
    wait_until(browser, lambda d: cell(d, "pools", pool, "requests_per_min") not in ("", "0"))
    # Values move while the page stays the same page (no reload).
    seen = {cell(browser, "pools", pool, "requests_per_min")}
    wait_until(browser, lambda d: seen | {cell(d, "pools", pool, "requests_per_min")} != seen)
    assert int(text_of(browser, "#polls")) >= 2
    assert cell(browser, "pools", pool, "rpm_quota") == "50,000"
    assert cell(browser, "classes", "interactive", "p99_ms").endswith("ms")
    assert cell(browser, "workloads", "w", "state") == "running"
    # One apply, and the page shows the new limit and version by itself.
    policy = rate_policy(pool, 60000, 1000)
    policy["models"][pool]["requests_per_minute"] = 42000
    policy["priorities"] = {"interactive": {"target_p99_ms": 800}}
    policy["workloads"]["w"]["priority"] = "interactive"
    out = sluice_cli("policy", "apply", str(write_policy(tmp_path, policy)),
                     "--redis-url", redis_server.url, "--fleet", name)  # fmt: skip
    assert out.returncode == 0, out.stderr
    wait_until(browser, lambda d: cell(d, "pools", pool, "rpm_quota") == "42,000")
    assert text_of(browser, "#policy-version") == "v2"
    assert text_of(browser, "#instances") == "2"
    # Let the sparklines gather a few points, then keep the picture for the README.
    wait_until(
        browser,
        lambda d: int(text_of(d, f'#pools tr[data-name="{pool}"] svg', "data-points") or 0) >= 5,
    )
    assert browser.execute_script("return window.sluiceMarker") == "same page"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    time.sleep(0.3)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000


def test_dashboard_names_every_instance_off_the_fleets_version(
    browser: Any, tmp_path: Path, simulator: Simulator, make_sluice: Callable[..., Sluice],
    redis_factory: Callable[..., RedisServerProcess],
) -> None:  # fmt: skip
    # A Redis of its own: a --no-fleet instance shows on the default fleet's board.
    redis, env = redis_factory(), "SLUICE_BROWSER_TEST_SECRET"
    first = write_policy(tmp_path, rate_policy("p", 600, 10))
    member = make_sluice(upstream=simulator.url, policy=str(first), redis_url=redis.url,
                         extra_args=["--fleet", "default"], env={env: "s3cret"})  # fmt: skip
    loner = make_sluice(upstream=simulator.url, policy=str(first), redis_url=redis.url,
                        extra_args=["--no-fleet"])  # fmt: skip
    out = sluice_cli("policy", "apply", str(write_policy(tmp_path, secret_policy("p", 900, env))),
                     "--redis-url", redis.url)  # fmt: skip
    assert out.returncode == 0, out.stderr
    # Started after v2, without v2's secret: refuses it and keeps running its file.
    refuser = make_sluice(upstream=simulator.url, policy=str(first), redis_url=redis.url,
                          extra_args=["--fleet", "default"])  # fmt: skip
    browser.get(loner.url + "/dashboard")
    items = "#off-policy li"
    # (one poll can see a member's board entry a tick late on a loaded machine: waited for)
    wait_until(
        browser,
        lambda d: (
            len(d.find_elements("css selector", items)) == 2 and text_of(d, "#instances") == "2"
        ),  # the member and the refuser, not the loner
    )
    assert text_of(browser, "#policy-version") == "v2"
    refused = text_of(browser, f'#off-policy li[data-instance*="-{refuser.pid}-"]')
    assert refused.endswith(f"is not on v2: runs file {first} (local v0, sha "
                            f"{sha256(first.read_bytes()).hexdigest()[:12]})")  # fmt: skip
    own = text_of(browser, f'#off-policy li[data-instance*="-{loner.pid}-"]')
    assert f"runs its own file {first} (local v1" in own and "not a member" in own
    assert not text_of(browser, f'#off-policy li[data-instance*="-{member.pid}-"]')
