"""`AtlasModule`: token layouts, features equal to the SAE's, CLIP class names, and a plain-DataLoader atlas."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from prisma_lightning.activations import select_tokens
from prisma_lightning.atlas import validate_feature
from prisma_lightning.backbones import HookedViT, HookedViTConfig, ZeroShotClassifier, load_hooked_model
from prisma_lightning.callbacks.atlas_writer import AtlasWriter
from prisma_lightning.modules.atlas_module import AtlasModule, TokenLayout
from prisma_lightning.sae import SAEConfig, SparseAutoencoder

HOOK = "blocks.0.hook_resid_post"


def make_sae(d_in: int = 32, d_sae: int = 24, tokens: str = "all", architecture: str = "topk") -> SparseAutoencoder:
    k = {"k": 4} if architecture == "topk" else {}
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, hook_name=HOOK,
                                       tokens=tokens, **k))  # fmt: skip


@pytest.mark.parametrize(
    ("name", "tokens", "layout"),
    [
        ("test/vit-tiny-reg", "all", TokenLayout(19, 3, 16, (1, 4, 4))),
        ("test/vit-tiny-reg", "patches", TokenLayout(16, 0, 16, (1, 4, 4))),
        ("test/vit-tiny-reg", "cls", TokenLayout(1, 0, 0, (1, 4, 4))),
        ("test/video-tiny", "all", TokenLayout(32, 0, 32, (2, 4, 4))),
    ],
)
def test_layout_and_features_equal_the_sae(name: str, tokens: str, layout: TokenLayout) -> None:
    model = load_hooked_model(name, pretrained=False)
    sae = make_sae(tokens=tokens).eval()
    module = AtlasModule(sae, backbone=model)
    assert module.layout == layout
    images = model.example_input(3).normal_()
    batch = module.predict_step((images, torch.tensor([0, 1, 2])), 0)
    assert batch.features.shape == (3, layout.tokens_per_image, 24)
    assert batch.labels.tolist() == [0, 1, 2]
    _, cache = model.run_with_cache(images, names_filter=[HOOK])
    cfg = model.cfg
    rows = select_tokens(cache[HOOK], tokens, cfg.n_prefix_tokens, has_cls=cfg.class_token)
    assert batch.features.layout == torch.sparse_coo  # a TopK SAE's features come without a dense tensor
    with torch.no_grad():
        assert_close(batch.features.to_dense().reshape(-1, 24), sae.encode(rows))
    module.skip_batches = 1
    assert module.predict_step((images,), 0) is None and module.predict_step((images,), 1).labels is None


def test_wrong_width_and_missing_hook_are_reported(tiny_vit) -> None:
    with pytest.raises(ValueError, match="d_in=16 but blocks.0.hook_resid_post"):
        AtlasModule(make_sae(d_in=16), backbone=tiny_vit)
    with pytest.raises(KeyError):
        AtlasModule(make_sae(), backbone=tiny_vit, hook_name="blocks.0.hook_resid_pots")


def test_display_images_undo_normalisation(tiny_vit) -> None:
    module = AtlasModule(make_sae(), backbone=tiny_vit)
    x = torch.rand(2, 3, 16, 16)
    assert_close(module.display_images(x), x)  # already in [0, 1]
    shifted = module.display_images(x * 4 - 2)  # unknown normalisation: min-max per image
    assert_close(shifted.amin(dim=(1, 2, 3)), torch.zeros(2))
    assert_close(shifted.amax(dim=(1, 2, 3)), torch.ones(2))
    module.display_mean, module.display_std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.2, 0.2])
    normalised = (x - module.display_mean[:, None, None]) / module.display_std[:, None, None]
    assert_close(module.display_images(normalised), x)


def clip_like(tmp_path):
    """A tiny CLIP-style backbone (projection head) whose head reads the first 8 residual dimensions, an SAE whose
    decoder row j is dimension j, and a zero-shot file whose class j is embedding axis j: feature j's closest
    class must be class j."""
    cfg = HookedViTConfig(d_model=32, n_layers=1, n_heads=4, image_size=16, patch_size=4, head="projection",
                          projection_dim=8, head_bias=False, model_name="test/clip-like")  # fmt: skip
    model = HookedViT(cfg).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[:, :8] = torch.eye(8)
        model.ln_final.weight.uniform_(0.5, 1.5)
    sae = make_sae(d_sae=8, architecture="relu")
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_dec[:, :8] = torch.eye(8)
    names = ["cat <b>", "dog", "car", "tree", "sky", "sea", "road", "bird"]
    ZeroShotClassifier(torch.eye(8), class_names=names).save(tmp_path / "zs.safetensors")
    return model, sae, names


def test_clip_closest_class_names(tmp_path) -> None:
    model, sae, names = clip_like(tmp_path)
    module = AtlasModule(sae, backbone=model, zero_shot=str(tmp_path / "zs.safetensors"))
    text = module.text_similarity(top=3)
    assert text["names"] == names
    assert text["pos"][0][:, 0].tolist() == list(range(8))
    assert (text["pos"][1][:, 0] > 0.9).all() and (text["neg"][1][:, 0] < 0).all()
    with pytest.raises(ValueError, match="projection head"):
        AtlasModule(make_sae(), backbone=load_hooked_model("test/vit-tiny", pretrained=False),
                    zero_shot=str(tmp_path / "zs.safetensors")).text_similarity()  # fmt: skip


def test_atlas_with_a_plain_dataloader_and_clip_names(tmp_path) -> None:
    """No data module (labels are numbers, no factors, no ground truth); CLIP names land in the export and site."""
    model, sae, names = clip_like(tmp_path)
    module = AtlasModule(sae, backbone=model, zero_shot=str(tmp_path / "zs.safetensors"))
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(40, 3, 16, 16, generator=gen), torch.arange(40) % 4)
    writer = AtlasWriter(str(tmp_path / "atlas"), top_k=5, text_top=2, chunk_size=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[writer])  # fmt: skip
    trainer.predict(module, DataLoader(data, batch_size=16))
    rows = [json.loads(line) for line in (tmp_path / "atlas" / "features.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(validate_feature(r) == [] for r in rows)
    assert [r["pos_str"][0] for r in rows] == names and all(len(r["neg_str"]) == 2 for r in rows)
    fired = [r for r in rows if r["activations"]]
    assert fired and {a["labelName"] for r in fired for a in r["activations"]} <= {"0", "1", "2", "3"}
    assert not (tmp_path / "atlas" / "ground_truth.json").exists()
    assert not (tmp_path / "atlas" / "ground_truth.html").exists()
    chunk = (tmp_path / "atlas" / "data" / "features_00000.js").read_text()
    assert "cat \\u003cb\\u003e" in chunk and "<b>" not in chunk
    assert len(list((tmp_path / "atlas" / "data").glob("features_*.js"))) == 3


def test_class_token_sae_has_no_patch_maps(tmp_path, tiny_vit) -> None:
    module = AtlasModule(make_sae(tokens="cls"), backbone=tiny_vit)
    data = TensorDataset(torch.rand(24, 3, 16, 16), torch.zeros(24, dtype=torch.long))
    writer = AtlasWriter(str(tmp_path / "atlas"), top_k=4, site=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[writer])  # fmt: skip
    trainer.predict(module, DataLoader(data, batch_size=8))
    rows = [json.loads(line) for line in (tmp_path / "atlas" / "features.jsonl").read_text().splitlines()]
    assert all(r["patch_grid"] == [0, 0, 0] and r["tokens"] == "cls" for r in rows)
    assert all(a["values"] == [] and a["image"] is None for r in rows for a in r["activations"])
    meta = json.loads((tmp_path / "atlas" / "atlas.json").read_text())
    assert meta["n_tokens"] == 24 and meta["n_images"] == 24
    assert not (tmp_path / "atlas" / "index.html").exists()


class NormalisedImages(pl.LightningDataModule):
    """A data module that takes the backbone's preprocessing (like ImageNetDataModule) over fixed [0, 1] images."""

    accepts_backbone_transforms = True

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images, self.transform = images, None

    def use_transforms(self, train, val) -> None:
        self.transform = val

    def predict_dataloader(self) -> DataLoader:
        x = torch.stack([self.transform(img) for img in self.images])
        return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=8)


def test_images_are_written_unnormalised(tmp_path, tiny_vit) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 16, 16, generator=gen)
    module = AtlasModule(make_sae(), backbone=tiny_vit)
    writer = AtlasWriter(str(tmp_path / "atlas"), top_k=2, neighbours=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[writer])  # fmt: skip
    trainer.predict(module, datamodule=NormalisedImages(images))
    assert module.display_std is not None  # the backbone's mean / std were applied, then undone for display
    for image_id, rel in writer.data.image_files.items():
        png = torch.tensor(list(Image.open(tmp_path / "atlas" / rel).convert("RGB").getdata()), dtype=torch.float32)
        expected = images[image_id].permute(1, 2, 0).reshape(-1, 3) * 255
        assert_close(png, expected, atol=1.01, rtol=0)


def test_state_of_another_run_is_not_resumed(tmp_path, tiny_vit) -> None:
    out = tmp_path / "atlas"
    state = out / ".atlas_state" / "rank0-of-1.pt"
    state.parent.mkdir(parents=True)
    torch.save({"fingerprint": {"model": "another"}, "accumulator": {}, "batches_done": 3}, state)
    data = TensorDataset(torch.rand(16, 3, 16, 16), torch.zeros(16, dtype=torch.long))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[AtlasWriter(str(out))])  # fmt: skip
    with pytest.raises(ValueError, match="holds an unfinished atlas of another run"):
        trainer.predict(AtlasModule(make_sae(), backbone=tiny_vit), DataLoader(data, batch_size=8))
