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
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())  # the validate run's folder
    assert saved["ce_recovered_pct"] == pytest.approx(results["ce_recovered_pct"])
    assert (tmp_path / "eval" / "sparsity.safetensors").is_file()


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


def half_sae(d: int = 32) -> SparseAutoencoder:
    """Reconstructs the first half of the coordinates exactly and zeroes the rest: CE lands between the two ends."""
    sae = constructed_sae("perfect", d)
    with torch.no_grad():
        sae.W_dec[:, d // 2 :] = 0
    return sae


def hand_computed_ce(backbone, classifier, sae) -> dict[str, float]:
    """Mean CE of the classifier's logits clean / with the SAE's reconstruction spliced in / with zeros, computed
    straight from hooks and ``F.cross_entropy`` over the same data as :func:`labelled_images`."""
    sums = {"clean": 0.0, "recon": 0.0, "zero": 0.0}
    n = 0
    with torch.no_grad():
        for images, labels in labelled_images():
            logits = {
                "clean": classifier(backbone(images)),
                "recon": classifier(backbone.run_with_hooks(images, fwd_hooks=[(HOOK, lambda a, hook: sae(a).recon)])),
                "zero": classifier(backbone.run_with_hooks(images, fwd_hooks=[(HOOK, lambda a, hook: a * 0)])),
            }
            for key, value in logits.items():
                sums[key] += float(torch.nn.functional.cross_entropy(value, labels, reduction="sum"))
            n += len(labels)
    ce = {key: value / n for key, value in sums.items()}
    ce["recovered_pct"] = (ce["zero"] - ce["recon"]) / (ce["zero"] - ce["clean"]) * 100
    return ce


def headless_backbone():
    backbone = load_hooked_model("test/vit-tiny", pretrained=False)
    backbone.cfg.head = "none"
    backbone.head = None
    return backbone


def test_linear_probe_ce_matches_a_hand_computed_value(tmp_path) -> None:
    backbone = headless_backbone()
    gen = torch.Generator().manual_seed(1)
    weight, bias = 3 * torch.randn(10, 32, generator=gen), torch.randn(10, generator=gen)
    save_file({"weight": weight, "bias": bias}, str(tmp_path / "probe.safetensors"))
    evaluator = SAEEvaluator(n_batches=None, ce_source="linear_probe", linear_probe=str(tmp_path / "probe.safetensors"))
    sae = half_sae()
    results = evaluate(tmp_path, sae, evaluator=evaluator, backbone=backbone)
    expected = hand_computed_ce(backbone, lambda f: f @ weight.T + bias, sae)
    assert results["ce_clean"] == pytest.approx(expected["clean"], rel=1e-4)
    assert results["ce_recon"] == pytest.approx(expected["recon"], rel=1e-4)
    assert results["ce_zero"] == pytest.approx(expected["zero"], rel=1e-4)
    assert results["ce_recovered_pct"] == pytest.approx(expected["recovered_pct"], rel=1e-3)
    assert 1 < results["ce_recovered_pct"] < 99  # a half reconstruction is neither end: the test can fail


def test_zero_shot_ce_matches_a_hand_computed_value(tmp_path) -> None:
    from prisma_lightning.backbones.zero_shot import ZeroShotClassifier

    backbone = headless_backbone()
    gen = torch.Generator().manual_seed(2)
    weights = torch.nn.functional.normalize(torch.randn(32, 10, generator=gen), dim=0)
    classifier = ZeroShotClassifier(weights, logit_scale=20.0)
    path = classifier.save(tmp_path / "zero_shot.safetensors")
    evaluator = SAEEvaluator(n_batches=None, ce_source="zero_shot", zero_shot=str(path))
    sae = half_sae()
    results = evaluate(tmp_path, sae, evaluator=evaluator, backbone=backbone)
    assert "zero-shot classifier" in results["ce_source"]
    expected = hand_computed_ce(backbone, classifier, sae)
    for key in ("clean", "recon", "zero"):
        assert results[f"ce_{key}"] == pytest.approx(expected[key], rel=1e-4), key
    assert results["ce_recovered_pct"] == pytest.approx(expected["recovered_pct"], rel=1e-3)
    assert abs(results["ce_recovered_pct"]) > 1 and abs(results["ce_recovered_pct"] - 100) > 1  # neither end


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
    folder.chmod(0o555)  # an input folder: never written to, even when the table is saved
    try:
        PrismaCLI(args=args)
    finally:
        folder.chmod(0o755)
    assert not (folder / "eval.json").exists()
    (saved_file,) = tmp_path.rglob("eval/eval.json")
    saved = json.loads(saved_file.read_text())
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


def dsprites_with_factors(factors: bool = True):
    from prisma_lightning.datamodules import DSpritesDataModule

    return DSpritesDataModule(cache=False, subset_size=400, val_fraction=0.4, test_fraction=0.0, image_size=16,
                              channels=3, batch_size=40, factors=factors)  # fmt: skip


def test_ground_truth_columns_match_the_report_of_hand_computed_scores(tmp_path) -> None:
    from prisma_lightning.callbacks.evaluator import GROUND_TRUTH_COLUMNS
    from prisma_lightning.metrics import ground_truth_report

    torch.manual_seed(0)
    backbone = load_hooked_model("test/vit-tiny", pretrained=False)
    cfg = SAEConfig(d_in=32, d_sae=48, architecture="topk", k=6, hook_name=HOOK, tokens="all", b_dec_init="zeros")
    sae = SparseAutoencoder(cfg)
    data = dsprites_with_factors()
    module = SAEModule(sae, backbone=backbone, export_dir=str(tmp_path / "sae"))
    evaluator = SAEEvaluator(n_batches=None)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[evaluator], enable_progress_bar=False, logger=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.validate(module, data)
    row = evaluator.results
    # the same scores by hand: each feature's max over the image's tokens, with the images' own factors
    scores, classes, ids = [], [], []
    sae.eval()
    with torch.no_grad():
        for images, _, extra in data.val_dataloader():
            _, cache = backbone.run_with_cache(images, names_filter=[HOOK])
            scores.append(sae.encode(cache[HOOK]).amax(dim=1))
            classes.append(extra["factors"])
            ids.append(extra["index"])
    expected = ground_truth_report(torch.cat(scores), torch.cat(classes), ids=torch.cat(ids))
    assert row["ground_truth"]["n_images"] == 160
    for name, factor in expected["factors"].items():
        assert row["ground_truth"]["factors"][name]["mean_auroc"] == pytest.approx(factor["mean_auroc"], abs=1e-6)
        got = row["ground_truth"]["factors"][name]["values"]
        assert [v["best_feature"] for v in got] == [v["best_feature"] for v in factor["values"]]
    mean_auroc = sum(f["mean_auroc"] for f in expected["factors"].values()) / 5
    assert row["gt_auroc"] == pytest.approx(mean_auroc, abs=1e-6)
    assert 0 <= row["gt_dominance_pct"] <= 100 and 0 <= row["gt_probe_k1"] <= 1
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["ground_truth"]["factors"]["shape"]["values"][0]["n_images"] > 0
    from prisma_lightning.callbacks import format_table

    assert all(label in format_table(row) for _, label in GROUND_TRUTH_COLUMNS)


def test_ground_truth_true_without_factors_fails_at_setup(tmp_path) -> None:
    module = SAEModule(constructed_sae("perfect"), backbone="test/vit-tiny", pretrained_backbone=False)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[SAEEvaluator(ground_truth=True)], logger=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match="factors=False: set its factors: true"):
        trainer.validate(module, dsprites_with_factors(factors=False))


def test_without_factors_the_table_has_no_ground_truth_columns(tmp_path) -> None:
    from prisma_lightning.callbacks import format_table

    results = evaluate(tmp_path, constructed_sae("perfect"))
    assert "gt_auroc" not in results and "ground_truth" not in results
    assert "GT AUROC" not in format_table(results)


class EveryOtherPatch(SAEModule):
    """A ``select_tokens`` override keeping a subset of positions (the class token and every other patch)."""

    def select_tokens(self, acts):
        return acts[:, ::2].reshape(-1, acts.shape[-1])


class MeanToken(SAEModule):
    """A ``select_tokens`` override that is not a subset of positions (one averaged row per image)."""

    def select_tokens(self, acts):
        return acts.mean(dim=1)


def validate_with(tmp_path, module_class, sae):
    module = module_class(sae, backbone="test/vit-tiny", pretrained_backbone=False, export_dir=str(tmp_path / "sae"))
    evaluator = SAEEvaluator(n_batches=None)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[evaluator], enable_progress_bar=False, logger=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.validate(module, labelled_images())
    return module, evaluator.results


def test_select_tokens_subset_override_is_spliced_at_its_positions(tmp_path) -> None:
    module, results = validate_with(tmp_path, EveryOtherPatch, constructed_sae("perfect"))
    assert module.groups[next(iter(module.groups))].positions == list(range(0, 17, 2))
    assert results["ce_recovered_pct"] == pytest.approx(100.0, abs=1e-3)
    assert results["l0"] == pytest.approx(32.0, abs=0.5)
    # the zero SAE zero-ablates exactly those positions: its CE is the zero-ablation CE
    _, zero = validate_with(tmp_path / "zero", EveryOtherPatch, constructed_sae("zero"))
    assert zero["ce_recon"] == pytest.approx(zero["ce_zero"], abs=1e-5) and zero["ce_zero"] != zero["ce_clean"]


def test_select_tokens_that_is_not_a_subset_reports_why_there_is_no_splice(tmp_path) -> None:
    _, results = validate_with(tmp_path, MeanToken, constructed_sae("perfect"))
    assert results["ce_recovered_pct"] is None and results["recon_cos_sim"] is None
    assert "does not keep a subset of token positions" in results["notes"]["ce_recovered_pct"]
    assert results["explained_variance_pct"] == pytest.approx(100.0, abs=1e-4)  # the SAE itself is still scored
