"""Benchmarks (c) and (d) of the SAE issue, used by ``bench_sae.py``:

(c) ``Trainer.fit`` of ``SAEModule`` over cached activations / a raw PyTorch loop on the same SAE and batches.
(d) ``ActivationDataModule`` read throughput / a raw sequential read of the same shard bytes.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch


def write_shards(folder: Path, rows: int, d: int, tokens_per_image: int = 64) -> Path:
    from prisma_lightning.activations import ShardWriter

    writer = ShardWriter(folder, d=d, tokens_per_image=tokens_per_image, images_per_shard=512, shuffle=False)
    images = rows // tokens_per_image
    gen = torch.Generator().manual_seed(0)
    for start in range(0, images, 256):
        n = min(256, images - start)
        writer.add(torch.randn(n * tokens_per_image, d, generator=gen), n)
    writer.close()
    return folder


def lightning_vs_raw(
    d_in: int = 768, expansion: int = 16, batch: int = 2048, steps: int = 12, k: int = 64, rounds: int = 3
) -> dict:
    """Seconds per SAE step in ``Trainer.fit`` vs a hand-written loop over the same shards.

    Each step is timed end to end (from the end of one step to the end of the next: data loading, the step, and
    for Lightning its hooks and logging). The two run alternately, ``rounds`` times each, so both see the same
    machine load; the first two steps of every run (initialisation, warm-up) are dropped and medians compared.
    """
    import lightning.pytorch as pl

    from prisma_lightning.datamodules.activations import ActivationDataModule
    from prisma_lightning.modules import SAEModule
    from prisma_lightning.sae import SAEConfig, SparseAutoencoder

    cfg = SAEConfig(d_in=d_in, expansion_factor=expansion, architecture="topk", k=k, b_dec_init="zeros")
    fit_times: list[float] = []
    raw_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_shards(Path(tmp) / "acts", rows=batch * (steps + 2), d=d_in)

        class Timer(pl.Callback):
            def on_train_start(self, *args):
                self.ends: list[float] = [time.perf_counter()]

            def on_train_batch_end(self, *args):
                self.ends.append(time.perf_counter())

        def fit_run() -> list[float]:
            timer = Timer()
            module = SAEModule(SparseAutoencoder(cfg), init_tokens=batch, export_dir=str(Path(tmp) / "sae"),
                               export_on_checkpoint=False)  # fmt: skip
            trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                                 accelerator="cpu", devices=1)  # fmt: skip
            trainer.fit(module, datamodule=ActivationDataModule(str(folder), batch_size=batch, shuffle=False))
            return [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)][2:]

        def raw_run() -> list[float]:
            """The same work by hand: initialisation, the step, the finiteness checks and every metric SAEModule
            logs per step (loss terms, L0, explained variance, dead fraction, lr, tokens seen)."""
            sae = SparseAutoencoder(cfg)
            dm = ActivationDataModule(str(folder), batch_size=batch, shuffle=False)
            dm.setup("fit")
            sae.initialize_from_data(next(iter(dm.train_dataloader())))
            optimizer = torch.optim.Adam([{"params": list(sae.parameters()), "lr": 4e-4}], fused=True)
            seen, logged = 0, []
            ends = [time.perf_counter()]
            for i, x in enumerate(dm.train_dataloader()):
                if i >= steps:
                    break
                if not bool(torch.isfinite(x).all()):
                    raise ValueError("non-finite activations")
                out = sae(x, step=i, return_feats=False)
                if not bool(torch.isfinite(out.loss)):
                    raise FloatingPointError("diverged")
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                sae.before_optimizer_step()
                optimizer.step()
                sae.after_optimizer_step()
                seen += x.shape[0]
                with torch.no_grad():
                    sse = (out.recon - x).pow(2).sum()
                    sst = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
                    dead = (sae.steps_since_fired >= sae.cfg.dead_feature_window).float().mean()
                    logged.append(
                        [
                            float(v)
                            for v in (
                                out.loss,
                                out.mse_loss,
                                out.sparsity_loss,
                                out.aux_loss,
                                out.l0.float().mean(),
                                1 - sse / sst,
                                dead,
                            )
                        ]
                        + [4e-4, seen]
                    )
                ends.append(time.perf_counter())
            return [b - a for a, b in zip(ends, ends[1:], strict=False)][2:]

        for _ in range(rounds):
            fit_times += fit_run()
            raw_times += raw_run()
    fit_med, raw_med = statistics.median(fit_times), statistics.median(raw_times)
    return {"fit_step_s": fit_med, "raw_step_s": raw_med, "ratio": fit_med / raw_med}


def shard_read_vs_raw(rows: int = 400_000, d: int = 768, batch: int = 4096, repeats: int = 5) -> dict:
    """GB/s of ``ActivationDataModule`` iteration vs raw sequential reads of the same shard files (page cache warm)."""
    from prisma_lightning.datamodules.activations import ActivationDataModule

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_shards(Path(tmp) / "acts", rows=rows, d=d)
        files = sorted(folder.glob("shard_*.npy"))
        n_bytes = sum(f.stat().st_size for f in files)
        dm = ActivationDataModule(str(folder), batch_size=batch, shuffle=True)
        dm.setup("fit")

        def ours() -> int:
            return sum(x.numel() * x.element_size() for x in dm.train_dataloader())

        buffer = bytearray(max(f.stat().st_size for f in files))

        def raw() -> int:  # the floor: sequential reads of every shard file into one preallocated buffer
            total = 0
            for f in files:
                with open(f, "rb", buffering=0) as fh:
                    total += fh.readinto(buffer)
            return total

        ours(), raw()  # warm the page cache
        t_ours, t_raw, got = [], [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            got = ours()
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw()
            t_raw.append(time.perf_counter() - t0)
    ours_gbs = got / statistics.median(t_ours) / 1e9
    raw_gbs = n_bytes / statistics.median(t_raw) / 1e9
    return {"ours_GBps": ours_gbs, "raw_GBps": raw_gbs, "ratio": ours_gbs / raw_gbs, "bytes": n_bytes}


if __name__ == "__main__":
    print(lightning_vs_raw(steps=6))
    print(shard_read_vs_raw(rows=100_000))


def online_vs_forward(model: str = "vit_small_patch16_224", layer: int = 6, batch: int = 32, steps: int = 8) -> dict:
    """Images/s of online SAE training (backbone + buffer + SAE steps) vs the backbone forward alone, both as total
    images over total wall time (the online run from its first training step to its last)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from prisma_lightning.backbones import load_hooked_model
    from prisma_lightning.modules import SAEModule
    from prisma_lightning.sae import SAEConfig

    backbone = load_hooked_model(f"timm/{model}", pretrained=False)
    hook = f"blocks.{layer - 1}.hook_resid_post"
    tokens = batch * backbone.cfg.n_tokens
    images = torch.randn(batch * (steps + 2), 3, 224, 224)
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=batch)
    with torch.inference_mode():
        backbone.run_with_cache(images[:batch], names_filter=hook, stop_at_layer=layer)  # warm-up
        t0 = time.perf_counter()
        for x, _ in loader:
            backbone.run_with_cache(x, names_filter=hook, stop_at_layer=layer)
        forward_ips = len(images) / (time.perf_counter() - t0)
    cfg = SAEConfig(d_in=backbone.cfg.d_model, expansion_factor=16, architecture="topk", k=32, hook_name=hook,
                    b_dec_init="mean")  # fmt: skip
    # one SAE step per image batch (batch_tokens = the batch's tokens), a buffer of two batches
    module = SAEModule(cfg, backbone=backbone, buffer_tokens=2 * tokens, batch_tokens=tokens, init_tokens=tokens,
                       export_dir=tempfile.mkdtemp(), export_on_checkpoint=False)  # fmt: skip
    span: dict[str, float] = {}

    class Span(pl.Callback):
        def on_train_start(self, *args):
            span["start"] = time.perf_counter()

        def on_train_end(self, *args):
            span["end"] = time.perf_counter()

    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Span()], accelerator="cpu", devices=1)  # fmt: skip
    trainer.fit(module, loader)
    consumed = module._stream.batches_in_epoch + module._stream.image_epoch * len(loader)
    online_ips = consumed * batch / (span["end"] - span["start"])
    return {"online_img_per_s": online_ips, "forward_img_per_s": forward_ips, "ratio": online_ips / forward_ips}


def online_peak_memory(buffer_tokens: int = 2**20, d: int = 384, repeats: int = 3) -> dict:
    """Extra peak RSS of an online run with a large mixing buffer (fresh processes) vs the buffer's configured bytes."""
    import json
    import subprocess
    import sys

    code = f"""
import json, torch, lightning.pytorch as pl, tempfile

def peak_kb():  # this process's own high-water RSS (ru_maxrss would inherit the parent's peak across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

from torch.utils.data import DataLoader, TensorDataset
from prisma_lightning.backbones import HookedViTConfig, HookedViT
from prisma_lightning.modules import SAEModule
from prisma_lightning.sae import SAEConfig
cfg = HookedViTConfig(d_model={d}, n_layers=2, n_heads=6, image_size=64, patch_size=8, n_classes=10)
model = HookedViT(cfg).eval()
images = torch.randn(2048, 3, 64, 64)
loader = DataLoader(TensorDataset(images, torch.zeros(2048)), batch_size=256)
before = peak_kb()
sae = SAEConfig(d_in={d}, expansion_factor=4, architecture="topk", k=16, hook_name="blocks.0.hook_resid_post",
                b_dec_init="mean")
module = SAEModule(sae, backbone=model, buffer_tokens={buffer_tokens}, batch_tokens=4096, init_tokens=4096,
                   export_dir=tempfile.mkdtemp())
pl.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False, accelerator="cpu").fit(module, loader)
after = peak_kb()
print(json.dumps({{"growth_bytes": (after - before) * 1024}}))
"""

    def growth(tokens: int) -> float:
        script = code.replace(f"buffer_tokens={buffer_tokens}", f"buffer_tokens={tokens}")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])["growth_bytes"]

    # The same run with a minimal buffer measures everything else (Lightning, activations, the SAE). Pairs of
    # runs alternate and the median difference is reported, so one disturbed process does not decide the row.
    extras = [growth(buffer_tokens) - growth(16384) for _ in range(repeats)]
    extra = statistics.median(extras)
    buffer_bytes = (buffer_tokens - 16384) * d * 4
    return {"buffer_extra_MB": extra / 2**20, "buffer_MB": buffer_bytes / 2**20, "ratio": extra / buffer_bytes,
            "extras_MB": [e / 2**20 for e in extras]}  # fmt: skip
