"""FactoredMatrix against dense computations, and the OV/QK circuits of a tiny HookedViT."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from prisma_lightning.backbones.factored_matrix import FactoredMatrix
from prisma_lightning.backbones.hooked_vit import HookedViT
from prisma_lightning.backbones.registry import TEST_CONFIGS

BATCH = (2, 3)
M, K, N = 6, 4, 5


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def fm() -> FactoredMatrix:
    """Non-square ``[2, 3, 6, 5]`` of inner rank 4."""
    return FactoredMatrix(rand(*BATCH, M, K, seed=1), rand(*BATCH, K, N, seed=2))


@pytest.fixture
def square() -> FactoredMatrix:
    """Square ``[2, 3, 6, 6]`` of inner rank 4."""
    return FactoredMatrix(rand(*BATCH, M, K, seed=3), rand(*BATCH, K, M, seed=4))


def test_ab_and_shape(fm: FactoredMatrix) -> None:
    assert_close(fm.AB, fm.A @ fm.B)
    assert fm.shape == (*BATCH, M, N)
    assert (fm.ldim, fm.mdim, fm.rdim, fm.ndim) == (M, K, N, 4)
    assert_close(fm.get_corner(3), fm.AB[..., :3, :3])
    assert "inner_dim=4" in repr(fm)


def test_ba(square: FactoredMatrix, fm: FactoredMatrix) -> None:
    assert_close(square.BA, square.B @ square.A)
    assert square.BA.shape == (*BATCH, K, K)
    with pytest.raises(ValueError, match="square"):
        _ = fm.BA


def test_transpose(fm: FactoredMatrix) -> None:
    t = fm.T
    assert isinstance(t, FactoredMatrix)
    assert t.shape == (*BATCH, N, M)
    assert_close(t.AB, fm.AB.transpose(-2, -1))
    assert_close(t.T.AB, fm.AB)


def test_broadcasting_batch_dims() -> None:
    A, B = rand(3, M, K, seed=1), rand(*BATCH, K, N, seed=2)
    fm = FactoredMatrix(A, B)
    assert fm.shape == (*BATCH, M, N)
    assert_close(fm.AB, A @ B)


@pytest.mark.parametrize("which", ["fm", "square"])
def test_svd_reconstructs_ab(which: str, request: pytest.FixtureRequest) -> None:
    m: FactoredMatrix = request.getfixturevalue(which)
    U, S, Vh = m.svd()
    r = min(m.ldim, m.mdim, m.rdim)
    assert U.shape == (*BATCH, m.ldim, r)
    assert S.shape == (*BATCH, r)
    assert Vh.shape == (*BATCH, r, m.rdim)
    assert_close(U @ torch.diag_embed(S) @ Vh, m.AB)
    assert_close(S, torch.linalg.svdvals(m.AB)[..., :r])
    eye = torch.eye(r, dtype=S.dtype).expand(*BATCH, r, r)
    assert_close(U.transpose(-2, -1) @ U, eye)
    assert_close(Vh @ Vh.transpose(-2, -1), eye)
    assert (m.U, m.S, m.Vh) == (U, S, Vh)


def test_svd_when_inner_dim_is_largest() -> None:
    m = FactoredMatrix(rand(3, 8, seed=5), rand(8, 4, seed=6))
    U, S, Vh = m.svd()
    assert S.shape == (3,)
    assert_close(U @ torch.diag(S) @ Vh, m.AB)
    assert_close(S, torch.linalg.svdvals(m.AB))


def sorted_by_magnitude(x: torch.Tensor) -> torch.Tensor:
    return x.abs().sort(dim=-1, descending=True).values


def test_eigenvalues_are_the_nonzero_eigenvalues_of_ab(square: FactoredMatrix) -> None:
    eig = square.eigenvalues
    assert eig.shape == (*BATCH, K)
    assert eig.is_complex()
    dense = torch.linalg.eigvals(square.AB)  # M eigenvalues, M - K of them zero
    dense_mags = sorted_by_magnitude(dense)
    assert_close(sorted_by_magnitude(eig), dense_mags[..., :K])
    assert bool((dense_mags[..., K:] < 1e-8).all())
    # Same multiset of complex values, not just magnitudes: products and sums agree (det and trace of BA).
    assert_close(eig.prod(-1), torch.linalg.det(square.BA).to(eig.dtype))
    assert_close(eig.sum(-1), torch.diagonal(square.AB, dim1=-2, dim2=-1).sum(-1).to(eig.dtype))


def test_norm(fm: FactoredMatrix) -> None:
    assert_close(fm.norm(), torch.linalg.matrix_norm(fm.AB))
    assert fm.norm().shape == BATCH


def test_matmul_with_tensor(fm: FactoredMatrix) -> None:
    C = rand(N, 7, seed=7)
    out = fm @ C
    assert isinstance(out, FactoredMatrix)
    assert out.shape == (*BATCH, M, 7)
    assert_close(out.AB, fm.AB @ C)
    D = rand(*BATCH, 7, M, seed=8)
    left = D @ fm
    assert isinstance(left, FactoredMatrix)
    assert_close(left.AB, D @ fm.AB)


def test_matmul_with_vector(fm: FactoredMatrix) -> None:
    v = rand(N, seed=9)
    out = fm @ v
    assert isinstance(out, torch.Tensor)
    assert out.shape == (*BATCH, M)
    assert_close(out, fm.AB @ v)
    w = rand(M, seed=10)
    out = w @ fm
    assert out.shape == (*BATCH, N)
    assert_close(out, w @ fm.AB)


def test_matmul_with_factored_matrix(fm: FactoredMatrix) -> None:
    other = FactoredMatrix(rand(*BATCH, N, 3, seed=11), rand(*BATCH, 3, 2, seed=12))
    out = fm @ other
    assert isinstance(out, FactoredMatrix)
    assert out.shape == (*BATCH, M, 2)
    assert_close(out.AB, fm.AB @ other.AB)


def test_shape_mismatch_raises_value_error(fm: FactoredMatrix) -> None:
    with pytest.raises(ValueError, match="Inner dimensions"):
        FactoredMatrix(rand(M, K), rand(K + 1, N))
    with pytest.raises(ValueError):
        fm @ rand(N + 1, 3)
    with pytest.raises(ValueError):
        fm @ FactoredMatrix(rand(N + 1, 2), rand(2, 2))
    with pytest.raises(ValueError):
        rand(3, M + 1) @ fm
    with pytest.raises(ValueError):
        fm @ rand(N + 1)
    with pytest.raises(ValueError):
        rand(M + 1) @ fm


def test_indexing(fm: FactoredMatrix) -> None:
    one = fm[1]
    assert isinstance(one, FactoredMatrix)
    assert one.shape == (3, M, N)
    assert_close(one.AB, fm.AB[1])
    assert_close(fm[1, 2].AB, fm.AB[1, 2])
    assert_close(fm[:, 0].AB, fm.AB[:, 0])
    assert_close(fm[0, 1:].AB, fm.AB[0, 1:])
    assert_close(fm[1, 2].S, torch.linalg.svdvals(fm.AB[1, 2])[:K])
    with pytest.raises(IndexError):
        fm[0, 0, 0]


# ---------------------------------------------------------------------------------------------- model circuits
@pytest.fixture
def model() -> HookedViT:
    torch.manual_seed(0)
    # No q/k/v biases, so attention scores and head outputs are exactly the bilinear QK / linear OV maps.
    model = HookedViT(dataclasses.replace(TEST_CONFIGS["test/vit-tiny"], qkv_bias="none")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_model_ov_qk_shapes_and_values(model: HookedViT) -> None:
    cfg = model.cfg
    OV, QK = model.OV, model.QK
    assert OV.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    assert QK.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    W_Q, W_K, W_V, W_O = model.W_Q, model.W_K, model.W_V, model.W_O
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            assert_close(OV.AB[layer, head], W_V[layer, head] @ W_O[layer, head])
            assert_close(OV[layer, head].AB, W_V[layer, head] @ W_O[layer, head])
            assert_close(QK.AB[layer, head], W_Q[layer, head] @ W_K[layer, head].T)
    assert not torch.allclose(OV.AB[0, 0], OV.AB[0, 1])


def test_model_circuits_reproduce_attention(model: HookedViT) -> None:
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
        QK, OV, b_O = model.QK.AB, model.OV.AB, model.b_O
    scale = model.cfg.d_head**-0.5
    for layer in range(model.cfg.n_layers):
        x = cache[f"blocks.{layer}.ln1.hook_normalized"]  # [B, T, d]
        scores = torch.einsum("bqd,hde,bke->bhqk", x, QK[layer], x) * scale
        assert_close(cache[f"blocks.{layer}.attn.hook_attn_scores"], scores, atol=1e-5, rtol=1e-5)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        attn_out = torch.einsum("bhqk,bkd,hde->bqe", pattern, x, OV[layer]) + b_O[layer]
        assert_close(cache[f"blocks.{layer}.hook_attn_out"], attn_out, atol=1e-5, rtol=1e-5)
