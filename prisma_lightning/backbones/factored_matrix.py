"""`FactoredMatrix`: a low-rank product ``A @ B`` kept in factored form (OV and QK circuits).

Shapes: ``A [..., m, k]``, ``B [..., k, n]`` -> a virtual ``[..., m, n]`` matrix whose SVD, eigenvalues and
norms are computed through the small inner dimension ``k`` instead of materialising ``m x n``.
"""

from __future__ import annotations

from functools import cached_property

import torch


def _check_inner(left: torch.Size, right: torch.Size) -> None:
    """Raise ValueError unless ``left @ right`` is defined (a vector counts as one row or one column)."""
    cols = left[-1]
    rows = right[0] if len(right) == 1 else right[-2]
    if cols != rows:
        raise ValueError(f"Cannot multiply shapes {tuple(left)} @ {tuple(right)}: inner dimensions {cols} != {rows}.")


class FactoredMatrix:
    """The product ``A @ B`` with leading batch dimensions (e.g. ``[layer, head]``)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(
                f"Inner dimensions do not match: A is {tuple(A.shape)}, B is {tuple(B.shape)} (need A[-1] == B[-2])."
            )
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        self.A = A.broadcast_to(batch + A.shape[-2:])
        self.B = B.broadcast_to(batch + B.shape[-2:])

    @property
    def ldim(self) -> int:
        return self.A.shape[-2]

    @property
    def rdim(self) -> int:
        return self.B.shape[-1]

    @property
    def mdim(self) -> int:
        return self.A.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return self.A.shape[:-1] + self.B.shape[-1:]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def AB(self) -> torch.Tensor:
        """The full product ``[..., m, n]``."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """The reversed product ``[..., k, k]`` (same non-zero eigenvalues as AB; needs m == n)."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square product, but AB is {self.ldim} x {self.rdim}.")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    def __matmul__(self, other: torch.Tensor | FactoredMatrix) -> FactoredMatrix | torch.Tensor:
        """``self @ other``: a FactoredMatrix for a matrix or FactoredMatrix, a tensor ``[..., m]`` for a vector."""
        if isinstance(other, FactoredMatrix):
            _check_inner(self.shape, other.shape)
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        _check_inner(self.shape, other.shape)
        if other.ndim == 1:
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: torch.Tensor) -> FactoredMatrix | torch.Tensor:
        """``other @ self``: a FactoredMatrix for a matrix, a tensor ``[..., n]`` for a vector."""
        _check_inner(other.shape, self.shape)
        if other.ndim == 1:
            return ((other[None, :] @ self.A) @ self.B)[..., 0, :]
        return FactoredMatrix(other @ self.A, self.B)

    def __getitem__(self, idx) -> FactoredMatrix:
        """Index the leading (batch) dimensions only: ``OV[layer, head]``."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        if len(idx) > self.ndim - 2:
            raise IndexError(f"Index only the {self.ndim - 2} leading batch dimensions, got {len(idx)} indices.")
        return FactoredMatrix(self.A[idx], self.B[idx])

    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # SVD of A, then of (S_a Vh_a) B, which is only k x n: AB = U_a U' S' Vh'.
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
        inner = (Sa[..., :, None] * Vha) @ self.B
        Ui, Si, Vhi = torch.linalg.svd(inner, full_matrices=False)
        return Ua @ Ui, Si, Vhi

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compact SVD ``(U [..., m, r], S [..., r], Vh [..., r, n])`` with ``r = min(k, m, n)``."""
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        return self._svd[0]

    @property
    def S(self) -> torch.Tensor:
        return self._svd[1]

    @property
    def Vh(self) -> torch.Tensor:
        return self._svd[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The (complex) non-zero eigenvalues of AB, via the small ``k x k`` matrix BA."""
        return torch.linalg.eigvals(self.BA)

    def norm(self) -> torch.Tensor:
        """Frobenius norm, from the singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """Top-left ``k x k`` corner of AB, without computing all of it."""
        return self.A[..., :k, :] @ self.B[..., :, :k]

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, inner_dim={self.mdim})"
