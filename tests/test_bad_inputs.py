"""Bad-input sweep: each mistake a user can make gets a specific exception whose message names the value and the fix.

Table-driven: every case is a function that makes one mistake, the exception type it must raise, a pattern for the
offending value and one for what to do. None of these may surface as a bare traceback from deep inside torch, PIL,
PyAV or jsonargparse. The mistakes a user makes on the command line are also run through `prisma` itself
(`test_cli_errors_are_short`): the whole error must fit in a few lines, with the full traceback only on `--debug`.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_post"
TINY_SAE = {"d_in": 32, "expansion_factor": 2, "architecture": "topk", "k": 4, "hook_name": HOOK}


# ---------------------------------------------------------------------------------------------- helpers
def sae_folder(tmp_path: Path, **cfg) -> Path:
    from prisma_lightning.sae import SAEConfig, SparseAutoencoder

    folder = tmp_path / "sae"
    sae = SparseAutoencoder(SAEConfig(**{**TINY_SAE, **cfg}))
    if sae.cfg.normalize_activations == "expected_norm":
        sae.fit_normalization(torch.randn(64, 32))
    sae.save(folder)
    return folder


def edit_cfg(folder: Path, edit) -> None:
    raw = json.loads((folder / "cfg.json").read_text())
    edit(raw)
    (folder / "cfg.json").write_text(json.dumps(raw))


def load(folder: Path) -> None:
    from prisma_lightning.sae import SparseAutoencoder

    SparseAutoencoder.load(folder)


def fit_online(tmp_path: Path, **module_kw) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from prisma_lightning.modules import SAEModule

    callbacks = module_kw.pop("callbacks", None)
    module = SAEModule(**{"sae": TINY_SAE, "backbone": "test/vit-tiny", "pretrained_backbone": False,
                          "buffer_tokens": 0, "batch_tokens": 68, "init_tokens": 68, **module_kw})  # fmt: skip
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 16, 16), torch.zeros(16, dtype=torch.long)), batch_size=4)
    pl.Trainer(max_steps=2, default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False,
               enable_checkpointing=False, callbacks=callbacks).fit(module, loader, val_dataloaders=loader)  # fmt: skip


def write_images(root: Path, n: int = 2) -> None:
    for split in ("train", "val"):
        folder = root / split / "n01440764"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.JPEG")


# ---------------------------------------------------------------------------------------------- configuration
def unknown_hook(tmp_path):
    from prisma_lightning.backbones import load_hooked_model

    load_hooked_model("test/vit-tiny", pretrained=False).run_with_cache(
        torch.zeros(1, 3, 16, 16), names_filter="blocks.0.hook_resid_pots"
    )


def wrong_d_in(tmp_path):
    fit_online(tmp_path, sae={**TINY_SAE, "d_in": 48})


def unknown_architecture(tmp_path):
    from prisma_lightning.sae import SAEConfig

    SAEConfig(d_in=8, d_sae=16, architecture="top-k")


def k_larger_than_d_sae(tmp_path):
    from prisma_lightning.sae import SAEConfig

    SAEConfig(d_in=8, d_sae=16, architecture="topk", k=32)


def k_negative(tmp_path):
    from prisma_lightning.sae import SAEConfig

    SAEConfig(d_in=8, d_sae=16, architecture="topk", k=-5)


def d_in_as_text(tmp_path):
    from prisma_lightning.sae import SAEConfig

    SAEConfig(d_in="64", architecture="relu")


def tokens_misspelt(tmp_path):
    from prisma_lightning.sae import SAEConfig

    SAEConfig(d_in=8, tokens="patch")


def field_of_another_architecture(tmp_path):
    from prisma_lightning.sae import SAEConfig

    SAEConfig(d_in=8, architecture="jumprelu", l1_coefficient=1e-3)


def nan_coefficient(tmp_path):
    from prisma_lightning.sae import SAEConfig

    SAEConfig(d_in=8, architecture="relu", l1_coefficient=float("nan"))


def matryoshka_prefixes_not_increasing(tmp_path):
    from prisma_lightning.sae import SAEConfig

    SAEConfig(d_in=8, d_sae=32, architecture="matryoshka_batchtopk", k=2, matryoshka_prefixes=[16, 8])


def negative_lr(tmp_path):
    from prisma_lightning.modules import SAEModule

    SAEModule(TINY_SAE, lr=-1e-3)


def infinite_lr(tmp_path):
    from prisma_lightning.modules import SAEModule

    SAEModule(TINY_SAE, lr=float("inf"))


def min_lr_ratio_out_of_range(tmp_path):
    from prisma_lightning.modules import SAEModule

    SAEModule(TINY_SAE, min_lr_ratio=-0.5)


def buffer_smaller_than_two_batches(tmp_path):
    from prisma_lightning.modules import SAEModule

    SAEModule(TINY_SAE, buffer_tokens=100, batch_tokens=64)


def sweep_of_unknown_field(tmp_path):
    from prisma_lightning.modules import SAEModule

    SAEModule({**TINY_SAE}, sweep={"kk": [1, 2]})


def hook_pattern_unclosed(tmp_path):
    from prisma_lightning.modules import SAEModule

    SAEModule(TINY_SAE, hooks="blocks.{0..3.hook_resid_post")


def duplicate_sae_names(tmp_path):
    from prisma_lightning.modules import SAEModule

    SAEModule(TINY_SAE, saes=[{"name": "a"}, {"name": "a", "k": 2}])


def evaluator_zero_batches(tmp_path):
    from prisma_lightning.callbacks import SAEEvaluator

    SAEEvaluator(n_batches=0)


def probe_of_wrong_width(tmp_path):
    from prisma_lightning.callbacks import SAEEvaluator

    save_file({"weight": torch.zeros(10, 7), "bias": torch.zeros(10)}, str(tmp_path / "probe.safetensors"))
    fit_online(
        tmp_path, callbacks=[SAEEvaluator(ce_source="linear_probe", linear_probe=str(tmp_path / "probe.safetensors"))]
    )


def export_dir_not_writable(tmp_path):
    (tmp_path / "locked").write_text("a file where the export folder should go")  # not writable, even as root
    fit_online(tmp_path, export_dir=str(tmp_path / "locked" / "sae"))


def export_into_the_sae_being_fine_tuned(tmp_path):
    folder = sae_folder(tmp_path)
    fit_online(tmp_path, sae=str(folder), export_dir=str(folder))


def memory_budget_exceeded(tmp_path):
    fit_online(tmp_path, buffer_tokens=1 << 16, batch_tokens=68, memory_budget_gb=1e-4)


def empty_validation_split(tmp_path):
    import lightning.pytorch as pl

    from prisma_lightning.callbacks import SAEEvaluator
    from prisma_lightning.datamodules import DSpritesDataModule
    from prisma_lightning.modules import SAEModule

    module = SAEModule(TINY_SAE, backbone="test/vit-tiny", pretrained_backbone=False, buffer_tokens=0,
                       batch_tokens=68, init_tokens=68)  # fmt: skip
    data = DSpritesDataModule(cache=False, subset_size=40, val_fraction=0.0, test_fraction=0.0, image_size=16,
                              channels=3, batch_size=4)  # fmt: skip
    pl.Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, callbacks=[SAEEvaluator()]).fit(module, data)


def diverging_training(tmp_path):
    fit_online(tmp_path, lr=1e30)


def trained_sae_with_another_hook(tmp_path):
    from prisma_lightning.modules import SAEModule

    SAEModule(str(sae_folder(tmp_path)), hook_name="blocks.1.hook_resid_post")


# ---------------------------------------------------------------------------------------------- files
def missing_local_sae_folder(tmp_path):
    from prisma_lightning.modules import SAEModule

    SAEModule("runs/no_such_run/sae")


def malformed_cfg_json(tmp_path):
    folder = sae_folder(tmp_path)
    (folder / "cfg.json").write_text('{"d_in": 8, "d_sae": ')
    load(folder)


def cfg_norm_scale_nan(tmp_path):
    folder = sae_folder(tmp_path, normalize_activations="expected_norm")
    edit_cfg(folder, lambda raw: raw["prisma_lightning"].update(folded_norm_scale_in=float("nan")))
    load(folder)


def cfg_norm_scale_negative(tmp_path):
    folder = sae_folder(tmp_path, normalize_activations="expected_norm")
    edit_cfg(folder, lambda raw: raw["prisma_lightning"].update(folded_norm_scale_out=-2.0))
    load(folder)


def cfg_k_zero(tmp_path):
    folder = sae_folder(tmp_path)
    edit_cfg(folder, lambda raw: raw["prisma_lightning"]["config"].update(k=0))
    load(folder)


def cfg_d_in_as_text(tmp_path):
    folder = sae_folder(tmp_path)
    edit_cfg(folder, lambda raw: raw["prisma_lightning"]["config"].update(d_in="32"))
    load(folder)


def saelens_cfg_d_sae_negative(tmp_path):
    folder = sae_folder(tmp_path)
    edit_cfg(folder, lambda raw: (raw.pop("prisma_lightning"), raw.update(d_sae=-64)))
    load(folder)


def saelens_cfg_unknown_architecture(tmp_path):
    folder = sae_folder(tmp_path)
    edit_cfg(folder, lambda raw: (raw.pop("prisma_lightning"), raw.update(architecture="standrad")))
    load(folder)


def nan_in_the_weights(tmp_path):
    folder = sae_folder(tmp_path)
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["W_dec"][3, 1] = float("nan")
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    load(folder)


def weights_of_another_shape(tmp_path):
    folder = sae_folder(tmp_path)
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["W_enc"] = torch.zeros(32, 65)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    load(folder)


class _NotATensor:
    pass


def pickle_instead_of_safetensors(tmp_path):
    folder = sae_folder(tmp_path)
    torch.save({"W_enc": _NotATensor()}, folder / "sae_weights.safetensors")
    load(folder)


def truncated_vit_prisma_checkpoint(tmp_path):
    torch.save({"state_dict": {"W_enc": torch.zeros(8, 16)}}, tmp_path / "n_images_64.pt")
    path = tmp_path / "n_images_64.pt"
    path.write_bytes(path.read_bytes()[:150])
    config = {"d_in": 8, "expansion_factor": 2, "hook_point_layer": 0, "layer_subtype": "hook_resid_post"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    load(tmp_path)


def truncated_model_weights(tmp_path):
    from prisma_lightning.backbones import HookedViT, load_hooked_model

    load_hooked_model("test/vit-tiny", pretrained=False).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    HookedViT.from_pretrained(tmp_path)


def truncated_checkpoint(tmp_path):
    from prisma_lightning.checkpoint_io import AtomicCheckpointIO
    from prisma_lightning.cli import check_checkpoint

    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(1000)}}, tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt").write_bytes((tmp_path / "last.ckpt").read_bytes()[:500])
    check_checkpoint(str(tmp_path / "last.ckpt"), None)


def missing_activation_folder(tmp_path):
    from prisma_lightning.datamodules import ActivationDataModule

    ActivationDataModule(str(tmp_path / "acts" / HOOK)).setup("fit")


def batch_larger_than_the_cache(tmp_path):
    from prisma_lightning.activations import ShardWriter
    from prisma_lightning.datamodules import ActivationDataModule

    writer = ShardWriter(tmp_path / "acts", d=4, tokens_per_image=2)
    writer.add(torch.randn(20, 4), 10)
    writer.close()
    ActivationDataModule(str(tmp_path / "acts"), batch_size=4096).setup("fit")


def hooks_from_different_caching_runs(tmp_path):
    from prisma_lightning.activations import ShardWriter
    from prisma_lightning.datamodules import ActivationDataModule

    for hook, per_shard in ((HOOK, 4), ("blocks.1.hook_resid_post", 5)):
        writer = ShardWriter(tmp_path / hook, d=4, tokens_per_image=2, images_per_shard=per_shard)
        writer.add(torch.randn(40, 4), 20)
        writer.close()
    ActivationDataModule(str(tmp_path), batch_size=8, hooks=[HOOK, "blocks.1.hook_resid_post"]).setup("fit")


# ---------------------------------------------------------------------------------------------- data
def missing_data_folder(tmp_path):
    from prisma_lightning.datamodules import ImageNetDataModule

    ImageNetDataModule(str(tmp_path / "no_such_imagenet"), num_workers=0).setup("fit")


def empty_class_folder(tmp_path):
    from prisma_lightning.datamodules import ImageNetDataModule

    write_images(tmp_path, n=1)
    (tmp_path / "train" / "n01443537").mkdir()
    (tmp_path / "val" / "n01443537").mkdir()
    ImageNetDataModule(str(tmp_path), num_workers=0).setup("fit")


def corrupt_jpeg(tmp_path):
    from prisma_lightning.datamodules import ImageNetDataModule

    write_images(tmp_path, n=1)
    good = tmp_path / "train" / "n01440764" / "0.JPEG"
    (good.parent / "broken.JPEG").write_bytes(good.read_bytes()[:40])
    dm = ImageNetDataModule(str(tmp_path), num_workers=0, on_bad_image="raise")
    dm.setup("fit")
    for i in range(len(dm.train_set)):
        dm.train_set[i]


def truncated_mp4(tmp_path):
    from prisma_lightning.datamodules import VideoClipDataModule
    from prisma_lightning.datamodules.video import write_moving_sprites

    write_moving_sprites(tmp_path / "v", n_per_class=1, frames=8, size=32, seed=0, fps=8)
    for path in sorted((tmp_path / "v").rglob("*.mp4")):
        path.write_bytes(path.read_bytes()[:300])
    dm = VideoClipDataModule(str(tmp_path / "v"), frames=4, image_size=32, val_fraction=0.0, test_fraction=0.0,
                             on_bad_video="raise")  # fmt: skip
    dm.setup("fit")
    dm.train_set[0]


def grayscale_into_rgb_model(tmp_path):
    from prisma_lightning.backbones import load_hooked_model

    load_hooked_model("test/vit-tiny", pretrained=False)(torch.zeros(2, 1, 16, 16))


def nan_activations_into_shards(tmp_path):
    from prisma_lightning.activations import ShardWriter

    ShardWriter(tmp_path, d=2, tokens_per_image=1).add(torch.tensor([[float("nan"), 1.0]]), 1)


def nan_images_into_training(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from prisma_lightning.modules import SAEModule

    images = torch.randn(16, 3, 16, 16)
    images[5] = float("nan")
    module = SAEModule(TINY_SAE, backbone="test/vit-tiny", pretrained_backbone=False, buffer_tokens=0,
                       batch_tokens=68, init_tokens=68)  # fmt: skip
    loader = DataLoader(TensorDataset(images, torch.zeros(16)), batch_size=4)
    pl.Trainer(max_steps=4, default_root_dir=tmp_path, logger=False, enable_progress_bar=False).fit(module, loader)


def hub_repo_id_without_owner(tmp_path):
    from prisma_lightning.callbacks import HubUploader

    HubUploader("my-sae")


def resume_without_a_checkpoint(tmp_path):
    from prisma_lightning.cli import PrismaCLI

    PrismaCLI(args=["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.default_root_dir",
                    str(tmp_path / "fresh"), "--ckpt_path", "last"])  # fmt: skip


CASES = [
    # (mistake, exception, the value named, the fix named)
    (unknown_hook, KeyError, r"blocks\.0\.hook_resid_pots", r"Closest valid names: \['blocks\.0\.hook_resid_post'"),
    (wrong_d_in, ValueError, r"expects width 48.*has width 32", r"set d_in=32"),
    (unknown_architecture, ValueError, r"architecture='top-k'", r"choose one of \['relu', 'topk'"),
    (k_larger_than_d_sae, ValueError, r"k=32", r"0 < k <= d_sae=16.*lower k or raise d_sae"),
    (k_negative, ValueError, r"got -5", r"k must be an integer >= 1"),
    (d_in_as_text, ValueError, r"got '64' \(str\)", r"d_in must be an integer"),
    (tokens_misspelt, ValueError, r"'patch'", r"must be one of \['all', 'cls', 'patches'\]"),
    (field_of_another_architecture, ValueError, r"'l1_coefficient'", r"its fields: .*'l0_coefficient'"),
    (nan_coefficient, ValueError, r"got nan", r"l1_coefficient must be a finite number"),
    (matryoshka_prefixes_not_increasing, ValueError, r"\[16, 8\]", r"strictly increasing.*e\.g\."),
    (negative_lr, ValueError, r"lr=-0\.001", r"positive finite number; a typical SAE learning rate is 4e-4"),
    (infinite_lr, ValueError, r"lr=inf", r"positive finite number"),
    (min_lr_ratio_out_of_range, ValueError, r"min_lr_ratio=-0\.5", r"must be in \[0, 1\]"),
    (buffer_smaller_than_two_batches, ValueError, r"buffer_tokens=100", r"raise it or set buffer_tokens=0"),
    (sweep_of_unknown_field, ValueError, r"'kk'", r"did you mean 'k'\?"),
    (hook_pattern_unclosed, ValueError, r"'blocks\.\{0\.\.3\.hook_resid_post'", r"range like \{0\.\.11\}"),
    (duplicate_sae_names, ValueError, r"named 'a'", r"give them distinct `name`s"),
    (evaluator_zero_batches, ValueError, r"n_batches=0", r"positive number of batches, or null"),
    (probe_of_wrong_width, ValueError, r"takes 7 features but the backbone .* outputs 10", r"train the probe"),
    (export_dir_not_writable, OSError, r"locked/sae", r"set export_dir .* to a writable folder"),
    (export_into_the_sae_being_fine_tuned, ValueError, r"is the trained SAE it was loaded from",
     r"set export_dir to another folder"),
    (memory_budget_exceeded, MemoryError, r"needs about .* GiB", r"lower buffer_tokens"),
    (empty_validation_split, ValueError, r"validation split is empty", r"Raise val_fraction"),
    (diverging_training, FloatingPointError, r"diverged at step \d+", r"Lower lr"),
    (trained_sae_with_another_hook, ValueError, r"hook_name='blocks\.0\.hook_resid_post'",
     r"drop the hook_name argument"),
    (missing_local_sae_folder, FileNotFoundError, r"'runs/no_such_run/sae'", r"relative to the current directory"),
    (malformed_cfg_json, ValueError, r"cfg\.json is not valid JSON", r"re-save the SAE or fix the file"),
    (cfg_norm_scale_nan, ValueError, r"'folded_norm_scale_in' .* got nan", r"must be a positive finite number"),
    (cfg_norm_scale_negative, ValueError, r"'folded_norm_scale_out' .* got -2\.0", r"positive finite number"),
    (cfg_k_zero, ValueError, r"cfg\.json: field 'prisma_lightning\.config'.*got 0", r"k must be an integer >= 1"),
    (cfg_d_in_as_text, ValueError, r"cfg\.json.*got '32' \(str\)", r"d_in must be an integer"),
    (saelens_cfg_d_sae_negative, ValueError, r"cfg\.json: field 'd_sae'.*-64", r"must be a positive integer"),
    (saelens_cfg_unknown_architecture, ValueError, r"'architecture'='standrad'", r"known: \[.*'standard'"),
    (nan_in_the_weights, ValueError, r"tensor 'W_dec' holds NaN", r"the SAE is broken"),
    (weights_of_another_shape, ValueError, r"'W_enc' has shape \[32, 65\]", r"expected \[32, 64\]"),
    (pickle_instead_of_safetensors, ValueError, r"sae_weights\.safetensors", r"not a readable safetensors file"),
    (truncated_vit_prisma_checkpoint, ValueError, r"n_images_64\.pt", r"not a readable PyTorch checkpoint"),
    (truncated_model_weights, ValueError, r"model\.safetensors is truncated", r"re-download|save it again|delete"),
    (truncated_checkpoint, ValueError, r"last\.ckpt is truncated or corrupt", r"delete it and resume"),
    (missing_activation_folder, FileNotFoundError, r"acts/blocks\.0\.hook_resid_post", r"prisma predict"),
    (batch_larger_than_the_cache, ValueError, r"holds 20 rows, fewer than one batch of 4096", r"lower batch_size"),
    (hooks_from_different_caching_runs, ValueError, r"do not hold the same rows per shard",
     r"written by the same caching run"),
    (missing_data_folder, FileNotFoundError, r"no_such_imagenet", r"[Dd]ownload|expected|root"),
    (empty_class_folder, ValueError, r"n01443537 contains no images", r"[Aa]dd images|remove"),
    (corrupt_jpeg, RuntimeError, r"broken\.JPEG", r"Replace or delete the file, or pass on_bad_image='skip'"),
    (truncated_mp4, RuntimeError, r"\.mp4", r"on_bad_video='skip'"),
    (grayscale_into_rgb_model, ValueError, r"got 1", r"Expected 3 input channels"),
    (nan_activations_into_shards, ValueError, r"Non-finite activations", r"NaN/inf"),
    (nan_images_into_training, ValueError, r"non-finite activations .* 'blocks\.0\.hook_resid_post'",
     r"check the backbone's inputs"),
    (hub_repo_id_without_owner, ValueError, r"'my-sae'", r"'<user or org>/<name>'"),
    (resume_without_a_checkpoint, ValueError, r"no last\.ckpt under .*fresh", r"Drop --ckpt_path to start a new run"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "error", "value", "fix"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_gets_a_clear_error(tmp_path: Path, case, error, value: str, fix: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as info:
        case(tmp_path)
    message = str(info.value.args[0]) if isinstance(info.value, KeyError) else str(info.value)
    import re

    assert re.search(value, message, re.S), f"the message does not name the value ({value}):\n{message}"
    assert re.search(fix, message, re.S), f"the message does not say what to do ({fix}):\n{message}"


def test_the_sweep_covers_forty_mistakes() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_images_of_other_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    from prisma_lightning.datamodules.imagenet import load_rgb

    if mode == "I;16":
        array = np.full((4, 4), 65535, dtype=np.uint16)
        Image.fromarray(array).save(tmp_path / "x.png")
    else:
        Image.new(mode, (4, 4), 255 if mode == "L" else (255, 255, 255, 255)).save(tmp_path / "x.png")
    img = load_rgb(str(tmp_path / "x.png"))
    assert img.mode == "RGB" and np.asarray(img).min() == 255  # full white stays white (16-bit is scaled)


# ---------------------------------------------------------------------------------------------- through prisma
def quickstart(tmp_path: Path, edit=None) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["model"]["init_args"]["backbone"] = str(ROOT / cfg["model"]["init_args"]["backbone"])
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    if edit is not None:
        edit(cfg)
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sae(cfg):
    return cfg["model"]["init_args"]["sae"]


CLI_CASES = [
    ("yaml_key_typo", lambda c: _sae(c).update(expansion_factr=_sae(c).pop("expansion_factor")), [],
     r"expansion_factr.*did you mean 'expansion_factor'"),
    ("module_key_typo", lambda c: c["model"]["init_args"].update(lrr=c["model"]["init_args"].pop("lr")), [],
     r"lrr.*did you mean 'lr'"),
    ("architecture_typo", lambda c: _sae(c).update(architecture="topkk"), [], r"'topkk'.*did you mean 'topk'"),
    ("k_negative", lambda c: _sae(c).update(k=-5), [], r"k must be an integer >= 1, got -5"),
    ("lr_infinite", lambda c: c["model"]["init_args"].update(lr=float("inf")), [], r"lr=inf must be a positive"),
    ("missing_sae_folder", None, ["--model.init_args.sae", "runs/x/sae"], r"No SAE at 'runs/x/sae'"),
    ("no_checkpoint_to_resume", None, ["--ckpt_path", "last"], r"no last\.ckpt under .*runs"),
    ("missing_checkpoint_file", None, ["--ckpt_path", "nope.ckpt"], r"Checkpoint nope\.ckpt does not exist"),
    ("unknown_hook", lambda c: _sae(c).update(hook_name="blocks.1.hook_resid_pst"), [],
     r"blocks\.1\.hook_resid_pst.*blocks\.1\.hook_resid_post"),
    ("unknown_data_option", lambda c: c["data"]["init_args"].update(subset_sise=10), [], r"did you mean 'subset_size'"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "edit", "extra", "expected"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_errors_are_short(tmp_path, monkeypatch, name, edit, extra, expected) -> None:
    """Through `prisma`: exit status 1 or 2, the point in at most 15 lines, no traceback unless --debug."""
    import re

    from prisma_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    config = quickstart(tmp_path, edit)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--trainer.max_steps", "1", *extra])
    text = err.getvalue()
    assert exit_info.value.code in (1, 2)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) <= 15, text
    assert "Traceback" not in text and re.search(expected, text, re.S | re.I), text
    assert not (tmp_path / "runs" / "lightning_logs").exists() or name in ("unknown_hook",)
