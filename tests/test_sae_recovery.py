"""Dictionary recovery: every architecture, trained *with its default config* on activations built from a known sparse
dictionary, must find its atoms. The data: 512 random unit-norm atoms in 64 dimensions, 4 active atoms per sample
with magnitudes in [0.5, 1.5], plus Gaussian noise of std 0.01 per dimension. An atom counts as recovered when some
decoder row has cosine similarity >= 0.9 with it; an SAE must recover >= 90% of the atoms. Training stops early once
92% are recovered (checked every 50 steps), so a healthy run takes a few hundred steps.

What a user sets is what the test sets: the activations are normalised (``expected_norm``, as the quickstart and the
recommended coefficients assume), the dictionary width and the optimiser recipe (batch, learning rate, step budget,
and the dead-feature window that scales with it) come from a table, and the only sparsity knob is swept -- the
architecture's coefficient around its ``recommended_coefficient`` (which is also its default), or ``k`` for
architectures that fix the number of active features. The test passes if some value of the sweep recovers the
dictionary; thresholds, bandwidths, dead-feature losses and initialisations are the architecture's defaults."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prisma_lightning.sae import (
    SAEConfig,
    SparseAutoencoder,
    Transcoder,
    TranscoderConfig,
    architecture_names,
    config_class,
    make_optimizer,
    train_step,
)

D, N_ATOMS, ACTIVE = 64, 512, 4
FACTORS = (1.0, 1.5, 0.5)
"""The coefficient sweep, as multiples of ``recommended_coefficient``, in the order tried."""
K_SWEEP = (ACTIVE, 2 * ACTIVE)
"""The sweep of ``k`` for architectures without a coefficient."""


@pytest.fixture(autouse=True)
def _single_thread():
    """Single-threaded: these matrices are small, and on a busy 2-core machine OpenMP threads that wait for each
    other make each step several times slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SparseDictionaryData:
    """Samples ``sum_j m_j * atoms[a_j]`` (+ the same codes through a second dictionary, for transcoders)."""

    def __init__(self, seed: int, d_out: int | None = None) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.atoms = self._unit_atoms(D)
        self.atoms_out = self._unit_atoms(d_out) if d_out else None

    def _unit_atoms(self, width: int) -> torch.Tensor:
        atoms = torch.randn(N_ATOMS, width, generator=self.gen)
        return atoms / atoms.norm(dim=1, keepdim=True)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.randint(0, N_ATOMS, (n, ACTIVE), generator=self.gen)
        mag = torch.rand(n, ACTIVE, 1, generator=self.gen) + 0.5
        x = (self.atoms[idx] * mag).sum(1) + 0.01 * torch.randn(n, D, generator=self.gen)
        y = None if self.atoms_out is None else (self.atoms_out[idx] * mag).sum(1)
        return x, y


def recovered_fraction(W_dec: torch.Tensor, atoms: torch.Tensor) -> float:
    rows = W_dec.detach() / W_dec.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ((atoms @ rows.T).max(dim=1).values >= 0.9).float().mean().item()


def train_until_recovered(sae, data: SparseDictionaryData, lr: float, max_steps: int, batch: int) -> float:
    """Train as the trainer does (``initialize_from_data`` on a sample, then Adam steps) until 92% are recovered."""
    atoms = data.atoms if data.atoms_out is None else data.atoms_out
    sample_x, sample_y = data.batch(8192)
    sae.initialize_from_data(sample_x, sample_y)
    opt = make_optimizer(sae, lr=lr)
    sae.train()
    fraction = 0.0
    for step in range(max_steps):
        x, y = data.batch(batch)
        out = train_step(sae, opt, x, y, step=step)
        assert torch.isfinite(out.loss), f"loss diverged at step {step}"
        if (step + 1) % 50 == 0:
            fraction = recovered_fraction(sae.W_dec, atoms)
            if fraction >= 0.92:
                break
    return fraction


RECIPES = {  # architecture: (d_sae, batch, Adam learning rate, step budget per sweep value)
    "relu": (1024, 512, 5e-3, 600),
    "gated": (1024, 512, 5e-3, 600),
    "jumprelu": (1024, 512, 5e-3, 600),
    "topk": (1024, 512, 5e-3, 1000),
    "batchtopk": (1024, 512, 6e-3, 1000),
    "matryoshka_batchtopk": (1024, 1024, 8e-3, 1000),
    "panneal": (1024, 512, 5e-3, 600),
    "archetypal": (1024, 512, 5e-3, 600),
    "matching_pursuit": (1024, 512, 5e-3, 600),
}
"""The optimiser recipe. The dead-feature window (in steps, like the budget) is a tenth of the budget: a run this
short never reaches the default 1,000-step window, so dead-feature losses (AuxK) would never start."""


def sweep(architecture: str) -> list[dict[str, float]]:
    """The values of the architecture's one sparsity knob to try, in order (the default first)."""
    cls = config_class(architecture)
    if cls.sparsity_field is not None and cls.recommended_coefficient is not None:
        return [{cls.sparsity_field: cls.recommended_coefficient * f} for f in FACTORS]
    assert "k" in {f.name for f in dataclasses.fields(cls)}, f"{architecture}: no coefficient and no k to sweep"
    return [{"k": k} for k in K_SWEEP]


def test_every_registered_architecture_has_a_recipe() -> None:
    """A new architecture is one file plus one entry here: the recovery test cannot silently skip it."""
    missing = sorted(set(architecture_names()) - set(RECIPES))
    assert not missing, f"add a RECIPES entry for {missing}"


def test_every_architecture_file_is_imported_and_registered() -> None:
    """Adding an architecture needs no edit outside its file: the package imports every module in it."""
    from pathlib import Path

    from prisma_lightning.sae import architecture_class, architectures

    files = {p.stem for p in Path(architectures.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    modules = {architecture_class(name).__module__.rsplit(".", 1)[-1] for name in architecture_names()}
    assert files == modules


def test_default_coefficient_is_the_recommended_one() -> None:
    """The default config *is* the recommended starting point (so the first value of each sweep is the default)."""
    for architecture in RECIPES:
        cls = config_class(architecture)
        if cls.sparsity_field is not None:
            cfg = SAEConfig(d_in=D, architecture=architecture)
            assert cfg.sparsity_coefficient == cls.recommended_coefficient, architecture


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(RECIPES))
def test_sae_recovers_the_dictionary_with_its_defaults(arch: str) -> None:
    d_sae, batch, lr, max_steps = RECIPES[arch]
    data = SparseDictionaryData(seed=1)
    tried = []
    for knob in sweep(arch):
        torch.manual_seed(0)
        cfg = SAEConfig(d_in=D, d_sae=d_sae, architecture=arch, normalize_activations="expected_norm",
                        dead_feature_window=max_steps // 10, **knob)  # fmt: skip
        sae = SparseAutoencoder(cfg)
        assert recovered_fraction(sae.W_dec, data.atoms) < 0.05  # random rows do not match atoms by chance
        fraction = train_until_recovered(sae, data, lr, max_steps, batch)
        tried.append(f"{knob}: {fraction:.1%}")
        if fraction >= 0.9:
            sae.fold_activation_norm_scaling_factor()  # folding rescales rows uniformly: directions survive
            assert recovered_fraction(sae.W_dec, data.atoms) == fraction
            return
    pytest.fail(f"{arch}: no value of the sweep recovered 90% of the atoms ({'; '.join(tried)})")


@pytest.mark.slow
def test_transcoder_learns_a_sparse_map() -> None:
    torch.manual_seed(0)
    cfg = TranscoderConfig(
        d_in=D,
        d_out=48,
        d_sae=1024,
        architecture="topk",
        k=ACTIVE,
        b_dec_init="mean",
        aux_k_coefficient=1.0,
        dead_feature_window=10,
        skip_connection=True,
    )
    tc = Transcoder(cfg)
    data = SparseDictionaryData(seed=2, d_out=48)
    fraction = train_until_recovered(tc, data, 5e-3, 1200, 512)
    assert fraction >= 0.9, f"transcoder: only {fraction:.1%} of the output atoms recovered"
    x, y = data.batch(512)
    tc.eval()
    out = tc(x, y)
    assert out.mse_loss < 0.3 * y.pow(2).sum(-1).mean()  # it maps inputs to targets, not just directions
