"""The playground on the demo run as a user meets it: `sc-steer app --run runs/demo` started as a
subprocess, the README preset chosen in headless Chromium, feature 1350 inspected, Generate clicked
three times (40 new tokens, baseline then steered, then scores and heatmaps): the time from click to
everything shown, and a screenshot written to apps/playground.png.

    python bench/playground_session.py     # needs runs/demo (sc-steer demo) and Debian's chromium
"""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests")) 
from pathlib import Path

from helpers import launch_chromium, wait_for_http
from playwright.sync_api import sync_playwright

log = Path("/tmp/playground_session.log")
env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "2"}
proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "sc-steer"), "app", "--run", "runs/demo", "--port", "7862"], cwd=ROOT,
                        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
t0 = time.time()
wait_for_http("http://127.0.0.1:7862/", proc, log)
print("served in", round(time.time() - t0, 1), "s")
try:
    with sync_playwright() as p:
        b = launch_chromium(p)
        pg = b.new_page(viewport={"width": 1500, "height": 1300})
        pg.goto("http://127.0.0.1:7862/")
        pg.wait_for_selector("#generate")
        pg.locator("#preset input").click()
        pg.get_by_role("option").first.click()
        pg.wait_for_function("document.querySelector('#recipe_json textarea').value.includes('1350')")
        pg.fill("#prompt textarea", "HAMLET.\nTo be, or not")
        pg.fill("#query textarea, #query input", "Exeunt")
        pg.click("#search")
        pg.wait_for_function("document.querySelectorAll('#results [role=row]').length > 1")
        pg.fill("#feature input", "1350"); pg.locator("#site input").fill("resid_post.1"); pg.locator("#site input").press("Enter")
        pg.click("#inspect")
        pg.wait_for_function("document.querySelector('#details').innerText.includes('#1350')")
        times = []
        for i, pr in enumerate(["HAMLET.\nTo be, or not", "KING.\nHow fares our cousin", "HAMLET.\nTo be, or not"]):
            pg.fill("#prompt textarea", pr)
            t = time.time()
            pg.click("#generate")
            pg.wait_for_function("n => document.querySelectorAll('#heat .heat').length > 0 && document.querySelector('#scores').innerText.includes('KL to baseline') && document.querySelector('#snippet').innerText.includes(n)", arg=pr.split(chr(10))[1], timeout=120000)
            times.append(time.time() - t)
        print("click to scores+heatmaps (40 tokens, baseline+steered):", [round(x, 2) for x in times])
        pg.screenshot(path=os.path.join(ROOT, "apps", "playground.png"), full_page=True)
        print(pg.input_value("#steered textarea")[:200])
        b.close()
finally:
    proc.terminate(); proc.wait()
