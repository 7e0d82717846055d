"""The interpretability tools' HTML pages stay intact whatever text they show, and every file they write is atomic.

HTML: a title or class name such as ``</script>``, ``<!--<script>`` or a template placeholder (``__DATA__``) must
show literally and leave the page's structure and data unchanged. Files: a writer that fails midway leaves the
previous file as it was and no temporary file behind.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from helpers import randomize_

from prisma_lightning.backbones import TEST_CONFIGS, HookedViT, HookedViTConfig
from prisma_lightning.interp import (
    attention_html,
    emoji_logit_lens_html,
    logit_lens,
    plot_top_activating,
    save_attention_html,
    save_emoji_logit_lens_html,
    save_figure,
    save_top_activating,
    top_activating,
)
from prisma_lightning.interp._common import fill_template, script_json
from prisma_lightning.sae import SAEConfig, SparseAutoencoder
from prisma_lightning.utils import atomic_write_text, save_figure_atomic, save_image_atomic

HOSTILE = [
    "<!--<script>",
    "</script><script>window.pwned = 1</script>",
    "</SCRIPT >",
    "__DATA__ and __TITLE__",
    "a & b > c < d \"quoted\" 'single' &amp; \u2028line\u2029para",
    "<!--<script> __DATA__ </script> -->",
]


class PageParser(HTMLParser):
    """Collects what a browser would see: the <title> text, every <script> element, and the lens cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.title = ""
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.cells: list[tuple[str | None, str]] = []
        self.captions: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack.append(tag)
        attributes = dict(attrs)
        if tag == "script":
            self.scripts.append((attributes, ""))
        elif tag == "div" and attributes.get("class") == "cell":
            self.cells.append((attributes.get("title"), ""))
        elif tag == "figcaption":
            self.captions.append("")

    def handle_endtag(self, tag: str) -> None:
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        current = self.stack[-1] if self.stack else ""
        if current == "title":
            self.title += data
        elif current == "script":
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)
        elif current == "div" and self.cells:
            title, text = self.cells[-1]
            self.cells[-1] = (title, text + data)
        elif current == "figcaption":
            self.captions[-1] += data


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def assert_valid_script_data(text: str) -> None:
    """The HTML standard's restrictions on a <script> element's text: nothing a browser would read as the end of
    the element (``</script``) or as the start of an escaped section that swallows the real end (``<!--``,
    ``<script``)."""
    lowered = text.lower()
    for bad in ("<!--", "<script", "</script"):
        assert bad not in lowered, f"{bad!r} in script text {text[:200]!r}"


@pytest.fixture(scope="module")
def vit() -> HookedViT:
    cfg = HookedViTConfig.from_dict(TEST_CONFIGS["test/vit-tiny-reg"].to_dict())
    return randomize_(HookedViT(cfg)).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))


def payload_of(page: str) -> dict:
    parsed = parse(page)
    payloads = [text for attrs, text in parsed.scripts if attrs.get("id") == "payload"]
    assert len(payloads) == 1, parsed.scripts
    return json.loads(payloads[0])


# ---------------------------------------------------------------------------------------------- attention page
@pytest.mark.parametrize("title", HOSTILE)
def test_attention_page_with_a_hostile_title_parses_to_the_given_data(vit, image, title: str) -> None:
    reference = payload_of(attention_html(vit, image, title="plain"))
    page = attention_html(vit, image, title=title)
    parsed = parse(page)
    # Exactly the template's two scripts: the JSON payload, then the viewer, which is intact.
    assert [attrs.get("id") for attrs, _ in parsed.scripts] == ["payload", None]
    payload_text, viewer = parsed.scripts[0][1], parsed.scripts[1][1]
    assert "window.prismaAttention" in viewer and viewer.rstrip().endswith("})();")
    assert_valid_script_data(payload_text)
    data = json.loads(payload_text)
    assert data == {**reference, "title": title}  # everything else is unchanged
    assert parsed.title == title  # <title> shows the text literally, placeholders included
    assert page.count("__DATA__") == title.count("__DATA__") * 2  # only the title's own (in <title> and JSON)


def test_script_json_round_trips_and_has_no_markup() -> None:
    value = {"t": HOSTILE, "emoji": "🐕 naïve", "lone": "\ud800"}
    text = script_json(value)
    assert json.loads(text) == value
    assert not re.search("[<>&\u2028\u2029]", text) and text.isascii()


def test_fill_template_substitutes_each_placeholder_once() -> None:
    template = "<title>__TITLE__</title><p>__DATA__</p>"
    out = fill_template(template, {"__TITLE__": "__DATA__", "__DATA__": "__TITLE__"})
    assert out == "<title>__DATA__</title><p>__TITLE__</p>"
    with pytest.raises(ValueError, match="__MISSING__"):
        fill_template(template, {"__MISSING__": "x"})


# ---------------------------------------------------------------------------------------------- emoji lens page
def test_emoji_lens_page_shows_hostile_names_and_emoji_literally() -> None:
    cfg = HookedViTConfig(d_model=32, n_layers=2, n_heads=4, image_size=16, patch_size=4, n_classes=4)
    m = randomize_(HookedViT(cfg)).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    names = [f'{HOSTILE[i]} " onmouseover="x{i}' for i in range(4)]
    emoji = [f"<b>{i}</b>{HOSTILE[i + 1]}" for i in range(4)]
    lens = logit_lens(m, x, class_names=names)
    page = emoji_logit_lens_html(lens, x, layers=[-1], emoji=emoji)
    parsed = parse(page)
    assert parsed.scripts == [] and "onmouseover=" not in re.sub(r'title="[^"]*"', "", page)
    probs = lens.patch_logits[-1, 0].softmax(-1)
    top_p, top_i = probs.max(-1)
    expected = [(f"{names[c]} ({p:.2f})", emoji[c]) for p, c in zip(top_p.tolist(), top_i.tolist(), strict=True)]
    assert parsed.cells == expected
    assert parsed.captions == [lens.layer_labels[-1]]


# ---------------------------------------------------------------------------------------------- atomic writes
def _partial_then_fail(target_of, calls: list):
    """A stand-in writer: writes half of some bytes where it was told to, then fails like a full disk."""

    def writer(self, *args, **kwargs):
        target = target_of(self, *args)
        calls.append((target, kwargs))
        with Path(target).open("wb") as f:
            f.write(b"\x89PNG partial output")
        raise OSError(28, "No space left on device")

    return writer


def _assert_untouched(folder: Path, name: str, before: bytes) -> None:
    assert (folder / name).read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [name]  # no temporary file left behind


def test_attention_and_lens_pages_are_written_atomically(vit, image, tmp_path, monkeypatch) -> None:
    path = save_attention_html(tmp_path / "attention.html", vit, image, title="first")
    before = path.read_bytes()
    calls: list = []
    fail = _partial_then_fail(lambda self, *a: self, calls)
    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space"):
        patch.setattr(Path, "write_bytes", fail)
        patch.setattr(Path, "write_text", fail)
        save_attention_html(path, vit, image, title="second")
    assert calls and calls[0][0] != path  # the writer was given a temporary file, not the target
    _assert_untouched(tmp_path, "attention.html", before)
    assert payload_of(path.read_text(encoding="utf-8"))["title"] == "first"
    assert payload_of(save_attention_html(path, vit, image, title="second").read_text("utf-8"))["title"] == "second"

    cfg = HookedViTConfig(d_model=32, n_layers=1, n_heads=4, image_size=16, patch_size=4, n_classes=3)
    m = randomize_(HookedViT(cfg)).eval()
    lens = logit_lens(m, image, class_names=["a", "b", "c"])
    lens_dir = tmp_path / "lens"
    page = save_emoji_logit_lens_html(lens_dir / "lens.html", lens, image, emoji=["1", "2", "3"])
    before = page.read_bytes()
    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space"):
        patch.setattr(Path, "write_bytes", fail)
        patch.setattr(Path, "write_text", fail)
        save_emoji_logit_lens_html(page, lens, image, emoji=["x", "y", "z"])
    _assert_untouched(lens_dir, "lens.html", before)


def test_figures_are_written_atomically_in_the_format_of_the_suffix(vit, tmp_path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=16, hook_name="blocks.0.hook_resid_post")).eval()
    batches = [(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(s)), torch.zeros(4)) for s in (1, 2)]
    result = top_activating(sae, vit, batches, [0, 3], k=2)
    path = save_top_activating(result, tmp_path / "grid.png")
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG\r\n\x1a\n")
    calls: list = []
    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space"):
        patch.setattr(Figure, "savefig", _partial_then_fail(lambda self, fname, *a: fname, calls))
        save_top_activating(result, path, dpi=50)
    assert calls[0][1]["format"] == "png" and Path(calls[0][0]) != path
    _assert_untouched(tmp_path, "grid.png", before)

    # The format follows the target's suffix, not the temporary file's name.
    fig = plot_top_activating(result)
    assert save_figure(fig, tmp_path / "f.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in save_figure(fig, tmp_path / "f.svg").read_bytes()[:400]
    assert save_figure_atomic(fig, tmp_path / "f.JPG", dpi=30).read_bytes().startswith(b"\xff\xd8")
    with pytest.raises(ValueError, match="suffix"):
        save_figure(fig, tmp_path / "no_suffix")
    with pytest.raises(ValueError, match="'xyz'"):
        save_figure(fig, tmp_path / "f.xyz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.JPG", "f.pdf", "f.svg", "grid.png"]


def test_image_and_text_helpers_are_atomic(tmp_path, monkeypatch) -> None:
    from PIL import Image

    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    path = save_image_atomic(images, tmp_path / "grid.png", nrow=2)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG") and Image.open(path).size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    calls: list = []
    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space"):
        patch.setattr(Image.Image, "save", _partial_then_fail(lambda self, fp, *a: fp, calls))
        save_image_atomic(images.flip(0), path)
    assert calls[0][1]["format"] == "PNG"
    _assert_untouched(tmp_path, "grid.png", before)
    jpg = save_image_atomic(images[0], tmp_path / "one.jpeg")
    assert jpg.read_bytes().startswith(b"\xff\xd8")
    with pytest.raises(ValueError, match="'.tmp'"):
        save_image_atomic(images[0], tmp_path / "x.tmp")

    text = atomic_write_text(tmp_path / "sub" / "a.json", json.dumps({"é": 1}))
    assert json.loads(text.read_text(encoding="utf-8")) == {"é": 1}
