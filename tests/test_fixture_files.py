"""The interop fixtures under tests/fixtures are present, complete and readable without the peer libraries.

Only JSON and safetensors are read; pickles (``.pt``) are inspected with ``pickletools`` / ``zipfile``, never
unpickled. See tests/fixtures/README.md for what each fixture is and how it was made.
"""

from __future__ import annotations

import json
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
SAELENS, VIT_PRISMA = FIXTURES / "saelens", FIXTURES / "vit_prisma"
D_IN, D_SAE, N_ROWS = 16, 64, 32
MAX_FILE_BYTES = 100_000

STD = {"W_enc": [D_IN, D_SAE], "b_enc": [D_SAE], "W_dec": [D_SAE, D_IN], "b_dec": [D_IN]}
TC = {"W_enc": [D_IN, D_SAE], "b_enc": [D_SAE], "W_dec": [D_SAE, 24], "b_dec": [24]}
GATED = {k: v for k, v in STD.items() if k != "b_enc"} | {"b_gate": [D_SAE], "r_mag": [D_SAE], "b_mag": [D_SAE]}
TRAINER_FILES = {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "trainer_state.pt"}
TRAINER_FILES |= {"activation_scaler.json"}

# name -> (cfg.json architecture, tensors {name: shape}, files in the folder, extra tensors in the expected file)
SAELENS_CASES: dict[str, tuple[str, dict[str, list[int]], set[str], set[str]]] = {
    "standard": ("standard", STD, set(), set()),
    "standard_no_b_dec_to_input": ("standard", STD, set(), set()),
    "layer_norm": ("standard", STD, set(), set()),
    "constant_norm_rescale": ("standard", STD, set(), set()),
    "topk": ("topk", STD, set(), set()),
    "jumprelu": ("jumprelu", STD | {"threshold": [D_SAE]}, set(), set()),
    "gated": ("gated", GATED, set(), set()),
    "transcoder": ("transcoder", TC, set(), set()),
    "skip_transcoder": ("skip_transcoder", TC | {"W_skip": [24, D_IN]}, set(), {"decode_only"}),
    "jumprelu_transcoder": ("jumprelu_transcoder", TC | {"threshold": [D_SAE]}, set(), set()),
    "topk_rescaled": ("topk", STD, {"sparsity.safetensors"}, set()),
    "batchtopk": ("jumprelu", STD | {"threshold": [D_SAE]}, {"sparsity.safetensors"}, set()),
    "expected_average_only_in": ("standard", STD, {"sparsity.safetensors"}, set()),
    "topk_training_checkpoint": ("topk", STD, TRAINER_FILES, set()),
    "batchtopk_training_checkpoint": (
        "batchtopk",
        STD | {"topk_threshold": []},
        TRAINER_FILES,
        {"feats_inference", "recon_inference"},
    ),
    "matryoshka_batchtopk_training_checkpoint": (
        "matryoshka_batchtopk",
        STD | {"topk_threshold": []},
        TRAINER_FILES,
        {"feats_inference", "recon_inference"},
    ),
    "expected_average_only_in_checkpoint": ("standard", STD, TRAINER_FILES, {"feats_scaled", "recon_scaled"}),
}

VIT_PRISMA_CASES: dict[str, dict[str, list[int]]] = {
    "relu": STD,
    "topk": STD,
    "gated": GATED | {"b_enc": [D_SAE]},
    "transcoder": STD | {"W_skip": [D_IN, D_IN], "b_dec_out": [D_IN]},
}
GENUINE_GLOBALS = [
    "vit_prisma.sae.config.VisionModelSAERunnerConfig",
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch.FloatStorage",
]


def _check_expected(file: Path, d_out: int, extra: set[str]) -> dict[str, torch.Tensor]:
    """The expected-output file holds x / feats / recon (+ ``extra``) with the right shapes and finite values."""
    tensors = load_file(str(file))
    assert set(tensors) == {"x", "feats", "recon"} | extra, sorted(tensors)
    assert list(tensors["x"].shape) == [N_ROWS, D_IN]
    assert list(tensors["feats"].shape) == [N_ROWS, D_SAE]
    assert list(tensors["recon"].shape) == [N_ROWS, d_out]
    for name, t in tensors.items():
        assert t.dtype == torch.float32 and torch.isfinite(t).all(), name
    assert 4.0 < tensors["x"].norm(dim=-1).mean().item() < 20.0
    return tensors


def _firing(feats: torch.Tensor) -> float:
    return (feats != 0).float().mean().item()


def _pickle_globals(pt_file: Path) -> list[str]:
    """Globals referenced by the ``data.pkl`` of a torch zip archive, read with pickletools (never executed)."""
    with zipfile.ZipFile(pt_file) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        data = archive.read(name)
    ops = list(pickletools.genops(data))
    found: list[str] = []
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            ref = str(arg).replace(" ", ".")
        elif op.name == "STACK_GLOBAL":
            ref = f"{ops[i - 2][1]}.{ops[i - 1][1]}"
        else:
            continue
        if ref not in found:
            found.append(ref)
    return found


@pytest.mark.parametrize("name", sorted(SAELENS_CASES))
def test_saelens_fixture(name: str) -> None:
    arch, shapes, extra_files, extra_tensors = SAELENS_CASES[name]
    folder = SAELENS / name
    assert {p.name for p in folder.iterdir()} == {"cfg.json", "sae_weights.safetensors"} | extra_files
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == arch
    assert cfg["metadata"]["sae_lens_version"] == "6.54.12"
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert {k: list(v.shape) for k, v in weights.items()} == shapes
    d_out = shapes["W_dec"][1]
    expected = _check_expected(SAELENS / f"{name}.expected.safetensors", d_out, extra_tensors)
    feats = expected["feats_scaled" if "feats_scaled" in expected else "feats"]
    assert 0.05 <= _firing(feats) <= 0.30, _firing(feats)
    if "sparsity.safetensors" in extra_files:
        sparsity = load_file(str(folder / "sparsity.safetensors"))
        assert list(sparsity) == ["sparsity"] and list(sparsity["sparsity"].shape) == [D_SAE]
    if "activation_scaler.json" in extra_files:
        scaler = json.loads((folder / "activation_scaler.json").read_text())
        assert set(scaler) == {"scaling_factor", "has_whitening"}


def test_saelens_normalisation_fixtures_say_what_they_are() -> None:
    """The trainer folds the factor into its final output; its mid-training checkpoint keeps it separate."""
    final = json.loads((SAELENS / "expected_average_only_in" / "cfg.json").read_text())
    ckpt_folder = SAELENS / "expected_average_only_in_checkpoint"
    ckpt = json.loads((ckpt_folder / "cfg.json").read_text())
    scale = json.loads((ckpt_folder / "activation_scaler.json").read_text())["scaling_factor"]
    assert final["normalize_activations"] == "none"
    assert ckpt["normalize_activations"] == "expected_average_only_in"
    assert 0.2 < scale < 1.0  # sqrt(16) / mean norm of about 8
    assert json.loads((SAELENS / "layer_norm" / "cfg.json").read_text())["normalize_activations"] == "layer_norm"
    topk_ckpt = json.loads((SAELENS / "topk_training_checkpoint" / "cfg.json").read_text())
    assert topk_ckpt["rescale_acts_by_decoder_norm"] is True
    w_dec = load_file(str(SAELENS / "topk_rescaled" / "sae_weights.safetensors"))["W_dec"]
    torch.testing.assert_close(w_dec.norm(dim=1), torch.ones(D_SAE))  # norms folded in by save_inference_model


@pytest.mark.parametrize("name", sorted(VIT_PRISMA_CASES))
def test_vit_prisma_fixture(name: str) -> None:
    folder = VIT_PRISMA / name
    files = {p.name for p in folder.iterdir()}
    assert files == {"config.json", "n_images_140.pt", "n_images_140_log_feature_sparsity.pt"}
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["d_in"], cfg["expansion_factor"], cfg["_dtype"]) == (D_IN, 4, "float32")
    assert cfg["is_transcoder"] is (name == "transcoder")
    assert _pickle_globals(folder / "n_images_140.pt") == GENUINE_GLOBALS
    with zipfile.ZipFile(folder / "n_images_140.pt") as archive:
        assert archive.testzip() is None
        storages = [i for i in archive.infolist() if "/data/" in i.filename]
    shapes = VIT_PRISMA_CASES[name]  # one float32 storage per state-dict tensor
    assert len(storages) == len(shapes)
    assert sum(i.file_size for i in storages) == 4 * sum(torch.Size(v).numel() for v in shapes.values())
    d_out = cfg["d_out"] if cfg["is_transcoder"] else D_IN
    extra = {"decode_only"} if name == "transcoder" else set()
    expected = _check_expected(VIT_PRISMA / f"{name}.expected.safetensors", d_out, extra)
    assert 0.05 <= _firing(expected["feats"]) <= 0.30


def test_vit_prisma_malicious_fixture_carries_a_payload() -> None:
    folder = VIT_PRISMA / "malicious"
    assert {p.name for p in folder.iterdir()} == {"config.json", "n_images_64.pt"}
    json.loads((folder / "config.json").read_text())
    found = _pickle_globals(folder / "n_images_64.pt")
    assert found[: len(GENUINE_GLOBALS)] == GENUINE_GLOBALS
    assert "io.open" in found
    with zipfile.ZipFile(folder / "n_images_64.pt") as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        assert b"/tmp/prisma_lightning_pwned_marker" in archive.read(name)


def test_fixture_files_are_small() -> None:
    files = [p for p in FIXTURES.rglob("*") if p.is_file()]
    assert len(files) > 50
    too_big = {str(p.relative_to(FIXTURES)): p.stat().st_size for p in files if p.stat().st_size > MAX_FILE_BYTES}
    assert not too_big, too_big
