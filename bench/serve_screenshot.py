"""A screenshot of the playground (md4 serve) in headless Chromium, after one infilling request.

    python bench/serve_screenshot.py RUN [OUT.png] [--text "the king hath ____ his ____"]

Needs Debian's chromium and chromium-driver and `pip install selenium`. The server listens on
127.0.0.1 on a free port and stops when the screenshot is taken.
"""

from __future__ import annotations

import argparse
import shutil
import threading

import md4
from md4.serve import make_server


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("out", nargs="?", default="bench/serve_screenshot.png")
    p.add_argument("--text", default="the king hath ____ his ______ to the ____")
    p.add_argument("--steps", type=int, default=48)
    args = p.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = make_server(md4.load(args.run), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=900,720"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        box = driver.find_element(By.ID, "text")
        box.clear()
        box.send_keys(args.text)
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys(str(args.steps))
        driver.find_element(By.ID, "run").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done"))
        driver.execute_script("document.querySelector('details').open = true")
        driver.save_screenshot(args.out)
        print(f"screenshot written to {args.out}")
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main()
