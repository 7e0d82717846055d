"""HookedViT vs timm forward speed, early stopping and full caching (prints a markdown table of ratios).

    python tests/benchmarks/bench_backbone.py [--model vit_base_patch16_224] [--batch 8] [--repeats 7]

All timings are medians over interleaved repeats in this one process, on random weights.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch


def median_time(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm architecture (random weights)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    import timm

    from prisma_lightning.backbones import convert_model

    torch.manual_seed(0)
    source = timm.create_model(args.model, pretrained=False).eval()
    hooked = convert_model(source)
    size = source.patch_embed.img_size
    images = torch.randn(args.batch, 3, *size)
    mid = hooked.cfg.n_layers // 2

    cases: dict[str, Callable[[], object]] = {
        "timm forward": lambda: source(images),
        "HookedViT forward": lambda: hooked(images),
        f"run_with_cache(blocks.{mid - 1}.hook_resid_post, stop_at_layer={mid})": lambda: hooked.run_with_cache(
            images, names_filter=f"blocks.{mid - 1}.hook_resid_post", stop_at_layer=mid
        ),
        "run_with_cache(every hook)": lambda: hooked.run_with_cache(images),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for fn in cases.values():
            for _ in range(args.warmup):
                fn()
        # Interleave the cases so drift in machine load hits all of them alike.
        for _ in range(args.repeats):
            for name, fn in cases.items():
                samples[name] += median_time(fn, 1)
    med = {name: statistics.median(ts) for name, ts in samples.items()}
    names = list(cases)
    rows = [
        ("HookedViT forward / timm forward", med[names[1]] / med[names[0]], "<= 1.05"),
        (f"{names[2]} / HookedViT forward", med[names[2]] / med[names[1]], "<= 0.6"),
        ("run_with_cache(every hook) / HookedViT forward", med[names[3]] / med[names[1]], "report"),
    ]
    print(
        f"\nbench_backbone: {args.model}, batch {args.batch}, {size[0]} px, float32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"median of {args.repeats}\n"
    )
    print("| case | median seconds |\n| --- | --- |")
    for name in names:
        print(f"| {name} | {med[name]:.3f} |")
    print("\n| ratio | measured | target |\n| --- | --- | --- |")
    for label, ratio, target in rows:
        print(f"| {label} | {ratio:.3f} | {target} |")


if __name__ == "__main__":
    main()
