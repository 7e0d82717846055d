"""SAEEvaluator: table values on constructed SAEs (perfect, zero), CE sources, eval.json, prisma validate."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from prisma_lightning.backbones import load_hooked_model
from prisma_lightning.callbacks import SAEEvaluator
from prisma_lightning.modules import SAEModule
from prisma_lightning.sae import SAEConfig, SparseAutoencoder

HOOK = "blocks.0.hook_resid_post"


def constructed_sae(kind: str, d: int = 32, tokens: str = "all") -> SparseAutoencoder:
    """``perfect``: relu(x) - relu(-x) == x exactly; ``zero``: reconstructs 0."""
    cfg = SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_name=HOOK, tokens=tokens, b_dec_init="zeros",
                    apply_b_dec_to_input=False, decoder_norm="free")  # fmt: skip
    sae = SparseAutoencoder(cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0) if kind == "perfect" else torch.zeros(2 * d, d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def labelled_images(n=32, size=16, n_classes=10):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=gen)
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def evaluate(tmp_path, sae, evaluator=None, backbone=None, tokens="all"):
    backbone = backbone or load_hooked_model("test/vit-tiny", pretrained=False)
    module = SAEModule(sae, backbone=backbone, tokens=tokens, export_dir=str(tmp_path / "sae"))
    evaluator = evaluator or SAEEvaluator(n_batches=None)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[evaluator], enable_progress_bar=False, logger=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.validate(module, labelled_images())
    return evaluator.results


def test_perfect_sae_recovers_everything(tmp_path) -> None:
    results = evaluate(tmp_path, constructed_sae("perfect"))
    assert results["explained_variance_pct"] == pytest.approx(100.0, abs=1e-4)
    assert results["cos_sim"] == pytest.approx(1.0, abs=1e-6)
    assert results["recon_cos_sim"] == pytest.approx(1.0, abs=1e-6)
    assert results["ce_recovered_pct"] == pytest.approx(100.0, abs=1e-3)
    assert results["ce_recon"] == pytest.approx(results["ce_clean"], abs=1e-5)
    assert results["l0"] == pytest.approx(32.0, abs=0.5)  # every coordinate is non-zero in one half
    assert results["cls_l0"] == pytest.approx(32.0, abs=0.5)
    saved = json.loads((tmp_path / "sae" / "eval.json").read_text())
    assert saved["ce_recovered_pct"] == pytest.approx(results["ce_recovered_pct"])
    assert (tmp_path / "sae" / "sparsity.safetensors").is_file()


def test_zero_sae_recovers_nothing(tmp_path) -> None:
    results = evaluate(tmp_path, constructed_sae("zero"))
    assert results["ce_recovered_pct"] == pytest.approx(0.0, abs=1e-3)
    assert results["ce_recon"] == pytest.approx(results["ce_zero"], abs=1e-5)
    assert results["explained_variance_pct"] < 0  # predicting 0 is worse than predicting the mean


def test_patch_tokens_only_splice_patches(tmp_path) -> None:
    results = evaluate(tmp_path, constructed_sae("perfect", tokens="patches"), tokens="patches")
    assert results["cls_l0"] is None  # the SAE never sees the class token
    assert results["ce_recovered_pct"] == pytest.approx(100.0, abs=1e-3)


def test_without_ce_source_the_rest_is_reported_with_a_reason(tmp_path) -> None:
    backbone = load_hooked_model("test/vit-tiny", pretrained=False)
    backbone.cfg.head = "none"
    backbone.head = None
    results = evaluate(tmp_path, constructed_sae("perfect"), backbone=backbone)
    assert results["ce_recovered_pct"] is None
    assert "no classifier head" in results["ce_source"]
    assert results["explained_variance_pct"] == pytest.approx(100.0, abs=1e-4)


def test_linear_probe_ce_source(tmp_path) -> None:
    backbone = load_hooked_model("test/vit-tiny", pretrained=False)
    probe = tmp_path / "probe.safetensors"
    save_file({"weight": backbone.head.weight.detach().clone(), "bias": backbone.head.bias.detach().clone()},
              str(probe))  # fmt: skip
    backbone.cfg.head = "none"
    head = backbone.head
    backbone.head = None
    evaluator = SAEEvaluator(n_batches=None, ce_source="linear_probe", linear_probe=str(probe))
    results = evaluate(tmp_path, constructed_sae("zero"), evaluator=evaluator, backbone=backbone)
    assert "linear probe" in results["ce_source"]
    assert results["ce_recovered_pct"] == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="linear_probe=<path"):
        SAEEvaluator(ce_source="linear_probe")
    assert head is not None


def test_prisma_validate_on_a_saved_sae_folder(tmp_path, capsys) -> None:
    from prisma_lightning.cli import PrismaCLI

    folder = constructed_sae("perfect").save(tmp_path / "my_sae")
    load_hooked_model("test/vit-tiny", pretrained=False).save_pretrained(tmp_path / "backbone")
    args = [
        "validate",
        "--model", "prisma_lightning.modules.SAEModule",
        "--model.sae", str(folder),
        "--model.backbone", str(tmp_path / "backbone"),
        "--trainer.callbacks+", "prisma_lightning.callbacks.SAEEvaluator",
        "--trainer.callbacks.n_batches", "2",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--data", "prisma_lightning.datamodules.DSpritesDataModule",
        "--data.cache", "false",
        "--data.subset_size", "200",
        "--data.image_size", "16",
        "--data.channels", "3",
        "--data.batch_size", "16",
    ]  # fmt: skip
    PrismaCLI(args=args)
    saved = json.loads((folder / "eval.json").read_text())  # written next to the evaluated SAE
    assert saved["explained_variance_pct"] == pytest.approx(100.0, abs=1e-3)
    assert saved["ce_recovered_pct"] == pytest.approx(100.0, abs=1e-3)
    assert "% CE recovered" in capsys.readouterr().out


def test_fit_ends_with_an_evaluation_of_the_final_sae(tmp_path, capsys) -> None:
    backbone = load_hooked_model("test/vit-tiny", pretrained=False)
    cfg = SAEConfig(d_in=32, expansion_factor=4, architecture="topk", k=4, hook_name=HOOK, b_dec_init="mean")
    module = SAEModule(cfg, backbone=backbone, buffer_tokens=0, batch_tokens=136, init_tokens=136,
                       export_dir=str(tmp_path / "sae"))  # fmt: skip
    evaluator = SAEEvaluator(n_batches=2)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[evaluator], enable_progress_bar=False, max_steps=3,
                         limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    loader = labelled_images()
    trainer.fit(module, loader, val_dataloaders=loader)
    assert evaluator.results["global_step"] == 3
    assert 0 < evaluator.results["l0"] <= 4
    assert "% CE recovered" in capsys.readouterr().out
    assert json.loads((tmp_path / "sae" / "eval.json").read_text())["global_step"] == 3
