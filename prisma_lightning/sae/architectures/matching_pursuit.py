"""Matching-pursuit SAE (MP-SAE): the encoder is greedy residual pursuit over the unit-norm decoder atoms.

Method: Costa et al. (2025), "From Flat to Hierarchical: Extracting Sparse Representations with Matching Pursuit".
There is no encoder matrix: starting from the centred input ``r_0 = x - b_dec``, each of ``k`` steps picks the atom
most correlated with the residual, ``j_t = argmax_j <r_{t-1}, W_dec[j]>``, adds the coefficient
``c_t = relu(<r_{t-1}, W_dec[j_t]>)`` to feature ``j_t`` and removes that component,
``r_t = r_{t-1} - c_t W_dec[j_t]``. The reconstruction is ``x_hat = sum_t c_t W_dec[j_t] + b_dec = x - r_k``.
Later steps explain what earlier atoms left over, so correlated (hierarchical) features can be selected together,
which a one-shot linear encoder cannot do. Gradients flow through the selected coefficients and the residual
updates into ``W_dec`` and ``b_dec`` (the selection itself is a discrete choice and passes none).

The pursuit follows SAELens's ``matching_pursuit`` architecture (SAELens 6) step for step: coefficients are
non-negative (a step whose best correlation is not positive adds nothing), an atom may be picked again (its
coefficients add up), and SAELens's optional stopping rules are available for reading its files
(``mp_residual_threshold``, ``mp_stop_on_duplicate_support``; both off by default, so every token takes exactly
``k`` steps as in the paper). Saved folders use SAELens's layout -- ``cfg.json`` with ``architecture:
matching_pursuit``, ``max_iterations = k`` and the two stopping rules, and only ``W_dec`` and ``b_dec`` in
``sae_weights.safetensors`` (``W_enc`` is ``W_dec.T``) -- so SAELens 6 loads them and computes the same features;
SAELens's ``matching_pursuit`` folders load here as this class.

Conventions forced by the tied pursuit:

* decoder rows stay unit norm (``decoder_norm='unit'``): a coefficient is then the length of the residual's
  projection on its atom.
* ``apply_b_dec_to_input`` must stay true: the pursuit runs on ``x - b_dec`` and the reconstruction adds ``b_dec``
  back (SAELens adds no decoder bias at all otherwise).
* folding an ``expected_norm`` factor (on save) divides ``b_dec`` by it and leaves the unit atoms as they are, as
  SAELens folds this architecture: the reconstruction is unchanged, and the features -- projection lengths -- come
  out in raw activation units, i.e. divided by the factor.
* no transcoder: the pursuit reads the input with the decoder's atoms, so input and output are the same space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..config import SAEConfig, TranscoderConfig, check_int, check_number
from ..registry import register_architecture
from ..sparse_autoencoder import Pass, SparseAutoencoder, SparseCodes
from ..sparse_ops import SparsePattern, sparse_decode


@dataclass
class MatchingPursuitConfig(SAEConfig):
    """MP-SAE: ``k`` greedy matching-pursuit steps over unit-norm decoder atoms; no encoder matrix."""

    architecture: Literal["matching_pursuit"] = "matching_pursuit"
    """``matching_pursuit``."""
    k: int = 32
    """Pursuit steps per token: at most ``k`` active features (fewer when an atom is picked twice or a step finds
    no positive correlation). SAELens's ``max_iterations``."""
    mp_residual_threshold: float = 0.0
    """Stop a token's pursuit once its residual norm (normalised space) is below this (0: off). SAELens's
    ``residual_threshold``."""
    mp_stop_on_duplicate_support: bool = False
    """Stop a token's pursuit once a step leaves its set of active features unchanged. SAELens's
    ``stop_on_duplicate_support``."""

    default_decoder_norm = "unit"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("k", self.k)
        check_number("mp_residual_threshold", self.mp_residual_threshold)
        if isinstance(self, TranscoderConfig):
            raise ValueError(
                "architecture='matching_pursuit' cannot be a transcoder: the pursuit reads the input with the "
                "decoder's own atoms, so input and output must be the same activations. Use an SAE config, or a "
                "transcoder architecture with an encoder (e.g. 'topk')."
            )
        if self.decoder_norm != "unit":
            raise ValueError(
                f"decoder_norm={self.decoder_norm!r} is not valid for architecture='matching_pursuit': the pursuit "
                "needs unit-norm atoms (a coefficient is a projection length). Leave decoder_norm unset or 'unit'."
            )
        if not self.apply_b_dec_to_input:
            raise ValueError(
                "apply_b_dec_to_input=False is not valid for architecture='matching_pursuit': the pursuit runs on "
                "x - b_dec and the reconstruction adds b_dec back. Leave it true (b_dec_init='zeros' keeps b_dec "
                "at 0 until training moves it)."
            )
        if self.mp_residual_threshold > 0 and self.normalize_activations == "expected_norm":
            raise ValueError(
                "mp_residual_threshold > 0 cannot be combined with normalize_activations='expected_norm' (the "
                "threshold is in normalised units, which a saved SAE folds away); use 'layer_norm' or 'none', or "
                "mp_residual_threshold=0."
            )


class Pursuit:
    """The outcome of a batch's pursuit: what each step chose, and the final residual."""

    def __init__(self, indices: Tensor, values: Tensor, residual: Tensor) -> None:
        self.indices = indices
        """Atom chosen by each step, ``[n, steps]``."""
        self.values = values
        """Coefficient added by each step, ``[n, steps]`` (0 for a step that added nothing); differentiable."""
        self.residual = residual
        """Final residual ``r_k [n, d_in]`` (normalised space); differentiable."""

    def merged(self) -> tuple[Tensor, Tensor]:
        """``(indices, values)`` ``[n, steps]`` with repeated atoms of a row merged into their first entry (the
        rest become zero-valued entries); sums and gradients are unchanged."""
        steps = self.indices.shape[1]
        order = torch.sort(self.indices, dim=1, stable=True)
        idx, perm = order.values, order.indices
        starts = torch.ones_like(idx, dtype=torch.bool)
        starts[:, 1:] = idx[:, 1:] != idx[:, :-1]
        slot = starts.long().cumsum(1) - 1  # entry of each step's atom in the merged row
        values = torch.zeros_like(self.values).scatter_add(1, slot, self.values.gather(1, perm))
        indices = torch.zeros_like(idx).scatter(1, slot, idx)
        unused = torch.arange(steps, device=idx.device) > slot[:, -1:]
        return torch.where(unused, indices[:, :1], indices), values  # unused slots repeat a used atom, value 0


GRAM_MAX_ELEMENTS = 1 << 28
"""Largest Gram matrix ``W_dec W_dec^T`` (entries) the pursuit builds to update its correlations (1 GiB in fp32)."""


def matching_pursuit(
    r: Tensor,
    W_dec: Tensor,
    k: int,
    residual_threshold: float = 0.0,
    stop_on_duplicate_support: bool = False,
    use_gram: bool | None = None,
) -> Pursuit:
    """Greedy matching pursuit of centred rows ``r [n, d]`` over atoms ``W_dec [d_sae, d]`` (see the module
    docstring); differentiable in ``r`` and ``W_dec`` through the selected coefficients.

    The atoms are chosen without autograd first; with gradients on, the chosen atoms are then gathered in one
    ``index_select`` (one scatter into ``W_dec``'s gradient, not one per step) and the ``k`` residual updates are
    replayed on them. The correlations ``r_t W_dec^T [n, d_sae]`` that choose each atom cost ``n * d_sae * d`` per
    step to recompute; with ``use_gram`` they are updated instead, ``r_t W^T = r_{t-1} W^T - c_t G[j_t]``, with the
    Gram matrix ``G = W W^T`` built once (``d_sae^2 * d``), which is cheaper when ``d_sae < k * n`` (training
    batches). Default: the cheaper of the two, within :data:`GRAM_MAX_ELEMENTS`. Only near-ties between atoms can
    come out differently; coefficients are always computed from the residual itself.
    """
    n, d_sae = r.shape[0], W_dec.shape[0]
    if use_gram is None:
        use_gram = k > 1 and d_sae < k * n and d_sae * d_sae <= GRAM_MAX_ELEMENTS
    with torch.no_grad():
        chosen, values, active, residual = _choose(
            r.detach(), W_dec.detach(), k, residual_threshold, stop_on_duplicate_support, use_gram
        )
    if not (torch.is_grad_enabled() and (r.requires_grad or W_dec.requires_grad)):
        return Pursuit(chosen, values, residual)
    steps = chosen.shape[1]
    atoms = W_dec.index_select(0, chosen.reshape(-1)).view(n, steps, -1).unbind(1)
    coefs = []
    for t, a in enumerate(atoms):
        c = (r * a).sum(-1).relu()
        if active is not None:
            c = torch.where(active[:, t], c, 0.0)
        r = r - c[:, None] * a
        coefs.append(c)
    return Pursuit(chosen, torch.stack(coefs, 1), r)


def _choose(
    r: Tensor, W: Tensor, k: int, residual_threshold: float, stop_on_duplicate_support: bool, use_gram: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """The pursuit without autograd: chosen atoms ``[n, steps]``, coefficients ``[n, steps]``, which rows were still
    running at each step (``[n, steps]``, None without stopping rules) and the final residual."""
    n = r.shape[0]
    stops = stop_on_duplicate_support or residual_threshold > 0
    done = torch.zeros(n, dtype=torch.bool, device=r.device)
    chosen: list[Tensor] = []
    coefs: list[Tensor] = []
    running: list[Tensor] = []
    W_t = W.t()
    gram = W @ W_t if use_gram else None
    scores = r @ W_t if use_gram else None  # [n, d_sae], kept up to date through the Gram matrix
    for _ in range(k):
        j = (scores if scores is not None else r @ W_t).argmax(1)
        atoms = W.index_select(0, j)  # [n, d]
        c = (r * atoms).sum(-1).relu()
        if stops:
            running.append(~done)
            c = torch.where(done, 0.0, c)
        r = r - c[:, None] * atoms
        if scores is not None:
            scores.addcmul_(gram.index_select(0, j), c[:, None], value=-1)
        if stop_on_duplicate_support:  # the support grows only by a new atom with a positive coefficient
            seen = torch.zeros(n, dtype=torch.bool, device=r.device)
            for jj, cc in zip(chosen, coefs, strict=True):
                seen |= (jj == j) & (cc > 0)
            done |= (c <= 0) | seen
        if residual_threshold > 0:
            done |= r.norm(dim=-1) < residual_threshold
        chosen.append(j)
        coefs.append(c)
        if stops and bool(done.all()):
            break
    active = torch.stack(running, 1) if stops else None
    return torch.stack(chosen, 1), torch.stack(coefs, 1), active, r


@register_architecture
class MatchingPursuitSAE(SparseAutoencoder):
    """MP-SAE (see the module docstring)."""

    config_class = MatchingPursuitConfig
    sparse_codes = True
    feature_parameters = {"W_dec": 0}
    feature_biases = ()
    saelens_names = ("matching_pursuit",)
    paper = "Costa et al. 2025, From Flat to Hierarchical: Extracting Sparse Representations with Matching Pursuit"

    def build_parameters(self, kw: dict[str, Any]) -> None:
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **kw))

    def init_weights(self, w_enc_t: Tensor, w_dec: Tensor) -> None:
        self.W_dec.copy_(w_dec)

    @property
    def W_enc(self) -> Tensor:
        """The pursuit's correlation matrix ``[d_in, d_sae]``: the decoder transposed (a view)."""
        return self.W_dec.t()

    # ------------------------------------------------------------------ pursuit
    def pursue(self, x_n: Tensor) -> Pursuit:
        """The pursuit of normalised rows ``x_n [n, d_in]`` (centred by ``b_dec`` first)."""
        cfg = self.cfg
        return matching_pursuit(
            x_n - self.b_dec, self.W_dec, cfg.k, cfg.mp_residual_threshold, cfg.mp_stop_on_duplicate_support
        )

    def encode_rows(self, x_n: Tensor) -> Tensor:
        p = self.pursue(x_n)
        feats = x_n.new_zeros(x_n.shape[0], self.d_sae)
        return feats.scatter_add(1, p.indices, p.values)

    def encode_entries(self, x_n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        indices, values = self.pursue(x_n).merged()  # a feature chosen twice appears once, with the summed value
        rows = torch.arange(x_n.shape[0], device=x_n.device).repeat_interleave(indices.shape[1])
        return rows, indices.reshape(-1), values.reshape(-1)

    def pass_rows(self, x_n: Tensor, target_n: Tensor, step: int | None, return_feats: bool) -> Pass:
        p = self.pursue(x_n)
        recon = x_n - p.residual  # = sum_t c_t W_dec[j_t] + b_dec, exactly and without a decode
        indices, values = p.merged()
        with torch.no_grad():
            active = values > 0
            l0 = active.sum(-1).to(values.dtype)
            fired = indices[active] if self.training else indices.new_zeros(0)
        flat_idx, flat_val = indices.reshape(-1), values.reshape(-1)
        feats = None
        if return_feats:
            feats = values.new_zeros(x_n.shape[0], self.d_sae).scatter_add(1, indices, values)
        offsets = torch.arange(0, flat_idx.numel(), indices.shape[1], device=flat_idx.device)
        codes = SparseCodes(flat_idx, flat_val, offsets)
        return Pass(recon, feats, codes, recon.new_zeros(()), None, None, l0, fired)

    def decode_rows(self, f: Tensor) -> Tensor:
        rows, cols = f.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=f.shape[0])
        pattern = SparsePattern.from_counts(cols, counts, self.d_sae)
        return sparse_decode(f[rows, cols], self.W_dec, pattern) + self.b_dec

    # ------------------------------------------------------------------ weights written by others
    @torch.no_grad()
    def resample_features(self, features: Tensor, decoder_dirs: Tensor, encoder_dirs: Tensor, scale: float) -> None:
        """New unit atoms ``decoder_dirs [n, d_in]`` for ``features``; the pursuit reads them directly (no encoder
        rows to write)."""
        self.W_dec[features] = decoder_dirs
        self.reset_feature_state(features)
        self.steps_since_fired[features] = 0

    def fold_scales(self, s_in: Tensor, s_out: Tensor) -> None:
        """``b_dec`` over the factor; the unit atoms stay (SAELens's folding): reconstructions are unchanged and the
        features come out in raw units (divided by the factor)."""
        self.b_dec.div_(s_out)

    # ------------------------------------------------------------------ files
    def file_tensors(self) -> dict[str, Tensor]:
        return {"W_dec": self.W_dec, "b_dec": self.b_dec}

    def saelens_fields(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "architecture": "matching_pursuit",
            "max_iterations": cfg.k,
            "residual_threshold": cfg.mp_residual_threshold,
            "stop_on_duplicate_support": cfg.mp_stop_on_duplicate_support,
        }

    @classmethod
    def config_from_saelens(cls, raw: dict[str, Any], file: Path) -> dict[str, Any]:
        k = raw.get("max_iterations")
        if k is None:
            k = raw.get("d_in")  # SAELens's default: d_in iterations
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"{file}: field 'max_iterations' must be a positive integer or null, got {k!r}.")
        threshold = raw.get("residual_threshold", 1e-2)  # SAELens's defaults
        stop = raw.get("stop_on_duplicate_support", True)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold >= 0:
            raise ValueError(f"{file}: field 'residual_threshold' must be a number >= 0, got {threshold!r}.")
        if not isinstance(stop, bool):
            raise ValueError(f"{file}: field 'stop_on_duplicate_support' must be true or false, got {stop!r}.")
        # SAELens without apply_b_dec_to_input neither centres nor adds b_dec: our form with b_dec = 0 (below)
        return {
            "k": k,
            "mp_residual_threshold": float(threshold),
            "mp_stop_on_duplicate_support": stop,
            "apply_b_dec_to_input": True,
        }

    @torch.no_grad()
    def after_saelens_load(self, raw: dict[str, Any]) -> None:
        """A SAELens folder with ``apply_b_dec_to_input: false`` uses no bias at all: ``b_dec`` := 0."""
        if raw.get("apply_b_dec_to_input", True) is False:
            self.b_dec.zero_()
