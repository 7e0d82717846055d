"""Dictionary recovery: every architecture, trained on activations built from a known sparse dictionary, must find
its atoms. The data: 512 random unit-norm atoms in 64 dimensions, 4 active atoms per sample with magnitudes in
[0.5, 1.5], plus Gaussian noise of std 0.01 per dimension. An atom counts as recovered when some decoder row has
cosine similarity >= 0.9 with it; each SAE must recover >= 90% of the atoms. Training stops early once 92% are
recovered (checked every 50 steps), so a healthy run takes a few hundred steps.

JumpReLU is trained here with Anthropic's tanh penalty: with the step-function L0 penalty alone, Adam moves each
log-threshold by about one learning rate per step and recovery takes thousands of steps (the L0 straight-through
gradient itself is checked against its formula in test_sae_architectures.py)."""

from __future__ import annotations

import pytest
import torch

from prisma_lightning.sae import (
    SAEConfig,
    SparseAutoencoder,
    Transcoder,
    TranscoderConfig,
    make_optimizer,
    train_step,
)

D, N_ATOMS, ACTIVE = 64, 512, 4


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
    atoms = data.atoms if data.atoms_out is None else data.atoms_out
    sample_x, sample_y = data.batch(8192)
    if sae.cfg.normalize_activations == "expected_norm":
        sae.fit_normalization(sample_x) if sample_y is None else sae.fit_normalization(sample_x, sample_y)
    sae.initialize_b_dec(sample_x if sample_y is None else sample_y)
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


AUXK = {"aux_k_coefficient": 1.0, "dead_feature_window": 10}  # revive features quickly: runs are short
TANH_JUMPRELU = {  # Anthropic's tanh penalty (see the note in the module docstring)
    "jumprelu_sparsity_loss": "tanh",
    "jumprelu_tanh_scale": 1.0,
    "l0_coefficient": 1.0,
    "jumprelu_init_threshold": 0.01,
    "jumprelu_bandwidth": 0.05,
}
RECIPES = {  # architecture: (config overrides, d_sae, batch, Adam learning rate, step budget)
    "relu": ({"l1_coefficient": 1.0}, 1024, 512, 3e-3, 600),
    "gated": ({"l1_coefficient": 2.0}, 1024, 512, 3e-3, 600),
    "jumprelu": (TANH_JUMPRELU, 1024, 512, 3e-3, 600),
    "topk": ({"normalize_activations": "expected_norm", **AUXK}, 512, 512, 5e-3, 1200),
    "batchtopk": ({"normalize_activations": "expected_norm", **AUXK}, 512, 512, 6e-3, 1600),
    "matryoshka_batchtopk": ({"matryoshka_prefixes": [256], **AUXK}, 512, 1024, 8e-3, 1600),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(RECIPES))
def test_sae_recovers_the_dictionary(arch: str) -> None:
    torch.manual_seed(0)
    overrides, d_sae, batch, lr, max_steps = RECIPES[arch]
    cfg = SAEConfig(d_in=D, d_sae=d_sae, architecture=arch, k=ACTIVE, b_dec_init="mean", **overrides)
    sae = SparseAutoencoder(cfg)
    data = SparseDictionaryData(seed=1)
    assert recovered_fraction(sae.W_dec, data.atoms) < 0.05  # random rows do not match atoms by chance
    fraction = train_until_recovered(sae, data, lr, max_steps, batch)
    assert fraction >= 0.9, f"{arch}: only {fraction:.1%} of the atoms recovered"
    if cfg.normalize_activations == "expected_norm":  # folding rescales rows uniformly: directions survive
        sae.fold_activation_norm_scaling_factor()
        assert recovered_fraction(sae.W_dec, data.atoms) == fraction


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
