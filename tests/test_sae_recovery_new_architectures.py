"""The ``panneal``, ``archetypal`` and ``matching_pursuit`` architectures: forward values, losses and gradients against
dense reference formulas, their schedules and constraints, files (round trips and the SAELens layouts they promise),
the dead-feature resampler, transcoders, ``prisma fit``, and dictionary recovery on the planted-dictionary data of
``test_sae_recovery.py`` (same data, same bar: >= 90% of the atoms at cosine >= 0.9).

SAELens's matching-pursuit encoder is restated below (:func:`saelens_pursuit`, from SAELens 6.54's
``saes/matching_pursuit_sae.py``) to check both directions of the file interop offline.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from saelens_reader import load_from_disk
from safetensors.torch import load_file, save_file
from test_resampler import fake_trainer
from test_sae_recovery import (  # noqa: F401  (_single_thread: the same one-thread fixture)
    ACTIVE,
    D,
    SparseDictionaryData,
    _single_thread,
    recovered_fraction,
)
from torch.testing import assert_close

from prisma_lightning.callbacks import DeadFeatureResampler
from prisma_lightning.sae import (
    ArchetypalSAE,
    MatchingPursuitSAE,
    PAnnealSAE,
    SAEConfig,
    SparseAutoencoder,
    Transcoder,
    TranscoderConfig,
    architecture_names,
    make_optimizer,
    train_step,
)
from prisma_lightning.sae.architectures.archetypal import ARCHETYPAL_FILE, distinct_rows_first, kmeans
from prisma_lightning.sae.architectures.matching_pursuit import matching_pursuit
from prisma_lightning.sae.architectures.relu import ReLUSAE

D_IN, D_SAE, K = 12, 48, 4
NEW = ("panneal", "archetypal", "matching_pursuit")
CLASSES = {"panneal": PAnnealSAE, "archetypal": ArchetypalSAE, "matching_pursuit": MatchingPursuitSAE}


def build(arch: str, transcoder: bool = False, **kw) -> SparseAutoencoder:
    """A small SAE of ``arch`` with non-trivial biases (and, for archetypal, a non-trivial feasible dictionary)."""
    if arch != "panneal":
        kw.setdefault("k", K)
    kw.setdefault("seed", 1)
    base = dict(d_in=D_IN, d_sae=D_SAE, architecture=arch, hook_name="blocks.2.hook_resid_post", **kw)
    cfg = TranscoderConfig(**base, d_out=7, hook_name_out="blocks.2.hook_mlp_out") if transcoder else SAEConfig(**base)
    sae = SparseAutoencoder(cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name in ("b_enc", "b_dec", "b_in"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        if arch == "archetypal":
            sae.archetype_weights.add_(0.3 * torch.rand(sae.archetype_weights.shape, generator=gen))
            sae.relaxation.copy_(0.05 * torch.randn(sae.relaxation.shape, generator=gen))
            sae.log_multiplier.fill_(0.2)
            sae.project()
    return sae


def distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact pairwise Euclidean distances ``[len(a), len(b)]`` (``torch.cdist`` takes a rounding-prone shortcut)."""
    return (a[:, None] - b[None]).norm(dim=-1)


def topk_reference(pre: torch.Tensor, k: int = K) -> torch.Tensor:
    values, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, values.relu())


def saelens_pursuit(
    sae_in: torch.Tensor,
    W_dec: torch.Tensor,
    residual_threshold: float = 0.0,
    max_iterations: int | None = None,
    stop_on_duplicate_support: bool = False,
) -> torch.Tensor:
    """SAELens 6's ``_encode_matching_pursuit`` restated with dense tensors: features ``[n, d_sae]`` of centred
    rows ``sae_in [n, d_in]``; differentiable (the additions are out of place)."""
    r = sae_in
    n, (d_sae, d_in) = r.shape[0], W_dec.shape
    acts = r.new_zeros(n, d_sae)
    previous = torch.zeros(n, d_sae, dtype=torch.bool)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_iterations or d_in):
        with torch.no_grad():
            idx = (r @ W_dec.T).relu().max(dim=1).indices
        atoms = W_dec[idx]
        values = (r * atoms).sum(-1).relu() * (~done).to(r.dtype)
        acts = acts + torch.zeros_like(acts).scatter(1, idx[:, None], values[:, None])
        r = r - values[:, None] * atoms
        if stop_on_duplicate_support or residual_threshold > 0:
            with torch.no_grad():
                support = acts != 0
                if stop_on_duplicate_support:
                    done = done | (support == previous).all(dim=1)
                    previous = support
                if residual_threshold > 0:
                    done = done | (r.norm(dim=-1) < residual_threshold)
            if bool(done.all()):
                break
    return acts


# ---------------------------------------------------------------------------------------------------- registration
def test_the_three_architectures_are_registered_with_their_configs() -> None:
    assert set(NEW) <= set(architecture_names())
    for arch, cls in CLASSES.items():
        sae = build(arch)
        assert type(sae) is cls and sae.cfg.architecture == arch and cls.paper
    assert SAEConfig(architecture="panneal").recommended_coefficient == 1.0


# ---------------------------------------------------------------------------------------------------- panneal
def lp_reference(a: torch.Tensor, p: float, form: str) -> torch.Tensor:
    """Per-row penalty of non-negative ``a [n, d]`` over its positive entries only (boolean indexing)."""
    rows = [row[row > 0].pow(p).sum() for row in a]
    powered = torch.stack(rows)
    return powered if form == "lp_p" else torch.stack([v.pow(1 / p) if v > 0 else v for v in powered])


@pytest.mark.parametrize("form", ["lp_p", "lp"])
@pytest.mark.parametrize("n_updates", [0, 3])
def test_panneal_forward_loss_and_gradients_match_reference(form: str, n_updates: int) -> None:
    sae = build("panneal", lp_coefficient=0.7, lp_form=form, anneal_start=0, anneal_end=8, n_p_updates=4)
    with torch.no_grad():
        sae.p_updates_done.fill_(n_updates)
        sae.lp_scale.fill_(0.6)
    p = 1.0 - 0.8 * n_updates / 4
    assert sae.p == pytest.approx(p)
    x = torch.randn(32, D_IN)
    out = sae(x)  # training mode without a step: no schedule change
    W_enc, b_enc, W_dec, b_dec = (t.detach().clone().requires_grad_() for t in (sae.W_enc, sae.b_enc, sae.W_dec,
                                                                                 sae.b_dec))  # fmt: skip
    feats = torch.relu((x - b_dec) @ W_enc + b_enc)
    recon = feats @ W_dec + b_dec
    sparsity = 0.7 * 0.6 * lp_reference(feats * W_dec.norm(dim=1), p, form).mean()
    mse = (recon - x).pow(2).sum(-1).mean()
    assert_close(out.feats, feats, atol=1e-5, rtol=1e-5)
    assert_close(out.recon, recon, atol=1e-5, rtol=1e-5)
    assert_close(out.sparsity_loss, sparsity, atol=1e-5, rtol=1e-5)
    assert_close(out.loss, mse + sparsity, atol=1e-5, rtol=1e-5)
    assert_close(out.l0, (feats > 0).sum(-1).float())
    out.loss.backward()
    (mse + sparsity).backward()
    for ours, ref in ((sae.W_enc, W_enc), (sae.b_enc, b_enc), (sae.W_dec, W_dec), (sae.b_dec, b_dec)):
        assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-4)


def test_panneal_schedule_lowers_p_and_rescales_the_coefficient_by_the_measured_ratio() -> None:
    sae = build("panneal", lp_coefficient=0.5, anneal_start=4, anneal_end=12, n_p_updates=4, rescale_window=2)
    xs = [torch.randn(16, D_IN) for _ in range(14)]

    def mean_lp(x: torch.Tensor, p: float) -> float:
        with torch.no_grad():
            feats = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
            return float(lp_reference(feats * sae.W_dec.norm(dim=1), p, "lp_p").mean())

    expected_p = [1.0] * 6 + [0.8] * 2 + [0.6] * 2 + [0.4] * 2 + [0.2] * 2  # changes at steps 6, 8, 10, 12
    scale = 1.0
    for step, x in enumerate(xs):
        if step in (6, 8, 10, 12):  # the ratio over the two batches before the change
            old, new = expected_p[step - 1], expected_p[step]
            ratio = (mean_lp(xs[step - 2], old) + mean_lp(xs[step - 1], old)) / (
                mean_lp(xs[step - 2], new) + mean_lp(xs[step - 1], new)
            )
            scale *= ratio
        out = sae(x, step=step)  # no optimizer: the weights stay fixed, so the reference sees what the SAE saw
        assert sae.p == pytest.approx(expected_p[step]), step
        assert float(sae.lp_scale) == pytest.approx(scale, rel=1e-5), step
        assert_close(out.sparsity_loss, torch.tensor(0.5 * scale * mean_lp(x, expected_p[step])), rtol=1e-5, atol=1e-6)
    assert scale < 1.0  # activations below 1 count more as p falls: the coefficient is lowered to compensate
    sae.eval()
    sae(xs[0], step=100)  # evaluation never moves the schedule
    assert int(sae.p_updates_done) == 4


def test_panneal_rescaling_under_ddp_equals_one_process(monkeypatch) -> None:
    """Two ranks with half a batch each, synchronised after every step (``sync_statistics``), rescale exactly as one
    process does on the whole batch. ``all_reduce`` is simulated: each rank's tensor meets the other's."""
    kw = dict(lp_coefficient=0.5, anneal_start=2, anneal_end=8, n_p_updates=3, rescale_window=2)
    one = build("panneal", **kw)
    ranks = [copy.deepcopy(one), copy.deepcopy(one)]
    batches = [torch.randn(32, D_IN) for _ in range(10)]
    partner: dict[int, torch.Tensor] = {}

    def all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=None):
        other = partner[id(tensor)]
        tensor.copy_(torch.minimum(tensor, other) if op == torch.distributed.ReduceOp.MIN else tensor + other)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    for step, x in enumerate(batches):
        one(x, step=step)
        for sae, half in zip(ranks, x.chunk(2), strict=True):
            sae(half, step=step)
        a, b = ranks
        for name in ("lp_sums", "steps_since_fired"):  # what each rank receives from the other
            partner[id(getattr(a, name))] = getattr(b, name).clone()
            partner[id(getattr(b, name))] = getattr(a, name).clone()
        for sae in ranks:
            sae.sync_statistics(2)
        for sae in ranks:
            assert int(sae.p_updates_done) == int(one.p_updates_done), step
            assert_close(sae.lp_scale, one.lp_scale, rtol=1e-5, atol=0)
            assert_close(sae.lp_sums, one.lp_sums, rtol=1e-5, atol=1e-6)
    assert int(one.p_updates_done) == 3 and float(one.lp_scale) < 1.0


def test_panneal_gradients_stay_finite_with_exact_zeros_at_small_p() -> None:
    sae = build("panneal", p_end=0.1, anneal_start=0, anneal_end=1, n_p_updates=1)
    opt = make_optimizer(sae, lr=1e-2)
    x = torch.randn(64, D_IN)
    for step in range(5):
        out = train_step(sae, opt, x, step=step)
        assert torch.isfinite(out.loss)
    assert sae.p == pytest.approx(0.1)
    assert all(bool(torch.isfinite(p).all()) for p in sae.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p_end": 1.5}, "p_end must be in"),
        ({"p_start": 0.0}, "p_start must be in"),
        ({"anneal_start": 10, "anneal_end": 12}, "anneal_end=12 must be at least"),
        ({"lp_form": "l0"}, r"lp_form must be one of \['lp_p', 'lp'\]"),
    ],
)
def test_panneal_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SAEConfig(d_in=8, architecture="panneal", **kwargs)


# ---------------------------------------------------------------------------------------------------- archetypal
def test_archetypal_forward_and_gradients_match_the_dense_formulas() -> None:
    sae = build("archetypal").eval()
    A, L, C, m = sae.archetype_weights, sae.relaxation, sae.candidates, sae.log_multiplier
    W_ref = m.exp() * (A @ C + L)
    assert_close(sae.W_dec, W_ref)
    x = torch.randn(2, 16, D_IN)
    out = sae(x)
    x2 = x.reshape(-1, D_IN)
    refs = {n: getattr(sae, n).detach().clone().requires_grad_() for n in
            ("W_enc", "b_enc", "b_dec", "archetype_weights", "relaxation", "log_multiplier")}  # fmt: skip
    W = refs["log_multiplier"].exp() * (refs["archetype_weights"] @ C + refs["relaxation"])
    feats = topk_reference((x2 - refs["b_dec"]) @ refs["W_enc"] + refs["b_enc"])
    recon = feats @ W + refs["b_dec"]
    assert_close(out.feats.reshape(-1, D_SAE), feats, atol=1e-5, rtol=1e-5)
    assert_close(out.recon.reshape(-1, D_IN), recon, atol=1e-5, rtol=1e-5)
    assert_close(sae.decode(out.feats), out.recon, atol=1e-5, rtol=1e-5)
    mse = (recon - x2).pow(2).sum(-1).mean()
    assert_close(out.loss, mse, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    mse.backward()
    for name, ref in refs.items():
        assert_close(getattr(sae, name).grad, ref.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert sae.candidates.grad is None  # the candidates are fixed data points


def test_archetypal_training_keeps_atoms_archetypal() -> None:
    torch.manual_seed(0)
    sae = build("archetypal", archetypal_delta=0.1, aux_k_coefficient=1.0, dead_feature_window=2)
    opt = make_optimizer(sae, lr=3e-2)
    x = 3 * torch.randn(128, D_IN)
    for step in range(10):
        train_step(sae, opt, x, step=step)
    with torch.no_grad():  # the cached dictionary follows the optimizer's in-place updates
        assert torch.equal(sae.W_dec, sae.compute_dictionary())
    assert torch.equal(copy.deepcopy(sae).W_dec, sae.W_dec)  # a pass's graph is never copied
    out = sae(x)
    out.loss.backward()
    (sae.W_dec.pow(2).sum() + sae(x).loss).backward()  # after a backward the next access builds a new graph
    A, L = sae.archetype_weights.detach(), sae.relaxation.detach()
    assert bool((A >= 0).all())
    assert_close(A.sum(-1), torch.ones(D_SAE))
    assert float(L.norm(dim=1).max()) <= float(sae.relaxation_bound()) * (1 + 1e-5)
    assert float(sae.log_multiplier.detach()) != 0.0 and float(L.abs().sum()) > 0  # both were trained
    with torch.no_grad():  # projection: negative weights clipped, rows renormalised, an all-negative row kept one-hot
        sae.archetype_weights[0] = -torch.rand(sae.archetype_weights.shape[1])
        sae.archetype_weights[0, 5] = -1e-3
        sae.archetype_weights[1, :3] = torch.tensor([2.0, -1.0, 2.0])
        sae.archetype_weights[1, 3:] = 0
        sae.relaxation[2] = 100.0
    sae.project()
    assert torch.equal(sae.archetype_weights[0], torch.eye(sae.archetype_weights.shape[1])[5])
    assert_close(sae.archetype_weights[1, :3], torch.tensor([0.5, 0.0, 0.5]))
    assert_close(sae.relaxation[2].norm(), sae.relaxation_bound())
    with pytest.raises(ValueError, match="cannot rescale decoder rows"):
        sae.set_decoder_norm_to_unit_norm()


@pytest.mark.parametrize("init", ["sample", "kmeans"])
def test_archetypal_candidates_come_from_the_centred_sample(init: str) -> None:
    sae = build("archetypal", candidates_init=init, b_dec_init="mean", kmeans_iterations=30)
    x = 2 * torch.randn(300, D_IN) + 1
    sae.initialize_from_data(x)
    centred = x - x.mean(0)
    C = sae.candidates
    if init == "sample":  # every candidate is one of the (centred) sample rows
        assert bool((distances(C, centred).min(dim=1).values < 1e-5).all())
    else:  # a k-means fixed point: every candidate is the mean of the rows closest to it
        owner = distances(centred, C).argmin(dim=1)
        for j in owner.unique():
            assert_close(C[j], centred[owner == j].mean(0), atol=1e-4, rtol=1e-4)
    assert torch.equal(sae.archetype_weights.detach(), torch.eye(D_SAE))  # atom i starts as candidate i
    rms = C.pow(2).sum(-1).mean().sqrt()
    assert_close(sae.W_dec, C / rms)  # the multiplier starts the atoms at unit root-mean-square norm
    # encoder columns along the atoms' unit directions, all scaled by one positive factor ...
    unit = C / C.norm(dim=-1, keepdim=True)
    factor = float((sae.W_enc.T * unit).sum() / unit.pow(2).sum())
    assert factor > 0
    assert_close(sae.W_enc.T, factor * unit)
    # ... that makes the initial reconstruction least-squares optimal: the residual is orthogonal to it
    with torch.no_grad():
        part = sae(x).recon - sae.b_dec
    assert abs(float((part * (x - sae.b_dec - part)).sum())) <= 1e-3 * float(part.pow(2).sum())
    with pytest.raises(ValueError, match="n_candidates=48 candidates from the initialisation sample, but the sample "
                                         "has 10 rows; raise init_tokens"):  # fmt: skip
        sae.initialize_from_data(x[:10])


def test_kmeans_reaches_a_fixed_point_from_its_start() -> None:
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(500, 6, generator=gen)
    centroids = kmeans(points, points[:20], iterations=100)
    owner = distances(points, centroids).argmin(dim=1)
    for j in owner.unique():
        assert_close(centroids[j], points[owner == j].mean(0), atol=1e-5, rtol=1e-5)


def test_repeated_activations_give_distinct_candidates() -> None:
    """A sample where most rows repeat a few vectors (like a ViT's background patches) still gives one candidate per
    distinct row, and k-means does not keep duplicate centroids: no atom starts as a copy of another."""
    gen = torch.Generator().manual_seed(0)
    varied = torch.randn(60, D_IN, generator=gen)
    repeated = torch.randn(4, D_IN, generator=gen).repeat(60, 1)  # 240 rows, 4 distinct
    x = torch.cat([repeated, varied])[torch.randperm(300, generator=gen)]
    pick = distinct_rows_first(x, 50, gen)
    assert len({tuple(r) for r in x[pick].tolist()}) == 50
    pick = distinct_rows_first(x, 70, gen)  # only 64 distinct rows: every one, then repeats
    assert len({tuple(r) for r in x[pick].tolist()}) == 64 and pick.unique().numel() == 70
    centroids = kmeans(x, x[:48], iterations=10)  # the first rows hold many copies of the same vectors
    assert torch.cdist(centroids, centroids).add(torch.eye(48) * 1e9).min() > 1e-4
    for init in ("sample", "kmeans"):
        sae = build("archetypal", candidates_init=init)
        sae.initialize_from_data(x)
        C = sae.candidates
        assert torch.cdist(C, C).add(torch.eye(D_SAE) * 1e9).min() > 1e-4, init


def test_archetypal_transcoder_takes_candidates_from_the_targets() -> None:
    tc = build("archetypal", transcoder=True, candidates_init="sample", b_dec_init="mean", skip_connection=True)
    assert isinstance(tc, Transcoder) and tc.candidates.shape == (D_SAE, 7)
    x, y = torch.randn(100, D_IN), 3 * torch.randn(100, 7) + 2
    tc.initialize_from_data(x, y)
    assert bool((distances(tc.candidates, y - y.mean(0)).min(dim=1).values < 1e-5).all())
    with torch.no_grad():
        tc.W_skip.copy_(0.1 * torch.randn(D_IN, 7))
    tc.eval()
    out = tc(x, y)
    feats = topk_reference(x @ tc.W_enc + tc.b_enc)
    assert_close(out.feats, feats, atol=1e-5, rtol=1e-5)
    assert_close(out.recon, feats @ tc.W_dec + tc.b_dec + x @ tc.W_skip, atol=1e-4, rtol=1e-5)


def test_archetypal_config_refuses_unit_decoders() -> None:
    with pytest.raises(ValueError, match="decoder_norm='unit' is not valid for architecture='archetypal'"):
        SAEConfig(d_in=8, architecture="archetypal", k=2, decoder_norm="unit")


# ---------------------------------------------------------------------------------------------------- matching pursuit
def test_matching_pursuit_forward_and_gradients_match_saelens_pursuit() -> None:
    sae = build("matching_pursuit", k=5)
    assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    x = torch.randn(2, 16, D_IN)
    out = sae(x)
    x2 = x.reshape(-1, D_IN)
    W_dec, b_dec = (t.detach().clone().requires_grad_() for t in (sae.W_dec, sae.b_dec))
    feats = saelens_pursuit(x2 - b_dec, W_dec, max_iterations=5)
    recon = feats @ W_dec + b_dec
    assert_close(out.feats.reshape(-1, D_SAE), feats, atol=1e-5, rtol=1e-5)
    assert_close(out.recon.reshape(-1, D_IN), recon, atol=1e-5, rtol=1e-5)
    assert_close(out.l0.reshape(-1), (feats > 0).sum(-1).float())
    assert bool((out.l0 <= 5).all()) and float(out.l0.mean()) > 3
    mse = (recon - x2).pow(2).sum(-1).mean()
    assert_close(out.loss, mse, atol=1e-5, rtol=1e-5)
    assert_close(sae.encode(x), out.feats)
    assert_close(sae.decode(out.feats), out.recon, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    mse.backward()
    assert_close(sae.W_dec.grad, W_dec.grad, atol=1e-5, rtol=1e-4)
    assert_close(sae.b_dec.grad, b_dec.grad, atol=1e-5, rtol=1e-4)
    # sparse codes: each row's entries sum to its dense features
    codes = out.codes
    dense = torch.zeros(32, D_SAE).index_put_(
        (torch.arange(32).repeat_interleave(5), codes.indices), codes.values.detach(), accumulate=True
    )
    assert_close(dense, out.feats.detach().reshape(-1, D_SAE))


@pytest.mark.parametrize("use_gram", [False, True])
def test_both_ways_of_updating_the_correlations_give_saelens_pursuit(use_gram: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    W = torch.nn.functional.normalize(torch.randn(D_SAE, D_IN, generator=gen), dim=-1)
    r = 2 * torch.randn(40, D_IN, generator=gen)
    for rules in ({}, {"residual_threshold": 1.0, "stop_on_duplicate_support": True}):
        p = matching_pursuit(r, W, 8, use_gram=use_gram, **rules)
        feats = torch.zeros(40, D_SAE).scatter_add(1, p.indices, p.values)
        ref = saelens_pursuit(r, W, max_iterations=8, **rules)
        assert_close(feats, ref, atol=1e-5, rtol=1e-5)
        assert_close(p.residual, r - ref @ W, atol=1e-5, rtol=1e-5)


def test_matching_pursuit_stopping_rules_match_saelens() -> None:
    sae = build("matching_pursuit", k=12, mp_residual_threshold=1.5, mp_stop_on_duplicate_support=True).eval()
    x = 2 * torch.randn(64, D_IN)
    with torch.no_grad():
        ref = saelens_pursuit(x - sae.b_dec, sae.W_dec, 1.5, 12, True)
        assert_close(sae.encode(x), ref, atol=1e-5, rtol=1e-5)
        assert_close(sae(x).recon, ref @ sae.W_dec + sae.b_dec, atol=1e-5, rtol=1e-5)
    assert float((ref > 0).sum(-1).float().std()) > 0  # rows stopped after different numbers of steps


def test_matching_pursuit_merges_an_atom_picked_twice() -> None:
    """A non-unit atom keeps part of its direction in the residual and is picked again: one feature, summed."""
    sae = SparseAutoencoder(SAEConfig(d_in=4, d_sae=4, architecture="matching_pursuit", k=3, b_dec_init="zeros"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.diag(torch.tensor([0.5, 1.0, 1.0, 1.0])))
    x = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    out = sae(x)
    assert_close(out.feats, torch.tensor([[1.0 + 0.75 + 0.5625, 0.0, 0.0, 0.0]]))
    assert_close(out.recon, torch.tensor([[0.5 * 2.3125, 0.0, 0.0, 0.0]]))
    assert out.l0.tolist() == [1.0] and int((out.codes.values > 0).sum()) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decoder_norm": "free"}, "needs unit-norm atoms"),
        ({"apply_b_dec_to_input": False}, "pursuit runs on x - b_dec"),
        ({"mp_residual_threshold": 0.1, "normalize_activations": "expected_norm"}, "cannot be combined"),
    ],
)
def test_matching_pursuit_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SAEConfig(d_in=8, architecture="matching_pursuit", k=2, **kwargs)


def test_matching_pursuit_cannot_be_a_transcoder() -> None:
    with pytest.raises(ValueError, match="'matching_pursuit' cannot be a transcoder"):
        TranscoderConfig(d_in=8, d_out=4, architecture="matching_pursuit", k=2)


def test_panneal_transcoder_matches_the_reference_and_trains() -> None:
    tc = build("panneal", transcoder=True, skip_connection=True, apply_b_dec_to_input=True, lp_coefficient=0.1)
    with torch.no_grad():
        tc.W_skip.copy_(0.1 * torch.randn(D_IN, 7))
    x, y = torch.randn(64, D_IN), torch.randn(64, 7)
    out = tc(x, y)
    feats = torch.relu((x - tc.b_in) @ tc.W_enc + tc.b_enc)
    assert_close(out.feats, feats, atol=1e-5, rtol=1e-5)
    assert_close(out.recon, feats @ tc.W_dec + tc.b_dec + x @ tc.W_skip, atol=1e-5, rtol=1e-5)
    opt = make_optimizer(tc, lr=1e-2)
    first = float(out.mse_loss.detach())
    for step in range(30):
        train_step(tc, opt, x, y, step=step)
    assert float(tc(x, y).mse_loss.detach()) < 0.7 * first


# ---------------------------------------------------------------------------------------------------- folding
@pytest.mark.parametrize("arch", NEW)
def test_folding_the_norm_factor_keeps_reconstructions(arch: str) -> None:
    sae = build(arch, normalize_activations="expected_norm")
    x = 7.0 * torch.randn(32, D_IN) + 2.0
    scale = sae.fit_normalization(x)
    sae.eval()
    before = sae(x)
    W_dec = sae.W_dec.detach().clone()
    sae.fold_activation_norm_scaling_factor()
    after = sae(x)
    assert_close(after.recon, before.recon, atol=1e-4, rtol=1e-5)
    if arch == "matching_pursuit":  # SAELens's folding: the unit atoms stay, projection lengths are in raw units
        assert torch.equal(sae.W_dec.detach(), W_dec)
        assert_close(after.feats, before.feats / scale, atol=1e-5, rtol=1e-5)
    else:
        assert_close(after.feats, before.feats, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- files
def eval_outputs(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sae.eval()
    with torch.no_grad():
        out = sae(x)
    return out.feats, out.recon


@pytest.mark.parametrize("norm", ["none", "layer_norm"])
@pytest.mark.parametrize("arch", NEW)
def test_save_load_round_trip(arch: str, norm: str, tmp_path: Path) -> None:
    sae = build(arch, normalize_activations=norm, model_name="test/vit-tiny")
    x = 3 * torch.randn(40, D_IN)
    sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert type(loaded) is type(sae) is CLASSES[arch] and loaded.cfg == sae.cfg
    assert isinstance(CLASSES[arch].load(tmp_path / "sae"), CLASSES[arch])
    for name, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    feats, recon = eval_outputs(sae, x)
    loaded_feats, loaded_recon = eval_outputs(loaded, x)
    assert torch.equal(loaded_feats, feats) and torch.equal(loaded_recon, recon)
    loaded.save(tmp_path / "again")  # the files round-trip bitwise
    for name in ("sae_weights.safetensors", *([ARCHETYPAL_FILE] if arch == "archetypal" else [])):
        first, second = load_file(str(tmp_path / "sae" / name)), load_file(str(tmp_path / "again" / name))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name
    assert not list((tmp_path / "sae").glob(".*.tmp"))
    if arch == "matching_pursuit":
        with pytest.raises(ValueError, match="holds a MatchingPursuitSAE, not a ReLUSAE"):
            ReLUSAE.load(tmp_path / "sae")


@pytest.mark.parametrize("arch", NEW)
def test_expected_norm_folds_into_the_file_and_unfolds_for_training(arch: str, tmp_path: Path) -> None:
    sae = build(arch, normalize_activations="expected_norm")
    x = 7 * torch.randn(64, D_IN) + 1
    scale = sae.fit_normalization(x)
    sae.save(tmp_path)
    loaded = SparseAutoencoder.load(tmp_path)
    assert loaded.cfg.normalize_activations == "none"
    feats, recon = eval_outputs(sae, x)
    loaded_feats, loaded_recon = eval_outputs(loaded, x)
    assert_close(loaded_recon, recon, atol=1e-4, rtol=1e-5)
    assert_close(loaded_feats, feats / scale if arch == "matching_pursuit" else feats, atol=1e-4, rtol=1e-5)
    loaded.unfold_activation_norm()
    assert loaded.cfg == sae.cfg
    for name, value in sae.state_dict().items():
        if value.is_floating_point():
            assert_close(loaded.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_panneal_folder_is_a_saelens_standard_sae(tmp_path: Path) -> None:
    sae = build("panneal", normalize_activations="layer_norm")
    sae.save(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "standard"
    x = 4 * torch.randn(40, D_IN) + 1
    their_feats, their_recon = load_from_disk(tmp_path).forward(x)
    feats, recon = eval_outputs(sae, x)
    assert_close(their_feats, feats, atol=1e-5, rtol=1e-5)
    assert_close(their_recon, recon, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["none", "expected_norm"])
def test_archetypal_folder_is_a_saelens_topk_sae_with_the_derived_decoder(norm: str, tmp_path: Path) -> None:
    sae = build("archetypal", normalize_activations=norm)
    x = 4 * torch.randn(40, D_IN) + 1
    if norm == "expected_norm":
        sae.fit_normalization(x)
    sae.save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    assert raw["architecture"] == "topk" and raw["k"] == K
    assert set(load_file(str(tmp_path / "sae_weights.safetensors"))) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert set(load_file(str(tmp_path / ARCHETYPAL_FILE))) == {"archetype_weights", "relaxation", "candidates",
                                                              "log_multiplier"}  # fmt: skip
    their_feats, their_recon = load_from_disk(tmp_path).forward(x)
    feats, recon = eval_outputs(sae, x)
    assert_close(their_feats, feats, atol=1e-4, rtol=1e-5)
    assert_close(their_recon, recon, atol=1e-4, rtol=1e-5)


def test_archetypal_folder_without_its_own_file_loads_the_saved_atoms_as_candidates(tmp_path: Path, caplog) -> None:
    sae = build("archetypal", n_candidates=30)
    x = torch.randn(40, D_IN)
    sae.save(tmp_path)
    (tmp_path / ARCHETYPAL_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        loaded = SparseAutoencoder.load(tmp_path)
    assert f"there is no {ARCHETYPAL_FILE} beside it" in caplog.text
    assert type(loaded) is ArchetypalSAE and loaded.cfg.n_candidates == D_SAE
    assert_close(loaded.candidates, sae.W_dec.detach())
    feats, recon = eval_outputs(sae, x)
    loaded_feats, loaded_recon = eval_outputs(loaded, x)
    assert_close(loaded_feats, feats)
    assert_close(loaded_recon, recon, atol=1e-6, rtol=1e-5)
    # a stale file (from another SAE saved in this folder) is detected the same way
    build("archetypal", n_candidates=30, seed=7).save(tmp_path / "other")
    (tmp_path / "other" / ARCHETYPAL_FILE).replace(tmp_path / ARCHETYPAL_FILE)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stale = SparseAutoencoder.load(tmp_path)
    assert "does not belong to these weights" in caplog.text
    assert_close(eval_outputs(stale, x)[1], recon, atol=1e-6, rtol=1e-5)


def saelens_mp_outputs(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What SAELens 6 computes with a ``matching_pursuit`` folder (``normalize_activations: none``): its loader is
    strict (exactly ``W_dec`` and ``b_dec``), ``encode`` centres by ``b_dec`` when ``apply_b_dec_to_input`` and
    runs the pursuit, ``decode`` adds ``b_dec`` back only then."""
    raw = json.loads((folder / "cfg.json").read_text())
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert raw["architecture"] == "matching_pursuit" and set(tensors) == {"W_dec", "b_dec"}
    assert raw.get("normalize_activations", "none") == "none"
    apply = raw.get("apply_b_dec_to_input", True)
    W_dec, b_dec = tensors["W_dec"], tensors["b_dec"] * apply
    feats = saelens_pursuit(x - b_dec, W_dec, raw.get("residual_threshold", 1e-2), raw.get("max_iterations"),
                            raw.get("stop_on_duplicate_support", True))  # fmt: skip
    return feats, feats @ W_dec + b_dec


@pytest.mark.parametrize("norm", ["none", "expected_norm"])
def test_matching_pursuit_folder_follows_the_saelens_layout(norm: str, tmp_path: Path) -> None:
    sae = build("matching_pursuit", k=6, normalize_activations=norm, mp_stop_on_duplicate_support=True)
    x = 4 * torch.randn(40, D_IN) + 1
    if norm == "expected_norm":
        sae.fit_normalization(x)
    sae.save(tmp_path)
    raw = json.loads((tmp_path / "cfg.json").read_text())
    assert (raw["max_iterations"], raw["residual_threshold"], raw["stop_on_duplicate_support"]) == (6, 0.0, True)
    their_feats, their_recon = saelens_mp_outputs(tmp_path, x)
    loaded_feats, loaded_recon = eval_outputs(SparseAutoencoder.load(tmp_path), x)
    assert_close(their_feats, loaded_feats, atol=1e-5, rtol=1e-5)
    assert_close(their_recon, loaded_recon, atol=1e-5, rtol=1e-5)
    assert_close(their_recon, eval_outputs(sae, x)[1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_matching_pursuit_folder_loads_with_its_outputs(apply_b_dec: bool, tmp_path: Path) -> None:
    """A folder as SAELens 6.54's ``save_model`` writes it, with SAELens's defaults (residual threshold 0.01,
    ``max_iterations: null`` = d_in steps, stop on duplicate support)."""
    gen = torch.Generator().manual_seed(3)
    W_dec = torch.nn.functional.normalize(torch.randn(D_SAE, D_IN, generator=gen), dim=-1)
    save_file(
        {"W_dec": W_dec, "b_dec": 0.3 * torch.randn(D_IN, generator=gen)}, str(tmp_path / "sae_weights.safetensors")
    )
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12"},
           "residual_threshold": 0.01, "max_iterations": None, "stop_on_duplicate_support": True,
           "architecture": "matching_pursuit"}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = SparseAutoencoder.load(tmp_path)
    assert type(sae) is MatchingPursuitSAE and sae.cfg.k == D_IN and sae.cfg.mp_stop_on_duplicate_support
    x = 2 * torch.randn(64, D_IN)
    their_feats, their_recon = saelens_mp_outputs(tmp_path, x)
    feats, recon = eval_outputs(sae, x)
    assert_close(feats, their_feats, atol=1e-5, rtol=1e-5)
    assert_close(recon, their_recon, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- resampler
@pytest.mark.parametrize("arch", NEW)
def test_resampler_rewrites_dead_features_and_their_adam_state(arch: str) -> None:
    torch.manual_seed(0)
    sae = build(arch, dead_feature_window=5, b_dec_init="mean")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    data = torch.randn(256, D_IN)
    for step in range(6):
        train_step(sae, opt, data[step * 32 :][:32], step=step)
    dead = torch.tensor([1, 7, 20, 33])
    with torch.no_grad():
        sae.steps_since_fired.zero_()
        sae.steps_since_fired[dead] = 10
    alive = torch.ones(D_SAE, dtype=torch.bool)
    alive[dead] = False
    W_before = sae.W_dec.detach().clone()
    params = dict(sae.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    state_before = {n: {k: v.clone() for k, v in opt.state[p].items() if k != "step"} for n, p in params.items()}
    pool = torch.cat([torch.randn(60, D_IN), 30 * torch.eye(D_IN)[:4]])  # four outliers carry the loss
    resampler = DeadFeatureResampler(every_n_steps=10, n_samples=pool.shape[0])
    assert resampler.resample(fake_trainer(opt), SimpleNamespace(sae=sae), pool) == len(dead)
    # dead atoms now point along the outliers (exactly, or for archetypal atoms as close as the bound allows)
    rows = sae.W_dec.detach()[dead]
    cos = (rows / rows.norm(dim=1, keepdim=True)) @ torch.eye(D_IN)[:4].T
    best = cos.max(dim=1).values
    old = ((W_before[dead] / W_before[dead].norm(dim=1, keepdim=True)) @ torch.eye(D_IN)[:4].T).max(dim=1).values
    if arch == "archetypal":
        assert bool((best >= old).all())
        A = sae.archetype_weights.detach()[dead]
        assert torch.equal((A > 0).sum(-1), torch.ones(len(dead), dtype=torch.long))  # anchored at one candidate
    else:
        assert_close(best, torch.ones(len(dead)), atol=1e-2, rtol=0)
    assert torch.equal(sae.W_dec.detach()[alive], W_before[alive])
    for name, p in params.items():  # live entries bitwise untouched; Adam moments zeroed exactly at the dead ones
        axis = type(sae).feature_parameters.get(name)
        if axis is None:
            assert torch.equal(p.detach(), before[name]), name
            continue
        keep = (slice(None),) * axis + (alive,)
        drop = (slice(None),) * axis + (dead,)
        assert torch.equal(p.detach()[keep], before[name][keep]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key][drop], torch.zeros_like(p.detach()[drop])), (name, key)
            assert torch.equal(opt.state[p][key][keep], state_before[name][key][keep]), (name, key)
    assert torch.equal(sae.steps_since_fired[dead], torch.zeros(len(dead), dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- prisma fit
@pytest.mark.parametrize("arch", NEW)
def test_trains_through_prisma_fit(arch: str, tmp_path: Path) -> None:
    from prisma_lightning.activations import ShardWriter
    from prisma_lightning.cli import PrismaCLI

    root = Path(__file__).resolve().parents[1]
    writer = ShardWriter(tmp_path / "acts", d=64, tokens_per_image=16, images_per_shard=32)
    writer.add(torch.randn(64 * 16, 64), 64)
    writer.close()
    own = {"panneal": ["--model.init_args.sae.anneal_start", "1", "--model.init_args.sae.anneal_end", "4",
                       "--model.init_args.sae.n_p_updates", "3", "--model.init_args.sae.rescale_window", "2"],
           "archetypal": ["--model.init_args.sae.n_candidates", "256", "--model.init_args.sae.kmeans_iterations", "3"],
           "matching_pursuit": []}[arch]  # fmt: skip
    args = [
        "fit", "--config", str(root / "configs/sae/cached_shards.yaml"),
        "--model.init_args.sae.architecture", arch, *own,
        "--model.init_args.export_dir", str(tmp_path / "sae"),
        "--data.init_args.path", str(tmp_path / "acts"),
        "--data.init_args.batch_size", "128",
        "--trainer.max_steps", "6",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    cli = PrismaCLI(args=args)
    sae = cli.model.sae
    assert type(sae) is CLASSES[arch] and cli.trainer.global_step == 6
    assert sae.cfg.d_in == 64 and sae.cfg.hook_name == "blocks.1.hook_resid_post"  # the config's other fields
    exported = SparseAutoencoder.load(tmp_path / "sae")
    assert type(exported) is CLASSES[arch] and exported.cfg == sae.cfg
    x = torch.randn(32, 64)
    assert_close(eval_outputs(exported, x)[1], eval_outputs(sae, x)[1], atol=1e-5, rtol=1e-5)
    if arch == "panneal":
        assert sae.p == pytest.approx(0.2) and float(sae.lp_scale) != 1.0  # annealed, rescaled
    if arch == "archetypal":  # candidates from the data (k-means centroids of centred rows, not unit rows)
        assert (tmp_path / "sae" / ARCHETYPAL_FILE).is_file()
        assert not torch.allclose(sae.candidates.norm(dim=1), torch.ones(256), atol=0.05)
        assert_close(sae.archetype_weights.sum(-1), torch.ones(sae.d_sae))
        assert torch.equal(exported.archetype_weights.detach(), sae.archetype_weights.detach())
    if arch == "matching_pursuit":
        assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))


# ---------------------------------------------------------------------------------------------------- recovery
# The default-config recovery of every architecture is test_sae_recovery.py's (RECIPES holds these three too).


ANNEALED = {"normalize_activations": "expected_norm", "anneal_start": 150, "anneal_end": 350}
"""A schedule that fits a short run: L1 until the atoms are found, then p falls to p_end."""


@pytest.mark.slow
@pytest.mark.parametrize("coefficient", [2.0, 2.5])
def test_panneal_recovers_the_dictionary_with_the_annealed_penalty(coefficient: float) -> None:
    """Every step of the schedule is run (no early stop): the dictionary is recovered at ``p = p_end``, with sparse
    codes (the planted ones have ``ACTIVE`` atoms)."""
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=D, d_sae=1024, architecture="panneal", lp_coefficient=coefficient, **ANNEALED)
    sae = SparseAutoencoder(cfg)
    data = SparseDictionaryData(seed=1)
    sae.initialize_from_data(data.batch(8192)[0])
    opt = make_optimizer(sae, lr=5e-3)
    for step in range(400):
        out = train_step(sae, opt, data.batch(512)[0], step=step)
        assert torch.isfinite(out.loss), f"loss diverged at step {step}"
    assert sae.p == pytest.approx(cfg.p_end)
    fraction = recovered_fraction(sae.W_dec, data.atoms)
    assert fraction >= 0.9, f"lp_coefficient={coefficient}: only {fraction:.1%} of the atoms recovered"
    assert float(out.l0.mean()) < 3 * ACTIVE


def test_archetypal_extra_file_is_written_by_save_sae_and_downloaded_by_from_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prisma_lightning.sae import io as sae_io

    sae = build("archetypal", n_candidates=30)
    sae_io.save_sae(sae, tmp_path / "repo" / "layer")  # the free function, not ArchetypalSAE.save
    assert (tmp_path / "repo" / "layer" / ARCHETYPAL_FILE).is_file()
    hub = tmp_path / "cache"
    fetched: list[str] = []

    def fake_download(repo_id, filename, revision=None, subfolder=None):
        source = tmp_path / "repo" / (subfolder or "") / filename
        if not source.exists():
            raise FileNotFoundError(f"{filename!r} was not found in {repo_id!r}")
        target = hub / (subfolder or "") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        fetched.append(filename)
        return str(target)

    monkeypatch.setattr(sae_io, "hub_download", fake_download)
    loaded = SparseAutoencoder.from_pretrained("someone/saes", subfolder="layer")
    assert ARCHETYPAL_FILE in fetched
    assert type(loaded) is ArchetypalSAE and loaded.cfg.n_candidates == 30  # the exact reload, not the fallback
    assert_close(loaded.archetype_weights.detach(), sae.archetype_weights.detach())
