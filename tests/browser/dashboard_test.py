"""Real-browser test of the dashboard: headless Chromium (Debian's chromium and
chromium-driver) opens /gorchestra of a host running the example plugins, checks that the
table lists them, sorts by a column, sees a value change, and saves a PNG screenshot.

Run by .ci/run after `cargo build -p gorch-demo` (the demo, target/debug/demo, and the guests):
    python3 tests/browser/dashboard_test.py [SCREENSHOT.png]
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "debug", "demo")
EXPECTED = {"ticker", "echo", "producer", "consumer-1", "consumer-2", "crasher", "spinner"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except Exception as e:  # the page or server may not be there yet
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def column(driver, index):
    return [
        row.find_elements(By.TAG_NAME, "td")[index].text
        for row in driver.find_elements(By.CSS_SELECTOR, "#routines tbody tr")
    ]


def main():
    shot = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "dashboard.png")
    port = free_port()
    host = subprocess.Popen(
        [BIN, "--addr", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    driver = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: urllib.request.urlopen(url + "/readyz", timeout=1).status == 200, 120, "readyz")

        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run",
                     "--disable-dev-shm-usage", "--window-size=1400,1000"]:
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        driver.get(url + "/gorchestra")

        # The table lists every example routine.
        names = wait_for(lambda: EXPECTED <= set(column(driver, 1)) and column(driver, 1), 30, "all routines")
        print("routines:", sorted(names))

        # Sorting: click "Name" (ascending), then again (descending).
        header = driver.find_element(By.CSS_SELECTOR, '#routines th[data-key="name"]')
        header.click()
        wait_for(lambda: column(driver, 1) == sorted(column(driver, 1)), 5, "ascending sort by name")
        header.click()
        wait_for(lambda: column(driver, 1) == sorted(column(driver, 1), reverse=True), 5, "descending sort by name")
        assert "sorted" in header.get_attribute("class")

        # A value changes live: the producer's "Out" count grows.
        def out_of(name):
            for row in driver.find_elements(By.CSS_SELECTOR, "#routines tbody tr"):
                if row.get_attribute("data-name") == name:
                    return row.find_elements(By.TAG_NAME, "td")[12].text
            return None

        first = wait_for(lambda: out_of("producer"), 10, "producer row")
        wait_for(lambda: out_of("producer") not in (None, first), 10, "producer's Out to change")
        print("producer out:", first, "->", out_of("producer"))

        # CPU% of the spinner becomes visible once two samples exist.
        time.sleep(2.5)
        os.makedirs(os.path.dirname(shot), exist_ok=True)
        driver.save_screenshot(shot)
        print("screenshot:", shot)
    finally:
        if driver is not None:
            driver.quit()
        host.send_signal(signal.SIGINT)
        try:
            code = host.wait(timeout=15)
        except subprocess.TimeoutExpired:
            host.kill()
            raise AssertionError("the host did not stop on SIGINT")
    assert code == 0, f"host exited with {code}"
    print("1 passed, 0 failed")


if __name__ == "__main__":
    main()
