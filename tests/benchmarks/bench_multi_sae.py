"""Many SAEs from one backbone pass: what a multi-SAE run saves over one run per SAE, and what it holds in memory.

Rows (each a ratio measured in this process, medians over interleaved repeats):

* **amortisation**: 12 TopK SAEs on the 12 layers of a ViT-S/16-sized random backbone in one run vs 12 single-SAE
  runs, the same SAE steps and tokens for each SAE; total wall time ratio (target <= 0.35), with the split of the
  multi-SAE run's time between the backbone pass and the SAE steps.
* **sweep**: 8 ReLU SAEs on one hook differing only in their sparsity coefficient in one run vs 8 runs (<= 0.3), on
  the last block's residual stream and, reported, on the middle one's (half the backbone pass to share); each row
  names the ratio that sharing the backbone pass alone would give (one backbone pass plus the singles' SAE side).
* **memory**: extra peak memory (VmHWM) of the 12-SAE run over the same process before the SAEs are built, vs what
  its buffers and SAEs need (``SAEModule.memory_needed()``: buffers, SAE parameters with gradients and Adam moments,
  one step's activations); target <= 1.15.

Run: ``python tests/benchmarks/bench_multi_sae.py`` (``--help`` for sizes). The equality of each SAE of a
multi-SAE run with the same SAE trained alone is a test (``tests/test_multi_sae.py``), not a benchmark.
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

HERE = Path(__file__).resolve().parent


def _loader(n_images: int, batch: int, size: int = 224):
    from torch.utils.data import DataLoader, TensorDataset

    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(images, torch.zeros(n_images)), batch_size=batch)


def _fit(backbone, steps: int, batch: int, **module_kw) -> dict[str, float]:
    """Wall time of a fit from its first training step to its last, and the part spent in the backbone pass."""
    import lightning.pytorch as pl

    from prisma_lightning.modules import SAEModule

    tokens = batch * backbone.cfg.n_tokens
    module = SAEModule(backbone=backbone, buffer_tokens=2 * tokens, batch_tokens=tokens, init_tokens=tokens,
                       export_dir=tempfile.mkdtemp(), export_on_checkpoint=False, **module_kw)  # fmt: skip
    spent = {"backbone": 0.0}
    rows = module.rows_from_images

    def timed_rows(images):
        t0 = time.perf_counter()
        out = rows(images)
        spent["backbone"] += time.perf_counter() - t0
        return out

    module.rows_from_images = timed_rows
    span: dict[str, float] = {}

    class Span(pl.Callback):
        def on_train_start(self, *args):
            spent["backbone"] = 0.0  # the initialisation pass is not part of the steps
            span["start"] = time.perf_counter()

        def on_train_end(self, *args):
            span["end"] = time.perf_counter()

    pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[Span()], accelerator="cpu", devices=1).fit(
        module, _loader(batch * (3 * steps + 4), batch)
    )  # fmt: skip
    total = span["end"] - span["start"]
    return {"total": total, "backbone": spent["backbone"], "sae": total - spent["backbone"]}


def amortisation(layers: int = 12, steps: int = 4, batch: int = 8, expansion: int = 8, k: int = 32,
                 repeats: int = 2) -> dict:  # fmt: skip
    from prisma_lightning.backbones import load_hooked_model

    torch.manual_seed(0)
    backbone = load_hooked_model("timm/vit_small_patch16_224.augreg_in21k", pretrained=False)
    d = backbone.cfg.d_model
    template = {"architecture": "topk", "d_in": d, "expansion_factor": expansion, "k": k, "b_dec_init": "mean"}
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(layers)]
    _fit(backbone, 1, batch, sae=template, hooks=hooks[:2])  # warm-up, not measured
    ratios, splits = [], []
    for r in range(repeats):
        if r % 2:  # alternate which side runs first
            single = [_fit(backbone, steps, batch, sae={**template, "hook_name": h}) for h in hooks]
            multi = _fit(backbone, steps, batch, sae=template, hooks=hooks)
        else:
            multi = _fit(backbone, steps, batch, sae=template, hooks=hooks)
            single = [_fit(backbone, steps, batch, sae={**template, "hook_name": h}) for h in hooks]
        ratios.append(multi["total"] / sum(s["total"] for s in single))
        splits.append(multi)
    split = splits[-1]
    return {"ratio": statistics.median(ratios), "ratios": ratios, "multi_s": split["total"],
            "multi_backbone_s": split["backbone"], "multi_sae_s": split["sae"],
            "singles_s": None if not splits else sum(s["total"] for s in single)}  # fmt: skip


def sweep(n: int = 8, steps: int = 4, batch: int = 8, expansion: int = 8, repeats: int = 2,
          hook: str = "blocks.11.hook_resid_post") -> dict:  # fmt: skip
    """``n`` ReLU SAEs on ``hook`` differing only in ``l1_coefficient``: one run vs ``n`` runs.

    Besides the ratio, ``backbone_only`` is what it would be if the one run saved exactly the backbone passes of the
    other ``n - 1`` runs, ``(B + n S) / (n (B + S))`` with the singles' mean backbone time ``B`` and SAE-side time
    ``S`` (steps, data, loop): a hook whose SAE side weighs more than about a quarter of its backbone pass cannot
    reach 0.3 that way; the one run also shares the loop's per-step work, so it may do a little better.
    """
    from prisma_lightning.backbones import load_hooked_model

    torch.manual_seed(0)
    backbone = load_hooked_model("timm/vit_small_patch16_224.augreg_in21k", pretrained=False)
    d = backbone.cfg.d_model
    coefficients = [10 ** (-4 + 0.4 * i) for i in range(n)]
    template = {"architecture": "relu", "d_in": d, "expansion_factor": expansion, "hook_name": hook,
                "b_dec_init": "mean"}  # fmt: skip
    _fit(backbone, 1, batch, sae=template, sweep={"l1_coefficient": coefficients[:2]})  # warm-up, not measured
    ratios, splits = [], []
    for r in range(repeats):
        # alternate which side runs first, so neither always meets the other's leftover state
        if r % 2:
            single = [_fit(backbone, steps, batch, sae={**template, "l1_coefficient": c}) for c in coefficients]
            multi = _fit(backbone, steps, batch, sae=template, sweep={"l1_coefficient": coefficients})
        else:
            multi = _fit(backbone, steps, batch, sae=template, sweep={"l1_coefficient": coefficients})
            single = [_fit(backbone, steps, batch, sae={**template, "l1_coefficient": c}) for c in coefficients]
        ratios.append(multi["total"] / sum(s["total"] for s in single))
        splits.append((multi, single))
    multi, single = splits[-1]
    b_one = statistics.mean(s["backbone"] for _, single_runs in splits for s in single_runs)
    s_one = statistics.mean(s["sae"] for _, single_runs in splits for s in single_runs)
    backbone_only = (b_one + n * s_one) / (n * (b_one + s_one))
    return {"ratio": statistics.median(ratios), "ratios": ratios, "backbone_only": backbone_only, "hook": hook,
            "multi_s": multi["total"],
            "multi_backbone_s": multi["backbone"], "multi_sae_s": multi["sae"],
            "singles_s": sum(s["total"] for s in single), "singles_sae_s": sum(s["sae"] for s in single)}  # fmt: skip


_MEMORY_SCRIPT = """
import json, tempfile, torch, lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from prisma_lightning.backbones import load_hooked_model
from prisma_lightning.modules import SAEModule

def peak_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

torch.manual_seed(0)
backbone = load_hooked_model("timm/vit_small_patch16_224.augreg_in21k", pretrained=False).eval()
batch, layers = {batch}, {layers}
images = torch.randn(batch * 16, 3, 224, 224)
loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=batch)
with torch.no_grad():  # the backbone's own peak (its activations) is part of the baseline, not of the SAEs
    backbone(images[:batch])
before = peak_kb()
tokens = batch * backbone.cfg.n_tokens
template = dict(architecture="topk", d_in=backbone.cfg.d_model, expansion_factor={expansion}, k=32, b_dec_init="mean")
module = SAEModule(sae=template, hooks=[f"blocks.{{i}}.hook_resid_post" for i in range(layers)], backbone=backbone,
                   buffer_tokens={buffer}, batch_tokens=tokens, init_tokens=tokens, export_dir=tempfile.mkdtemp(),
                   export_on_checkpoint=False)
pl.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False, accelerator="cpu").fit(module, loader)
after = peak_kb()
print(json.dumps({{"growth": (after - before) * 1024, "needed": module.memory_needed()}}))
"""


def memory(layers: int = 12, batch: int = 8, expansion: int = 8, buffer: int = 65536, repeats: int = 2) -> dict:
    script = _MEMORY_SCRIPT.format(batch=batch, layers=layers, expansion=expansion, buffer=buffer)
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    growth = statistics.median(r["growth"] for r in runs)
    needed = sum(runs[0]["needed"].values())
    return {"ratio": growth / needed, "growth_MB": growth / 2**20, "needed_MB": needed / 2**20,
            "needed_parts_MB": {k: v / 2**20 for k, v in runs[0]["needed"].items()}}  # fmt: skip


def sweep_label(r: dict) -> str:
    alone = r["backbone_only"]
    return f"8-coefficient ReLU sweep on {r['hook']} in one run / 8 runs (backbone sharing alone: {alone:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="images per batch (one SAE step per image batch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=["amortisation", "sweep", "memory"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = []
    if args.only in (None, "amortisation"):
        r = amortisation(steps=args.steps, batch=args.batch, repeats=args.repeats)
        rows.append(("12 SAEs on 12 layers in one run / 12 runs (wall time, ViT-S/16)", r["ratio"], "<= 0.35"))
        print(json.dumps({"amortisation": r}))
    if args.only in (None, "sweep"):
        for hook, target in (("blocks.11.hook_resid_post", "<= 0.3"), ("blocks.5.hook_resid_post", "report")):
            r = sweep(steps=args.steps, batch=args.batch, repeats=args.repeats, hook=hook)
            rows.append((sweep_label(r), r["ratio"], target))
            print(json.dumps({"sweep": r}))
    if args.only in (None, "memory"):
        r = memory(batch=args.batch, repeats=args.repeats)
        rows.append(("peak memory of the 12-SAE run / buffers + SAEs needed", r["ratio"], "<= 1.15"))
        print(json.dumps({"memory": r}))
    print("\n| benchmark | ratio | target |\n| --- | --- | --- |")
    for name, ratio, target in rows:
        print(f"| {name} | {ratio:.3f} | {target} |")


if __name__ == "__main__":
    main()
