"""Regenerate docs/playground.png: the playground of a running ``trimode serve`` caught
mid-answer in headless Chromium (diffusion and linear_spec side by side).

    trimode serve --port 8765 &
    python docs/playground_screenshot.py --url http://127.0.0.1:8765/ --out docs/playground.png
"""

from __future__ import annotations

import argparse
import shutil
import time


SNAP = """
const words = (p) => document.querySelector(`[data-panel=${p}] li.assistant .text`)
  .textContent.split(/\\s+/).filter(Boolean).length;
const count = (sel) => document.querySelectorAll(`[data-panel=a] .cell.${sel}`).length;
const rejected = document.querySelectorAll('[data-panel=b] s.rej').length;
return words('a') >= arguments[0] && words('b') >= arguments[0] && count('provisional') >= 3
  && count('masked') >= 1 && rejected >= 1;
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/")
    ap.add_argument("--out", default="docs/playground.png")
    ap.add_argument("--prompt", default="Write a short poem about the sea.")
    ap.add_argument("--words", type=int, default=12,
                    help="take the screenshot once both answers have this many words, "
                    "request A's block shows masked and provisional slots and request B's "
                    "a rejected draft")
    args = ap.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1360,900", "--hide-scrollbars"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or ""
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(args.url)
        deadline = time.monotonic() + 30
        while not driver.find_element(By.ID, "status").text.startswith("connected"):
            assert time.monotonic() < deadline, "the page did not connect"
            time.sleep(0.1)
        for panel, mode in (("a", "diffusion"), ("b", "linear_spec")):
            for name, value in (("mode", mode), ("block_length", "16"), ("max_tokens", "64")):
                driver.execute_script(
                    "document.querySelector(`[data-panel=${arguments[0]}] [name=${arguments[1]}]`)"
                    ".value = arguments[2]", panel, name, value)
        driver.execute_script("document.querySelector('#pace').value = '500'")  # holds each frame
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(args.prompt)
        driver.find_element(By.ID, "send").click()
        while not driver.execute_script(SNAP, args.words):
            time.sleep(0.05)
        driver.save_screenshot(args.out)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
