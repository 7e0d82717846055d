"""Every interpretability example runs (in-process, tiny settings) and writes its figures and pages.

The numbers the examples print are checked on the objects they computed (recorded by wrapping the library
functions they call), never by matching printed text.
"""

from __future__ import annotations

import re
import runpy
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

import prisma_lightning.interp as interp

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["logit_lens", "direct_logit_attribution", "activation_patching", "attention_viz", "sae_features"]


def run_example(name: str, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="__main__")
    return capsys.readouterr().out


def record(monkeypatch, name: str) -> list[tuple[tuple, dict[str, Any], Any]]:
    """Wrap ``prisma_lightning.interp.<name>`` so every call's (args, kwargs, result) is kept for the test."""
    calls: list[tuple[tuple, dict[str, Any], Any]] = []
    real = getattr(interp, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(interp, name, wrapper)
    return calls


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help(name: str, monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_example(name, ["--help"], monkeypatch, capsys)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--out" in out


def test_logit_lens_example(tmp_path, monkeypatch, capsys) -> None:
    lenses = record(monkeypatch, "logit_lens")
    run_example("logit_lens", ["--clip-model", "tiny", "--out", str(tmp_path)], monkeypatch, capsys)
    (model, images), kwargs, lens = lenses[0]  # the dSprites ViT
    with torch.no_grad():
        assert_close(lens.pooled_logits[-1], model(images).float(), atol=1e-5, rtol=1e-5)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {
        "logit_lens_heatmap.png",
        "logit_lens_patches.png",
        "emoji_logit_lens.png",
        "emoji_logit_lens.html",
    }
    assert 'class="cell"' in (tmp_path / "emoji_logit_lens.html").read_text(encoding="utf-8")


def test_direct_logit_attribution_example(tmp_path, monkeypatch, capsys) -> None:
    results = record(monkeypatch, "direct_logit_attribution")
    run_example("direct_logit_attribution", ["--out", str(tmp_path)], monkeypatch, capsys)
    assert len(results) == 2  # the predicted class, then the logit difference
    for _, _, dla in results:
        assert_close(dla.total, dla.logit, atol=1e-4, rtol=0)  # the parts sum to the logit
    assert {p.name for p in tmp_path.iterdir()} == {"dla_predicted.png", "dla_logit_diff.png"}


@pytest.mark.parametrize("extra", [[], ["--model", "test/video-tiny"]])
def test_activation_patching_example(extra: list[str], tmp_path, monkeypatch, capsys) -> None:
    runs = record(monkeypatch, "activation_patching")
    run_example("activation_patching", [*extra, "--out", str(tmp_path)], monkeypatch, capsys)
    same = next(result for args, _, result in runs if args[1] is args[2])  # clean patched into clean
    final = next(result for _, kwargs, result in runs if kwargs.get("by") == "all" and "resid_post" in kwargs["hook"])
    # Patched copies run in batches of up to --batch-patches inputs, the unpatched baseline in a batch of its own;
    # CPU matmul kernels sum in an order that depends on the batch size, so identical inputs can give metrics a
    # few float32 ulps apart (eps = 1.2e-7 relative: 9.5e-7 was seen on logits of about 20). 1e-5 relative to the
    # metric's scale allows ~80 ulps of such rounding while a patch that changed anything real moves the metric
    # by a visible fraction of the clean-corrupted gap (checked below to be far larger than the tolerance).
    scale = max(1.0, abs(same.baseline), abs(final.source), abs(final.baseline))
    tol = 1e-5 * scale
    assert abs(final.source - final.baseline) > 1000 * tol
    assert_close(same.values, torch.full_like(same.values, same.baseline), atol=tol, rtol=0)
    assert same.source == same.baseline  # the same unpatched run, computed the same way
    # The whole final residual stream carries everything: the patched run reproduces the source run's metric.
    assert_close(final.values, torch.tensor([final.source]), atol=tol, rtol=0)
    assert {p.name for p in tmp_path.iterdir()} == {"patching_resid_pre.png", "patching_heads.png"}


def test_attention_viz_example(tmp_path, monkeypatch, capsys) -> None:
    run_example("attention_viz", ["--out", str(tmp_path)], monkeypatch, capsys)
    page = (tmp_path / "attention.html").read_text(encoding="utf-8")
    assert "window.prismaAttention" in page and "http://" not in page and "https://" not in page
    assert (tmp_path / "attention_heads.png").stat().st_size > 1000


def test_sae_features_example(tmp_path, monkeypatch, capsys) -> None:
    argv = ["--images", "64", "--steps", "10", "--features", "2", "--k", "3", "--out", str(tmp_path)]
    out = run_example("sae_features", argv, monkeypatch, capsys)
    error_term = float(re.search(r"with the error term: ([0-9.e+-]+)", out).group(1))
    assert error_term < 1e-4
    assert "over 32 images" in out
    assert (tmp_path / "sae_top_images.png").stat().st_size > 1000
