"""Drive the browser demo as a person would, in headless Chromium, and save a screenshot.

    python tests/browser_demo.py SHOT.png [--model SRC] [--adapter DIR] [--clause "Governing Law"] [--timeout S]

Starts `python -m engine.demo` on a free local port, pastes a short contract (with < and & in it), picks the
clause type, clicks the button, waits for the answer and checks that the page highlights a quote that is the
contract's own text at the offsets the page states, then saves the page as a PNG. Needs gradio and selenium
(`pip install -e '.[demo]'`) and Debian's chromium + chromium-driver (`apt-get install -y chromium
chromium-driver`); CHROMIUM / CHROMEDRIVER name other binaries. Exit status 0 when the page answered as it
should, 1 otherwise, 2 when no browser is installed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLAUSE = ("This Agreement shall be governed by and construed in accordance with the laws of the State of New York, "
          "without regard to its conflict of laws principles.")
CONTRACT = f"""CONSULTING AGREEMENT

This Consulting Agreement (the "Agreement") is made between Smith & Jones LLC ("Client") and Acme <Consulting> Inc.
("Consultant").

1. Services. Consultant shall provide the advisory services described in Exhibit A.

2. Fees. Client shall pay Consultant a monthly fee of $5,000; expenses < $500 need no prior approval.

3. Term. This Agreement begins on January 1, 2025 and continues for twelve (12) months.

4. Governing Law. {CLAUSE}

5. Confidentiality. Each party shall keep the other party's confidential information secret.
"""


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None when either is missing."""
    found = []
    for env, names in (("CHROMIUM", ("chromium", "chromium-browser")), ("CHROMEDRIVER", ("chromedriver",))):
        path = os.environ.get(env) or next((p for p in map(shutil.which, names) if p), None)
        if not path or not Path(path).is_file():
            return None
        found.append(path)
    return found[0], found[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(port: int, model, adapter, log_path: Path, timeout: float) -> subprocess.Popen:
    """The demo in a child process, returned once its page answers HTTP (the model loads first)."""
    cmd = [sys.executable, "-m", "engine.demo", "--port", str(port)]
    cmd += ["--model", model] if model else []
    cmd += ["--adapter", adapter] if adapter else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = open(log_path, "w")  # noqa: SIM115 - the child writes to it for its whole life
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo exited with status {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the demo did not serve its page within {timeout:.0f} s:\n{log_path.read_text()[-2000:]}")


def drive(url: str, browser: tuple[str, str], clause: str, shot: Path, timeout: float) -> str:
    """Paste, pick, click, wait; check the highlighted quote against the contract; save the screenshot.
    Returns the page's one-line result."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1500"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=browser[1]))
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#contract textarea")))
        box.send_keys(CONTRACT)
        pick = driver.find_element(By.CSS_SELECTOR, "#clause input")
        pick.click()
        pick.send_keys(Keys.CONTROL, "a")
        pick.send_keys(clause)
        option = wait.until(ec.element_to_be_clickable(
            (By.XPATH, f"//li[@role='option' and @aria-label='{clause}']")))
        option.click()
        driver.find_element(By.CSS_SELECTOR, "#find").click()
        summary = driver.find_element(By.CSS_SELECTOR, "#summary textarea")
        WebDriverWait(driver, timeout).until(lambda d: summary.get_attribute("value").strip())
        result = summary.get_attribute("value").strip()
        marks = driver.find_elements(By.CSS_SELECTOR, "#highlighted mark")
        if not marks:
            raise AssertionError(f"no highlighted quote on the page; it says: {result}")
        sent = driver.find_element(By.CSS_SELECTOR, "#contract textarea").get_attribute("value")
        start, end = int(marks[0].get_attribute("data-start")), int(marks[0].get_attribute("data-end"))
        quote = marks[0].get_attribute("textContent")
        if sent[start:end] != quote or f"characters {start}-{end}" not in result:
            raise AssertionError(f"highlight {start}-{end} {quote!r} is not the contract's text there; page: {result}")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", marks[0])
        driver.execute_script("window.scrollTo(0, 0);")
        driver.save_screenshot(str(shot))
        return result
    finally:
        driver.quit()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/browser_demo.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("shot", type=Path, help="where to save the screenshot (PNG)")
    ap.add_argument("--model", default=None, help="passed to engine.demo (default: the embedded smollm2-135m)")
    ap.add_argument("--adapter", default=None, help="passed to engine.demo")
    ap.add_argument("--clause", default="Governing Law", help="clause type to pick in the page")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for the model to load, and to answer")
    args = ap.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print("error: no chromium/chromedriver found: apt-get install -y chromium chromium-driver", file=sys.stderr)
        return 2
    args.shot.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = args.shot.with_suffix(".server.log")
    t0 = time.perf_counter()
    proc = start_demo(port, args.model, args.adapter, log_path, args.timeout)
    try:
        t1 = time.perf_counter()
        result = drive(f"http://127.0.0.1:{port}/", browser, args.clause, args.shot, args.timeout)
    except Exception as e:  # noqa: BLE001 - one line for the caller; the server's log is beside the shot
        print(f"error: {e} (server log: {log_path})", file=sys.stderr)
        return 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"ok: {result}; demo up in {t1 - t0:.0f} s, page driven in {time.perf_counter() - t1:.0f} s; "
          f"screenshot {args.shot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
