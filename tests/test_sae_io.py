"""SAE files: native round trips (bitwise), SAELens folders, ViT-Prisma checkpoints, refusal of pickled objects,
readable errors for broken files, sparsity files and the Hub entry point (with the download function faked)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prisma_lightning.sae import (
    ARCHITECTURES,
    SAEConfig,
    SparseAutoencoder,
    Transcoder,
    TranscoderConfig,
    config_class,
    load_sparsity,
)
from prisma_lightning.sae import io as sae_io

D_IN, D_SAE = 8, 32


def randomized(sae: SparseAutoencoder) -> SparseAutoencoder:
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if name != "log_threshold" else p.add_(torch.rand_like(p))
        if hasattr(sae, "running_threshold"):
            sae.running_threshold.fill_(0.123)
    return sae


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


def make_config(arch: str, **kw) -> SAEConfig:
    if "k" in {f.name for f in dataclasses.fields(config_class(arch))}:
        kw.setdefault("k", 3)
    return SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, **kw)


@pytest.mark.parametrize("norm", ["none", "layer_norm"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip_is_bitwise(arch: str, norm: str, tmp_path: Path) -> None:
    cfg = make_config(
        arch, hook_name="blocks.4.hook_resid_post", model_name="test/vit-tiny", normalize_activations=norm,
        context_size=50,
    )  # fmt: skip
    sae = randomized(SparseAutoencoder(cfg))
    sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for key, value in sae.file_tensors().items():
        assert torch.equal(loaded.file_tensors()[key], value), key
    if arch == "jumprelu":
        torch.testing.assert_close(loaded.log_threshold, sae.log_threshold)
    # the saved file itself round-trips bitwise (save(load(f)) == f)
    loaded.save(tmp_path / "again")
    first, second = file_tensors(tmp_path / "sae"), file_tensors(tmp_path / "again")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    x = torch.randn(16, D_IN)
    sae.eval(), loaded.eval()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert not list((tmp_path / "sae").glob(".*.tmp")), "atomic writes must not leave temporary files"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_expected_norm_is_folded_into_the_file_and_unfolds_for_training(arch: str, tmp_path: Path) -> None:
    sae = randomized(SparseAutoencoder(make_config(arch, normalize_activations="expected_norm")))
    x = 7 * torch.randn(64, D_IN) + 1
    scale = sae.fit_normalization(x)
    sae.save(tmp_path / "sae")
    assert sae.cfg.normalize_activations == "expected_norm"  # saving folds a copy, not the SAE itself
    raw = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert raw["normalize_activations"] == "none"  # what SAELens applies: nothing, the factor is in the weights
    assert raw["prisma_lightning"]["folded_norm_scale_in"] == pytest.approx(scale)
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.cfg.normalize_activations == "none" and loaded.folded_norm_scales is not None
    sae.eval(), loaded.eval()
    # raw weights applied to raw activations reconstruct what the trained SAE does
    torch.testing.assert_close(loaded(x).recon, sae(x).recon, atol=1e-4, rtol=1e-5)
    # matching pursuit keeps unit atoms (as SAELens requires), so its folded features carry the factor instead
    expected = sae.encode(x) / scale if arch == "matching_pursuit" else sae.encode(x)
    torch.testing.assert_close(loaded.encode(x), expected, atol=1e-4, rtol=1e-5)
    loaded.unfold_activation_norm()  # fine-tuning: back to the training form
    assert loaded.cfg.normalize_activations == "expected_norm" and loaded.cfg == sae.cfg
    for name, p in sae.named_parameters():
        torch.testing.assert_close(getattr(loaded, name), p, atol=1e-6, rtol=1e-5, msg=name)
    assert float(loaded.norm_scale_in) == pytest.approx(float(sae.norm_scale_in))


def test_cfg_json_speaks_saelens(tmp_path: Path) -> None:
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=5, hook_name="blocks.7.hook_mlp_out")
    SparseAutoencoder(cfg).save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    assert raw["architecture"] == "topk" and raw["k"] == 5 and raw["activation_fn_kwargs"] == {"k": 5}
    assert raw["hook_name"] == "blocks.7.hook_mlp_out" and raw["hook_layer"] == 7 and raw["d_sae"] == D_SAE
    assert raw["prisma_lightning"]["config"]["architecture"] == "topk"
    tensors = file_tensors(tmp_path)
    assert tensors["W_enc"].shape == (D_IN, D_SAE) and tensors["W_dec"].shape == (D_SAE, D_IN)
    # a BatchTopK SAE is written as a SAELens JumpReLU with its running threshold broadcast
    sae = randomized(SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="batchtopk", k=2)))
    sae.save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert torch.equal(file_tensors(tmp_path / "b")["threshold"], torch.full((D_SAE,), 0.123))


def test_transcoder_round_trip(tmp_path: Path) -> None:
    cfg = TranscoderConfig(
        d_in=D_IN,
        d_out=5,
        d_sae=D_SAE,
        skip_connection=True,
        apply_b_dec_to_input=True,
        hook_name="blocks.1.ln2.hook_normalized",
        hook_name_out="blocks.1.hook_mlp_out",
    )
    tc = randomized(Transcoder(cfg))
    tc.save(tmp_path)
    assert file_tensors(tmp_path)["W_skip"].shape == (5, D_IN)  # SAELens' [d_out, d_in] layout
    loaded = SparseAutoencoder.load(tmp_path)
    assert isinstance(loaded, Transcoder) and loaded.cfg == cfg
    # SAELens transcoders have no input bias: the file folds it into b_enc, b_enc - W_enc^T b_in
    torch.testing.assert_close(loaded.b_enc, tc.b_enc - tc.W_enc.t() @ tc.b_in)
    assert not loaded.b_in.any()
    for name, p in tc.named_parameters():
        if name not in ("b_enc", "b_in"):
            assert torch.equal(getattr(loaded, name), p), name
    x = torch.randn(16, D_IN)
    tc.eval(), loaded.eval()
    torch.testing.assert_close(loaded.encode(x), tc.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.decode(loaded.encode(x), x), tc.decode(tc.encode(x), x), atol=1e-5, rtol=1e-5)
    SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE)).save(tmp_path / "plain")
    with pytest.raises(ValueError, match="holds a ReLUSAE, not a Transcoder"):
        Transcoder.load(tmp_path / "plain")


def test_sparsity_round_trip(tmp_path: Path) -> None:
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE))
    log_density = torch.log10(torch.rand(D_SAE) + 1e-6)
    sae.save(tmp_path, sparsity=log_density)
    assert torch.equal(load_sparsity(tmp_path), log_density)
    assert load_sparsity(tmp_path / "missing") is None
    with pytest.raises(ValueError, match=r"sparsity must have shape \[d_sae\]=\[32\]"):
        sae.save(tmp_path, sparsity=torch.zeros(3))


def write_saelens_folder(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))


def saelens_tensors(d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    return {
        "W_enc": torch.randn(d_in, d_sae),
        "W_dec": torch.randn(d_sae, d_in),
        "b_enc": torch.randn(d_sae),
        "b_dec": torch.randn(d_in),
    }


def test_saelens_v5_standard_folder_loads(tmp_path: Path) -> None:
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        "hook_name": "blocks.3.hook_resid_pre",
        "hook_layer": 3,
        "model_name": "gpt2-small",
        "context_size": 128,
        "dtype": "float32",
        "device": "cuda",  # where it was trained; loading defaults to the CPU
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": "3.0",
    }
    t = saelens_tensors()
    write_saelens_folder(tmp_path, cfg, t)
    sae = SparseAutoencoder.load(tmp_path)
    assert sae.cfg.architecture == "relu" and sae.cfg.hook_name == "blocks.3.hook_resid_pre"
    assert sae.W_enc.device.type == "cpu" and sae.cfg.device == "cpu"
    x = torch.randn(10, D_IN)
    torch.testing.assert_close(sae.encode(x), torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]))


def test_saelens_v6_jumprelu_and_topk_folders_load(tmp_path: Path) -> None:
    t = saelens_tensors()
    t["threshold"] = torch.rand(D_SAE)
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": "blocks.0.hook_resid_post", "model_name": "m", "sae_lens_version": "6.5.0"},
    }
    write_saelens_folder(tmp_path / "j", cfg, t)
    sae = SparseAutoencoder.load(tmp_path / "j")
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.hook_name == "blocks.0.hook_resid_post"
    # a float32 log-threshold cannot hold every float32 threshold exactly: equal to within an ulp
    torch.testing.assert_close(sae.threshold, t["threshold"], rtol=2e-7, atol=0)
    x = torch.randn(10, D_IN)
    pre = x @ t["W_enc"] + t["b_enc"]
    torch.testing.assert_close(sae.encode(x), pre * (pre > sae.threshold))
    cfg_topk = {**cfg, "architecture": "topk", "k": 3}
    del t["threshold"]
    write_saelens_folder(tmp_path / "t", cfg_topk, t)
    assert SparseAutoencoder.load(tmp_path / "t").cfg.k == 3


def vit_prisma_config(**kw) -> dict:
    cfg = {
        "model_name": "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
        "hook_point_layer": 9,
        "layer_subtype": "hook_resid_post",
        "context_size": 50,
        "d_in": D_IN,
        "expansion_factor": 4,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "architecture": "standard",
        "normalize_activations": "layer_norm",
        "b_dec_init_method": "geometric_median",
        "_dtype": "float32",
        "_device": "cuda",
        "cls_token_only": False,
        "use_patches_only": False,
        "is_transcoder": False,
        "l1_coefficient": 1e-5,
    }
    cfg.update(kw)
    return cfg


def vit_prisma_encode(t: dict[str, torch.Tensor], x: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """ViT-Prisma's StandardSparseAutoencoder.encode, restated: layer norm, centre, project, activation."""
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    x_n = xc / (xc.std(-1, keepdim=True) + 1e-5)
    pre = (x_n - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if k is None:
        return torch.relu(pre)
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, v.relu())


@pytest.mark.parametrize(("name", "nested", "topk"), [("weights.pt", False, False), ("n_images_520028.pt", True, True)])
def test_vit_prisma_checkpoint_loads_and_encodes_the_same(tmp_path: Path, name: str, nested: bool, topk: bool) -> None:
    t = saelens_tensors()
    cfg = vit_prisma_config(activation_fn_str="topk", activation_fn_kwargs={"k": 3}) if topk else vit_prisma_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "n_images_1000.pt").write_bytes(b"an older checkpoint, never read")
    torch.save({"state_dict": t} if nested else t, tmp_path / name)
    for path in (tmp_path, tmp_path / name):
        sae = SparseAutoencoder.load(path)
        assert sae.cfg.hook_name == "blocks.9.hook_resid_post" and sae.cfg.d_sae == 4 * D_IN
        assert sae.cfg.architecture == ("topk" if topk else "relu") and sae.cfg.normalize_activations == "layer_norm"
        x = 5 * torch.randn(12, D_IN) + 1
        torch.testing.assert_close(sae.encode(x), vit_prisma_encode(t, x, 3 if topk else None))


@pytest.mark.parametrize(("field", "value"), [("activation_fn_str", "tanh-relu"), ("architecture", "crosscoder")])
def test_vit_prisma_unknown_architecture_names_the_field(tmp_path: Path, field: str, value: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(vit_prisma_config(**{field: value})))
    torch.save(saelens_tensors(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=rf"field '{field}'='{value}' names no registered architecture.*gated"):
        SparseAutoencoder.load(tmp_path)


def test_vit_prisma_transcoder_maps_biases_and_skip(tmp_path: Path) -> None:
    t = saelens_tensors()
    t["W_dec"] = torch.randn(D_SAE, 6)
    t["b_dec_out"], t["W_skip"] = torch.randn(6), torch.randn(6, D_IN)
    cfg = vit_prisma_config(
        is_transcoder=True,
        d_out=6,
        normalize_activations="none",
        d_sae=D_SAE,
        out_hook_point_layer=9,
        layer_out_subtype="hook_mlp_out",
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(t, tmp_path / "weights.pt")
    tc = SparseAutoencoder.load(tmp_path)
    assert isinstance(tc, Transcoder) and tc.cfg.hook_name_out == "blocks.9.hook_mlp_out"
    x = torch.randn(4, D_IN)
    f = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    expected = f @ t["W_dec"] + t["b_dec_out"] + x @ t["W_skip"].T
    torch.testing.assert_close(tc(x, torch.zeros(4, 6)).recon, expected, atol=1e-5, rtol=1e-5)


class Payload:
    """A pickled object whose reconstruction would run a command (what a malicious checkpoint carries)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclasses.dataclass
class RunnerConfig:
    """Stands in for ViT-Prisma's pickled runner config (a class this process cannot import when loading)."""

    d_in: int = D_IN
    hook_point: str = "blocks.9.hook_resid_post"


def test_pickled_objects_become_inert_data_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "config.json").write_text(json.dumps(vit_prisma_config(normalize_activations="none")))
    t = saelens_tensors()
    torch.save({"cfg": RunnerConfig(), "evil": Payload(marker), "state_dict": t}, tmp_path / "n_images_64.pt")
    sae = SparseAutoencoder.load(tmp_path)
    assert not marker.exists(), "a pickled __reduce__ was executed"
    torch.testing.assert_close(sae.W_enc, t["W_enc"])
    from prisma_lightning.sae.pickle_reader import Inert, read_config, read_pickle

    data = read_pickle(tmp_path / "n_images_64.pt")
    assert isinstance(data["evil"], Inert) and data["evil"].qualname == "posix.system"
    assert read_config(tmp_path / "n_images_64.pt") == {"d_in": D_IN, "hook_point": "blocks.9.hook_resid_post"}
    assert not marker.exists()


def test_broken_files_raise_errors_that_name_file_and_field(tmp_path: Path) -> None:
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE))
    sae.save(tmp_path)
    t = file_tensors(tmp_path)
    save_file({**t, "W_enc": torch.zeros(D_IN, D_SAE + 1)}, str(tmp_path / "sae_weights.safetensors"))
    shape_error = r"sae_weights\.safetensors: tensor 'W_enc' has shape \[8, 33\], expected \[8, 32\]"
    with pytest.raises(ValueError, match=shape_error):
        SparseAutoencoder.load(tmp_path)
    save_file({k: v for k, v in t.items() if k != "b_enc"}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: missing tensor 'b_enc'"):
        SparseAutoencoder.load(tmp_path)
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    raw = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(raw)[:-10])
    with pytest.raises(ValueError, match=r"cfg\.json is not valid JSON"):
        SparseAutoencoder.load(tmp_path)
    raw["prisma_lightning"]["config"]["k_sparse"] = 3
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    unknown = r"cfg\.json: field 'prisma_lightning\.config': Unknown ReLUConfig fields 'k_sparse'"
    with pytest.raises(ValueError, match=unknown):
        SparseAutoencoder.load(tmp_path)
    del raw["prisma_lightning"], raw["d_in"]
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"cfg\.json: missing field 'd_in'"):
        SparseAutoencoder.load(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors is not a readable safetensors file"):
        SparseAutoencoder.load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither cfg.json"):
        SparseAutoencoder.load(tmp_path / "empty")


def test_vit_prisma_config_errors_name_the_field(tmp_path: Path) -> None:
    torch.save(saelens_tensors(), tmp_path / "weights.pt")
    (tmp_path / "config.json").write_text(json.dumps(vit_prisma_config(normalize_activations="constant_norm_rescale")))
    with pytest.raises(ValueError, match=r"config\.json: field 'normalize_activations'='constant_norm_rescale'"):
        SparseAutoencoder.load(tmp_path)
    cfg = vit_prisma_config()
    del cfg["expansion_factor"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: missing field 'expansion_factor'"):
        SparseAutoencoder.load(tmp_path)


def test_from_pretrained_downloads_through_hub_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sae = randomized(SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=2)))
    sae.save(tmp_path / "repo" / "layer_3")
    calls = []

    def fake_download(repo_id, filename, revision=None, subfolder=None):
        calls.append((repo_id, filename, revision, subfolder))
        path = tmp_path / "repo" / (subfolder or "") / filename
        if not path.exists():
            raise FileNotFoundError(f"{filename!r} was not found in {repo_id!r}")
        return str(path)

    monkeypatch.setattr(sae_io, "hub_download", fake_download)
    loaded = SparseAutoencoder.from_pretrained("someone/saes", subfolder="layer_3", revision="main")
    assert torch.equal(loaded.W_dec, sae.W_dec)
    assert ("someone/saes", "cfg.json", "main", "layer_3") in calls
    # a ViT-Prisma repo: no cfg.json, but config.json + weights.pt
    (tmp_path / "repo" / "prisma").mkdir()
    (tmp_path / "repo" / "prisma" / "config.json").write_text(json.dumps(vit_prisma_config()))
    torch.save(saelens_tensors(), tmp_path / "repo" / "prisma" / "weights.pt")
    assert SparseAutoencoder.from_pretrained("someone/saes", subfolder="prisma").cfg.hook_name.startswith("blocks.9")
    with pytest.raises(FileNotFoundError, match="found neither cfg.json"):
        SparseAutoencoder.from_pretrained("someone/saes", subfolder="nothing")


def test_from_pretrained_offline_error_is_readable() -> None:
    with pytest.raises(FileNotFoundError, match="prisma-test/no-such-sae-repo"):
        SparseAutoencoder.from_pretrained("prisma-test/no-such-sae-repo")


def test_vit_prisma_gated_checkpoint_ignores_its_unused_b_enc(tmp_path: Path) -> None:
    t = saelens_tensors()  # ViT-Prisma's GatedSparseAutoencoder also stores a b_enc it never uses
    t.update(b_gate=torch.randn(D_SAE), r_mag=0.1 * torch.randn(D_SAE), b_mag=torch.randn(D_SAE))
    (tmp_path / "config.json").write_text(
        json.dumps(vit_prisma_config(architecture="gated", normalize_activations="none"))
    )
    torch.save(t, tmp_path / "weights.pt")
    sae = SparseAutoencoder.load(tmp_path)
    assert sae.cfg.architecture == "gated" and not hasattr(sae, "b_enc")
    x = torch.randn(6, D_IN)
    x_c = x - t["b_dec"]
    gate = (x_c @ t["W_enc"] + t["b_gate"] > 0).float()
    torch.testing.assert_close(sae.encode(x), gate * torch.relu(x_c @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]))


def test_saelens_batchtopk_training_checkpoint_loads(tmp_path: Path) -> None:
    t = {**saelens_tensors(), "topk_threshold": torch.tensor(0.25, dtype=torch.float64)}
    cfg = {
        "architecture": "batchtopk",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": 3.0,
        "dtype": "float32",
        "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0"},
    }
    write_saelens_folder(tmp_path, cfg, t)
    sae = SparseAutoencoder.load(tmp_path)
    assert sae.cfg.architecture == "batchtopk" and sae.cfg.k == 3 and sae.running_threshold.item() == 0.25


def test_sae_package_imports_only_torch_and_safetensors() -> None:
    code = (
        "import sys, prisma_lightning.sae\n"
        "heavy = {'timm', 'transformers', 'huggingface_hub', 'lightning', 'open_clip', 'torchvision'}\n"
        "loaded = sorted(m for m in sys.modules\n"
        "                if m.split('.')[0] in heavy or m.startswith('prisma_lightning.backbones'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
