"""The screenshot of Talaria's web view in docs/talaria.png: the view of a model, a what-if edit, auto, then a capture.

Serves `pippin talaria --serve`'s app for MODEL on a free local port, drives Debian's chromium with playwright (no
browser download): colours the block graph by decode latency, raises the MLP down projections to 4 bits with a rule,
solves auto for a size budget (so the Pareto plot holds a few plans), selects the first layer, sorts the table by
decode latency, and saves the window as a PNG. Nothing is measured: the figures are the roofline estimates of the profile.
  python benchmarks/talaria_screenshot.py --model ~/.cache/pippin/models/smollm2-135m-instruct-3.5bpw-rot \\
      --device-profile phone-npu --out docs/talaria.png
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time

import uvicorn
from playwright.sync_api import sync_playwright

from pippin.talaria.web import TalariaView, create_app


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="preset or model folder (default: the default model)")
    p.add_argument("--device-profile", default="phone-npu")
    p.add_argument("--rule", default="*.mlp.down_proj=4", help="the what-if rule shown")
    p.add_argument("--target-size-mb", type=float, default=55.0, help="auto's size budget")
    p.add_argument("--out", default="docs/talaria.png")
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1250)
    args = p.parse_args()

    view = TalariaView.open(args.model, device=args.device_profile, plans_dir=tempfile.mkdtemp(prefix="talaria-plans-"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(view), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    seq = 1

    def settle() -> None:
        nonlocal seq
        page.wait_for_function(f"Number(document.body.dataset.seq) >= {seq} && document.body.dataset.busy === '0'", timeout=60000)
        seq += 1

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height}, color_scheme="light")
        page.goto(url)
        settle()
        page.select_option("#color-metric", "decode_s")
        page.fill("#rule", args.rule)
        page.click("#apply-rule")
        settle()
        page.select_option("#target-kind", "size_mb")
        page.fill("#target-value", str(args.target_size_mb))
        page.click("#auto")
        settle()
        page.click('#graph text[data-layer="0"]')
        page.click("#ops th[data-key=decode_s]")
        page.evaluate("document.getElementById('table-panel').scrollTop = 0")
        print(page.inner_text("#status"))
        page.screenshot(path=args.out, full_page=False)
        browser.close()
    server.should_exit = True
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
