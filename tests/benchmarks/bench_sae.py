"""SAE training-step speed of every registered architecture against the dense GEMM floor (prints markdown tables).

    python tests/benchmarks/bench_sae.py [--d-in 768] [--expansion 16] [--batch 2048] [--k 64] [--repeats 9]

The floor is the five dense GEMMs a step of a dense SAE cannot avoid -- encoder forward ``x @ W_enc``, decoder
forward ``f @ W_dec``, the decoder's input gradient ``g @ W_dec.T`` and weight gradient ``f.T @ g``, and the
encoder's weight gradient ``x.T @ G`` (``x [B, d_in]``, ``f, G [B, d_sae]``, ``g [B, d_in]``) -- on the SAE's own
weight layouts, each writing into an output buffer allocated once (``out=``), so the floor times arithmetic, not
the allocator. Each row is a full ``train_step`` (forward, losses, backward, decoder-norm processing, Adam) of an
architecture with its default config (plus the options in ``OPTIONS``, e.g. ``k``), initialised from a data sample
as the trainer does. Every architecture in :func:`prisma_lightning.sae.architecture_names` gets a row, including
ones registered after this script was written.

All cases are timed interleaved in one process (each round runs every case, so drifts in machine load hit them
alike). Within a round each case runs twice in a row and the second run is the one timed: the steady state of a
training run, in which a step finds the work buffers its previous step left (see ``prisma_lightning.sae.scratch``)
-- right after nine other architectures' steps it finds theirs instead and allocates anew. The first runs are
reported too ("after other cases"), so that cost is not hidden. The tables report the median, the spread
(min - max) and the ratio of medians to the floor's. One reference row times the same GEMMs allocating fresh
outputs, the floor of earlier versions of this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from prisma_lightning.sae import SAEConfig, SparseAutoencoder, architecture_names, config_class, make_optimizer
from prisma_lightning.sae import train_step as sae_train_step

FLOOR = "GEMM floor (5 matmuls, preallocated outputs)"
FRESH = "the same GEMMs with fresh outputs (reference)"
OPTIONS: dict[str, dict[str, object]] = {}
"""Non-default options per architecture name, on top of ``k`` (given to every architecture that has the field)."""
TARGETS: dict[str, str] = {
    "relu": "<= 1.2",
    "topk": "<= 0.5",
    "batchtopk": "<= 0.5",
    "matryoshka_batchtopk": "<= 0.5",
    "jumprelu": "<= 1.2",
    "gated": "<= 1.6",
}
"""Targets of the ratio to the floor (other architectures: reported)."""


def _inputs(args: argparse.Namespace) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(args.batch, args.d_in, generator=gen)


def gemm_floor(args: argparse.Namespace) -> Callable[[], object]:
    """The five dense GEMMs of a step, on a ReLU SAE's weight layouts, into preallocated outputs."""
    sae = SparseAutoencoder(SAEConfig(d_in=args.d_in, expansion_factor=args.expansion, architecture="relu"))
    x, W_enc, W_dec = _inputs(args), sae.W_enc.detach(), sae.W_dec.detach()
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(args.batch, sae.d_sae, generator=gen)
    g = torch.randn(args.batch, args.d_in, generator=gen)
    pre, recon, grad_f = torch.empty_like(f), torch.empty_like(g), torch.empty_like(f)
    grad_W_dec, grad_W_enc = torch.empty_like(W_dec), torch.empty_like(W_enc)

    def run() -> None:
        torch.mm(x, W_enc, out=pre)  # encoder forward [B, d_sae]
        torch.mm(f, W_dec, out=recon)  # decoder forward [B, d_in]
        torch.mm(g, W_dec.t(), out=grad_f)  # decoder: gradient of the features [B, d_sae]
        torch.mm(f.t(), g, out=grad_W_dec)  # decoder: weight gradient [d_sae, d_in]
        torch.mm(x.t(), f, out=grad_W_enc)  # encoder: weight gradient [d_in, d_sae] (G has f's shape)

    return run


def gemm_floor_fresh(args: argparse.Namespace) -> Callable[[], object]:
    """The same five GEMMs allocating a fresh output each (the floor of earlier versions, for reference only)."""
    sae = SparseAutoencoder(SAEConfig(d_in=args.d_in, expansion_factor=args.expansion, architecture="relu"))
    x, W_enc, W_dec = _inputs(args), sae.W_enc.detach(), sae.W_dec.detach()
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(args.batch, sae.d_sae, generator=gen)
    g = torch.randn(args.batch, args.d_in, generator=gen)

    def run() -> None:
        torch.mm(x, W_enc)
        torch.mm(f, W_dec)
        torch.mm(g, W_dec.t())
        torch.mm(f.t(), g)
        torch.mm(x.t(), f)

    return run


def architecture_step(architecture: str) -> Callable[[argparse.Namespace], Callable[[], object]]:
    """A ``train_step`` case for ``architecture`` with its default config at the benchmark's sizes."""

    def build(args: argparse.Namespace) -> Callable[[], object]:
        fields = {f.name for f in dataclasses.fields(config_class(architecture))}
        extra = {"k": args.k} if "k" in fields else {}
        cfg = SAEConfig(d_in=args.d_in, expansion_factor=args.expansion, architecture=architecture,
                        b_dec_init="mean", **extra, **OPTIONS.get(architecture, {}))  # fmt: skip
        sae = SparseAutoencoder(cfg)
        x = _inputs(args)
        rows = max(4096, args.batch, sae.d_sae)  # archetypal takes d_sae candidates from the sample
        sae.initialize_from_data(torch.randn(rows, args.d_in, generator=torch.Generator().manual_seed(2)))
        optimizer = make_optimizer(sae, lr=1e-4)
        state = {"step": 0}

        def run() -> None:
            sae_train_step(sae, optimizer, x, step=state["step"])
            state["step"] += 1

        return run

    return build


def cases() -> dict[str, Callable[[argparse.Namespace], Callable[[], object]]]:
    """The floor, then one train-step case per registered architecture."""
    return {
        FLOOR: gemm_floor,
        FRESH: gemm_floor_fresh,
        **{name: architecture_step(name) for name in architecture_names()},
    }


Samples = dict[str, list[float]]


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> tuple[Samples, Samples]:
    """Wall-clock seconds of each case, ``repeats`` times, cases interleaved within each round: ``(steady, after)``,
    the second and the first of two runs in a row (see the module docstring)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    steady: Samples = {name: [] for name in fns}
    after: Samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for samples in (after, steady):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return steady, after


def measure(args: argparse.Namespace) -> tuple[Samples, Samples]:
    torch.manual_seed(0)
    return time_interleaved({name: build(args) for name, build in cases().items()}, args.repeats, args.warmup)


def ratio_rows(quick: bool = False) -> list[tuple[str, float, str]]:
    """``(label, median ratio to the floor, target)`` per architecture (for run_all.py)."""
    args = argparse.Namespace(d_in=768, expansion=4 if quick else 16, batch=512 if quick else 2048, k=64,
                              repeats=3 if quick else 9, warmup=1 if quick else 2)  # fmt: skip
    med = {name: statistics.median(ts) for name, ts in measure(args)[0].items()}
    size = f"d_in {args.d_in}, d_sae {args.d_in * args.expansion}, batch {args.batch}"
    return [
        (f"SAE {name} train_step / GEMM floor ({size})", med[name] / med[FLOOR], TARGETS.get(name, "report"))
        for name in med
        if name not in (FLOOR, FRESH)
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads{load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--architectures", nargs="*", default=None, help="default: every registered one")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    before = machine()
    builders = cases()
    if args.architectures:
        builders = {k: v for k, v in builders.items() if k in (FLOOR, FRESH) or k in args.architectures}
    torch.manual_seed(0)
    samples, after = time_interleaved({name: build(args) for name, build in builders.items()}, args.repeats,
                                      args.warmup)  # fmt: skip
    med = {name: statistics.median(ts) for name, ts in samples.items()}
    med_after = {name: statistics.median(ts) for name, ts in after.items()}
    d_sae = args.d_in * args.expansion
    print(
        f"\nbench_sae: d_in {args.d_in}, d_sae {d_sae}, batch {args.batch}, k {args.k}, float32, CPU; {args.repeats} "
        f"interleaved rounds\nbefore: {before}\nafter:  {machine()}\n"
    )
    print("| case | median s | min - max s | ratio to floor (medians) | ratio of mins | target "
          "| after other cases: ratio (medians) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    floor_min = min(samples[FLOOR])
    for name, ts in samples.items():
        ratio = "1" if name == FLOOR else f"{med[name] / med[FLOOR]:.2f}"
        mins = "1" if name == FLOOR else f"{min(ts) / floor_min:.2f}"
        target = "" if name in (FLOOR, FRESH) else TARGETS.get(name, "report")
        cold = f"{med_after[name] / med_after[FLOOR]:.2f}"
        print(f"| {name} | {med[name]:.3f} | {min(ts):.3f} - {max(ts):.3f} | {ratio} | {mins} | {target} | {cold} |")


if __name__ == "__main__":
    main()
