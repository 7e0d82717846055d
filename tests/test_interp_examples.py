"""Every interpretability example runs (in-process, tiny settings) and writes its figures and pages."""

from __future__ import annotations

import re
import runpy
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["logit_lens", "direct_logit_attribution", "activation_patching", "attention_viz", "sae_features"]


def run_example(name: str, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_help(name: str, monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_example(name, ["--help"], monkeypatch, capsys)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--out" in out


def test_logit_lens_example(tmp_path, monkeypatch, capsys) -> None:
    out = run_example("logit_lens", ["--clip-model", "tiny", "--out", str(tmp_path)], monkeypatch, capsys)
    assert "last entry equals the model's logits: True" in out
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {
        "logit_lens_heatmap.png",
        "logit_lens_patches.png",
        "emoji_logit_lens.png",
        "emoji_logit_lens.html",
    }
    assert 'class="cell"' in (tmp_path / "emoji_logit_lens.html").read_text(encoding="utf-8")


def test_direct_logit_attribution_example(tmp_path, monkeypatch, capsys) -> None:
    out = run_example("direct_logit_attribution", ["--out", str(tmp_path)], monkeypatch, capsys)
    error = float(re.search(r"\|sum of contributions - logit\| = ([0-9.e+-]+)", out).group(1))
    assert error < 1e-4
    assert {p.name for p in tmp_path.iterdir()} == {"dla_predicted.png", "dla_logit_diff.png"}


@pytest.mark.parametrize("extra", [[], ["--model", "test/video-tiny"]])
def test_activation_patching_example(extra: list[str], tmp_path, monkeypatch, capsys) -> None:
    out = run_example("activation_patching", [*extra, "--out", str(tmp_path)], monkeypatch, capsys)
    assert "clean into clean: largest change of the metric 0.00e+00" in out
    restored, gap = re.search(r"whole final residual restores ([0-9.e+-]+) of ([0-9.e+-]+)", out).groups()
    assert restored == gap
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
