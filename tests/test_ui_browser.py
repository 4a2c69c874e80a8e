"""The web page in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver` packages) driven by Selenium, on the packaged demo model.

Nothing is downloaded at test time: Selenium is pointed at the system browser and driver.
Skipped, with the reason, where they are not installed (.ci/run installs them with apt).
The stop test takes the page's screenshot mid-reply; with MOESERVE_UPDATE_SCREENSHOT=1 it
saves it as docs/ui.png (the README's), else in the test's temporary folder, so that a test
run leaves the tree clean.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from moeserve.assets import DEMO_MODEL_NAME, demo_model_path
from tests.server_fixture import RunningServer, serving, start_server, wait_for

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None
)
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
)
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "ui.png"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no system Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)",
)


class SlowSteps:
    """Makes each engine step take at least `delay` seconds while on, so that a long reply
    is still running when the test presses stop (the demo model decodes in milliseconds)."""

    def __init__(self, srv: RunningServer) -> None:
        self.delay = 0.0
        step = srv.engine.step

        def slow_step() -> Any:
            if self.delay:
                time.sleep(self.delay)
            return step()

        srv.engine.step = slow_step  # the engine loop looks it up on every step


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    # Every request routes its whole prompt (no prefix cache); half the experts offloaded, so
    # the page shows the expert cache too.
    engine = {"enable_prefix_caching": False, "expert_cache_slots": 4, "offload_mode": "fetch"}
    yield from serving(
        demo_model_path(),
        served_model_name=DEMO_MODEL_NAME,
        max_model_len=256,
        engine_kwargs=engine,
    )


@pytest.fixture(scope="module")
def slow(srv: RunningServer) -> SlowSteps:
    return SlowSteps(srv)


def _chromium() -> Any:
    """Headless system Chromium through the system chromedriver (Selenium downloads nothing
    when both paths are given)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,860")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_script_timeout(30)
    return driver


@pytest.fixture(scope="module")
def browser(srv: RunningServer) -> Iterator[Any]:
    driver = _chromium()
    try:
        driver.get(srv.url + "/")
        wait_until(lambda: driver.find_element(By.ID, "model").text == DEMO_MODEL_NAME)
        yield driver
    finally:
        driver.quit()


def wait_until(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def _send(driver: Any, text: str, max_tokens: int = 16, ignore_eos: bool = False) -> Any:
    """Type `text` in the page and send it in a new conversation (the demo model answers one
    question at a time); returns the new assistant message element. Every text the reply
    shows on the way is recorded in `window.seen`."""
    driver.find_element(By.ID, "clear").click()
    driver.execute_script(
        "window.seen = [];"
        "new MutationObserver(() => {"
        "  const t = document.querySelector('.msg.assistant .text');"
        "  if (t && window.seen[window.seen.length - 1] !== t.textContent)"
        "    window.seen.push(t.textContent);"
        "}).observe(document.getElementById('messages'),"
        "  {subtree: true, childList: true, characterData: true});"
    )
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.execute_script(
        "document.getElementById('max-tokens').value = arguments[0];"
        "document.getElementById('ignore-eos').checked = arguments[1];",
        max_tokens,
        ignore_eos,
    )
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    return wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[before:])[0]


def _counts(driver: Any) -> tuple[int, list[list[int]]]:
    """(polls so far, the heatmap's counts) as the page last drew them."""
    canvas = driver.find_element(By.ID, "heatmap")
    polls = canvas.get_attribute("data-polls")
    counts = canvas.get_attribute("data-counts")
    return int(polls or 0), json.loads(counts) if counts else []


def _next_map(driver: Any) -> list[list[int]]:
    """The heatmap of a poll that started after this call (polls are a second apart)."""
    polls, _ = _counts(driver)
    wait_until(lambda: _counts(driver)[0] >= polls + 2, 10, "two more polls")
    return _counts(driver)[1]


def _gauge(srv: RunningServer, name: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_heatmap_follows_requests(browser: Any, srv: RunningServer) -> None:
    """From an empty window (the first test on a fresh server; else after the window has
    passed), requests of different tasks add tokens to the map, spread differently."""
    start = wait_until(lambda: (m := _next_map(browser)) and not any(map(any, m)) and m, 15)
    assert len(start) == 4 and all(len(row) == 8 for row in start)
    msg = _send(browser, "sort 5193")
    wait_until(lambda: msg.get_attribute("data-done"), what="the reply's end")
    after_sort = _next_map(browser)
    assert sum(map(sum, after_sort)) > sum(map(sum, start))
    msg = _send(browser, "reverse kqzd", max_tokens=40)
    wait_until(lambda: msg.get_attribute("data-done"), what="the reply's end")
    after_reverse = _next_map(browser)
    delta = [[b - a for a, b in zip(r0, r1)] for r0, r1 in zip(after_sort, after_reverse)]
    assert sum(map(sum, delta)) > 0
    # Not just more of the same: some expert's count moved differently from the rest.
    assert len({n for row in delta for n in row}) > 1


def test_chat_streams_the_answer(browser: Any, srv: RunningServer) -> None:
    msg = _send(browser, "47+85")
    wait_until(lambda: msg.get_attribute("data-done"), what="the reply's end")
    assert msg.get_attribute("data-done") == "true"
    assert msg.find_element(By.CLASS_NAME, "text").text == "132"
    # Streamed: the page showed the answer growing, not only at the end.
    seen = [t for t in browser.execute_script("return window.seen") if t]
    assert seen[-1] == "132" and len(seen) > 1 and all("132".startswith(t) for t in seen), seen
    meta = msg.find_element(By.CLASS_NAME, "meta").text
    assert re.search(r"TTFT \d+ ms", meta) and "finish: stop" in meta, meta
    assert browser.find_element(By.ID, "ctx").text == "256"


def test_stop_aborts_the_request(
    browser: Any, srv: RunningServer, slow: SlowSteps, tmp_path: Path
) -> None:
    """A long reply (ignore EOS, 200 tokens at >= 50 ms a step) stopped after its first
    tokens: the request leaves the engine, and the running gauge goes back to 0."""
    slow.delay = 0.05
    aborted = _gauge(srv, 'moeserve_request_success_total{finished_reason="abort"}')
    try:
        msg = _send(browser, "reverse kqzd", max_tokens=200, ignore_eos=True)
        text = msg.find_element(By.CLASS_NAME, "text")
        wait_until(lambda: len(text.text) >= 8, what="some streamed text")
        wait_until(lambda: browser.find_element(By.ID, "running").text == "1", 5, "running 1")
        # Mid-reply: the map and the figures are live.
        update = os.environ.get("MOESERVE_UPDATE_SCREENSHOT") == "1"
        shot = DOCS_SCREENSHOT if update else tmp_path / "ui.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = browser.find_elements(By.CSS_SELECTOR, "#cache tbody tr")
        assert [r.text.split()[0] for r in rows] == ["0", "1", "2", "3"]
        assert all(" / 4 " in r.text for r in rows), [r.text for r in rows]
        browser.find_element(By.ID, "stop").click()
        wait_until(lambda: msg.get_attribute("data-done"), what="the reply's end")
        assert msg.get_attribute("data-done") == "stopped"
        assert "stopped" in msg.find_element(By.CLASS_NAME, "meta").text
        wait_for(lambda: _gauge(srv, "moeserve_num_requests_running") == 0, 10, "running 0")
        srv.wait_idle()
        assert _gauge(srv, 'moeserve_request_success_total{finished_reason="abort"}') == aborted + 1
        assert len(text.text) < 200  # it did stop early
        wait_until(lambda: browser.find_element(By.ID, "running").text == "0", 5, "page: 0")
    finally:
        slow.delay = 0.0


def test_api_key_field() -> None:
    """With --api-key the page loads, asks for the key, and works once it is typed in."""
    key = "open-sesame"
    keyed = start_server(
        demo_model_path(), served_model_name=DEMO_MODEL_NAME, max_model_len=64, api_key=key
    )
    driver = _chromium()
    try:
        driver.get(keyed.url + "/ui")
        status = driver.find_element(By.ID, "status")
        wait_until(lambda: "API key" in status.text, what="the key prompt")
        assert driver.find_element(By.ID, "model").text == "…"
        # Refused, the page waits for a key rather than asking every second (each refusal
        # counts in /metrics): one refusal for the model card, one for the map.
        time.sleep(2.5)
        refused = _gauge(keyed, 'moeserve_request_rejected_total{reason="unauthorized"}')
        assert refused == 2
        box = driver.find_element(By.ID, "apikey")
        box.send_keys(key)
        box.send_keys(Keys.TAB)  # the change event: the page reloads the model card
        wait_until(lambda: driver.find_element(By.ID, "model").text == DEMO_MODEL_NAME)
        assert status.text == ""
        msg = _send(driver, "47+85")
        wait_until(lambda: msg.get_attribute("data-done"), what="the reply's end")
        assert msg.find_element(By.CLASS_NAME, "text").text == "132"
        wait_until(lambda: driver.find_element(By.ID, "heatmap").get_attribute("data-polls"))
    finally:
        driver.quit()
        keyed.stop()
