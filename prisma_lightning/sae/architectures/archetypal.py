"""Relaxed archetypal SAE (RA-SAE): decoder atoms are convex combinations of data points plus a small relaxation.

Method: Fel et al. (2025), "Archetypal SAE: Adaptive and Stable Dictionary Learning for Concept Extraction in Large
Vision Models" (ICML 2025, arXiv:2502.12892). The dictionary is not a free matrix but

    W_dec = exp(m) * (A @ C + L)        A [d_sae, n_candidates] row-stochastic, ||L[i]|| <= delta * rho

with ``C`` a fixed set of candidate points taken from the data at initialisation (k-means centroids, or a random
subset of the sample), ``A`` the learned convex weights (non-negative rows summing to 1: each atom lies in the
convex hull of the candidates), ``L`` a learned relaxation whose rows are bounded in norm, and ``m`` an optional
learned scalar (``exp(m)`` moves the hull to the data's conical hull). Anchoring atoms to the data is what makes the
dictionary stable across seeds and data subsets. The encoder is the TopK SAE's (Gao et al. 2024), as the paper's
RA-SAE uses, with its sparse index-based decode and AuxK loss.

Here the candidates are points of the *centred* sample (``x - b_dec``, normalised space), because ``b_dec`` is
added back by the decoder; ``rho`` is the root-mean-square norm of the candidates, so ``archetypal_delta`` is
scale-free. Training starts from ``A = I`` (atom ``i`` is candidate ``i``), ``L = 0``, ``exp(m) = 1 / rho`` (atoms of
unit RMS norm) and encoder columns along the atoms' unit directions. The constraints are kept by projection after
every optimizer step (:meth:`after_optimizer_step`): ``A <- relu(A)`` with rows renormalised to sum 1, and rows of
``L`` shrunk to the bound.

``W_dec`` is a read-only property derived from ``(A, C, L, m)``; everything that would write it is overridden:
resampling (:meth:`resample_features` anchors the new atom at the candidate closest to the drawn direction and puts
the rest into the relaxation, within its bound), activation-norm folding (:meth:`fold_scales` scales ``C`` and
``L``), loading (:meth:`load_file_tensor`) and unit-norm renormalisation (refused: atom norms are not free).

Files: ``sae_weights.safetensors`` holds the derived ``W_dec`` with ``W_enc``, ``b_enc`` and ``b_dec`` in SAELens's
TopK layout (``cfg.json`` says ``topk``), so SAELens reads the folder as a plain TopK SAE with identical outputs;
``archetypal.safetensors`` beside it holds ``A``, ``C``, ``L`` and ``m`` for an exact reload. A folder without it (or
whose ``archetypal.safetensors`` no longer matches the weights) loads with the saved atoms as its candidates, one
per atom: the same function, its archetypal history lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..config import check_choice, check_int, check_number
from ..init import least_squares_scale
from ..registry import register_architecture
from ..sparse_autoencoder import Pass
from .topk import TopKConfig, TopKSAE

log = logging.getLogger(__name__)

ARCHETYPAL_FILE = "archetypal.safetensors"
"""The file beside ``sae_weights.safetensors`` holding the archetypal parameters (SAELens never reads it)."""
_OWN_TENSORS = ("archetype_weights", "relaxation", "candidates", "log_multiplier")

CandidatesInit = Literal["kmeans", "sample"]


@dataclass
class ArchetypalConfig(TopKConfig):
    """Relaxed archetypal SAE: TopK encoder; atoms are convex combinations of data candidates plus a bounded
    relaxation."""

    architecture: Literal["archetypal"] = "archetypal"
    """``archetypal``."""
    n_candidates: int | None = None
    """Number of candidate points the atoms are convex combinations of; default ``d_sae``. The initialisation
    sample must hold at least this many rows (``SAEModule(init_tokens=...)``)."""
    candidates_init: CandidatesInit = "kmeans"
    """How the candidates are taken from the initialisation sample: ``kmeans`` centroids (the paper's choice) or a
    random ``sample`` of its rows."""
    kmeans_iterations: int = 10
    """Lloyd iterations of the k-means that sets the candidates."""
    archetypal_delta: float = 0.25
    """Bound on each relaxation row's norm, as a fraction of the candidates' root-mean-square norm (0: atoms stay
    exactly in the hull)."""
    archetypal_multiplier: bool = True
    """Learn the scalar ``exp(m)`` that scales the whole dictionary (atoms in the conical hull of the data)."""

    default_decoder_norm = "free"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_candidates is None:
            self.n_candidates = self.d_sae
        check_int("n_candidates", self.n_candidates)
        check_choice("candidates_init", self.candidates_init, ("kmeans", "sample"))
        check_int("kmeans_iterations", self.kmeans_iterations, minimum=0)
        check_number("archetypal_delta", self.archetypal_delta)
        if self.decoder_norm != "free":
            raise ValueError(
                f"decoder_norm={self.decoder_norm!r} is not valid for architecture='archetypal': its atoms are convex "
                "combinations of data points, so their norms are set by the data (and the learned multiplier). "
                "Leave decoder_norm unset or 'free'."
            )


@register_architecture
class ArchetypalSAE(TopKSAE):
    """Relaxed archetypal SAE with a TopK encoder (see the module docstring)."""

    config_class = ArchetypalConfig
    feature_parameters = {"W_enc": 1, "b_enc": 0, "archetype_weights": 0, "relaxation": 0}
    saelens_names = ()  # SAELens sees a plain ``topk`` SAE; its topk folders load as TopKSAE
    paper = (
        "Fel et al. 2025, Archetypal SAE: Adaptive and Stable Dictionary Learning for Concept Extraction in Large "
        "Vision Models"
    )

    def build_parameters(self, kw: dict[str, Any]) -> None:
        n_c = int(self.cfg.n_candidates)
        self.W_enc = nn.Parameter(torch.empty(self.d_in, self.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **kw))
        self.archetype_weights = nn.Parameter(torch.zeros(self.d_sae, n_c, **kw))
        """``A [d_sae, n_candidates]``: each row is a point of the probability simplex."""
        self.relaxation = nn.Parameter(torch.zeros(self.d_sae, self.d_out, **kw))
        """``L [d_sae, d_out]``: rows bounded by ``archetypal_delta * rho``."""
        if self.cfg.archetypal_multiplier:
            self.log_multiplier = nn.Parameter(torch.zeros((), **kw))
        else:
            self.register_buffer("log_multiplier", torch.zeros((), **kw))
        self.register_buffer("candidates", torch.zeros(n_c, self.d_out, **kw))
        """``C [n_candidates, d_out]``: points of the centred, normalised data (fixed after initialisation)."""
        self._dictionary_cache: tuple[tuple[Any, ...], Tensor] | None = None

    # ------------------------------------------------------------------ the derived dictionary
    def _dictionary_key(self) -> tuple[Any, ...]:
        tensors = (self.archetype_weights, self.relaxation, self.candidates, self.log_multiplier)
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def compute_dictionary(self) -> Tensor:
        """``exp(m) * (A @ C + L)``, ``[d_sae, d_out]``, freshly computed (differentiable in ``A``, ``L``, ``m``)."""
        return torch.addmm(self.relaxation, self.archetype_weights, self.candidates) * self.log_multiplier.exp()

    @property
    def W_dec(self) -> Tensor:  # type: ignore[override]
        """The decoder ``[d_sae, d_out]`` derived from the archetypal parameters (read-only).

        Computed once per training pass (:meth:`pass_rows`; the AuxK loss and any loss added to the pass reuse its
        graph until its backward) and once per parameter state without autograd (evaluation, inspection). The
        cache follows the parameters' in-place version counters, so write the parameters in place (``copy_``,
        optimizers), not through ``.data``."""
        tensors = (self.archetype_weights, self.relaxation, self.log_multiplier)
        needs_graph = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        cache = self._dictionary_cache
        if cache is not None and cache[0] == self._dictionary_key():
            if not needs_graph:
                return cache[1].detach()
            if cache[1].requires_grad:
                return cache[1]
        if needs_graph:
            return self.compute_dictionary()
        with torch.no_grad():
            W = self.compute_dictionary()
        self._dictionary_cache = (self._dictionary_key(), W)
        return W

    def _forget_dictionary(self, grad: Tensor) -> None:
        """Backward hook of a pass's dictionary: its graph is being consumed, so the next access recomputes."""
        self._dictionary_cache = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {**state, "_dictionary_cache": None}  # a graph cannot be copied or pickled (deepcopy on save)

    def relaxation_bound(self) -> Tensor:
        """Largest allowed relaxation row norm: ``archetypal_delta`` times the candidates' RMS norm."""
        return self.candidates.pow(2).sum(-1).mean().sqrt() * self.cfg.archetypal_delta

    # ------------------------------------------------------------------ initialisation
    def init_weights(self, w_enc_t: Tensor, w_dec: Tensor) -> None:
        """Before any data: the candidates are random unit rows (the directions of ``w_dec``; ``decoder_init_norm``
        does not apply, data sets the scale), each atom one of them, and the encoder tied to them."""
        n_c = self.candidates.shape[0]
        rows = torch.arange(n_c, device=w_dec.device) % self.d_sae
        self.candidates.copy_(w_dec[rows] / w_dec[rows].norm(dim=-1, keepdim=True).clamp_min(1e-12))
        self._reset_dictionary()
        self.W_enc.copy_(w_enc_t.t())
        self._tie_encoder()

    @torch.no_grad()
    def _reset_dictionary(self) -> None:
        """Atom ``i`` := candidate ``i`` (the identity of the paper); atoms beyond ``n_candidates`` start at the
        midpoint of two random candidates. No relaxation, multiplier 1 (:meth:`_tie_encoder` then sets it)."""
        n_c = self.candidates.shape[0]
        A = self.archetype_weights
        A.zero_()
        first = min(n_c, self.d_sae)
        idx = torch.arange(first, device=A.device)
        A[idx, idx] = 1.0
        if self.d_sae > n_c:
            gen = torch.Generator().manual_seed(self.cfg.seed + 1)
            extra = self.d_sae - n_c
            a = torch.randint(0, n_c, (extra,), generator=gen)
            b = (a + torch.randint(1, max(2, n_c), (extra,), generator=gen)) % n_c
            rows = torch.arange(n_c, self.d_sae)
            A[rows, a.to(A.device)] += 0.5
            A[rows, b.to(A.device)] += 0.5
        self.relaxation.zero_()
        self.log_multiplier.zero_()

    @torch.no_grad()
    def _tie_encoder(self) -> None:
        """Start from the current candidates: the multiplier brings the atoms to unit root-mean-square norm (so a
        feature's value is on the scale of the projection it reconstructs), and encoder column ``i`` is the unit
        direction of atom ``i`` (TopK's tied start: the pre-activation is the projection length); ``b_enc`` := 0.
        A transcoder's encoder reads another space and keeps its own initialisation."""
        if self.cfg.archetypal_multiplier:
            rms = self.candidates.pow(2).sum(-1).mean().sqrt().clamp_min(1e-12)
            self.log_multiplier.copy_(-rms.log())
        if self.is_transcoder:
            return
        W = self.W_dec
        self.W_enc.copy_((W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)).t())
        self.b_enc.zero_()

    def initialize_dictionary(self, x_n: Tensor) -> None:
        """Candidates from the centred sample ``x_n - b_dec`` (``x_n [n, d_in]``), then the identity weights, the
        multiplier and a tied encoder (:meth:`_tie_encoder`). Transcoders take theirs from the target sample
        instead (:meth:`initialize_from_data`)."""
        if not self.is_transcoder:
            self.set_candidates(x_n - self.b_dec)
            self._fit_encoder_scale(x_n)

    @torch.no_grad()
    def _fit_encoder_scale(self, x_n: Tensor) -> None:
        """Scale the encoder so the initial reconstruction of ``x_n [n, d_in]`` is least-squares optimal. Atoms
        taken from the data point in similar directions, so the top-``k`` projections of a token all reconstruct
        much the same direction: left tied, the first reconstruction is about ``k`` times the input (a loss of
        thousands of times the ``b_dec``-only loss on the quickstart). The selection does not depend on the scale."""
        pairs = ((self.encode_rows(rows) @ self.W_dec, rows - self.b_dec) for rows in x_n.split(1024))
        scale = least_squares_scale(pairs)
        self.W_enc.mul_(scale)
        self.b_enc.mul_(scale)

    @torch.no_grad()
    def initialize_from_data(self, x_sample: Tensor, target_sample: Tensor | None = None) -> None:
        super().initialize_from_data(x_sample, target_sample)
        if target_sample is not None:  # a transcoder's atoms live in the output space
            x = self._rows(x_sample, self.d_in, "x_sample")
            stats = self._normalize_input(x)[1]
            y_n = self._normalize_target(self._rows(target_sample, self.d_out, "target_sample"), stats)
            self.set_candidates(y_n - self.b_dec)

    @torch.no_grad()
    def set_candidates(self, points: Tensor) -> None:
        """Take the candidates from ``points [n, d_out]`` (``candidates_init``), reset ``A``, ``L``, ``m`` and tie
        the encoder to the new atoms."""
        n_c = self.candidates.shape[0]
        if points.shape[0] < n_c:
            raise ValueError(
                f"architecture='archetypal' takes n_candidates={n_c} candidates from the initialisation sample, but "
                f"the sample has {points.shape[0]} rows; raise init_tokens (SAEModule) or lower n_candidates."
            )
        gen = torch.Generator().manual_seed(self.cfg.seed)
        pick = distinct_rows_first(points, n_c, gen)
        chosen = points.index_select(0, pick).to(self.candidates.dtype)
        if self.cfg.candidates_init == "kmeans":
            chosen = kmeans(points.to(self.candidates.dtype), chosen, self.cfg.kmeans_iterations)
        self.candidates.copy_(chosen)
        self._reset_dictionary()
        self._tie_encoder()

    # ------------------------------------------------------------------ training
    def pass_rows(self, x_n: Tensor, target_n: Tensor, step: int | None, return_feats: bool) -> Pass:
        if torch.is_grad_enabled():  # one dictionary (one graph) per pass, reused by the AuxK loss
            W = self.compute_dictionary()
            if W.requires_grad:
                W.register_hook(self._forget_dictionary)
            self._dictionary_cache = (self._dictionary_key(), W)
        return super().pass_rows(x_n, target_n, step, return_feats)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Project back onto the constraints: ``A`` onto the simplex (``relu`` then rows summing to 1; a row with no
        positive entry keeps its largest one) and relaxation rows onto the norm bound."""
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Make ``A`` row-stochastic and bound the relaxation rows (in place; see :meth:`after_optimizer_step`)."""
        A = self.archetype_weights
        empty = (A > 0).sum(-1) == 0
        if bool(empty.any()):
            rows = empty.nonzero().squeeze(1)
            best = A[rows].argmax(-1)
            A[rows] = 0.0
            A[rows, best] = 1.0
        A.clamp_(min=0).div_(A.sum(-1, keepdim=True))
        L = self.relaxation
        bound = self.relaxation_bound()
        L.mul_((bound / L.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))

    def before_optimizer_step(self) -> None:
        """Nothing to do: there is no free decoder matrix whose gradient could be projected."""

    def set_decoder_norm_to_unit_norm(self) -> None:
        raise ValueError(
            "architecture='archetypal' cannot rescale decoder rows to unit norm: each atom is a convex combination of "
            "data points (times one shared multiplier), so its norm is not free. Normalise the features instead."
        )

    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        raise ValueError(
            "architecture='archetypal' has no decoder matrix parameter: its gradient reaches the archetypal weights, "
            "the relaxation and the multiplier, which after_optimizer_step projects onto the constraints."
        )

    # ------------------------------------------------------------------ weights written by others
    @torch.no_grad()
    def resample_features(self, features: Tensor, decoder_dirs: Tensor, encoder_dirs: Tensor, scale: float) -> None:
        """Re-anchor dead atoms: atom ``i`` := the candidate with the highest cosine to ``decoder_dirs[i]``, plus the
        relaxation (within its bound) that turns it toward ``||candidate|| * decoder_dirs[i]``; encoder and biases
        as in Anthropic's resampling (see ``SparseAutoencoder.resample_features``)."""
        C = self.candidates
        unit_c = C / C.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        best = (decoder_dirs.to(C.dtype) @ unit_c.t()).argmax(-1)
        anchor = C.index_select(0, best)
        target = decoder_dirs * anchor.norm(dim=-1, keepdim=True)
        lam = target - anchor
        bound = self.relaxation_bound()
        lam.mul_((bound / lam.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))
        self.archetype_weights[features] = 0.0
        self.archetype_weights[features, best] = 1.0
        self.relaxation[features] = lam
        alive = torch.ones(self.d_sae, dtype=torch.bool, device=features.device)
        alive[features] = False
        enc_norms = self.W_enc.norm(dim=0)
        mean_norm = float(enc_norms[alive].mean()) if bool(alive.any()) else 1.0
        self.W_enc[:, features] = (encoder_dirs * (scale * mean_norm)).t()
        self.b_enc[features] = 0.0
        self.reset_feature_state(features)
        self.steps_since_fired[features] = 0

    def fold_scales(self, s_in: Tensor, s_out: Tensor) -> None:
        """Encoder times ``s_in``; candidates, relaxation and ``b_dec`` over ``s_out`` (so ``W_dec`` is over
        ``s_out``; ``A``, ``m`` and the relative relaxation bound are unchanged)."""
        self.W_enc.mul_(s_in)
        self._fold_input_bias(s_in, s_out)
        self.candidates.div_(s_out)
        self.relaxation.div_(s_out)
        self.b_dec.div_(s_out)

    # ------------------------------------------------------------------ files
    def file_tensors(self) -> dict[str, Tensor]:
        return {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}

    def archetypal_tensors(self) -> dict[str, Tensor]:
        """The tensors of ``archetypal.safetensors``."""
        return {name: getattr(self, name) for name in _OWN_TENSORS}

    extra_file_names = (ARCHETYPAL_FILE,)

    def extra_files(self) -> dict[str, dict[str, Tensor]]:
        """``archetypal.safetensors``: the archetypal parameters, in the same (folded) form as the weights file."""
        return {ARCHETYPAL_FILE: self.archetypal_tensors()}

    @torch.no_grad()
    def load_file_tensor(self, name: str, value: Tensor, file: Path | str) -> None:
        if name != "W_dec":
            return super().load_file_tensor(name, value, file)
        own = Path(file).parent / ARCHETYPAL_FILE
        problem = self._load_archetypal(own, value) if own.is_file() else f"there is no {ARCHETYPAL_FILE} beside it"
        if problem is None:
            return
        log.warning(
            "%s: %s; loading its W_dec as the candidates of an archetypal SAE with n_candidates=d_sae=%d (the same "
            "outputs; the archetypal parameters it was trained with are not available).", file, problem, self.d_sae,
        )  # fmt: skip
        self.cfg.n_candidates = self.d_sae
        self.candidates = value.detach().clone()
        self.archetype_weights = nn.Parameter(torch.eye(self.d_sae, dtype=value.dtype, device=value.device))
        self.relaxation.zero_()
        self.log_multiplier.zero_()

    def _load_archetypal(self, own: Path, W_dec: Tensor) -> str | None:
        """Read ``archetypal.safetensors``; None when it was loaded and reproduces ``W_dec``, else the problem."""
        try:
            tensors = load_file(str(own))
        except Exception as err:  # safetensors raises its own error types for truncated files
            return f"{own} is not a readable safetensors file ({err})"
        n_c = int(self.cfg.n_candidates)
        shapes = {
            "archetype_weights": (self.d_sae, n_c),
            "relaxation": (self.d_sae, self.d_out),
            "candidates": (n_c, self.d_out),
            "log_multiplier": (),
        }
        for key, shape in shapes.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                return f"{own}: tensor {key!r} should have shape {list(shape)}, got {got}"
        for key in shapes:
            getattr(self, key).copy_(tensors[key].to(W_dec))
        derived = self.compute_dictionary()
        tolerance = 1e-5 * float(W_dec.abs().max().clamp_min(1.0))
        error = float((derived - W_dec).abs().max()) if W_dec.numel() else 0.0
        if error > tolerance:
            return f"{own} does not belong to these weights (its dictionary differs from W_dec by {error:.3g})"
        return None


@torch.no_grad()
def distinct_rows_first(points: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Indices of ``n`` rows of ``points [m, d]`` in random order, one per distinct row before any repeat.

    Activations repeat exactly (a ViT's background patches at one position are the same vector in every image), so
    a plain random pick would make many candidates -- and atoms, and features -- copies of each other; only when
    the sample has fewer than ``n`` distinct rows are repeats taken."""
    m = points.shape[0]
    _, inverse = torch.unique(points, dim=0, return_inverse=True)
    order = torch.randperm(m, generator=generator).to(points.device)
    position = torch.arange(m, device=points.device)
    first = torch.full((int(inverse.max()) + 1,), m, dtype=torch.int64, device=points.device)
    first.scatter_reduce_(0, inverse[order], position, reduce="amin")  # earliest place of each distinct row
    is_first = torch.zeros(m, dtype=torch.bool, device=points.device)
    is_first[first] = True
    return order[torch.cat([position[is_first], position[~is_first]])[:n]]


def kmeans(points: Tensor, centroids: Tensor, iterations: int, chunk: int = 4096) -> Tensor:
    """Lloyd's k-means of ``points [n, d]`` from initial ``centroids [c, d]``. A cluster left empty restarts at one of
    the points farthest from their centroids (so centroids do not stay duplicates). Rows are assigned in chunks of
    ``chunk`` so memory stays ``chunk x c``."""
    centroids = centroids.clone()
    sq_points = points.pow(2).sum(-1)
    for _ in range(iterations):
        sq_centroids = centroids.pow(2).sum(-1)
        nearest = [
            torch.addmm(sq_centroids, points[i : i + chunk], centroids.t(), alpha=-2).min(-1)
            for i in range(0, points.shape[0], chunk)
        ]
        assign = torch.cat([a.indices for a in nearest])
        sq_dist = torch.cat([a.values for a in nearest]) + sq_points
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=centroids.shape[0])
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(points.dtype)
        empty = torch.nonzero(~filled).squeeze(1)
        if empty.numel():
            far = sq_dist.topk(min(empty.numel(), points.shape[0])).indices
            centroids[empty[: far.numel()]] = points[far]
    return centroids
