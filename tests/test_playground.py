"""The playground page (issue 21) in headless Chromium against a live server on the tiny
checkpoint, whose tokenizer is rewritten so every generated token is HTML (``<script>``,
``<img onerror>``, ``<b>``): the page must show it as text. Checks, through the real page:
diffusion and linear_spec side by side, sent from the keyboard, draw block cells that change
over time and end with exactly the API's answer; a server error is shown as a message; the
page notices the server going away and reconnects when it is back. Skips loudly when no
browser can start (needs Debian's chromium + chromium-driver and selenium: ``.ci/run``).
"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest

from conftest import make_oracle, write_checkpoint
from serve_utils import free_port, running
from test_server import start

PROMPT = "hello there"


def html_names(directory) -> None:
    """Rename every ``wN`` token of the tiny tokenizer to markup around its name."""
    path = directory / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    forms = ["<script>window.pwned=1</script>{}", "<img src=x onerror=window.pwned=1>{}",
             "<b>{}</b>"]
    spec["model"]["vocab"] = {(forms[i % 3].format(k) if k.startswith("w") else k): i
                              for k, i in vocab.items()}
    path.write_text(json.dumps(spec))



@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from trimode import LLM

    directory = write_checkpoint(tmp_path_factory.mktemp("html"), make_oracle(seed=0))
    html_names(directory)
    engine, app = start(LLM(str(directory), max_batch_size=4))
    yield app
    engine.shutdown()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through chromedriver; skips (loudly) when it cannot start."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000"):
            options.add_argument(flag)
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary:
            options.binary_location = binary
        driver_path = shutil.which("chromedriver")
        service = Service(driver_path) if driver_path else Service()
        driver = webdriver.Chrome(options=options, service=service)
    except Exception as exc:  # noqa: BLE001 - any failure to start means no browser here
        pytest.skip(f"BROWSER TESTS SKIPPED: headless Chromium could not start ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); install Debian's chromium "
                    "and chromium-driver and pip's selenium (as .ci/run does)")
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def set_field(driver, panel: str, name: str, value: str) -> None:
    driver.execute_script(
        "const el = document.querySelector(`[data-panel=${arguments[0]}] [name=${arguments[1]}]`);"
        "el.value = arguments[2]; el.dispatchEvent(new Event('change'));", panel, name, value)


def signature(driver, panel: str) -> str:
    return driver.execute_script(
        "return [...document.querySelectorAll(`[data-panel=${arguments[0]}] .block .cell`)]"
        ".map(c => c.className + ':' + c.textContent).join('|')", panel)


def test_two_modes_side_by_side_from_the_keyboard(app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with running(app, free_port()) as url:
        browser.get(url + "/")
        wait(lambda: browser.find_element(By.ID, "status").text.startswith("connected"),
             what="the page to connect")
        for panel, mode in (("a", "diffusion"), ("b", "linear_spec")):
            for name, value in (("mode", mode), ("block_length", "4"), ("threshold", ""),
                                ("temperature", "0"), ("max_tokens", "24")):
                set_field(browser, panel, name, value)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(PROMPT)
        prompt.send_keys(Keys.TAB)
        assert browser.switch_to.active_element.get_attribute("id") == "send"  # focus order
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)
        seen = {"a": set(), "b": set()}
        while browser.execute_script("return document.body.dataset.busy") != "no":
            for panel in seen:
                seen[panel].add(signature(browser, panel))
            time.sleep(0.01)
        for panel, mode in (("a", "diffusion"), ("b", "linear_spec")):
            state = browser.execute_script(
                f"return document.querySelector('[data-panel={panel}]').dataset.state")
            assert state == "done", (panel, browser.find_element(By.ID, "errors").text)
            assert len(seen[panel] - {""}) >= 3, (panel, seen[panel])  # cells appear and change
            shown = browser.execute_script(
                f"return document.querySelector('[data-panel={panel}] li.assistant .text').textContent")
            body = {"messages": [{"role": "user", "content": PROMPT}], "mode": mode,
                    "block_length": 4, "temperature": 0, "max_tokens": 24}
            want = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
            assert shown == want["choices"][0]["message"]["content"] and shown
            assert "<script>" in shown or "<img" in shown or "<b>" in shown
        markup = browser.execute_script(
            "return document.querySelectorAll('#panels script, #panels img, #panels b').length")
        assert markup == 0 and browser.execute_script("return window.pwned") is None
        cells = browser.find_elements(By.CSS_SELECTOR, "[data-panel=b] .block .cell")
        assert cells and all(c.find_elements(By.XPATH, "./*[not(self::s)]") == [] for c in cells)


def test_server_error_and_restart_are_shown(app, browser):
    from selenium.webdriver.common.by import By

    port = free_port()
    with running(app, port) as url:
        browser.get(url + "/")
        wait(lambda: browser.find_element(By.ID, "status").text.startswith("connected"),
             what="the page to connect")
        set_field(browser, "a", "block_length", "0")
        browser.find_element(By.ID, "send").click()
        errors = wait(lambda: browser.find_element(By.ID, "errors").text, what="an error message")
        assert "block_length" in errors and "Request A" in errors
        browser.execute_script("document.querySelectorAll('#errors button')"
                               ".forEach(b => b.click())")
        set_field(browser, "a", "block_length", "4")
        browser.find_element(By.ID, "compare").click()  # panel B off
        wait(lambda: browser.execute_script("return document.body.dataset.busy") == "no",
             what="the first request to end")
    wait(lambda: "unreachable" in browser.find_element(By.ID, "status").text, timeout=10,
         what="the page to notice the server is gone")
    browser.find_element(By.ID, "send").click()
    wait(lambda: "connection to the server was lost" in browser.find_element(By.ID, "errors").text,
         what="a lost-connection message")
    with running(app, port):
        wait(lambda: browser.find_element(By.ID, "status").text.startswith("connected"),
             timeout=10, what="the page to reconnect")


def test_page_is_package_data_and_can_be_turned_off(app, tiny):
    """GET / and its files come from the package (declared in pyproject's package-data)
    and reference nothing outside the server; ServerConfig(ui=False) (--no-ui) turns it off."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import trimode.entrypoints.server.app as server_app

    folder = Path(server_app.__file__).parent / "ui"
    globs = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["trimode.entrypoints.server"]
    files = sorted(p.name for p in folder.iterdir())
    assert {"index.html", "app.js", "view.js", "style.css"} <= set(files)
    assert all(any(fnmatch.fnmatch(f"ui/{name}", g) for g in globs) for name in files)
    for name in files:
        text = (folder / name).read_text().replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text, name
    with running(app, free_port()) as url:
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "trimode playground" in page.text
        assert httpx.get(url + "/ui/app.js").status_code == 200
    from trimode import LLM
    from trimode.entrypoints.cli.main import build_parser

    assert build_parser().parse_args(["serve", "--no-ui"]).ui is False
    assert build_parser().parse_args(["serve"]).ui is True
    engine, off = start(LLM(str(tiny[0])), ui=False)
    with running(off, free_port()) as url:
        assert httpx.get(url + "/").status_code == 404
        assert httpx.get(url + "/ui/app.js").status_code == 404
        assert httpx.get(url + "/health").status_code == 200
    engine.shutdown()
