"""SAE training-step speed against the dense matmul floor (prints one markdown table of ratios).

    python tests/benchmarks/bench_sae.py [--d-in 768] [--expansion 16] [--batch 2048] [--k 64] [--repeats 7]

The floor is the five GEMMs a dense SAE step cannot avoid: encoder forward ``x @ W_enc``, decoder forward
``f @ W_dec``, decoder input gradient ``g @ W_dec.T``, decoder weight gradient ``f.T @ g`` and encoder weight
gradient ``x.T @ G``, each producing a fresh output as in a real step (``x [B, d_in]``, ``f, G [B, d_sae]``,
``g [B, d_in]``). The cases:

(a) ReLU SAE: a full ``train_step`` (forward, MSE + norm-weighted L1, backward, Adam, decoder processing) / floor;
    target <= 1.2.
(b) TopK SAE (k=64): the same step with the index-based sparse decoder and encoder backward / floor; target <= 0.6.

The other architectures (BatchTopK, Matryoshka BatchTopK, JumpReLU, Gated) are timed against the same floor.

Each case is a function returning a zero-argument callable; ``main`` times all of them interleaved (so drifts in
machine load hit every case alike) and prints medians and ratios. New cases: add a builder to ``CASES`` and a
row to ``RATIOS``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from prisma_lightning.sae import SAEConfig, SparseAutoencoder, make_optimizer, train_step

Builder = Callable[[argparse.Namespace], Callable[[], object]]


def _inputs(args: argparse.Namespace) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(args.batch, args.d_in, generator=gen)


def gemm_floor(args: argparse.Namespace) -> Callable[[], object]:
    """The five dense matmuls of a ReLU SAE step, on the SAE's own weight layouts."""
    sae = SparseAutoencoder(SAEConfig(d_in=args.d_in, expansion_factor=args.expansion))
    x, W_enc, W_dec = _inputs(args), sae.W_enc.detach(), sae.W_dec.detach()
    f = torch.randn(args.batch, sae.d_sae)
    g = torch.randn(args.batch, args.d_in)

    def run() -> None:
        torch.mm(x, W_enc)  # encoder forward
        torch.mm(f, W_dec)  # decoder forward
        torch.mm(g, W_dec.t())  # decoder: gradient of the features
        torch.mm(f.t(), g)  # decoder: weight gradient [d_sae, d_in]
        torch.mm(x.t(), f)  # encoder: weight gradient [d_in, d_sae] (the feature gradient has f's shape)

    return run


def _train_step_case(cfg: SAEConfig, args: argparse.Namespace) -> Callable[[], object]:
    sae = SparseAutoencoder(cfg)
    x = _inputs(args)
    sae.initialize_b_dec(x[:256])
    optimizer = make_optimizer(sae, lr=1e-4)
    state = {"step": 0}

    def run() -> None:
        train_step(sae, optimizer, x, step=state["step"])
        state["step"] += 1

    return run


def relu_train_step(args: argparse.Namespace) -> Callable[[], object]:
    """(a) ReLU SAE, L1 weighted by decoder norms, free decoder."""
    cfg = SAEConfig(d_in=args.d_in, expansion_factor=args.expansion, architecture="relu", b_dec_init="mean")
    return _train_step_case(cfg, args)


def topk_train_step(args: argparse.Namespace) -> Callable[[], object]:
    """(b) TopK SAE, unit-norm decoder (gradient projection and renormalisation included)."""
    cfg = SAEConfig(d_in=args.d_in, expansion_factor=args.expansion, architecture="topk", k=args.k, b_dec_init="mean")
    return _train_step_case(cfg, args)


def architecture_step(architecture: str) -> Builder:
    """A train_step case for any other architecture, at the same sizes (k for the TopK family)."""

    def build(args: argparse.Namespace) -> Callable[[], object]:
        k = args.k if architecture in ("batchtopk", "matryoshka_batchtopk") else None
        cfg = SAEConfig(d_in=args.d_in, expansion_factor=args.expansion, architecture=architecture, k=k,
                        b_dec_init="mean")  # fmt: skip
        return _train_step_case(cfg, args)

    build.__doc__ = f"{architecture} SAE train_step."
    return build


FLOOR = "dense GEMM floor (5 matmuls)"
CASES: dict[str, Builder] = {
    FLOOR: gemm_floor,
    "ReLU SAE train_step": relu_train_step,
    "TopK SAE train_step": topk_train_step,
    "BatchTopK SAE train_step": architecture_step("batchtopk"),
    "Matryoshka BatchTopK SAE train_step": architecture_step("matryoshka_batchtopk"),
    "JumpReLU SAE train_step": architecture_step("jumprelu"),
    "Gated SAE train_step": architecture_step("gated"),
}
RATIOS: list[tuple[str, str, str, str]] = [
    # (label, numerator case, denominator case, target)
    ("(a) ReLU train_step / GEMM floor", "ReLU SAE train_step", FLOOR, "<= 1.2"),
    ("(b) TopK train_step / GEMM floor", "TopK SAE train_step", FLOOR, "<= 0.6"),
    ("BatchTopK train_step / GEMM floor", "BatchTopK SAE train_step", FLOOR, "<= 0.6"),
    ("Matryoshka BatchTopK train_step / GEMM floor", "Matryoshka BatchTopK SAE train_step", FLOOR, "report"),
    ("JumpReLU train_step / GEMM floor", "JumpReLU SAE train_step", FLOOR, "<= 1.2"),
    ("Gated train_step / GEMM floor", "Gated SAE train_step", FLOOR, "report"),
]


def ratio_rows(quick: bool = False) -> list[tuple[str, float, str]]:
    """The ratios above as ``(label, median ratio, target)`` rows (for run_all.py)."""
    args = argparse.Namespace(d_in=768, expansion=4 if quick else 16, batch=512 if quick else 2048, k=64,
                              repeats=3 if quick else 7, warmup=1 if quick else 2)  # fmt: skip
    samples = time_interleaved({name: build(args) for name, build in CASES.items()}, args.repeats, args.warmup)
    med = {name: statistics.median(ts) for name, ts in samples.items()}
    size = f"d_in {args.d_in}, d_sae {args.d_in * args.expansion}, batch {args.batch}"
    return [(f"SAE {label} ({size})", med[num] / med[den], target) for label, num, den, target in RATIOS]


def time_interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall-clock seconds of each case, ``repeats`` times, cases interleaved within each round."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    samples = time_interleaved({name: build(args) for name, build in CASES.items()}, args.repeats, args.warmup)
    med = {name: statistics.median(ts) for name, ts in samples.items()}
    best = {name: min(ts) for name, ts in samples.items()}
    d_sae = args.d_in * args.expansion
    print(
        f"\nbench_sae: d_in {args.d_in}, d_sae {d_sae}, batch {args.batch}, k {args.k}, float32, CPU; "
        f"{machine()}; median (and min) of {args.repeats} interleaved runs\n"
    )
    print("| case | median s | min s |\n| --- | --- | --- |")
    for name in CASES:
        print(f"| {name} | {med[name]:.3f} | {best[name]:.3f} |")
    print("\n| ratio | median | from mins | target |\n| --- | --- | --- | --- |")
    for label, num, den, target in RATIOS:
        print(f"| {label} | {med[num] / med[den]:.2f} | {best[num] / best[den]:.2f} | {target} |")


if __name__ == "__main__":
    main()
