"""Render the README's screenshots of the playground page from a running service; starts nothing itself.

    python -m serve run --port 8000 ...        # elsewhere, until READY
    python docs/screenshots/render.py http://127.0.0.1:8000

Drives the page in headless Chromium (playwright, Debian's /usr/bin/chromium by default) with a real photo
(scikit-image's astronaut): paints over the shuttle model, removes it, and writes playground.png (the page
with the mask painted) and before_after.png (the comparison) next to this file, each under MAX_BYTES.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
MAX_BYTES = 400 * 1024
VIEWPORT = {"width": 1200, "height": 760}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
# the shuttle model beside the astronaut, as fractions of the photo (x, y): two strokes down its length
STROKES = [
    [(0.80, 0.03), (0.80, 0.30), (0.78, 0.50)],
    [(0.86, 0.12), (0.87, 0.35), (0.86, 0.52)],
    [(0.73, 0.42), (0.90, 0.44)],
]


def astronaut_png() -> bytes:
    import skimage.data

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, format="PNG")
    return buffer.getvalue()


def save_small(png: bytes, path: Path) -> None:
    """The screenshot as PNG, reduced to a 256-colour palette when the full colours exceed MAX_BYTES."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    for colors in (None, 256, 128, 64):
        candidate = image if colors is None else image.quantize(colors, method=Image.Quantize.MEDIANCUT)
        buffer = io.BytesIO()
        candidate.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= MAX_BYTES:
            path.write_bytes(buffer.getvalue())
            print(f"{path} ({buffer.tell() // 1024} KB)")
            return
    raise SystemExit(f"{path.name}: cannot get under {MAX_BYTES} bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", help="the running service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--api-key", default=None, help="when the service uses API keys")
    parser.add_argument("--seed", default="7")
    parser.add_argument("--out", type=Path, default=HERE)
    options = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=options.chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(options.url.rstrip("/") + "/playground")
            if options.api_key:
                page.fill("#api-key", options.api_key)
            page.set_input_files(
                "#file", files=[{"name": "astronaut.png", "mimeType": "image/png", "buffer": astronaut_png()}]
            )
            page.wait_for_selector("body[data-state=editing]")
            box = page.locator("#mask").bounding_box()
            for stroke in STROKES:
                points = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in stroke]
                page.mouse.move(*points[0])
                page.mouse.down()
                for x, y in points[1:]:
                    page.mouse.move(x, y, steps=12)
                page.mouse.up()
            page.mouse.move(box["x"] + 0.7 * box["width"], box["y"] + 0.25 * box["height"])  # the brush outline
            page.fill("#seed", options.seed)
            options.out.mkdir(parents=True, exist_ok=True)
            save_small(page.screenshot(), options.out / "playground.png")

            page.click("#remove")
            page.wait_for_selector("#outcome[data-count='1']", timeout=300_000)
            if page.locator("#status.error").count():
                raise SystemExit(f"the removal failed: {page.inner_text('#status')}")
            page.locator("#split").evaluate("r => { r.value = '55'; r.dispatchEvent(new Event('input')); }")
            page.mouse.move(0, 0)
            save_small(page.screenshot(), options.out / "before_after.png")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
