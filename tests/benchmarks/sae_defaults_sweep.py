"""Quickstart-sized runs of every SAE architecture with its default config, over a sweep of its sparsity coefficient.

    python tests/benchmarks/sae_defaults_sweep.py [--architectures relu jumprelu] [--steps 600] [--factors 0.3 1 3]

The setting is the quickstart's (``configs/quickstart.yaml``): the residual stream ``blocks.1.hook_resid_post`` of
the shipped 2-layer dSprites ViT (``examples/checkpoints/dsprites-vit-2l``, d_model 64) on 20,000 random dSprites
images (17 tokens each), an x16 dictionary (1,024 features), ``expected_norm`` normalisation, ``b_dec`` at the
geometric median of 4,096 tokens, Adam at lr 1e-3 with 50 warm-up steps and cosine decay, 1,024-token batches,
600 steps; TopK-family SAEs with k = 16 and aux_k = 64. The activations are cached once (a few seconds) and the SAEs
train in a plain loop on shuffled cached tokens, so each run takes seconds instead of a ``prisma fit``'s minute.

Every architecture is run with its default config -- only the sparsity coefficient changes, as
``recommended_coefficient x factor`` (architectures without a coefficient run once). Printed per run, measured on
1,000 held-out images: the first training loss, the average L0 per token, the explained variance (1 - SSE/SST over
all held-out tokens) and the % CE recovered of the model's shape classifier with the reconstruction spliced in at
every token, against zero-ablation: ``(CE_zero - CE_recon) / (CE_zero - CE_clean)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prisma_lightning.backbones import load_hooked_model
from prisma_lightning.datamodules.dsprites import DSpritesGrid
from prisma_lightning.sae import SAEConfig, SparseAutoencoder, architecture_names, config_class, make_optimizer
from prisma_lightning.sae import train_step as sae_train_step

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "examples" / "checkpoints" / "dsprites-vit-2l"
HOOK = "blocks.1.hook_resid_post"
QUICKSTART = {  # the quickstart's SAE fields that are not about sparsity
    "d_in": 64,
    "expansion_factor": 16,
    "normalize_activations": "expected_norm",
    "b_dec_init": "geometric_median",
    "hook_name": HOOK,
}
TOPK_FIELDS = {"k": 16, "aux_k": 64}
"""The quickstart's TopK options, given to every architecture that has these fields."""
FACTORS = (0.5, 1.0, 2.0)


@dataclass
class Activations:
    """Cached hook activations of training and held-out images."""

    train: torch.Tensor
    """Training tokens ``[n_train_images * 17, 64]`` (image-major)."""
    val_images: torch.Tensor
    """Held-out images ``[n_val, 1, 64, 64]``."""
    val_labels: torch.Tensor
    """Their shape labels ``[n_val]``."""
    val: torch.Tensor
    """Held-out tokens ``[n_val, 17, 64]``."""


def cache_activations(model: torch.nn.Module, n_train: int, n_val: int, seed: int = 0) -> Activations:
    """Render ``n_train + n_val`` distinct random dSprites images and cache the hook's activations."""
    grid = DSpritesGrid()
    idx = np.random.default_rng(seed).choice(len(grid), n_train + n_val, replace=False)
    acts, images = [], []
    with torch.no_grad():
        for start in range(0, len(idx), 1000):
            x = torch.from_numpy(grid.render(idx[start : start + 1000])).float().unsqueeze(1)
            _, cache = model.run_with_cache(x, names_filter=HOOK, stop_at_layer=2)
            acts.append(cache[HOOK])
            images.append(x)
    acts_all, images_all = torch.cat(acts), torch.cat(images)
    labels = torch.from_numpy(grid.latents_classes(idx)[:, 1])
    return Activations(acts_all[:n_train].reshape(-1, acts_all.shape[-1]), images_all[n_train:], labels[n_train:],
                       acts_all[n_train:])  # fmt: skip


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """The quickstart's schedule: linear warm-up from 0, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train(cfg: SAEConfig, data: torch.Tensor, steps: int, batch: int = 1024, lr: float = 1e-3, warmup: int = 50,
          init_tokens: int = 4096, seed: int = 0) -> tuple[SparseAutoencoder, list[float]]:  # fmt: skip
    """Train an SAE on shuffled rows of ``data`` (the quickstart's recipe); returns it and the per-step losses."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=gen)
    sae = SparseAutoencoder(cfg)
    sae.initialize_from_data(data[order[:init_tokens]])
    optimizer = make_optimizer(sae, lr=lr)
    sae.train()
    losses, pos = [], 0
    for step in range(steps):
        if pos + batch > order.numel():
            order, pos = torch.randperm(data.shape[0], generator=gen), 0
        x = data[order[pos : pos + batch]]
        pos += batch
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, warmup, steps)
        out = sae_train_step(sae, optimizer, x, step=step)
        losses.append(float(out.loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    return sae, losses


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, model: torch.nn.Module, acts: Activations, batch: int = 250) -> dict[str, float]:
    """L0, explained variance and % CE recovered on the held-out images (SAE in eval mode)."""
    sae.eval()
    x = acts.val.reshape(-1, acts.val.shape[-1])
    out = sae(x)
    sse = (out.recon - x).pow(2).sum()
    sst = (x - x.mean(0)).pow(2).sum()
    ce = {"clean": 0.0, "recon": 0.0, "zero": 0.0}
    n = acts.val_images.shape[0]
    for start in range(0, n, batch):
        images, labels = acts.val_images[start : start + batch], acts.val_labels[start : start + batch]
        for key, hook in (("clean", None), ("recon", lambda a, hook: sae(a).recon), ("zero", lambda a, hook: 0 * a)):
            hooks = [] if hook is None else [(HOOK, hook)]
            logits = model.run_with_hooks(images, fwd_hooks=hooks)
            ce[key] += float(F.cross_entropy(logits, labels, reduction="sum"))
    ce_rec = (ce["zero"] - ce["recon"]) / (ce["zero"] - ce["clean"]) * 100
    alive = float((out.feats > 0).any(0).float().mean()) * 100
    return {"l0": float(out.l0.mean()), "ev": float(1 - sse / sst) * 100, "ce": ce_rec, "alive": alive}


def sweep_configs(
    architecture: str, factors: tuple[float, ...], coefficients: tuple[float, ...] | None = None
) -> list[tuple[str, SAEConfig]]:
    """(label, config) of every run of one architecture: its defaults, with the coefficient scaled by ``factors``
    (or set to each of ``coefficients``)."""
    cls = config_class(architecture)
    names = {f.name for f in dataclasses.fields(cls)}
    base = {**QUICKSTART, "architecture": architecture, **{k: v for k, v in TOPK_FIELDS.items() if k in names}}
    field, recommended = cls.sparsity_field, cls.recommended_coefficient
    if field is None or recommended is None:
        return [("-", SAEConfig(**base))]
    values = coefficients if coefficients else tuple(recommended * f for f in factors)
    return [(f"{v:.3g}", SAEConfig(**base, **{field: v})) for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="*", default=None, help="default: every registered architecture")
    parser.add_argument("--factors", nargs="*", type=float, default=list(FACTORS))
    parser.add_argument(
        "--coefficients", nargs="*", type=float, default=None, help="absolute values (overrides --factors)"
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_hooked_model(str(CHECKPOINT)).eval()
    acts = cache_activations(model, args.train_images, 1000)
    print(
        f"\nsae_defaults_sweep: {HOOK} of dsprites-vit-2l, {acts.train.shape[0]:,} training tokens, {args.steps} "
        "steps of 1,024 tokens, x16 (1,024 features), expected_norm; held-out: 1,000 images\n"
    )
    print(
        "| architecture | coefficient | first loss | L0 | explained variance % | CE recovered % | alive % | seconds |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for architecture in args.architectures or architecture_names():
        for label, cfg in sweep_configs(architecture, tuple(args.factors), args.coefficients):
            start = time.perf_counter()
            sae, losses = train(cfg, acts.train, args.steps)
            m = evaluate(sae, model, acts)
            seconds = time.perf_counter() - start
            print(f"| {architecture} | {label} | {losses[0]:.4g} | {m['l0']:.1f} | {m['ev']:.1f} | {m['ce']:.1f} | "
                  f"{m['alive']:.0f} | {seconds:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
