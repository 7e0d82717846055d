"""The interactive attention page in headless Chromium: it loads cleanly, draws, and follows the mouse.

Uses Playwright (PyPI) driving the system Chromium (Debian's ``chromium`` package at /usr/bin/chromium); no browser
is downloaded. Outside CI the test skips when either is missing; with ``CI=true`` it must run.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import randomize_

from prisma_lightning.backbones import TEST_CONFIGS, HookedViT, HookedViTConfig
from prisma_lightning.interp import save_attention_html

CHROMIUM = os.environ.get("PRISMA_CHROMIUM", "/usr/bin/chromium")


def _browser_or_skip() -> str:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing.append(f"a Chromium binary at {CHROMIUM} (apt-get install chromium, or set PRISMA_CHROMIUM)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}; .ci/run installs both.")
        pytest.skip(reason)
    return CHROMIUM


def _image_stats(png: bytes) -> tuple[float, int]:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20) or []
    pixels = torch.tensor(list(img.getdata()), dtype=torch.float32)
    return float(pixels.std()), len(colors)


@pytest.fixture(scope="module")
def page_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = HookedViTConfig.from_dict(TEST_CONFIGS["test/vit-tiny-reg"].to_dict())
    model = randomize_(HookedViT(cfg)).eval()
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    return save_attention_html(tmp_path_factory.mktemp("attn") / "attention.html", model, image, display_size=320)


def test_attention_page_in_headless_chromium(page_file: Path) -> None:
    executable = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            errors: list[str] = []
            requests: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(page_file.as_uri())
            page.wait_for_function("window.prismaAttention && window.prismaAttention.ready", timeout=10_000)

            # The page drew something: the screenshot is not blank.
            std, n_colors = _image_stats(page.screenshot())
            assert std > 5.0 and n_colors > 20, (std, n_colors)

            # Hovering two different patches moves the query and changes the overlay.
            view = page.locator("#view")
            box = view.bounding_box()
            assert box is not None and box["width"] >= 300
            cell = box["width"] / 4  # a 4 x 4 patch grid
            page.mouse.move(box["x"] + 0.5 * cell, box["y"] + 0.5 * cell)
            first, q1 = view.screenshot(), view.get_attribute("data-query")
            page.mouse.move(box["x"] + 2.5 * cell, box["y"] + 3.5 * cell)
            second, q2 = view.screenshot(), view.get_attribute("data-query")
            assert (q1, q2) == ("3", str(3 + 3 * 4 + 2))  # 3 prefix tokens, then row-major patches
            assert first != second
            assert "patch (3, 2)" in page.locator("#query").inner_text()

            # The head selector redraws the overlay for the same query.
            page.select_option("#head", "2")
            third = view.screenshot()
            assert third != second and "head 2" in page.locator("#query").inner_text()
            page.select_option("#scale", "range")
            assert view.screenshot() != third  # min-to-max colour scale stretches the same weights
            page.select_option("#head", "-1")
            assert "mean of heads" in page.locator("#query").inner_text()

            assert errors == [], errors
            assert all(url.startswith(("file:", "data:", "about:")) for url in requests), requests
        finally:
            browser.close()
