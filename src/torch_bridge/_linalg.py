"""Linear algebra for SOAP in PyTorch (Vyas et al., 2024, arXiv:2409.11321).

SOAP keeps, for every preconditioned dimension ``i`` of a parameter's work tensor ``G``, a Kronecker
factor ``GG_i`` (an exponential moving average of ``G`` contracted with itself over every other
dimension; for a matrix ``L = G Gᵀ`` and ``R = Gᵀ G``) and an orthonormal basis ``Q_i`` that
approximates the eigenvectors of ``GG_i``. The helpers here are the only places that touch those
matrices:

* :func:`update_factors` -- ``GG_i ← β GG_i + (1 - β) G_(i) G_(i)ᵀ`` in place (one fused ``addmm_``);
* :func:`eigh_descending` -- the initial basis, eigenvectors in descending eigenvalue order, with a
  float64 retry and a fallback basis when ``eigh`` fails or returns non-finite values;
* :func:`refresh_basis` -- one power iteration followed by QR, the cheap periodic refresh; a non-finite
  result keeps the (re-sorted) previous basis;
* :func:`project` / :func:`project_back` -- ``Gᵀ ×_i Q_i`` and ``G ×_i Q_iᵀ`` along every dimension that
  has a basis (for a matrix ``Q_Lᵀ G Q_R`` and ``Q_L G Q_Rᵀ``).

A basis list holds one entry per work dimension: a ``(d, d)`` matrix, or an empty tensor (``numel() ==
0``) for a dimension that keeps the identity basis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "compute_dtype",
    "eigh_descending",
    "project",
    "project_back",
    "refresh_basis",
    "update_factors",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype SOAP's factors, bases and moments use: the parameter dtype promoted with float32."""
    return torch.promote_types(dtype, torch.float32)


def _has_basis(q: torch.Tensor) -> bool:
    return q.numel() > 0


def _unfold(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` as a ``(x.shape[dim], -1)`` matrix whose rows are the slices along ``dim``."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.movedim(dim, 0).reshape(x.shape[dim], -1)


def update_factors(factors: Sequence[torch.Tensor], g: torch.Tensor, beta: float) -> None:
    """Updates the Kronecker factors in place: ``GG_i ← β GG_i + (1 - β) G_(i) G_(i)ᵀ``.

    ``G_(i)`` is ``g`` unfolded along dimension ``i`` (for a matrix: ``G`` for ``i = 0`` and ``Gᵀ`` for
    ``i = 1``), so ``G_(i) G_(i)ᵀ`` contracts ``g`` with itself over every dimension but ``i``. Empty
    entries (identity dimensions) are skipped.
    """
    for i, gg in enumerate(factors):
        if not _has_basis(gg):
            continue
        if g.dim() == 2:
            rows = g if i == 0 else g.T  # views; BLAS handles the transpose
        else:
            rows = _unfold(g, i)
        gg.addmm_(rows, rows.T, beta=beta, alpha=1.0 - beta)


def _eigh_or_none(mat: torch.Tensor) -> torch.Tensor | None:
    try:
        _, vecs = torch.linalg.eigh(mat)
    except (RuntimeError, torch.linalg.LinAlgError):
        return None
    if not bool(torch.isfinite(vecs).all()):
        return None
    return vecs


def eigh_descending(mat: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Eigenvectors of the symmetric ``mat`` as columns, in descending eigenvalue order.

    ``eigh`` runs in ``mat``'s dtype (float32 or wider); if it raises or returns non-finite values it is
    retried in float64, and if that fails too the ``fallback`` basis (default: the identity) is
    returned. The result has ``mat``'s dtype.
    """
    vecs = _eigh_or_none(mat)
    if vecs is None and mat.dtype != torch.float64:
        vecs = _eigh_or_none(mat.to(torch.float64))
        if vecs is not None:
            vecs = vecs.to(mat.dtype)
    if vecs is None:
        if fallback is None:
            return torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
        return fallback.clone()
    return vecs.flip(1)


def refresh_basis(gg: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One power iteration and a QR step towards the eigenvectors of ``gg``, starting from ``q``.

    With ``P = GG Q``, the Rayleigh quotients ``diag(Qᵀ GG Q) = Σ_rows Q ⊙ P`` estimate the eigenvalues;
    their descending order ``idx`` sorts the columns, and the new basis is ``qr(P[:, idx]).Q``. Returns
    ``(new_q, idx)``; the caller permutes the second moment along this dimension with ``idx`` so that it
    stays aligned with the columns. If the QR result is not finite, the sorted old basis ``q[:, idx]`` is
    kept (decided on device, without a host synchronisation, except on the CPU where reading the flag
    is free and saves building the fallback).
    """
    p = gg @ q
    estimates = (q * p).sum(dim=0)
    idx = torch.argsort(estimates, descending=True)
    # Q alone (LAPACK geqrf + orgqr): torch.linalg.qr would also build R (a triu copy) that is unused.
    new_q = torch.linalg.householder_product(*torch.geqrf(p.index_select(1, idx)))
    # A NaN or inf anywhere makes the sum non-finite (a finite Q has entries of magnitude <= 1).
    finite = torch.isfinite(new_q.sum())
    if new_q.device.type == "cpu":  # reading the flag costs nothing here: skip the fallback copy
        return (new_q if bool(finite) else q.index_select(1, idx)), idx
    return torch.where(finite, new_q, q.index_select(1, idx)), idx


def project(x: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rotates ``x`` into the eigenbasis: ``x ×_i Q_iᵀ`` along every dimension with a basis.

    For a matrix with two bases this is ``Q_Lᵀ X Q_R``. Dimensions without a basis are left alone; if
    none has one, ``x`` itself is returned (not a copy).
    """
    return _rotate(x, bases, transpose=True)


def project_back(x: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rotates ``x`` back from the eigenbasis: ``x ×_i Q_i`` along every dimension with a basis.

    For a matrix with two bases this is ``Q_L X Q_Rᵀ``, the inverse of :func:`project`.
    """
    return _rotate(x, bases, transpose=False)


def _rotate(x: torch.Tensor, bases: Sequence[torch.Tensor], *, transpose: bool) -> torch.Tensor:
    flags = [_has_basis(q) for q in bases]
    if not any(flags):
        return x
    if x.dim() == 2:
        left, right = bases
        if flags[0]:
            x = (left.T if transpose else left) @ x
        if flags[1]:
            x = x @ (right if transpose else right.T)
        return x
    if x.dim() == 1:
        (q,) = bases
        return (q.T if transpose else q) @ x
    # General N-d: contract the leading dimension and append the result at the end (the dimensions
    # cycle back to their original order after a full pass). A dimension without a basis is cycled
    # by a permutation; a run of them is folded into one permutation.
    pending = 0
    for q, on in zip(bases, flags):
        if not on:
            pending += 1
            continue
        if pending:
            x = x.permute(*range(pending, x.dim()), *range(pending))
            pending = 0
        x = torch.tensordot(x, q, dims=([0], [0] if transpose else [1]))
    if pending:
        x = x.permute(*range(pending, x.dim()), *range(pending))
    return x
