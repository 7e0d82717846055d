"""The interactive attention page in headless Chromium: it loads cleanly, draws, and follows the mouse.

Uses Playwright (PyPI) driving the system Chromium (Debian's ``chromium`` package at /usr/bin/chromium); no browser
is downloaded. Outside CI the test skips when either is missing; with ``CI=true`` it must run. To run it locally:
``apt-get install chromium`` (Debian/Ubuntu) or ``PRISMA_CHROMIUM=/path/to/chrome``, and ``pip install playwright``
(part of the ``dev`` extra).
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_

from prisma_lightning.backbones import TEST_CONFIGS, HookedViT, HookedViTConfig
from prisma_lightning.interp import save_attention_html

DEFAULT_CHROMIUM = "/usr/bin/chromium"
HOSTILE_TITLE = '<!--<script> </script><b>__DATA__</b> & __TITLE__ "q" \u2028'


def _browser_or_skip() -> str:
    """The Chromium executable to drive; skips (fails with ``CI=true``) saying what to install when it is missing."""
    chromium = os.environ.get("PRISMA_CHROMIUM", DEFAULT_CHROMIUM)
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append(
            "the playwright package: pip install playwright (it is in the dev extra: pip install -e '.[dev]')"
        )
    if not (Path(chromium).is_file() or shutil.which(chromium)):
        missing.append(
            f"a Chromium binary, none at {chromium}: apt-get install chromium (Debian/Ubuntu), "
            "or set PRISMA_CHROMIUM=/path/to/chrome"
        )
    if missing:
        reason = "the headless-browser test needs " + "; and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}; .ci/run installs both.")
        pytest.skip(reason)
    return chromium


def test_skip_reason_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setenv("PRISMA_CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # the import fails as if not installed
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        _browser_or_skip()
    reason = str(skipped.value)
    for needed in (
        "pip install playwright",
        "dev extra",
        "apt-get install chromium (Debian/Ubuntu)",
        "PRISMA_CHROMIUM=/path/to/chrome",
        "/nonexistent/chromium",
    ):
        assert needed in reason, (needed, reason)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but the headless-browser test needs"):
        _browser_or_skip()


def _image_stats(png: bytes) -> tuple[float, int]:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20) or []
    pixels = torch.tensor(list(img.getdata()), dtype=torch.float32)
    return float(pixels.std()), len(colors)


@pytest.fixture(scope="module")
def model_and_image() -> tuple[HookedViT, torch.Tensor]:
    torch.manual_seed(0)
    cfg = HookedViTConfig.from_dict(TEST_CONFIGS["test/vit-tiny-reg"].to_dict())
    model = randomize_(HookedViT(cfg)).eval()
    return model, torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def page_file(tmp_path_factory, model_and_image) -> Path:
    model, image = model_and_image
    return save_attention_html(tmp_path_factory.mktemp("attn") / "attention.html", model, image, display_size=320)


@pytest.fixture(scope="module")
def hostile_page_file(tmp_path_factory, model_and_image) -> Path:
    model, image = model_and_image
    folder = tmp_path_factory.mktemp("attn_hostile")
    return save_attention_html(folder / "attention.html", model, image, display_size=320, title=HOSTILE_TITLE)


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


def test_attention_page_with_a_hostile_title_still_works(hostile_page_file: Path) -> None:
    executable = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            errors: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(hostile_page_file.as_uri())
            page.wait_for_function("window.prismaAttention && window.prismaAttention.ready", timeout=10_000)

            # The title shows literally, in the heading and the tab; nothing it contains became markup or script.
            assert page.evaluate("document.getElementById('title').textContent") == HOSTILE_TITLE
            assert page.evaluate("document.title") == HOSTILE_TITLE
            assert page.evaluate("document.querySelectorAll('script').length") == 2
            assert page.evaluate("document.querySelectorAll('b').length") == 0

            # Hovering still shows attention: the query follows the mouse and the overlay changes.
            view = page.locator("#view")
            box = view.bounding_box()
            assert box is not None
            cell = box["width"] / 4
            page.mouse.move(box["x"] + 0.5 * cell, box["y"] + 0.5 * cell)
            first, q1 = view.screenshot(), view.get_attribute("data-query")
            page.mouse.move(box["x"] + 2.5 * cell, box["y"] + 3.5 * cell)
            second, q2 = view.screenshot(), view.get_attribute("data-query")
            assert (q1, q2) == ("3", str(3 + 3 * 4 + 2)) and first != second
            assert "patch (3, 2)" in page.locator("#query").inner_text()
            assert errors == [], errors
        finally:
            browser.close()
