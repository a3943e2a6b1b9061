"""The README's screenshots of the built course, taken with Playwright and the system Chromium.

    lecturekit course --fast --only 04 06         # or make course FAST=1
    python docs/screenshots.py build              # writes docs/course_model.png, in_the_wild.png, explorer.png

Each picture is one cell's output (the cell found by a piece of its code), offline, shrunk to a
palette PNG under 300 kB. Chromium: Debian's ``chromium`` (or LECTUREKIT_CHROMIUM=path).
"""
from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (file written, notebook page, a piece of the cell's code, what the picture shows)
SHOTS = [
    ("course_model.png", "06_cam_gradcam.html", "cams = lk.attribution.cam(model, x, y)", "CAM on the course model"),
    ("in_the_wild.png", "04_occlusion_saliency.html", "occ_cat = lk.attribution.occlusion(net, cat",
     "occlusion and saliency of an ImageNet model on the cat"),
    ("explorer.png", "04_occlusion_saliency.html", "occlusion_explorer(", "the occlusion explorer's picture"),
]
MAX_BYTES = 300_000


def chromium() -> str:
    for candidate in (os.environ.get("LECTUREKIT_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise SystemExit("no Chromium found (apt-get install chromium, or set LECTUREKIT_CHROMIUM)")


def small_png(png: bytes, max_bytes: int = MAX_BYTES) -> bytes:
    """The screenshot as a 256-colour PNG, halved in size until it is under ``max_bytes``."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        buffer = io.BytesIO()
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
        if buffer.tell() < max_bytes or image.width < 200:
            return buffer.getvalue()
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)


def shoot(build: Path, out: Path = HERE) -> list[Path]:
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900}, offline=True)
        for name, html, code, _ in SHOTS:
            page.goto((build / html).resolve().as_uri())
            cell = page.locator(".jp-CodeCell", has_text=code).filter(has=page.locator(".jp-OutputArea-output img"))
            if cell.count() == 0:
                raise SystemExit(f"{html}: no cell with an image whose code has {code!r}")
            picture = cell.first.locator(".jp-OutputArea-output img").last
            target = out / name
            target.write_bytes(small_png(picture.screenshot()))
            written.append(target)
            print(f"{target} ({target.stat().st_size / 1e3:.0f} kB)")
        browser.close()
    return written


if __name__ == "__main__":
    shoot(Path(sys.argv[1] if len(sys.argv) > 1 else "build"))
