"""Feature-atlas benchmarks: throughput of the atlas pass, and its peak memory against the number of images.

(a) images/s of the atlas pass (``AtlasModule.predict_step`` + ``AtlasWriter.write_on_batch_end``: statistics,
    histogram, streaming top-k with patch maps, ground-truth rows) / a plain forward of the backbone to the hook
    plus ``sae.encode`` over the same in-memory batches. Both run alternately ``--repeats`` times; the median of
    the per-repeat ratios is reported with its range. Target <= 1.3. Rows: the quickstart setting (2-layer
    dSprites ViT, TopK SAE 64 -> 1024, k 16; a trained SAE with ``--sae``, else random weights) and a ViT-S/16
    (random weights, 197 tokens) with a 16,384-feature TopK SAE.
(b) peak RSS (VmHWM) of a complete ``Trainer.predict`` atlas run (data, pass, ground truth, site) over 10,000
    and over 50,000 dSprites images, each in a fresh process; the ratio must stay near 1 (the atlas keeps
    O(d_sae x k) state, and ground-truth rows are capped at 10,000 images).

Run: ``python tests/benchmarks/bench_atlas.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DSPRITES_VIT = str(ROOT / "examples" / "checkpoints" / "dsprites-vit-2l")


def _random_sae(d_in: int, d_sae: int, k: int, hook: str):
    from prisma_lightning.sae import SAEConfig, SparseAutoencoder

    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, hook_name=hook, tokens="all")
    return SparseAutoencoder(cfg).eval()


def throughput(
    backbone: str, sae: object, images: torch.Tensor, labels: torch.Tensor, batch: int, repeats: int, factors=None
) -> dict:
    """Seconds per pass over ``images`` for the atlas and for the forward + encode floor (interleaved)."""
    from prisma_lightning.atlas import FeatureAccumulator
    from prisma_lightning.callbacks.atlas_writer import AtlasWriter
    from prisma_lightning.modules.atlas_module import AtlasModule

    module = AtlasModule(sae, backbone=backbone, pretrained_backbone=False if backbone.startswith("timm/") else True)
    model, hook = module.backbone, module.hook_name
    stop = model.stop_layer_for_all([hook])
    batches = [(images[i : i + batch], labels[i : i + batch]) for i in range(0, len(images), batch)]

    def floor_step(x: torch.Tensor) -> None:
        with torch.no_grad():
            _, cache = model.run_with_cache(x, names_filter=[hook], stop_at_layer=stop)
            module.sae.encode(cache[hook])

    def new_writer() -> AtlasWriter:
        writer = AtlasWriter(tempfile.gettempdir(), save_every_n_batches=0)
        layout = module.layout
        writer._factors = factors
        writer.acc = FeatureAccumulator(
            module.sae.d_sae, writer.top_k, layout.n_patches, layout.patch_start,
            gt_images=writer._gt_images(module.sae.d_sae) if factors is not None else 0,
            n_factors=len(factors.names) if factors is not None else 0,
        )  # fmt: skip
        return writer

    def atlas_step(writer: AtlasWriter, b: tuple, i: int) -> None:
        out = module.predict_step(b, i)
        first = i * batch
        writer.write_on_batch_end(None, module, out, list(range(first, first + b[0].shape[0])), b, i)

    # Warm-up, then repeats; within a repeat the two alternate batch by batch (same load for both).
    writer = new_writer()
    for i, b in enumerate(batches[:2]):
        floor_step(b[0]), atlas_step(writer, b, i)
    floor_t, atlas_t = [], []
    for _ in range(repeats):
        writer = new_writer()
        f_sum = a_sum = 0.0
        for i, b in enumerate(batches):
            t = time.perf_counter()
            floor_step(b[0])
            f_sum += time.perf_counter() - t
            t = time.perf_counter()
            atlas_step(writer, b, i)
            a_sum += time.perf_counter() - t
        floor_t.append(f_sum)
        atlas_t.append(a_sum)
    ratios = [a / f for a, f in zip(atlas_t, floor_t, strict=True)]
    n = len(images)
    return {
        "atlas_img_per_s": n / statistics.median(atlas_t),
        "floor_img_per_s": n / statistics.median(floor_t),
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
    }


def quickstart_throughput(sae_path: str | None, n_images: int, batch: int, repeats: int) -> dict:
    from prisma_lightning.atlas import dsprites_factors
    from prisma_lightning.datamodules import DSpritesDataModule

    dm = DSpritesDataModule(cache=False, subset_size=2 * n_images, val_fraction=0.5, test_fraction=0.0, seed=1)
    dm.setup()
    x, y = zip(*dm.val_set.__getitems__(list(range(n_images))), strict=True)
    images, labels = torch.stack(x), torch.tensor(y)
    if sae_path:
        from prisma_lightning.sae import SparseAutoencoder

        sae = SparseAutoencoder.load(sae_path)
    else:
        sae = _random_sae(64, 1024, 16, "blocks.1.hook_resid_post")
    return throughput(DSPRITES_VIT, sae, images, labels, batch, repeats, dsprites_factors(dm, dm.val_set))


def vit_s_throughput(n_images: int, batch: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n_images, 3, 224, 224, generator=gen)
    labels = torch.randint(0, 10, (n_images,), generator=gen)
    sae = _random_sae(384, 16384, 32, "blocks.5.hook_resid_post")
    return throughput("timm/vit_small_patch16_224.augreg_in21k", sae, images, labels, batch, repeats)


PEAK_SCRIPT = r"""
import json, sys, tempfile, torch
import lightning.pytorch as pl
torch.set_num_threads(2)

def peak_kb():  # this process's own high-water RSS
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

from prisma_lightning.callbacks.atlas_writer import AtlasWriter
from prisma_lightning.datamodules import DSpritesDataModule
from prisma_lightning.modules.atlas_module import AtlasModule
from prisma_lightning.sae import SAEConfig, SparseAutoencoder

n, backbone, sae_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if sae_path:
    sae = SparseAutoencoder.load(sae_path)
else:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=1024, architecture="topk", k=16,
                                      hook_name="blocks.1.hook_resid_post", tokens="all"))
dm = DSpritesDataModule(cache=False, subset_size=2 * n, val_fraction=0.5, test_fraction=0.0, batch_size=250, seed=1)
module = AtlasModule(sae, backbone=backbone)
out = tempfile.mkdtemp()
writer = AtlasWriter(out, save_every_n_batches=50)
trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[writer])
trainer.predict(module, datamodule=dm)
print(json.dumps({"peak_kb": peak_kb(), "images": int(writer.acc.n_images)}))
"""


def peak_memory(sizes: tuple[int, ...], sae_path: str | None, repeats: int) -> dict:
    """Peak RSS of a full atlas run per number of images (median over ``repeats`` fresh processes each)."""
    peaks: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            cmd = [sys.executable, "-c", PEAK_SCRIPT, str(n), DSPRITES_VIT, sae_path or ""]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
            row = json.loads(out.strip().splitlines()[-1])
            assert row["images"] == n, row
            peaks[n].append(row["peak_kb"] / 1024)
    med = {n: statistics.median(v) for n, v in peaks.items()}
    return {"peak_MB": med, "all_MB": peaks, "ratio": med[sizes[-1]] / med[sizes[0]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", default=None, help="trained quickstart SAE folder (default: random weights)")
    parser.add_argument("--images", type=int, default=5000, help="images per quickstart throughput pass")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vit-s-images", type=int, default=64, help="images of the ViT-S/16 row (0: skip it)")
    parser.add_argument("--memory", type=int, nargs=2, default=(10_000, 50_000), help="image counts of (b)")
    parser.add_argument("--memory-repeats", type=int, default=1)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    q = quickstart_throughput(args.sae, args.images, args.batch, args.repeats)
    rows.append(("atlas pass / forward + encode, dSprites ViT-2L, SAE 1024, batch " + str(args.batch), q))
    if args.vit_s_images:
        v = vit_s_throughput(args.vit_s_images, 32, max(3, args.repeats // 2))
        rows.append(("atlas pass / forward + encode, ViT-S/16, SAE 16384, batch 32", v))
    for name, r in rows:
        print(f"{name}: ratio {r['ratio']:.3f} (range {r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f}; "
              f"{r['atlas_img_per_s']:.0f} vs {r['floor_img_per_s']:.0f} images/s)  target <= 1.3")  # fmt: skip
    if not args.skip_memory:
        m = peak_memory(tuple(args.memory), args.sae, args.memory_repeats)
        a, b = args.memory
        print(f"atlas peak RSS {b} / {a} images: ratio {m['ratio']:.3f} "
              f"({m['peak_MB'][b]:.0f} MB vs {m['peak_MB'][a]:.0f} MB)  target ~1")  # fmt: skip


if __name__ == "__main__":
    main()
