"""The atlas site and export: escaping, the features.jsonl schema, and the pages in headless Chromium.

The browser tests use Playwright (PyPI) driving the system Chromium (/usr/bin/chromium, as in
``test_attention_browser.py``); outside CI they skip when either is missing. Every request must be a ``file://``
one. The index of a 16,384-feature SAE is opened and its load time printed (not asserted).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from prisma_lightning.atlas import (
    FEATURE_SCHEMA,
    AtlasData,
    FactorSource,
    FeatureAccumulator,
    decoder_neighbours,
    js_json,
    png_bytes,
    validate_feature,
    write_images,
    write_jsonl,
    write_site,
)
from prisma_lightning.metrics.ground_truth import ground_truth_report

CHROMIUM = os.environ.get("PRISMA_CHROMIUM", "/usr/bin/chromium")
HOSTILE = '</script><img src=x onerror="window.pwned=1">&amp;'
LABELS = ["square", HOSTILE, 'heart \u2028 "quoted"']


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


def synthetic_atlas(out: Path, d_sae: int, n_images: int = 96, top_k: int = 6, batch: int = 48) -> AtlasData:
    """An atlas of random sparse features over random images, with hostile label and factor names."""
    gen = torch.Generator().manual_seed(0)
    tokens, grid = 5, (1, 2, 2)  # class token + 2 x 2 patches
    acc = FeatureAccumulator(d_sae, top_k, n_patches=4, patch_start=1, gt_images=n_images, n_factors=2)
    scale = torch.rand(d_sae, generator=gen) * 10  # features of different sizes
    for start in range(0, n_images, batch):
        feats = torch.rand(batch, tokens, d_sae, generator=gen) * scale
        feats *= torch.rand(batch, tokens, d_sae, generator=gen) < min(1.0, 40 / d_sae)
        ids = torch.arange(start, start + batch)
        acc.update(feats, ids, ids % 3, torch.stack([ids % 3, ids % 2], 1))
    factors = FactorSource(
        names=["shape", "side"], sizes=[3, 2], value_names=[LABELS, ["left", "<right>"]],
        classes=lambda ids: np.stack([np.asarray(ids) % 3, np.asarray(ids) % 2], 1),
        source_index=lambda ids: np.asarray(ids) + 1000,
    )  # fmt: skip
    meta = {"modelId": "test<model>", "layer": "blocks.0.hook_resid_post", "tokens": "all", "d_sae": d_sae,
            "sae": "sae<&>", "patch_grid": list(grid)}  # fmt: skip
    directions = torch.randn(d_sae, 8, generator=gen)
    data = AtlasData.from_accumulator(acc, meta, label_names=LABELS, factors=factors,
                                      neighbours=decoder_neighbours(directions, 4))  # fmt: skip
    scores, classes, ids = acc.ground_truth_rows()
    data.ground_truth = ground_truth_report(scores, classes, {"shape": 3, "side": 2}, ids=ids,
                                            top_classes=data.top_classes, ks=(1, 4))  # fmt: skip

    def loader(image_ids: list[int]) -> torch.Tensor:
        return torch.stack([torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in image_ids])

    write_images(data, out, loader)
    write_jsonl(data, out / "features.jsonl")
    write_site(data, out, chunk_size=16, title="Test <atlas> & co")
    return data


@pytest.fixture(scope="module")
def small_atlas(tmp_path_factory) -> tuple[Path, AtlasData]:
    out = tmp_path_factory.mktemp("atlas")
    return out, synthetic_atlas(out, d_sae=40)


def test_js_json_escapes_script_breakers() -> None:
    text = js_json({"name": HOSTILE, "sep": "\u2028\u2029"})
    assert not any(c in text for c in "<>&\u2028\u2029")
    assert "\\u003c/script\\u003e" in text
    assert json.loads(text) == {"name": HOSTILE, "sep": "\u2028\u2029"}


def test_png_bytes_gray_and_rgb() -> None:
    from io import BytesIO

    from PIL import Image

    gray = Image.open(BytesIO(png_bytes(torch.linspace(0, 1, 64 * 64).reshape(1, 64, 64))))
    assert gray.mode == "L" and gray.size == (64, 64)
    rgb = Image.open(BytesIO(png_bytes(torch.rand(3, 300, 200), max_side=128)))
    assert rgb.mode == "RGB" and rgb.size == (85, 128)


def test_features_jsonl_validates_and_matches_the_data(small_atlas) -> None:
    out, data = small_atlas
    lines = (out / "features.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == data.d_sae
    for f, line in enumerate(lines):
        record = json.loads(line)
        assert validate_feature(record) == [], (f, validate_feature(record))
        assert record["index"] == f
        acts = record["activations"]
        assert [a["imageIndex"] for a in acts] == [i for i in data.top_ids[f].tolist() if i >= 0]
        for a in acts:
            assert a["sourceIndex"] == a["imageIndex"] + 1000
            assert (out / a["image"]).is_file()
            assert a["labelName"] == LABELS[a["imageIndex"] % 3]
            assert max(a["values"]) <= a["maxValue"] * (1 + 1e-3)
            assert a["factors"] == {"shape": a["imageIndex"] % 3, "side": a["imageIndex"] % 2}
        assert record["maxActApprox"] == pytest.approx(float(data.summary["max"][f]), rel=1e-5)
        assert sum(record["freq_hist_data_bar_heights"]) == int(round(float(data.summary["frac_nonzero"][f]) *
                                                                         data.meta["n_tokens"]))  # fmt: skip
        assert len(record["topkCosSimIndices"]) == 4 and f not in record["topkCosSimIndices"]
    meta = json.loads(lines[0])
    assert meta["sae"] == "sae<&>" and meta["modelId"] == "test<model>"


def test_schema_validator_reports_errors() -> None:
    assert FEATURE_SCHEMA["properties"]["activations"]["items"]["required"][0] == "imageIndex"
    bad = {"index": -1, "modelId": 3, "extra": True}
    errors = "\n".join(validate_feature(bad))
    for needle in ("missing required field 'layer'", "$.modelId: expected string", "$.index: -1 is below",
                   "unexpected field 'extra'"):  # fmt: skip
        assert needle in errors
    assert validate_feature({"frac_nonzero": float("nan")}, FEATURE_SCHEMA["properties"]["frac_nonzero"])


def test_site_files_escape_everything(small_atlas) -> None:
    out, _ = small_atlas
    for path in list((out / "data").glob("*.js")) + [out / "index.html", out / "feature.html"]:
        text = path.read_text(encoding="utf-8")
        assert "</script><img" not in text and 'onerror="' not in text, path
    assert "Test &lt;atlas&gt; &amp; co" in (out / "index.html").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "assets", "data", "feature.html", "features.jsonl", "ground_truth.html", "images", "index.html",
    ]  # fmt: skip
    assert not list(out.rglob("*.tmp"))


def _open(page, path: Path, requests: list[str], errors: list[str]) -> float:
    start = time.perf_counter()
    page.goto(path.as_uri())
    page.wait_for_function("window.atlasReady === true", timeout=30_000)
    return time.perf_counter() - start


def _page(browser, requests: list[str], errors: list[str]):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def route(r):
        requests.append(r.request.url)
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    return page


def _rows(page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all("#features tbody tr", "rs => rs.map(r => r.dataset.feature)")]


def test_site_in_headless_chromium(small_atlas, tmp_path) -> None:
    executable = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    out, data = small_atlas
    freq = data.summary["frac_nonzero"]
    top_label = [data.label_name(c[0][0]) if c else None for c in data.label_counts()]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            requests: list[str] = []
            errors: list[str] = []
            page = _page(browser, requests, errors)
            _open(page, out / "index.html", requests, errors)
            # Default order: frequency, highest first.
            expected = sorted(range(data.d_sae), key=lambda i: (-float(freq[i]), i))
            assert _rows(page) == expected
            # Sorting by max activation, then reversing it.
            maxes = [float(f"{v:.4g}") for v in data.summary["max"].tolist()]  # the table's 4 digits
            page.click("th[data-key=max]")
            assert _rows(page) == sorted(range(data.d_sae), key=lambda i: (-maxes[i], i))[:100]
            page.click("th[data-key=max]")
            assert _rows(page) == sorted(range(data.d_sae), key=lambda i: (maxes[i], i))[:100]
            assert page.get_attribute("th[data-key=max]", "aria-sort") == "ascending"
            # Filtering by the text of the top label (the hostile one, inserted as text).
            page.fill("#search", "onerror")
            page.wait_for_function(f"document.querySelectorAll('#features tbody tr').length === "
                                   f"{sum(lab == HOSTILE for lab in top_label)}")  # fmt: skip
            assert set(_rows(page)) == {i for i, lab in enumerate(top_label) if lab == HOSTILE}
            assert page.locator("#features tbody td", has_text="</script>").count() > 0
            page.fill("#search", "17")
            page.wait_for_function("document.querySelectorAll('#features tbody tr').length === 1")
            assert _rows(page) == [17]
            page.screenshot(path=str(tmp_path / "atlas_index.png"))

            # A feature page: its top images load, with heatmap overlays and neighbour links.
            feature = int(torch.argmax(freq))
            page.click("#features tbody tr[data-feature='17'] a")
            page.wait_for_function("window.atlasReady === true && document.querySelector('#title')")
            assert page.inner_text("#title") == "Feature 17"
            page.goto((out / "feature.html").as_uri() + f"#{feature}")
            page.wait_for_function(f"window.atlasReady === true && "
                                   f"document.querySelector('#title').textContent === 'Feature {feature}'")  # fmt: skip
            n_top = int((data.top_ids[feature] >= 0).sum())
            page.wait_for_function(f"Array.from(document.querySelectorAll('#top img')).filter("
                                   f"i => i.complete && i.naturalWidth > 0).length === {n_top}")  # fmt: skip
            widths = page.eval_on_selector_all("#top img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == n_top and all(w == 16 for w in widths)
            assert page.locator("#top .heat").count() == n_top
            assert page.locator("#top .heat > div").count() == 4 * n_top
            page.screenshot(path=str(tmp_path / "atlas_feature.png"), full_page=True)
            # Navigating by hash loads another chunk.
            page.evaluate("location.hash = '#39'")
            page.wait_for_function("document.querySelector('#title').textContent === 'Feature 39'")

            # The ground-truth page links each value's best feature.
            page.goto((out / "ground_truth.html").as_uri())
            page.wait_for_function("window.atlasReady === true")
            best = data.ground_truth["factors"]["shape"]["values"][1]["best_feature"]
            cell = page.locator("section[data-factor=shape] tbody tr").nth(1)
            assert cell.locator("a").get_attribute("href") == f"feature.html#{best}"
            assert HOSTILE in cell.inner_text()

            assert page.evaluate("window.pwned") is None  # nothing injected ran
            assert page.locator("img[src=x]").count() == 0
            assert errors == [], errors
            assert requests and all(url.startswith("file://") for url in requests), requests
        finally:
            browser.close()


@pytest.mark.slow
def test_index_of_16k_features_opens(tmp_path) -> None:
    """Opens the index and a feature page of a 16,384-feature atlas; prints the load time (not asserted)."""
    executable = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    out = tmp_path / "atlas16k"
    data = synthetic_atlas(out, d_sae=16384, n_images=96, top_k=4, batch=48)
    assert len(list((out / "data").glob("features_*.js"))) == 16384 // 16
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            requests: list[str] = []
            errors: list[str] = []
            page = _page(browser, requests, errors)
            seconds = _open(page, out / "index.html", requests, errors)
            in_page = page.evaluate("performance.now()")
            assert len(_rows(page)) == 100
            assert page.inner_text("#count") == "16384 of 16384 features"
            start = time.perf_counter()
            page.click("th[data-key=max]")
            sort_seconds = time.perf_counter() - start
            maxes = [float(f"{v:.4g}") for v in data.summary["max"].tolist()]
            assert _rows(page) == sorted(range(data.d_sae), key=lambda i: (-maxes[i], i))[:100]
            page.screenshot(path=str(tmp_path / "atlas16k_index.png"))
            page.goto((out / "feature.html").as_uri() + "#16383")
            page.wait_for_function("window.atlasReady === true")
            assert page.inner_text("#title") == "Feature 16383"
            assert errors == [] and all(url.startswith("file://") for url in requests)
        finally:
            browser.close()
    report = {"index_open_s": seconds, "page_ms_at_ready": in_page, "sort_s": sort_seconds}
    (tmp_path / "timing.json").write_text(json.dumps(report))
    print(f"\n16,384-feature index: opened in {seconds:.3f} s (page clock {in_page:.0f} ms), "
          f"re-sorted in {sort_seconds:.3f} s")  # fmt: skip
