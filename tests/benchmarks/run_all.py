"""Run every benchmark and write one markdown table of ratios (``tests/benchmarks/RESULTS.md``).

    python tests/benchmarks/run_all.py            # full sizes (about 30-40 minutes on 2 CPU cores)
    python tests/benchmarks/run_all.py --quick    # smaller sizes and fewer repeats, for a smoke run

Each ratio is measured within one process run (medians of repeated, interleaved timings where applicable).
On a CUDA machine the backbone section also times bf16 autocast and torch.compile.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}, {versions}"


def backbone_rows(quick: bool) -> list[tuple[str, float, str]]:
    import bench_backbone

    args = argparse.Namespace(batch=2 if quick else 8, repeats=3 if quick else 7, warmup=1 if quick else 2,
                              device="cpu", rows=[])  # fmt: skip
    bench_backbone.vit_section(args)
    bench_backbone.families_section(args)
    rows = args.rows
    if torch.cuda.is_available():
        rows += gpu_rows()
    return rows


def gpu_rows() -> list[tuple[str, float, str]]:
    """bf16 autocast and torch.compile vs float32 eager, HookedViT ViT-B/16 on the GPU."""
    import bench_backbone
    import timm

    from prisma_lightning.backbones import convert_model

    model = convert_model(timm.create_model("vit_base_patch16_224", pretrained=False)).cuda().eval()
    x = torch.randn(64, 3, 224, 224, device="cuda")
    compiled = torch.compile(model)

    def bf16():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x)

    med = bench_backbone.measure({"fp32": lambda: model(x), "bf16": bf16, "compile": lambda: compiled(x)}, 10, 3)
    return [("HookedViT bf16 autocast / fp32 (GPU)", med["bf16"] / med["fp32"], "report"),
            ("HookedViT torch.compile / eager (GPU)", med["compile"] / med["fp32"], "report")]  # fmt: skip


def sae_rows(quick: bool) -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    try:
        import bench_sae
    except ImportError:
        bench_sae = None
    if bench_sae is not None and hasattr(bench_sae, "ratio_rows"):
        rows += bench_sae.ratio_rows(quick=quick)
    import sae_pipeline_bench as pipe

    c = pipe.lightning_vs_raw(steps=5 if quick else 12, batch=512 if quick else 2048)
    rows.append(("Trainer.fit step / raw PyTorch loop step (SAE, cached)", c["ratio"], "<= 1.05"))
    d = pipe.shard_read_vs_raw(rows=50_000 if quick else 400_000)
    rows.append(("shard read throughput / raw sequential read", d["ratio"], ">= 0.8"))
    o = pipe.online_vs_forward(batch=8 if quick else 32, steps=3 if quick else 6)
    rows.append(("online SAE training / backbone forward only (images/s, ViT-S/16)", o["ratio"], "report"))
    m = pipe.online_peak_memory(buffer_tokens=2**17 if quick else 2**20, repeats=1 if quick else 3)
    rows.append(("peak memory added by the mixing buffer / its configured size", m["ratio"], "~1"))
    return rows


def multi_sae_rows(quick: bool) -> list[tuple[str, float, str]]:
    """Run in a fresh process: these rows time whole training runs against each other, which must not inherit the
    memory and allocator state that the earlier sections leave behind in this one."""
    import json
    import subprocess

    import bench_multi_sae as multi

    steps, batch, repeats = (2, 4, 1) if quick else (4, 8, 3)
    cmd = [sys.executable, str(HERE / "bench_multi_sae.py"), "--steps", str(steps), "--batch", str(batch),
           "--repeats", str(repeats)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    parts = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    a = next(p["amortisation"] for p in parts if "amortisation" in p)
    sweeps = {p["sweep"]["hook"]: p["sweep"] for p in parts if "sweep" in p}
    m = next(p["memory"] for p in parts if "memory" in p)
    split = (f"one run {a['multi_s']:.1f} s = backbone {a['multi_backbone_s']:.1f} s + SAEs {a['multi_sae_s']:.1f} s; "
             f"12 runs {a['singles_s']:.1f} s")  # fmt: skip
    last, middle = sweeps["blocks.11.hook_resid_post"], sweeps["blocks.5.hook_resid_post"]
    return [(f"12 SAEs on 12 layers in one run / 12 runs (wall time, ViT-S/16; {split})", a["ratio"], "<= 0.35"),
            (multi.sweep_label(last), last["ratio"], "<= 0.3"),
            (multi.sweep_label(middle), middle["ratio"], "report"),
            ("peak memory of the 12-SAE run / buffers + SAEs needed", m["ratio"], "<= 1.15")]  # fmt: skip


def atlas_rows(quick: bool) -> list[tuple[str, float, str]]:
    import bench_atlas as atlas

    images, repeats = (1000, 2) if quick else (5000, 5)
    q = atlas.quickstart_throughput(None, images, 250, repeats)
    rows = [("atlas pass / forward + encode, dSprites ViT-2L, SAE 1024", q["ratio"], "<= 1.3")]
    if not quick:
        v = atlas.vit_s_throughput(64, 32, 3)
        rows.append(("atlas pass / forward + encode, ViT-S/16, SAE 16384", v["ratio"], "<= 1.3"))
    sizes = (2000, 10_000) if quick else (10_000, 50_000)
    m = atlas.peak_memory(sizes, None, 1)
    rows.append((f"atlas peak memory, {sizes[1]:,} / {sizes[0]:,} images", m["ratio"], "~1"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = backbone_rows(args.quick) + sae_rows(args.quick) + multi_sae_rows(args.quick) + atlas_rows(args.quick)
    date = datetime.date.today().isoformat()
    lines = [f"Benchmarks ({'quick' if args.quick else 'full'} run, {date}): {machine()}", "",
             "| benchmark | ratio | target |", "| --- | --- | --- |"]  # fmt: skip
    lines += [f"| {name} | {ratio:.3f} | {target} |" for name, ratio, target in rows]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
