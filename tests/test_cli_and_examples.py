"""The `prisma` console script, `python -m prisma_lightning`, and the example scripts run."""

from __future__ import annotations

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_prisma_console_script_help() -> None:
    exe = shutil.which("prisma", path=str(Path(sys.executable).parent))
    assert exe is not None, "the `prisma` console script is not installed beside this Python"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "{fit,validate,test,predict}" in result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["predict", "--help"]])
def test_python_dash_m_help(argv: list[str], monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["prisma", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("prisma_lightning", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if argv[0] == "fit":
        assert "--trainer.max_steps" in out and "--model" in out


def test_hooks_demo_runs(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["hooks_demo.py", "--model", "test/vit-tiny-reg"])
    runpy.run_path(str(ROOT / "examples" / "hooks_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "blocks.0.attn.hook_pattern" in out and "(2, 4, 19, 19)" in out
    assert "equal to the cache: True" in out


def test_top_level_folders_have_readmes() -> None:
    for folder in ("configs", "callbacks", "datamodules", "examples", "tests"):
        assert (ROOT / folder / "README.md").is_file(), folder
