"""The chat page in headless Chromium, used as a person would: type, send, watch the answer stream in.

Needs Debian's `chromium` and `chromium-driver` (installed by .ci/run) and the `selenium` package; skipped
when they are missing. Set SERVE_SCREENSHOT=path.png to keep a screenshot of the conversation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import pytest

from serve_fixtures import server, tiny_model_dir  # noqa: F401  (pytest fixtures)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

_MISSING = "needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)"
if os.environ.get("CI"):  # CI installs both (.ci/run): there a missing browser is a failure, not a skip
    from selenium import webdriver
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), _MISSING
else:
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(_MISSING, allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture()
def browser():
    profile = tempfile.mkdtemp(prefix="chromium-profile.")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,800", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _set(driver, element_id: str, value: str) -> None:
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(value)


def _send_and_watch(driver, text: str, timeout: float = 60) -> tuple[str, set[int]]:
    """Type `text`, click Send, and record the answer's length while it grows; returns (answer, lengths)."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    _set(driver, "prompt", text)
    driver.find_element(By.ID, "send").click()
    lengths: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answers = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        errors = driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert not errors, errors[0].text
        if len(answers) > before:
            latest = answers[-1]
            lengths.add(len(latest.find_element(By.CLASS_NAME, "content").get_attribute("textContent")))
            if "done" in latest.get_attribute("class").split():
                return latest.find_element(By.CLASS_NAME, "content").get_attribute("textContent"), lengths
        time.sleep(0.005)
    raise AssertionError(f"no finished answer after {timeout}s")


def test_chat_page_streams_an_answer(browser, server):
    browser.get(server.url + "/")
    WebDriverWait(browser, 20).until(lambda d: "tiny-doge" in d.find_element(By.ID, "status").text)
    _set(browser, "system", "You are a terse assistant.")
    _set(browser, "max-tokens", "120")
    browser.execute_script("const t = document.getElementById('temperature'); t.value = '0.8';"
                           "t.dispatchEvent(new Event('input'));")
    assert browser.find_element(By.ID, "temperature-value").text == "0.80"

    # Random weights may sample end-of-turn early; a person would just ask again, and so does the test.
    for attempt in range(5):
        if attempt:
            browser.find_element(By.ID, "new-chat").click()
        question = f"Hello doge, tell me story number {attempt}."
        answer, lengths = _send_and_watch(browser, question)
        user = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
        assert user[-1].find_element(By.CLASS_NAME, "content").text == question
        assert browser.find_element(By.ID, "send").is_enabled()
        if len(answer) >= 20 and len(lengths) >= 3:
            break
    assert answer.strip(), "the answer is empty"
    assert len(lengths) >= 3, f"the answer arrived in one piece, not streamed: lengths seen {sorted(lengths)}"

    # A second turn: the whole conversation goes to the server, and lives in the browser across a reload.
    _send_and_watch(browser, "And another one?")
    history = json.loads(browser.execute_script("return localStorage.getItem('doge-chat:history')"))
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == question and history[1]["content"] == answer
    if os.environ.get("SERVE_SCREENSHOT"):
        browser.save_screenshot(os.environ["SERVE_SCREENSHOT"])
    browser.refresh()
    WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 4)
    assert browser.find_element(By.ID, "system").get_attribute("value") == "You are a terse assistant."
    assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == "120"

    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
