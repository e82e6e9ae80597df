"""Render a `scalebio report` page in headless Chromium and save a PNG screenshot (docs/report.png by default).

    python scripts/screenshot_report.py runs/demo/report.html [docs/report.png] [--height 2600]

Needs a Chromium binary (Debian: `apt-get install chromium`). The page is self-contained, so the browser runs with
the network off; what the screenshot shows is what a user opening the file sees.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path, nargs="?", default=Path("docs/report.png"))
    parser.add_argument("--width", type=int, default=1240)
    parser.add_argument("--height", type=int, default=2600)
    args = parser.parse_args()
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        print("no Chromium found (apt-get install chromium)", file=sys.stderr)
        return 1
    args.png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:  # a throwaway profile: no state from or for other runs
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                        f"--window-size={args.width},{args.height}", f"--screenshot={args.png.resolve()}",
                        args.page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    print(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
