"""The C kernels of the dense SAE training nodes: same values and gradients as the PyTorch passes, for any thread
count; compiled once into the cache; a clear fallback without a compiler, with a broken one, or when disabled."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from prisma_lightning.sae import SAEConfig, SparseAutoencoder, make_optimizer, native, train_step
from prisma_lightning.sae.activations import gated_sae, jumprelu_sae, relu_sae

needs_kernels = pytest.mark.skipif(native.library() is None, reason=f"native kernels unavailable: {native.status()}")


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A native module that looks for (and compiles) its library again, into an empty cache folder."""
    monkeypatch.setenv("PRISMA_CACHE_DIR", str(tmp_path / "cache"))
    native.reset()
    yield tmp_path / "cache"
    native.reset()


@needs_kernels
def test_tanh_matches_torch_to_a_few_ulp() -> None:
    x = torch.cat([torch.linspace(-30, 30, 600_001), torch.logspace(-30, 1, 10_000), -torch.logspace(-30, 1, 10_000)])
    ref = torch.tanh(x.double())
    rel = (native.tanh(x).double() - ref).abs() / ref.abs().clamp_min(1e-38)
    assert rel.max() < 3e-7  # float32 ulp is 6e-8 (relative, at worst 1.2e-7)
    special = native.tanh(torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e30, -1e30]))
    assert special[0].isnan() and special[1:].tolist() == [1.0, -1.0, 0.0, 1.0, -1.0]


def _inputs(n: int, d: int, m: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_()

    return {
        "x": rand(n, d),
        "W_enc": rand(d, m, scale=1 / math.sqrt(d)),
        "b_enc": rand(m, scale=0.1),
        "b_in": rand(d, scale=0.1),
        "W_dec": rand(m, d, scale=1 / math.sqrt(m)),
        "b_dec": rand(d, scale=0.1),
        "log_t": torch.full((m,), math.log(0.3)).add_(0.2 * torch.randn(m, generator=gen)).requires_grad_(),
        "b_gate": rand(m, scale=0.3),
        "r_mag": rand(m, scale=0.3),
        "b_mag": rand(m, scale=0.3),
    }


def _run(node: str, t: dict[str, torch.Tensor], with_b_in: bool, grad_feats: bool) -> list[torch.Tensor]:
    """Outputs and the gradients of a loss using every output (the features directly too, with ``grad_feats``)."""
    b_in = t["b_in"] if with_b_in else None
    weights = torch.linspace(0, 1, t["W_enc"].shape[1])
    if node == "relu":
        feats, recon, l1, l0, fired = relu_sae(t["x"], t["W_enc"], t["b_enc"], b_in, t["W_dec"], t["b_dec"], True)
        extra, outs, inputs = 0.3 * l1.sum(), [feats, recon, l1, l0, fired], ["b_enc"]
    elif node.startswith("jumprelu"):
        scale = 2.0 if node == "jumprelu_tanh" else None
        args = (t["x"], t["W_enc"], t["b_enc"], b_in, t["W_dec"], t["b_dec"], t["log_t"].exp(), 0.5, scale)
        feats, recon, l0, fired, tanh_sum = jumprelu_sae(*args)
        penalty = l0 if scale is None else tanh_sum
        extra, outs, inputs = 0.3 * penalty.sum(), [feats, recon, l0, fired, penalty], ["b_enc", "log_t"]
    else:
        args = (t["x"], t["W_enc"], t["b_gate"], t["r_mag"], t["b_mag"], b_in, t["W_dec"], t["b_dec"])
        feats, recon, via_gate, l1, l0, fired = gated_sae(*args)
        extra = 0.3 * l1.sum() + (via_gate + 0.5).pow(2).sum()
        outs, inputs = [feats, recon, via_gate, l1, l0, fired], ["b_gate", "r_mag", "b_mag"]
    loss = (recon - 1).pow(2).sum() + extra + ((feats * weights).sum() if grad_feats else 0)
    names = ["x", "W_enc", "W_dec", "b_dec", *inputs] + (["b_in"] if with_b_in else [])
    grads = torch.autograd.grad(loss, [t[k] for k in names])
    return [o.detach().float() for o in outs] + list(grads)


NODES = ["relu", "jumprelu_step", "jumprelu_tanh", "gated"]


@needs_kernels
@pytest.mark.parametrize("node", NODES)
@pytest.mark.parametrize("with_b_in", [False, True])
@pytest.mark.parametrize("grad_feats", [False, True])
def test_native_nodes_match_the_pytorch_passes(monkeypatch, node: str, with_b_in: bool, grad_feats: bool) -> None:
    """Every output and every gradient (thresholds, gate and magnitude biases, decoder norms included), float32;
    the PyTorch passes are the reference (themselves tested against autograd compositions in float64)."""
    t = _inputs(n=67, d=24, m=203)  # odd sizes: vector tails and an uneven split of rows between threads
    calls = []
    call = native.call
    monkeypatch.setattr(native, "call", lambda name, *a: (calls.append(name), call(name, *a)))
    got = _run(node, t, with_b_in, grad_feats)
    assert any(name.endswith("_forward") for name in calls) and any(name.endswith("_backward") for name in calls)
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    ref = _run(node, t, with_b_in, grad_feats)
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        assert_close(a, b, atol=2e-6 * max(1.0, float(b.abs().max())), rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("node", NODES)
def test_native_results_do_not_depend_on_the_thread_count(node: str) -> None:
    t = _inputs(n=129, d=16, m=97, seed=1)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(_run(node, t, True, True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert_close(a, b, atol=1e-6 * max(1.0, float(b.abs().max())), rtol=1e-6)


@needs_kernels
@pytest.mark.parametrize("node", NODES)
def test_native_nodes_keep_a_nan_input_visible(node: str) -> None:
    """A NaN in the input must reach the reconstruction (so the loss, and the trainer's NaN check, see it)."""
    t = _inputs(n=8, d=16, m=64, seed=2)
    with torch.no_grad():
        t["x"][3, 5] = float("nan")
    b_in = t["b_in"]
    if node == "relu":
        recon = relu_sae(t["x"], t["W_enc"], t["b_enc"], b_in, t["W_dec"], t["b_dec"])[1]
    elif node.startswith("jumprelu"):
        scale = 2.0 if node == "jumprelu_tanh" else None
        args = (t["x"], t["W_enc"], t["b_enc"], b_in, t["W_dec"], t["b_dec"], t["log_t"].exp(), 0.5, scale)
        recon = jumprelu_sae(*args)[1]
    else:
        args = (t["x"], t["W_enc"], t["b_gate"], t["r_mag"], t["b_mag"], b_in, t["W_dec"], t["b_dec"])
        outs = gated_sae(*args)
        recon = outs[1] + outs[2]  # the gated reconstruction and the auxiliary one
    assert recon[3].isnan().any() and not recon[[0, 1, 2, 4]].isnan().any()


@needs_kernels
@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "gated", "panneal"])
def test_training_steps_with_and_without_the_kernels_agree(monkeypatch, architecture: str) -> None:
    """Three full train steps (losses, Adam, decoder processing) from the same start end at the same weights."""

    def train(use_native: bool) -> SparseAutoencoder:
        if not use_native:
            monkeypatch.setattr(native, "usable", lambda *tensors: False)
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(d_in=16, expansion_factor=4, architecture=architecture))
        x = torch.randn(256, 16)
        sae.initialize_from_data(x)
        opt = make_optimizer(sae, lr=1e-3)
        for step in range(3):
            train_step(sae, opt, x, step=step)
        monkeypatch.undo()
        return sae

    fast, slow = train(True), train(False)
    for (name, a), (_, b) in zip(fast.state_dict().items(), slow.state_dict().items(), strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_disabled_by_the_environment_variable(monkeypatch, fresh_native) -> None:
    monkeypatch.setenv("PRISMA_NATIVE", "0")
    assert native.library() is None and native.status() == "disabled by PRISMA_NATIVE=0"
    assert not native.usable(torch.zeros(2, 2))
    t = _inputs(n=8, d=4, m=16)
    feats = relu_sae(t["x"], t["W_enc"], t["b_enc"], None, t["W_dec"], t["b_dec"])[0]  # PyTorch passes
    assert_close(feats, torch.relu(t["x"] @ t["W_enc"] + t["b_enc"]))


def test_without_a_compiler_the_pytorch_passes_run(monkeypatch, fresh_native) -> None:
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.library() is None and "no C compiler found" in native.status()
    t = _inputs(n=8, d=4, m=16)
    args = (t["x"], t["W_enc"], t["b_gate"], t["r_mag"], t["b_mag"], None, t["W_dec"], t["b_dec"])
    feats = gated_sae(*args)[0]
    h = t["x"] @ t["W_enc"]
    assert_close(feats, (h + t["b_gate"] > 0) * torch.relu(h * t["r_mag"].exp() + t["b_mag"]))


def test_a_failing_compiler_is_reported_once_and_falls_back(monkeypatch, fresh_native, caplog) -> None:
    monkeypatch.setenv("CC", "false")  # exits 1 without output
    with caplog.at_level(logging.WARNING, logger="prisma_lightning.sae.native"):
        assert native.library() is None
        assert native.library() is None  # (looked up once)
    assert "compiling the kernels failed" in native.status() and "false" in native.status()
    assert len([r for r in caplog.records if "compiling the kernels failed" in r.getMessage()]) == 1
    assert list(fresh_native.iterdir()) == []  # no half-written library, no temporary left


@pytest.mark.skipif(native._compiler() is None, reason="no C compiler")
def test_the_library_is_compiled_once_into_the_cache(monkeypatch, fresh_native) -> None:
    lib = native.library()
    assert lib is not None and native.status().startswith("compiled: ")
    built = [p for p in fresh_native.iterdir()]
    assert len(built) == 1 and built[0].suffix == ".so" and not built[0].name.startswith(".")
    stamp = built[0].stat().st_mtime_ns
    native.reset()

    def no_compiling(cmd, *args, **kwargs):
        assert "-o" not in cmd, f"compiled again: {cmd}"
        return real_run(cmd, *args, **kwargs)

    real_run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run", no_compiling)
    assert native.library() is not None
    assert [p for p in fresh_native.iterdir()] == built and built[0].stat().st_mtime_ns == stamp


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PRISMA_CACHE_DIR", str(tmp_path / "a"))
    assert native.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("PRISMA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dir() == tmp_path / "xdg" / "prisma_lightning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert native.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "prisma_lightning"


def test_only_contiguous_float32_cpu_tensors_take_the_native_path() -> None:
    if native.library() is None:
        pytest.skip(native.status())
    assert native.usable(torch.zeros(3, 4), None)
    assert not native.usable(torch.zeros(3, 4, dtype=torch.float64))
    assert not native.usable(torch.zeros(4, 3).t())
    assert not native.usable(torch.zeros(3, 4, dtype=torch.bfloat16))
