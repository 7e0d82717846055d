"""P-annealing SAE: a ReLU SAE whose ``Lp`` sparsity penalty starts convex (``p = 1``, the L1) and is annealed
toward ``p < 1``, closer to the L0 count that sparsity really means.

Method: Karvonen, Wright, Rager, Angell, Brinkmann, Smith, Mayrink Verdun, Bau and Marks (2024), "Measuring Progress
in Dictionary Learning for Language Model Interpretability with Board Game Models" (NeurIPS 2024, arXiv:2408.00113),
section "p-annealing". Training starts with the convex L1 penalty; from ``anneal_start`` to ``anneal_end`` ``p`` is
lowered in ``n_p_updates`` equal steps to ``p_end``. ``sum_i a_i^p`` grows as ``p`` falls (activations below 1
count more), so at each change the coefficient is multiplied by ``mean Lp(a; p_old) / mean Lp(a; p_new)``, both
averaged over the ``rescale_window`` training batches before the change: the penalty keeps its size and only its
shape changes.

The penalty acts on decoder-norm-weighted activations ``a_i = f_i * ||W_dec[i]||``, averaged over tokens, with free
decoder rows by default (Anthropic's convention, as the ``relu`` architecture: at ``p = 1`` the two are the same
SAE; the paper keeps unit-norm rows instead, ``decoder_norm='unit'``, where ``a_i = f_i``). ``lp_form`` chooses
``sum_i a_i^p`` (the default: it tends to the L0 count as ``p -> 0``) or the quasi-norm ``(sum_i a_i^p)^(1/p)``.
The encoder and decoder are a plain ReLU SAE (one fused autograd node,
:func:`~prisma_lightning.sae.activations.relu_sae`), so a trained ``panneal`` SAE is saved as SAELens's
``standard`` architecture and reads back in SAELens unchanged.

The schedule state -- the coefficient's rescaling factor, which change of ``p`` was applied last and the running
sums behind the next rescaling -- lives in buffers: checkpoints resume it exactly, and under DDP the sums are
averaged over the ranks every step, so every rank rescales by the same factor. The inference file does not hold
it (SAELens's ``standard`` layout has no room for it): training a loaded SAE further starts the schedule afresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..activations import relu_sae
from ..config import check_choice, check_int, check_number
from ..registry import register_architecture
from ..sparse_autoencoder import Pass, SparseAutoencoder
from ..sparse_ops import pre_activations
from .relu import FittedDecoder, FittedDecoderConfig

LpForm = Literal["lp_p", "lp"]


@dataclass
class PAnnealConfig(FittedDecoderConfig):
    """P-annealing SAE: ReLU encoder, ``Lp`` penalty with ``p`` annealed from ``p_start`` to ``p_end``."""

    architecture: Literal["panneal"] = "panneal"
    """``panneal``."""
    lp_coefficient: float = 1.0
    """Weight of the ``Lp`` penalty at the start of training (at ``p = p_start``), per token, averaged over tokens.
    Each change of ``p`` rescales it so the penalty keeps its size (see the module docstring). The default is the
    ``relu`` architecture's recommendation, for activations normalised to ``E||x|| = sqrt(d_in)``
    (``normalize_activations='expected_norm'``): at ``p = 1`` the two SAEs are the same. On a planted dictionary in 64
    dimensions 1 recovers it at ``p = 1``; annealed to ``p = 0.2`` within 400 steps, 2 to 2.5 do (1 leaves codes
    too dense, 3 starts to silence atoms)."""
    p_start: float = 1.0
    """``p`` before annealing starts (1: the convex L1 penalty)."""
    p_end: float = 0.2
    """``p`` at ``anneal_end`` and after; in ``(0, p_start]``."""
    anneal_start: int = 1000
    """Training step at which annealing begins (``p = p_start`` until the first change after it)."""
    anneal_end: int = 10000
    """Training step of the last change of ``p`` (to ``p_end``); Karvonen et al. anneal until the end of training,
    so set it near ``trainer.max_steps``."""
    n_p_updates: int = 10
    """Number of changes of ``p``: the ``i``-th, at step ``anneal_start + i * (anneal_end - anneal_start) /
    n_p_updates``, sets ``p = p_start + i * (p_end - p_start) / n_p_updates``."""
    rescale_window: int = 10
    """Training batches before each change over which the penalty at the old and the new ``p`` is averaged to
    rescale the coefficient."""
    lp_form: LpForm = "lp_p"
    """``lp_p``: ``sum_i a_i^p`` (tends to the L0 count as ``p -> 0``); ``lp``: the quasi-norm
    ``(sum_i a_i^p)^(1/p)``."""

    sparsity_field = "lp_coefficient"
    recommended_coefficient = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("lp_coefficient", self.lp_coefficient)
        check_choice("lp_form", self.lp_form, ("lp_p", "lp"))
        if not 0 < self.p_start <= 1:
            raise ValueError(f"p_start must be in (0, 1] (1 is the L1 penalty), got {self.p_start!r}.")
        if not 0 < self.p_end <= self.p_start:
            raise ValueError(
                f"p_end must be in (0, p_start={self.p_start}] (p is annealed downwards), got {self.p_end!r}."
            )
        check_int("anneal_start", self.anneal_start, minimum=0)
        check_int("anneal_end", self.anneal_end, minimum=0)
        check_int("n_p_updates", self.n_p_updates)
        check_int("rescale_window", self.rescale_window)
        if self.anneal_end < self.anneal_start + self.n_p_updates:
            raise ValueError(
                f"anneal_end={self.anneal_end} must be at least anneal_start + n_p_updates = "
                f"{self.anneal_start + self.n_p_updates} (one training step per change of p); raise anneal_end or "
                "lower n_p_updates."
            )


@register_architecture
class PAnnealSAE(FittedDecoder, SparseAutoencoder):
    """P-annealing SAE (see the module docstring)."""

    config_class = PAnnealConfig
    paper = (
        "Karvonen et al. 2024, Measuring Progress in Dictionary Learning for Language Model Interpretability with "
        "Board Game Models (p-annealing)"
    )

    def build_parameters(self, kw: dict[str, Any]) -> None:
        super().build_parameters(kw)
        self.register_buffer("lp_scale", torch.ones((), **kw))
        """Factor applied to ``lp_coefficient`` by the rescalings so far."""
        self.register_buffer("p_updates_done", torch.zeros((), dtype=torch.long, device=kw["device"]))
        """How many changes of ``p`` were applied."""
        self.register_buffer("lp_sums", torch.zeros(3, **kw))
        """Running sums for the next rescaling: mean penalty at the current ``p``, at the next ``p``, batches."""

    # ------------------------------------------------------------------ schedule
    def p_after(self, n_updates: int) -> float:
        """``p`` once ``n_updates`` changes have been applied."""
        cfg = self.cfg
        t = min(n_updates, cfg.n_p_updates) / cfg.n_p_updates
        return cfg.p_start * (1 - t) + cfg.p_end * t

    def update_step(self, i: int) -> int:
        """Training step of the ``i``-th change of ``p`` (1-based)."""
        cfg = self.cfg
        return cfg.anneal_start + (i * (cfg.anneal_end - cfg.anneal_start)) // cfg.n_p_updates

    @property
    def p(self) -> float:
        """The current exponent of the penalty."""
        return self.p_after(int(self.p_updates_done))

    @torch.no_grad()
    def _advance(self, step: int) -> None:
        """Apply every change of ``p`` due at ``step``, rescaling the coefficient by the measured penalty ratio."""
        done = int(self.p_updates_done)
        while done < self.cfg.n_p_updates and step >= self.update_step(done + 1):
            now, nxt, count = self.lp_sums
            if count > 0 and nxt > 0 and now > 0:
                self.lp_scale.mul_(now / nxt)
            self.lp_sums.zero_()
            done += 1
            self.p_updates_done.fill_(done)

    def _collecting(self, step: int) -> bool:
        """Whether ``step`` is one of the ``rescale_window`` steps before the next change of ``p``."""
        done = int(self.p_updates_done)
        if done >= self.cfg.n_p_updates or self.p_after(done + 1) == self.p_after(done):
            return False
        return self.update_step(done + 1) - self.cfg.rescale_window <= step

    def sparsity_coefficient(self, step: int | None = None) -> float:
        """``lp_coefficient`` times the rescaling factor, ramped over ``l1_warmup_steps``."""
        return super().sparsity_coefficient(step) * float(self.lp_scale)

    def reset_feature_state(self, features: Tensor | None) -> None:
        if features is None:  # a fresh SAE starts the schedule afresh
            self.lp_scale.fill_(1.0)
            self.p_updates_done.zero_()
            self.lp_sums.zero_()

    # ------------------------------------------------------------------ penalty
    def lp_penalty(self, a: Tensor, p: float) -> Tensor:
        """Per-token penalty ``[n]`` of non-negative weighted activations ``a [n, d_sae]`` at exponent ``p``."""
        if p == 1.0:
            return a.sum(-1)
        on = a > 0
        # a^p only where a > 0: the derivative p * a^(p-1) is infinite at 0, and inf * 0 would make NaN gradients
        powered = torch.where(on, torch.where(on, a, 1.0).pow(p), 0.0).sum(-1)
        if self.cfg.lp_form == "lp_p":
            return powered
        nonzero = powered > 0
        return torch.where(nonzero, torch.where(nonzero, powered, 1.0).pow(1.0 / p), 0.0)

    # ------------------------------------------------------------------ forward
    def encode_rows(self, x_n: Tensor) -> Tensor:
        return pre_activations(x_n, self.W_enc, self.b_enc, self._input_bias()).relu()

    def pass_rows(self, x_n: Tensor, target_n: Tensor, step: int | None, return_feats: bool) -> Pass:
        scheduled = self.training and step is not None
        if scheduled:
            self._advance(step)  # type: ignore[arg-type]
        p = self.p
        coef = super().sparsity_coefficient(step)
        fused_l1 = p == 1.0 and coef > 0  # the L1 term comes out of the fused node itself
        args = (x_n, self.W_enc, self.b_enc, self._input_bias(), self.W_dec, self.b_dec, fused_l1)
        feats, recon, l1, l0, fired = relu_sae(*args)
        collecting = scheduled and self._collecting(step)  # type: ignore[arg-type]
        norms = self.W_dec.norm(dim=1) if not fused_l1 or collecting else None
        if fused_l1:
            penalty = l1
        elif coef > 0:
            penalty = self.lp_penalty(feats * norms, p)
        else:
            penalty = None
        sparsity = recon.new_zeros(()) if penalty is None else (coef * self.lp_scale) * penalty.mean()
        if collecting:
            with torch.no_grad():
                a = feats.detach() * norms.detach()
                now = penalty.detach().mean() if penalty is not None else self.lp_penalty(a, p).mean()
                nxt = self.lp_penalty(a, self.p_after(int(self.p_updates_done) + 1)).mean()
                self.lp_sums.add_(torch.stack([now, nxt, now.new_ones(())]).to(self.lp_sums.dtype))
        recon = self._add_skip(recon, x_n)
        fired = fired if self.training else fired.new_zeros(0)
        return Pass(recon, feats, None, sparsity, None, None, l0, fired)

    # ------------------------------------------------------------------ distributed training
    @torch.no_grad()
    def sync_statistics(self, world_size: int) -> None:
        super().sync_statistics(world_size)
        # every rank adds its own batch's means; the average over ranks is what one process would have measured
        torch.distributed.all_reduce(self.lp_sums, op=torch.distributed.ReduceOp.SUM)
        self.lp_sums.div_(world_size)

    # ------------------------------------------------------------------ files
    def saelens_fields(self) -> dict[str, Any]:
        # at inference a p-annealing SAE is a plain ReLU SAE
        return {"architecture": "standard"}
