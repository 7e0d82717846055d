"""HookedViT vs the source libraries' forward speed, early stopping and full caching (markdown tables of ratios).

    python tests/benchmarks/bench_backbone.py                 # everything (a few minutes on 2 cores)
    python tests/benchmarks/bench_backbone.py --only vit      # ViT-B/16 section only
    python tests/benchmarks/bench_backbone.py --only families # per-family ratios only

All timings are medians over interleaved repeats in this one process, on random weights, float32, CPU (or the
current CUDA device with --device cuda).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch


def measure(cases: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per case; cases are interleaved so drift in machine load hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for fn in cases.values():
            for _ in range(warmup):
                fn()
        for _ in range(repeats):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def vit_section(args: argparse.Namespace) -> list[str]:
    import timm

    from prisma_lightning.backbones import convert_model

    source = timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(args.device)
    hooked = convert_model(source)
    images = torch.randn(args.batch, 3, 224, 224, device=args.device)
    mid = hooked.cfg.n_layers // 2
    stop = f"run_with_cache(blocks.{mid - 1}.hook_resid_post, stop_at_layer={mid})"
    cases: dict[str, Callable[[], object]] = {
        "timm forward": lambda: source(images),
        "HookedViT forward": lambda: hooked(images),
        stop: lambda: hooked.run_with_cache(
            images, names_filter=f"blocks.{mid - 1}.hook_resid_post", stop_at_layer=mid
        ),
        "run_with_cache(every hook)": lambda: hooked.run_with_cache(images),
    }
    med = measure(cases, args.repeats, args.warmup)
    args.rows = getattr(args, "rows", [])
    args.rows += [
        ("HookedViT / timm forward, ViT-B/16", med["HookedViT forward"] / med["timm forward"], "<= 1.05"),
        (f"{stop} / full forward", med[stop] / med["HookedViT forward"], "<= 0.6"),
        ("caching every hook / plain forward", med["run_with_cache(every hook)"] / med["HookedViT forward"], "report"),
    ]
    lines = [f"ViT-B/16 (timm `vit_base_patch16_224`), batch {args.batch}, 224 px", "",
             "| ratio | measured | target |", "| --- | --- | --- |",
             f"| HookedViT forward / timm forward | {med['HookedViT forward'] / med['timm forward']:.3f} | <= 1.05 |",
             f"| {stop} / HookedViT forward | {med[stop] / med['HookedViT forward']:.3f} | <= 0.6 |",
             f"| run_with_cache(every hook) / HookedViT forward | "
             f"{med['run_with_cache(every hook)'] / med['HookedViT forward']:.3f} | report |", ""]  # fmt: skip
    lines += ["| case | median s |", "| --- | --- |"] + [f"| {k} | {v:.3f} |" for k, v in med.items()]
    return lines


def _families(device: str) -> list[tuple[str, Callable[[], tuple[Callable, Callable]]]]:
    """(label, builder) where builder returns (source_forward, hooked_forward) closures over fixed inputs."""
    from prisma_lightning.backbones import convert_model

    def hf(model_cls: str, config_cls: str, kwargs: dict, shape: tuple[int, ...], out: str):
        def build():
            import transformers

            config = getattr(transformers, config_cls)(**kwargs)
            source = getattr(transformers, model_cls)(config).eval().to(device)
            hooked = convert_model(source)
            x = torch.randn(*shape, device=device)
            return (lambda: getattr(source(pixel_values=x), out)), (lambda: hooked(x))

        return build

    def open_clip_b32():
        import open_clip

        visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval().to(device)
        hooked = convert_model(visual)
        x = torch.randn(16, 3, 224, 224, device=device)
        return (lambda: visual(x)), (lambda: hooked(x))

    videomae_s = dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_frames=16, num_labels=400)
    return [
        ("CLIP B/32 (HF), batch 16", hf("CLIPVisionModelWithProjection", "CLIPVisionConfig",
                                        dict(patch_size=32, projection_dim=512), (16, 3, 224, 224), "image_embeds")),
        ("CLIP B/32 (open_clip), batch 16", open_clip_b32),
        ("DINOv2-S/14 (HF), batch 16", hf("Dinov2Model", "Dinov2Config",
                                          dict(hidden_size=384, num_attention_heads=6, image_size=518, patch_size=14),
                                          (16, 3, 224, 224), "pooler_output")),
        ("SigLIP-B/16 (HF), batch 4", hf("SiglipVisionModel", "SiglipVisionConfig", {}, (4, 3, 224, 224),
                                         "pooler_output")),
        ("VideoMAE-S (HF), 16 frames, batch 1", hf("VideoMAEForVideoClassification", "VideoMAEConfig", videomae_s,
                                                   (1, 16, 3, 224, 224), "logits")),
    ]  # fmt: skip


def families_section(args: argparse.Namespace) -> list[str]:
    lines = ["| model | source s | hooked s | hooked / source | target |", "| --- | --- | --- | --- | --- |"]
    for label, build in _families(args.device):
        source_fn, hooked_fn = build()
        med = measure({"source": source_fn, "hooked": hooked_fn}, args.repeats, args.warmup)
        ratio = med["hooked"] / med["source"]
        args.rows = getattr(args, "rows", []) + [(f"HookedViT / source forward, {label}", ratio, "<= 1.05")]
        lines.append(f"| {label} | {med['source']:.3f} | {med['hooked']:.3f} | {ratio:.3f} | <= 1.05 |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["vit", "families"], default=None)
    parser.add_argument("--batch", type=int, default=8, help="batch of the ViT-B/16 section")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    machine = f"{platform.machine()} {platform.processor()}".strip()
    header = (f"bench_backbone: float32, torch {torch.__version__}, {torch.get_num_threads()} threads, {machine}, "
              f"device {args.device}, median of {args.repeats}")  # fmt: skip
    out = [header, ""]
    if args.only in (None, "vit"):
        out += vit_section(args) + [""]
    if args.only in (None, "families"):
        out += families_section(args)
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
