"""SAE architectures: forward values against dense reference formulas, custom gradients, losses, decoder constraints,
activation normalisation, the geometric median and config validation. Tiny widths, CPU, float32/float64."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from prisma_lightning.sae import (
    ARCHITECTURES,
    SAEConfig,
    SparseAutoencoder,
    SparsePattern,
    Transcoder,
    TranscoderConfig,
    activations,
    config_class,
    geometric_median,
    make_optimizer,
    sparse_decode,
    sparse_encode,
    train_step,
)
from prisma_lightning.sae.activations import gated_sae, jumprelu, jumprelu_sae, relu_sae
from prisma_lightning.sae.activations import step as heaviside
from prisma_lightning.sae.sparse_ops import batch_topk_select, pre_activations, topk_select

D_IN, D_SAE, K = 12, 48, 4
FORMULAS = ("relu", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated")
"""Architectures whose textbook formulas ``reference_feats`` writes out (others have their own test files)."""


@pytest.fixture(autouse=True)
def _single_thread():
    """Single-threaded: tiny tensors, where thread start-up and waiting cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_sae(arch: str, **kw) -> SparseAutoencoder:
    if "k" in {f.name for f in dataclasses.fields(config_class(arch))}:
        kw.setdefault("k", K)
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, seed=1, **kw)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():  # non-trivial biases so a misplaced one shows up
        for name, p in sae.named_parameters():
            if p.ndim == 1 and name != "log_threshold":
                p.copy_(0.1 * torch.randn_like(p))
    return sae


def reference_feats(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Dense textbook formulas, independent of the module's code paths."""
    arch, W = sae.cfg.architecture, sae.W_enc
    x_c = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    if arch == "gated":
        h = x_c @ W
        return (h + sae.b_gate > 0).float() * torch.relu(x_c @ (W * sae.r_mag.exp()) + sae.b_mag)
    pre = x_c @ W + sae.b_enc
    if arch == "relu":
        return torch.relu(pre)
    if arch == "jumprelu":
        return pre * (pre > sae.log_threshold.exp())
    if arch == "topk":
        v, i = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter(-1, i, v.relu())
    if sae.training:  # batch top-k: the k*n largest over the whole batch
        flat = pre.relu().flatten()
        v, i = flat.topk(K * x.shape[0])
        return torch.zeros_like(flat).scatter(0, i, v).view_as(pre)
    return pre.relu() * (pre > sae.running_threshold)


@pytest.mark.parametrize("arch", FORMULAS)
def test_forward_matches_reference_formulas(arch: str) -> None:
    sae = make_sae(arch)
    x = torch.randn(2, 16, D_IN)
    out = sae(x)
    x2 = x.reshape(-1, D_IN)
    feats = reference_feats(sae, x2)
    torch.testing.assert_close(out.feats.reshape(-1, D_SAE), feats, atol=1e-5, rtol=1e-5)
    recon = feats @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out.recon.reshape(-1, D_IN), recon, atol=1e-5, rtol=1e-5)
    assert out.recon.shape == x.shape and out.feats.shape == (2, 16, D_SAE) and out.l0.shape == (2, 16)
    torch.testing.assert_close(out.mse_loss, (recon - x2).pow(2).sum(-1).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.l0.reshape(-1), (feats > 0).sum(-1).float())
    torch.testing.assert_close(out.loss, out.mse_loss + out.sparsity_loss + out.aux_loss + out.prefix_loss)
    if arch == "relu":
        l1 = (feats * sae.W_dec.norm(dim=1)).sum(-1).mean() * sae.cfg.l1_coefficient
        torch.testing.assert_close(out.sparsity_loss, l1)
    if arch == "jumprelu":  # the default penalty is Anthropic's tanh
        penalty = torch.tanh(sae.cfg.jumprelu_tanh_scale * feats * sae.W_dec.norm(dim=1)).sum(-1).mean()
        torch.testing.assert_close(out.sparsity_loss, sae.cfg.l0_coefficient * penalty)
    if arch == "gated":
        gate = torch.relu((x2 - sae.b_dec) @ sae.W_enc + sae.b_gate)
        torch.testing.assert_close(out.aux_loss, (gate @ sae.W_dec + sae.b_dec - x2).pow(2).sum(-1).mean())
    # encode/decode are the public halves of forward
    torch.testing.assert_close(sae.encode(x), out.feats)
    torch.testing.assert_close(sae.decode(out.feats), out.recon, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_falls_with_adam(arch: str) -> None:
    torch.manual_seed(0)
    sae = make_sae(arch, normalize_activations="expected_norm", b_dec_init="mean")
    x = torch.randn(256, D_SAE // 4) @ torch.randn(D_SAE // 4, D_IN)
    sae.initialize_from_data(x)  # normalisation, b_dec and the architecture's own data-driven initialisation
    opt = make_optimizer(sae, lr=3e-3)
    first = sae(x).loss.item()
    for step in range(100):
        train_step(sae, opt, x, step=step)
    last = sae(x).loss.item()
    assert last < 0.7 * first, (first, last)


def test_topk_keeps_exactly_k_per_row() -> None:
    sae = make_sae("topk", b_dec_init="zeros")
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive: exactly k survive the ReLU
    out = sae(torch.randn(64, D_IN))
    assert ((out.feats != 0).sum(-1) == K).all()
    assert out.codes.indices.shape == (64 * K,)


def test_batchtopk_selects_k_times_batch_and_uses_running_threshold() -> None:
    sae = make_sae("batchtopk")
    with torch.no_grad():
        sae.b_enc.fill_(2.0)
    x = torch.randn(64, D_IN) * torch.linspace(0.1, 3, 64)[:, None]  # rows of very different scale
    sae.train()
    out = sae(x)
    counts = (out.feats != 0).sum(-1)
    assert counts.sum() == K * 64 and counts.max() > K and counts.min() < K
    threshold = sae.running_threshold.item()
    assert threshold > 0
    sae.eval()
    out = sae(x)
    pre = pre_activations(x, sae.W_enc, sae.b_enc, sae.b_dec)
    torch.testing.assert_close(out.feats, pre.relu() * (pre > threshold))
    assert sae.training is False and sae.running_threshold.item() == threshold  # eval does not update it


def test_batchtopk_warmup_selects_per_token_then_over_the_batch() -> None:
    """During ``batch_topk_warmup_steps`` each token keeps its own top k and the inference threshold is not tracked;
    from then on the k * n largest of the batch are kept."""
    sae = make_sae("batchtopk", batch_topk_warmup_steps=3)
    with torch.no_grad():
        sae.b_enc.fill_(2.0)  # every pre-activation positive
    x = torch.randn(64, D_IN) * torch.linspace(0.1, 3, 64)[:, None]  # rows of very different scale
    sae.train()
    for step in (0, 2):
        counts = (sae(x, step=step).feats != 0).sum(-1)
        assert (counts == K).all() and sae.running_threshold.item() == 0.0
    counts = (sae(x, step=3).feats != 0).sum(-1)
    assert counts.sum() == K * 64 and counts.max() > K and sae.running_threshold.item() > 0


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_encoder_scale_is_fitted_to_the_data_sample(arch: str) -> None:
    """After initialize_from_data the per-token top-k reconstruction of the sample satisfies the normal equation
    <R, x - b_dec> = ||R||^2 (the encoder, tied to the unit decoder, overshoots otherwise)."""
    x = 3 * torch.randn(1024, D_IN) @ torch.randn(D_IN, D_IN) + 2
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K, seed=1))
    before = sae.W_enc.detach().clone()
    sae.initialize_from_data(x)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    v, i = pre.topk(K, dim=-1)
    r = torch.zeros_like(pre).scatter(-1, i, v.relu()) @ sae.W_dec
    target = x - sae.b_dec
    torch.testing.assert_close((r * target).sum(), r.pow(2).sum(), rtol=1e-4, atol=0)
    scale = (sae.W_enc / before).detach()
    torch.testing.assert_close(scale, torch.full_like(scale, float(scale[0, 0])))  # one factor for all weights
    kept = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K, seed=1, encoder_init_fit=False))
    kept.initialize_from_data(x)
    torch.testing.assert_close(kept.W_enc, before)


def test_batch_topk_select_is_exact_even_when_one_row_dominates() -> None:
    pre = torch.randn(8, 64)
    pre[3] += 10.0  # row 3 holds far more than 2k of the batch's winners: the candidate search must grow
    values, pattern = batch_topk_select(pre, 4)
    dense = torch.zeros_like(pre).index_put((pattern.rows, pattern.indices), values)
    v, i = pre.relu().flatten().topk(32)
    torch.testing.assert_close(dense, torch.zeros(8 * 64).scatter(0, i, v).view(8, 64))
    assert pattern.counts()[3] > 8


def test_jumprelu_threshold_learns_through_the_straight_through_estimator() -> None:
    sae = make_sae("jumprelu", jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.3, l0_coefficient=0.1,
                   jumprelu_sparsity_loss="step")  # fmt: skip
    x = torch.randn(128, D_IN)
    out = sae(x)
    out.loss.backward()
    grad = sae.log_threshold.grad
    assert grad is not None and grad.abs().sum() > 0
    # the L0 term alone: d/d(log t) sum_i H(z_i - t) = -t/bw * #{|z - t| < bw/2}, averaged over tokens
    sae.zero_grad()
    sae(x).sparsity_loss.backward()
    pre = pre_activations(x, sae.W_enc, sae.b_enc, sae.b_dec).detach()
    t = sae.log_threshold.exp().detach()
    near = ((pre - t).abs() < 0.25).float().sum(0) / x.shape[0]
    torch.testing.assert_close(sae.log_threshold.grad, -0.1 * t / 0.5 * near)


def test_jumprelu_threshold_and_bandwidth_follow_the_data_scale(tmp_path) -> None:
    """Left unset, the initial threshold and the bandwidth are 0.4x and 2x the RMS pre-activation of the initial
    encoder on the sample; they scale with the activations, are written into the config (so saved folders keep them)
    and into buffers (so checkpoints do), and explicit values are left alone."""
    x = 5 * torch.randn(512, D_IN) + 1

    def fresh(**kw) -> SparseAutoencoder:
        return SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="jumprelu", seed=1, **kw))

    sae = fresh()
    sae.initialize_from_data(x)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    rms = float(pre.double().pow(2).mean().sqrt())
    assert sae.cfg.jumprelu_init_threshold == pytest.approx(0.4 * rms, rel=1e-5)
    assert sae.cfg.jumprelu_bandwidth == pytest.approx(2.0 * rms, rel=1e-5)
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.4 * rms), rtol=1e-5, atol=0)
    assert 0.2 < (pre > sae.threshold).float().mean() < 0.5  # a third of the features fire at first
    scaled = fresh()
    scaled.initialize_from_data(10 * x)
    assert scaled.cfg.jumprelu_bandwidth == pytest.approx(10 * sae.cfg.jumprelu_bandwidth, rel=1e-4)
    # files and checkpoints keep the values set from data
    sae.save(tmp_path / "sae")
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.cfg.jumprelu_bandwidth == sae.cfg.jumprelu_bandwidth and float(loaded.bandwidth) == float(
        sae.bandwidth
    )
    resumed = fresh()
    resumed.load_state_dict(sae.state_dict())
    assert float(resumed.bandwidth) == float(sae.bandwidth) and float(resumed.init_threshold) == float(
        sae.init_threshold
    )
    assert resumed.cfg.jumprelu_init_threshold == pytest.approx(float(sae.init_threshold))
    older = {k: v for k, v in sae.state_dict().items() if k not in ("bandwidth", "init_threshold")}
    fresh().load_state_dict(older)  # checkpoints written before the buffers existed still load
    # resampled features return to the initial threshold
    with torch.no_grad():
        sae.log_threshold.add_(1.0)
    sae.reset_feature_state(torch.tensor([3, 5]))
    torch.testing.assert_close(sae.threshold[[3, 5]], torch.full((2,), float(sae.init_threshold)))
    # explicit values win
    explicit = fresh(jumprelu_init_threshold=0.7, jumprelu_bandwidth=0.2)
    explicit.initialize_from_data(x)
    assert explicit.cfg.jumprelu_init_threshold == 0.7 and float(explicit.bandwidth) == pytest.approx(0.2)
    torch.testing.assert_close(explicit.threshold, torch.full((D_SAE,), 0.7))


@pytest.mark.parametrize("arch", ["relu", "gated", "panneal"])
def test_free_decoder_scale_is_fitted_to_the_data_sample(arch: str) -> None:
    """After initialize_from_data the initial reconstruction is the least-squares multiple of itself:
    <R, x - b_dec> = ||R||^2 (the normal equation), instead of the ~1% of the input that a 0.1-norm decoder and its
    transpose give. ``decoder_init_fit=False`` keeps the rows at ``decoder_init_norm``."""
    x = 3 * torch.randn(1024, D_IN) @ torch.randn(D_IN, D_IN) + 2
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, seed=1))
    sae.initialize_from_data(x)
    with torch.no_grad():
        r = sae.encode(x) @ sae.W_dec
    target = x - sae.b_dec
    torch.testing.assert_close((r * target).sum(), r.pow(2).sum(), rtol=1e-4, atol=0)
    assert sae.W_dec.norm(dim=1).mean() > 1.0  # well above decoder_init_norm = 0.1
    kept = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, seed=1, decoder_init_fit=False))
    kept.initialize_from_data(x)
    torch.testing.assert_close(kept.W_dec.norm(dim=1), torch.full((D_SAE,), 0.1))


def test_decoder_unit_norm_and_parallel_gradient_removal() -> None:
    sae = make_sae("topk")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    sae(torch.randn(32, D_IN)).loss.backward()
    g_before = sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    w = sae.W_dec.detach()
    dots = (sae.W_dec.grad * w).sum(1)
    assert dots.abs().max() < 1e-5 * g_before.abs().max()
    # only the parallel part was removed
    parallel = (g_before * w).sum(1, keepdim=True) / w.pow(2).sum(1, keepdim=True) * w
    torch.testing.assert_close(sae.W_dec.grad, g_before - parallel)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_train_step_keeps_unit_decoder_rows_but_leaves_free_rows() -> None:
    x = torch.randn(64, D_IN)
    for arch, unit in (("topk", True), ("relu", False), ("batchtopk", True), ("gated", False)):
        sae = make_sae(arch)
        opt = make_optimizer(sae, lr=1e-2)
        train_step(sae, opt, x)
        norms = sae.W_dec.norm(dim=1)
        assert torch.allclose(norms, torch.ones(D_SAE), atol=1e-5) is unit


def _random_pattern(n_rows: int, n_features: int, counts: list[int]) -> SparsePattern:
    idx = torch.cat([torch.randperm(n_features)[:c] for c in counts])
    return SparsePattern.from_counts(idx, torch.tensor(counts), n_features)


def test_sparse_decode_equals_dense_decode_values_and_gradients() -> None:
    pattern = _random_pattern(6, 20, [3, 0, 5, 1, 4, 2])  # variable counts, one empty row (BatchTopK layout)
    values = torch.randn(pattern.nnz, requires_grad=True)
    W = torch.randn(20, 7, requires_grad=True)
    dense = torch.zeros(6, 20).index_put((pattern.rows, pattern.indices), values)
    g = torch.randn(6, 7)
    ref = dense @ W
    grads_ref = torch.autograd.grad(ref, (values, W), g)
    out = sparse_decode(values, W, pattern)
    grads = torch.autograd.grad(out, (values, W), g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads[0], grads_ref[0])
    torch.testing.assert_close(grads[1], grads_ref[1])


def test_sparse_ops_gradcheck_float64() -> None:
    pattern = _random_pattern(5, 9, [2, 3, 0, 1, 4])
    values = torch.randn(pattern.nnz, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(v, w, pattern), (values, W))

    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(9, dtype=torch.float64, requires_grad=True)
    b_in = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def encode(x, W_enc, b_enc, b_in):
        return sparse_encode(x, W_enc, b_enc, b_in, lambda pre: topk_select(pre, 3))[0]

    assert torch.autograd.gradcheck(encode, (x, W_enc, b_enc, b_in))
    W_enc_feature_major = torch.randn(9, 4, dtype=torch.float64).t().requires_grad_()
    assert torch.autograd.gradcheck(encode, (x, W_enc_feature_major, b_enc, b_in))


def test_sparse_topk_encoder_gradients_match_dense_autograd() -> None:
    sae = make_sae("topk")
    x = torch.randn(32, D_IN, requires_grad=True)
    params = (x, sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec)
    weights = torch.randn(32, D_IN)
    grads = torch.autograd.grad((sae(x).recon * weights).sum(), params)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # dense reference on the same weights
    v, i = pre.topk(K, dim=-1)
    recon = torch.zeros_like(pre).scatter(-1, i, v.relu()) @ sae.W_dec + sae.b_dec
    grads_ref = torch.autograd.grad((recon * weights).sum(), params)
    for got, ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("feature_major", [False, True])
def test_fused_relu_gradients_match_autograd(feature_major: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 5, requires_grad=True)
    W_enc = (torch.randn(11, 5).t() if feature_major else torch.randn(5, 11)).requires_grad_()
    W_dec, b_enc, b_in, b_dec = (torch.randn(*s, requires_grad=True) for s in ((11, 5), (11,), (5,), (5,)))
    tensors = (x, W_enc, b_enc, b_in, W_dec, b_dec)

    def loss_of(feats, recon, l1):
        return (recon - 1).pow(2).sum() + 0.3 * l1.sum() + (feats * torch.linspace(0, 1, 11)).sum()

    feats, recon, l1, l0, fired = relu_sae(x, W_enc, b_enc, b_in, W_dec, b_dec, True)
    assert torch.equal(l0, (feats > 0).sum(-1).float()) and torch.equal(fired, (feats > 0).any(0))
    grads = torch.autograd.grad(loss_of(feats, recon, l1), tensors)
    f = torch.relu((x - b_in) @ W_enc + b_enc)
    grads_ref = torch.autograd.grad(loss_of(f, f @ W_dec + b_dec, f @ W_dec.norm(dim=1)), tensors)
    for got, ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert grads[1].stride() == W_enc.stride()  # laid out like the weight: no copy in autograd or the optimizer


@pytest.mark.parametrize("feature_major", [False, True])
@pytest.mark.parametrize("with_b_in", [False, True])
@pytest.mark.parametrize("penalty", ["step", "tanh"])
@pytest.mark.parametrize("dense_kernel", [False, True])
def test_fused_jumprelu_matches_the_composition_of_its_estimators(
    feature_major: bool, with_b_in: bool, penalty: str, dense_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jumprelu_sae == jumprelu + step (or the tanh penalty) + addmm: values and every gradient, threshold included
    (wide kernel), with the kernel kept as coordinates or as a dense mask.

    In float64, so the comparison is not about float32 summation order."""
    monkeypatch.setattr(activations, "_DENSE_KERNEL", 10**9 if dense_kernel else 1)
    torch.manual_seed(0)
    f64 = torch.float64
    x = torch.randn(64, 5, dtype=f64, requires_grad=True)
    W_enc = (torch.randn(11, 5, dtype=f64).t() if feature_major else torch.randn(5, 11, dtype=f64)).requires_grad_()
    W_dec, b_enc, b_in, b_dec = (torch.randn(*s, dtype=f64, requires_grad=True) for s in ((11, 5), (11,), (5,), (5,)))
    log_t = torch.full((11,), math.log(0.5), dtype=f64).add_(0.3 * torch.randn(11, dtype=f64)).requires_grad_()
    bias_in = b_in if with_b_in else None
    tensors = [x, W_enc, b_enc, W_dec, b_dec, log_t] + ([b_in] if with_b_in else [])
    bw = 0.8  # wide enough that many entries sit inside the rectangle kernel
    scale = 1.7 if penalty == "tanh" else None

    def loss_of(feats, recon, pen):
        return (recon - 1).pow(2).sum() + 0.3 * pen.sum() + (feats * torch.linspace(0, 1, 11, dtype=f64)).sum()

    theta = log_t.exp()
    feats, recon, l0, fired, tanh_sum = jumprelu_sae(x, W_enc, b_enc, bias_in, W_dec, b_dec, theta, bw, scale)
    grads = torch.autograd.grad(loss_of(feats, recon, l0 if scale is None else tanh_sum), tensors)
    pre = (x if bias_in is None else x - bias_in) @ W_enc + b_enc
    theta = log_t.exp()  # a fresh graph for the reference
    ref_feats = jumprelu(pre, theta, bw)
    ref_l0 = heaviside(pre, theta, bw).sum(-1)
    ref_tanh = torch.tanh(1.7 * ref_feats * W_dec.norm(dim=1)).sum(-1)
    torch.testing.assert_close(feats, ref_feats)
    torch.testing.assert_close(l0, ref_l0)
    if scale is None:
        assert tanh_sum is None
    else:
        torch.testing.assert_close(tanh_sum, ref_tanh)
    assert torch.equal(fired, (ref_feats > 0).any(0))
    fired_two = jumprelu_sae(x[:2], W_enc, b_enc, bias_in, W_dec, b_dec, theta, bw)[3]
    assert torch.equal(fired_two, (ref_feats[:2] > 0).any(0)) and not fired_two.all()
    kernel = ((pre - theta).abs() < bw / 2).sum()
    assert 0 < kernel < pre.numel()  # the threshold gradient is exercised, and not trivially everywhere
    ref_pen = ref_l0 if scale is None else ref_tanh
    grads_ref = torch.autograd.grad(loss_of(ref_feats, ref_feats @ W_dec + b_dec, ref_pen), tensors)
    for got, ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    assert grads[1].stride() == W_enc.stride()


@pytest.mark.parametrize("feature_major", [False, True])
@pytest.mark.parametrize("with_b_in", [False, True])
def test_fused_gated_matches_the_unfused_composition(feature_major: bool, with_b_in: bool) -> None:
    """gated_sae == the Gated SAE written out with autograd (decoder frozen in the auxiliary reconstruction):
    values and every gradient, in float64."""
    torch.manual_seed(0)
    f64, n, d, m = torch.float64, 32, 5, 11
    x = torch.randn(n, d, dtype=f64, requires_grad=True)
    W_enc = (torch.randn(m, d, dtype=f64).t() if feature_major else torch.randn(d, m, dtype=f64)).requires_grad_()
    b_gate, r_mag, b_mag = ((0.3 * torch.randn(m, dtype=f64)).requires_grad_() for _ in range(3))
    W_dec, b_in, b_dec = (torch.randn(*s, dtype=f64, requires_grad=True) for s in ((m, d), (d,), (d,)))
    bias_in = b_in if with_b_in else None
    tensors = [x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec] + ([b_in] if with_b_in else [])
    weights = torch.linspace(0, 1, m, dtype=f64)

    def loss_of(feats, recon, via_gate, l1):
        return (recon - 1).pow(2).sum() + (via_gate + 0.5).pow(2).sum() + 0.3 * l1.sum() + (feats * weights).sum()

    feats, recon, via_gate, l1, l0, fired = gated_sae(x, W_enc, b_gate, r_mag, b_mag, bias_in, W_dec, b_dec)
    grads = torch.autograd.grad(loss_of(feats, recon, via_gate, l1), tensors)
    h = (x if bias_in is None else x - bias_in) @ W_enc
    gate = torch.relu(h + b_gate)
    ref_feats = (h + b_gate > 0) * torch.relu(h * r_mag.exp() + b_mag)
    ref = (ref_feats, ref_feats @ W_dec + b_dec, gate @ W_dec.detach() + b_dec.detach(), gate @ W_dec.norm(dim=1))
    for got, want in zip((feats, recon, via_gate, l1), ref, strict=True):
        torch.testing.assert_close(got, want)
    active = ref_feats > 0
    assert 0 < active.sum() < active.numel() and (active != (gate > 0)).any()  # both masks matter
    assert torch.equal(l0, active.sum(-1).to(f64)) and torch.equal(fired, active.any(0))
    grads_ref = torch.autograd.grad(loss_of(*ref), tensors)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert grads[1].stride() == W_enc.stride()


def test_auxk_is_zero_without_dead_features_and_trains_only_dead_ones() -> None:
    sae = make_sae("topk", dead_feature_window=3, aux_k=8)
    x = torch.randn(32, D_IN)
    sae.train()
    assert sae(x).aux_loss.item() == 0.0  # nothing has had 3 steps to die yet
    dead = torch.arange(0, D_SAE, 3)
    with torch.no_grad():
        sae.steps_since_fired.zero_()
        sae.steps_since_fired[dead] = 3
    out = sae(x)
    assert out.aux_loss.item() > 0
    sae.zero_grad()
    out.aux_loss.backward()
    touched = (sae.W_enc.grad.abs().sum(0) > 0).nonzero().squeeze(1)
    assert set(touched.tolist()) <= set(dead.tolist()) and len(touched) > 0
    sae.eval()
    assert sae(x).aux_loss.item() == 0.0


def test_ghost_grads_change_the_loss_when_features_are_dead() -> None:
    cfg = {"ghost_grads": True, "dead_feature_window": 2}
    sae = make_sae("relu", **cfg)
    x = torch.randn(32, D_IN)
    sae.train()
    base = sae(x)
    assert base.aux_loss.item() == 0.0
    with torch.no_grad():
        sae.steps_since_fired[:10] = 5
    out = sae(x)
    assert out.aux_loss.item() > 0 and out.loss.item() > base.loss.item()
    # rescaled to the size of the main reconstruction loss
    assert out.aux_loss.item() == pytest.approx(base.mse_loss.item(), rel=0.05)
    sae.zero_grad()
    out.aux_loss.backward()
    assert sae.W_enc.grad[:, 10:].abs().max() == 0 and sae.W_enc.grad[:, :10].abs().max() > 0


def test_jumprelu_tanh_penalty_and_pre_activation_loss() -> None:
    sae = make_sae(
        "jumprelu",
        jumprelu_sparsity_loss="tanh",
        jumprelu_tanh_scale=2.0,
        l0_coefficient=0.5,
        jumprelu_pre_act_coefficient=0.1,
        dead_feature_window=2,
    )
    x = torch.randn(32, D_IN)
    sae.train()
    out = sae(x)
    penalty = torch.tanh(2.0 * out.feats * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(out.sparsity_loss, 0.5 * penalty)
    assert out.aux_loss.item() == 0.0  # nothing is dead yet
    dead = torch.arange(5)
    with torch.no_grad():
        sae.steps_since_fired[dead] = 2
    out = sae(x)
    pre = pre_activations(x, sae.W_enc, sae.b_enc, sae.b_dec)
    t = sae.log_threshold.exp()
    gap = ((t - pre).relu() * sae.W_dec.norm(dim=1))[:, :5].sum(-1).mean()
    torch.testing.assert_close(out.aux_loss, 0.1 * gap)
    sae.zero_grad()
    out.aux_loss.backward()
    assert sae.W_enc.grad[:, 5:].abs().max() == 0 and sae.W_enc.grad[:, :5].abs().max() > 0


def test_firing_counter_resets_active_features() -> None:
    sae = make_sae("topk")
    sae.train()
    out = sae(torch.randn(8, D_IN))
    fired = torch.zeros(D_SAE, dtype=torch.bool)
    fired[out.codes.indices[out.codes.values > 0]] = True
    assert (sae.steps_since_fired[fired] == 0).all() and (sae.steps_since_fired[~fired] == 1).all()


def test_matryoshka_prefix_losses() -> None:
    sae = make_sae("matryoshka_batchtopk", matryoshka_prefixes=[6, 18])
    assert sae.cfg.matryoshka_prefixes == [6, 18, D_SAE]
    x = torch.randn(16, D_IN)
    out = sae(x)
    expected = sum((out.feats[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum(-1).mean() for m in (6, 18))
    torch.testing.assert_close(out.prefix_loss, expected)
    torch.testing.assert_close(out.mse_loss, (out.feats @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folding_the_norm_factor_leaves_outputs_unchanged(arch: str) -> None:
    sae = make_sae(arch, normalize_activations="expected_norm")
    x = 7.0 * torch.randn(32, D_IN) + 2.0
    scale = sae.fit_normalization(x)
    assert scale == pytest.approx(math.sqrt(D_IN) / x.norm(dim=-1).mean().item(), rel=1e-5)
    sae.eval()
    before = sae(x)
    sae.fold_activation_norm_scaling_factor()
    assert sae.cfg.normalize_activations == "none"
    after = sae(x)
    # Matching pursuit keeps unit-norm atoms, so its coefficients carry the input's scale:
    # after folding they are the normalised-space coefficients divided by the factor.
    expected = before.feats / scale if arch == "matching_pursuit" else before.feats
    torch.testing.assert_close(after.feats, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.recon, before.recon, atol=1e-4, rtol=1e-5)


def test_transcoder_folding_and_skip_connection() -> None:
    cfg = TranscoderConfig(
        d_in=D_IN,
        d_out=7,
        d_sae=D_SAE,
        architecture="topk",
        k=K,
        skip_connection=True,
        apply_b_dec_to_input=True,
        normalize_activations="expected_norm",
    )
    tc = Transcoder(cfg)
    assert tc.W_skip.shape == (D_IN, 7) and tc.W_skip.abs().sum() == 0 and tc.W_dec.shape == (D_SAE, 7)
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = 3 * torch.randn(16, D_IN), 5 * torch.randn(16, 7)
    tc.fit_normalization(x, y)
    out = tc(x, y)
    assert out.recon.shape == (16, 7)
    torch.testing.assert_close(tc.decode(out.feats, x), out.recon, atol=1e-5, rtol=1e-5)
    tc.eval()
    before = tc(x, y).recon
    tc.fold_activation_norm_scaling_factor()
    torch.testing.assert_close(tc(x, y).recon, before, atol=1e-4, rtol=1e-5)


def test_layer_norm_normalises_input_and_unnormalises_output() -> None:
    sae = make_sae("relu", normalize_activations="layer_norm")
    x = 10 * torch.randn(8, D_IN) + 3
    out = sae(x)
    mu, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True) + 1e-5
    x_n = (x - mu) / std
    feats = torch.relu((x_n - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(out.feats, feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.recon, (feats @ sae.W_dec + sae.b_dec) * std + mu, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.mse_loss, ((feats @ sae.W_dec + sae.b_dec) - x_n).pow(2).sum(-1).mean())


def test_b_dec_init_uses_normalised_activations() -> None:
    x = 4 * torch.randn(200, D_IN) + 1
    for method in ("mean", "geometric_median"):
        sae = make_sae("relu", b_dec_init=method, normalize_activations="expected_norm")
        scale = sae.fit_normalization(x)
        b = sae.initialize_b_dec(x)
        expected = (x * scale).mean(0) if method == "mean" else geometric_median(x * scale).median
        torch.testing.assert_close(b, expected, atol=1e-5, rtol=1e-5)


def test_geometric_median_minimises_sum_of_distances() -> None:
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(60, 3, generator=gen)
    pts[:6] += 40.0  # outliers drag the mean, not the median
    res = geometric_median(pts)
    assert res.converged

    def cost(y):
        return (pts - y).norm(dim=1).sum()

    assert cost(res.median) < cost(pts.mean(0))
    assert res.median.norm() < 1.0 < pts.mean(0).norm()
    # brute force: no point of a fine grid around the estimate, nor any sample, does better
    offsets = torch.stack(torch.meshgrid(*[torch.linspace(-0.3, 0.3, 13)] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid_costs = torch.stack([cost(res.median + o) for o in offsets])
    assert cost(res.median) <= grid_costs.min() + 1e-4
    assert cost(res.median) <= min(cost(p) for p in pts)
    # 1-D: the geometric median is the ordinary median
    line = torch.tensor([[0.0], [1.0], [2.0], [10.0], [50.0]])
    assert geometric_median(line).median.item() == pytest.approx(2.0, abs=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"architecture": "topq"}, "architecture='topq' is not valid; choose one of ['relu', 'topk'"),
        ({"architecture": "topq"}, "Did you mean 'topk'"),
        ({"architecture": "topk", "k": 0}, "k must be an integer >= 1, got 0"),
        ({"architecture": "batchtopk", "k": 49}, "k=49 must satisfy 0 < k <= d_sae=48"),
        ({"d_in": 0}, "d_in must be an integer >= 1, got 0"),
        ({"d_in": "12"}, "d_in must be an integer, got '12' (str)"),
        ({"l1_coefficient": -1.0}, "l1_coefficient must be a finite number >= 0.0, got -1.0"),
        ({"l1_coefficient": float("nan")}, "l1_coefficient must be a finite number, got nan"),
        ({"architecture": "topk", "aux_k_coefficient": -0.1}, "aux_k_coefficient must be a finite number >= 0.0"),
        ({"normalize_activations": "batch"}, "normalize_activations must be one of ['none', 'expected_norm'"),
        ({"architecture": "topk", "ghost_grads": True}, "Unknown TopKConfig fields 'ghost_grads'"),
        ({"architecture": "relu", "k": 4}, "Unknown ReLUConfig fields 'k' for architecture 'relu'"),
        ({"architecture": "topk", "kk": 4}, "'kk' (did you mean 'k'?)"),
        ({"architecture": "matryoshka_batchtopk", "matryoshka_prefixes": [8, 4]}, "strictly increasing"),
        ({"dtype": "float8"}, "dtype 'float8' is not supported"),
        ({"architecture": "jumprelu", "jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth must be a finite number > 0"),
    ],
)
def test_config_validation_messages(kwargs: dict, message: str) -> None:
    base = {"d_in": D_IN, "d_sae": D_SAE}
    with pytest.raises(ValueError, match=re.escape(message)):
        SAEConfig(**{**base, **kwargs})


def test_config_round_trip_and_unknown_keys() -> None:
    cfg = SAEConfig(d_in=8, expansion_factor=4, architecture="jumprelu")
    assert cfg.d_sae == 32 and cfg.decoder_norm == "free" and cfg.decoder_init_norm == 0.1
    assert SAEConfig(d_in=8, architecture="topk", k=2).decoder_norm == "unit"
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"Unknown JumpReLUConfig fields 'l2' for architecture 'jumprelu'"):
        SAEConfig.from_dict({**cfg.to_dict(), "l2": 1})
    # d_sae given next to an expansion_factor wins (as a later command-line override does)
    assert SAEConfig(d_in=8, expansion_factor=4, d_sae=20).d_sae == 20
    tc = TranscoderConfig(d_in=8, d_sae=16)
    assert tc.d_out == 8 and tc.apply_b_dec_to_input is False
    assert TranscoderConfig.from_dict(tc.to_dict()) == tc


def test_wrong_width_input_names_the_expected_shape() -> None:
    sae = make_sae("relu")
    with pytest.raises(ValueError, match=r"x has last dimension 5, but this SAE expects 12"):
        sae(torch.randn(3, 5))
    unfitted = SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, normalize_activations="expected_norm"))
    with pytest.raises(RuntimeError, match="fit_normalization"):
        unfitted(torch.randn(2, 4))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("training", [False, True])
def test_encode_sparse_holds_exactly_the_active_entries_of_encode(arch: str, training: bool) -> None:
    sae = make_sae(arch).train(training)
    if arch == "archetypal":
        sae.initialize_from_data(torch.randn(256, D_IN))
    x = torch.randn(3, 5, D_IN)
    with torch.no_grad():
        dense = sae.encode(x)
        sparse = sae.encode_sparse(x)
    assert sparse.layout == torch.sparse_coo and sparse.shape == (3, 5, D_SAE)
    assert bool((sparse._values() > 0).all())  # only active entries, each once
    assert sparse._nnz() == int((dense > 0).sum()) == sparse.coalesce()._nnz()
    torch.testing.assert_close(sparse.to_dense(), dense.clamp_min(0))


@pytest.mark.parametrize("groups", [1, 2, 5])
def test_nested_residuals_equal_the_explicit_prefix_reconstructions(groups: int) -> None:
    from prisma_lightning.sae.architectures.matryoshka import nested_residuals

    gen = torch.Generator().manual_seed(0)
    parts = torch.randn(6, groups, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    start = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    residual, prefix = nested_residuals(parts, start)
    explicit = start[:, None] + parts.cumsum(1)  # residual of every prefix's reconstruction
    torch.testing.assert_close(residual, explicit[:, -1])
    torch.testing.assert_close(prefix, explicit[:, :-1].pow(2).sum(-1).mean(0).sum())
    assert torch.autograd.gradcheck(lambda p, s: nested_residuals(p, s), (parts, start))
    assert torch.autograd.gradcheck(lambda p, s: nested_residuals(p, s)[0], (parts, start))  # prefix loss unused
