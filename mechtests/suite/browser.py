"""Look at a report the way a person does: headless Chromium, screenshots and overflow checks.

    python -m mechtests.suite.browser shot report.html out.png [--width 1400] [--height 900]
        [--at ID]
    python -m mechtests.suite.browser overflow report.html [--width 1400]

No browser driver is needed: the page is copied with a small script appended (it measures the
layout, or scrolls to an element) and Chromium's own ``--dump-dom`` / ``--screenshot`` run it.
``make browser`` installs Chromium (Debian: ``apt-get install chromium``, as root).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
HOW = ("install it with `make browser` (as root: apt-get install -y chromium), or set "
       "MECHTESTS_CHROMIUM to its path")


def chromium() -> str | None:
    """The Chromium (or Chrome) executable: $MECHTESTS_CHROMIUM, else the first on PATH."""
    given = os.environ.get("MECHTESTS_CHROMIUM")
    if given:
        return given if Path(given).exists() else None
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str], timeout: float = 120) -> str:
    exe = chromium()
    if exe is None:
        raise RuntimeError(f"Chromium not found (looked for {', '.join(NAMES)}): {HOW}")
    with tempfile.TemporaryDirectory(prefix="mechtests-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
               "--force-device-scale-factor=1", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"Chromium failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout


def _with_script(page: Path, script: str, folder: Path) -> Path:
    """A copy of the page with ``script`` run after load (images stay relative to the page)."""
    text = page.read_text(encoding="utf-8")
    tag = f"<script>{script}</script>"
    text = text.replace("</body>", tag + "</body>") if "</body>" in text else text + tag
    copy = folder / f".{page.stem}-measured.html"
    copy.write_text(text, encoding="utf-8")
    return copy


MEASURE = """
document.querySelectorAll('details').forEach(d => d.open = true);
const W = window.innerWidth, out = {viewport: W,
  page: document.documentElement.scrollWidth, overflowing: []};
document.querySelectorAll('table, img, figure, pre, h1, h2, h3, ul, p').forEach(el => {
  const r = el.getBoundingClientRect();
  if (r.right > W + 0.5 || el.scrollWidth > el.clientWidth + 1 && el.tagName == 'TABLE')
    out.overflowing.push({tag: el.tagName, cls: el.className, right: Math.round(r.right),
      width: Math.round(r.width), text: (el.alt || el.textContent || '').slice(0, 80)});
});
document.body.setAttribute('data-measured', JSON.stringify(out));
"""


def overflow(page: Path, width: int = 1400, height: int = 900) -> dict:
    """Lay the page out at ``width`` px, every <details> open; what sticks out of the viewport.

    Returns {"viewport", "page" (document scroll width), "overflowing": [elements]}.
    """
    page = Path(page).resolve()
    with tempfile.TemporaryDirectory(dir=page.parent, prefix=".measure-") as tmp:
        copy = _with_script(page, MEASURE, Path(tmp))
        dom = _run([f"--window-size={width},{height}", "--virtual-time-budget=5000",
                    "--dump-dom", copy.as_uri()])
    got = re.search(r'data-measured="([^"]*)"', dom)
    if not got:
        raise RuntimeError("the measuring script did not run in Chromium")
    import html

    return json.loads(html.unescape(got[1]))


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 900,
               at: str | None = None, colours: int | None = 256) -> Path:
    """A ``width`` x ``height`` screenshot of the page, from element id ``at`` if given.

    Saved as a palette PNG with at most ``colours`` colours (small enough to commit).
    """
    page, png = Path(page).resolve(), Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=page.parent, prefix=".shot-") as tmp:
        script = "" if at is None else (  # start the page at that element
            f"const el = document.getElementById({json.dumps(at)});"
            "if (el) while (el.previousElementSibling) el.previousElementSibling.remove();")
        copy = _with_script(page, script, Path(tmp))
        raw = Path(tmp) / "shot.png"
        _run([f"--window-size={width},{height}", "--virtual-time-budget=5000",
              "--run-all-compositor-stages-before-draw", f"--screenshot={raw}", copy.as_uri()])
        if colours:
            from PIL import Image

            Image.open(raw).convert("RGB").quantize(  # octree keeps small glyphs' colours
                colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
                png, optimize=True)
        else:
            shutil.copy(raw, png)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechtests.suite.browser", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    shot = sub.add_parser("shot", help="screenshot a page")
    shot.add_argument("page", type=Path)
    shot.add_argument("png", type=Path)
    shot.add_argument("--width", type=int, default=1400)
    shot.add_argument("--height", type=int, default=900)
    shot.add_argument("--at", default=None, help="id of the element to scroll to")
    over = sub.add_parser("overflow", help="list what overflows the viewport")
    over.add_argument("page", type=Path)
    over.add_argument("--width", type=int, default=1400)
    args = parser.parse_args(argv)
    if args.cmd == "shot":
        print(screenshot(args.page, args.png, args.width, args.height, args.at))
        return 0
    got = overflow(args.page, args.width)
    print(json.dumps(got, indent=1))
    return 1 if got["overflowing"] or got["page"] > got["viewport"] else 0


if __name__ == "__main__":
    sys.exit(main())
