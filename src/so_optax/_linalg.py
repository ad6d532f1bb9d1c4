"""Linear algebra shared by the so_optax optimizers.

Everything here works on a single (unbatched) tensor; callers ``jax.vmap`` these functions over a
stack of same-shape tensors so that XLA sees one batched matmul / eigh / QR per group.

Conventions:

* A *basis* ``Q`` is a square orthogonal matrix whose columns are (approximate) eigenvectors of a
  symmetric factor, in descending order of eigenvalue. ``None`` stands for the identity (a
  dimension that is not preconditioned).
* ``project(x, bases)`` rotates ``x`` into the eigenbasis: along every axis ``i`` with a basis it
  computes ``Q_iᵀ x`` (mode-``i`` product); ``project_back`` applies ``Q_i`` and undoes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Basis = jax.Array | None


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype second-order statistics are kept in: ``dtype`` promoted with float32."""
    return jnp.promote_types(dtype, jnp.float32)


def mode_product(x: jax.Array, mat: jax.Array, axis: int, contract_rows: bool) -> jax.Array:
    """Multiplies ``x`` along ``axis`` by ``matᵀ`` (``contract_rows``) or by ``mat``.

    The first and last axes are contracted so that the result comes out in place (no transpose).
    """
    mat_axis = 0 if contract_rows else 1
    if axis == x.ndim - 1:
        return jnp.tensordot(x, mat, axes=((axis,), (mat_axis,)))
    if axis == 0:
        return jnp.tensordot(mat, x, axes=((mat_axis,), (0,)))
    y = jnp.tensordot(x, mat, axes=((axis,), (mat_axis,)))
    return jnp.moveaxis(y, -1, axis)


def project(x: jax.Array, bases: Sequence[Basis]) -> jax.Array:
    """Rotates ``x`` into the eigenbases: ``x ×_i Q_iᵀ`` for every axis ``i`` with a basis."""
    for axis, q in enumerate(bases):
        if q is not None:
            x = mode_product(x, q, axis, contract_rows=True)
    return x


def project_back(x: jax.Array, bases: Sequence[Basis]) -> jax.Array:
    """Inverse of :func:`project`: ``x ×_i Q_i`` for every axis ``i`` with a basis."""
    for axis, q in enumerate(bases):
        if q is not None:
            x = mode_product(x, q, axis, contract_rows=False)
    return x


def gram(x: jax.Array, axis: int) -> jax.Array:
    """``x`` contracted with itself over every axis except ``axis``: a ``(d, d)`` PSD matrix.

    For a matrix ``G`` this is ``G Gᵀ`` (``axis=0``) or ``Gᵀ G`` (``axis=1``).
    """
    others = tuple(a for a in range(x.ndim) if a != axis)
    return jnp.tensordot(x, x, axes=(others, others))


class Contractions:
    """The tensor contractions of a SOAP step, on one device: :func:`project`, :func:`project_back` and
    the factors' Gram matrices. ``so_optax._distribution`` supplies a subclass that places their
    operands on a mesh; the results are the same."""

    def project(self, x: jax.Array, bases: Sequence[Basis]) -> jax.Array:
        return project(x, bases)

    def project_back(self, x: jax.Array, bases: Sequence[Basis]) -> jax.Array:
        return project_back(x, bases)

    def grams(self, x: jax.Array, preconditioned: Sequence[bool]) -> tuple[jax.Array | None, ...]:
        """:func:`gram` of ``x`` along every preconditioned axis (``None`` for the others)."""
        return tuple(gram(x, axis) if on else None for axis, on in enumerate(preconditioned))


def after(x: jax.Array, previous: None | jax.Array | Sequence[jax.Array]) -> jax.Array:
    """``x`` unchanged, but not computable before ``previous`` (an array, or every array of a sequence;
    ``None``, an empty sequence or arrays without elements: no constraint).

    The values are kept bit for bit (signed zeros, infinities and NaNs included), except that
    XLA:CPU flushes subnormals to zero, as in any floating-point op it runs.

    ``lax.optimization_barrier`` orders XLA's schedule but not XLA:CPU's concurrent executor, so
    this is a data dependency: ``x · (1 + 0·s)`` with ``s`` a finite scalar read from ``previous``
    (the largest of one element of each array). XLA does not fold a floating-point product with
    zero; ``1 + 0·s`` is exactly one, and a non-finite ``previous`` cannot leak into ``x``.
    """
    if previous is None:
        return x
    if not isinstance(previous, (list, tuple)):
        previous = [previous]
    previous = [p for p in previous if p.size]  # no element to read, and nothing worth waiting for
    if not previous:
        return x
    # p[0, ..., 0], not p.ravel()[0]: raveling a column-major LAPACK output copies all of it
    reads = [jnp.nan_to_num(p[(0,) * p.ndim].astype(x.dtype)) for p in previous]
    s = reads[0] if len(reads) == 1 else jnp.max(jnp.stack(reads))
    return x * (1 + 0 * s)


class Lanes:
    """Runs decompositions in ``count`` sequences: each one starts after the last one of its lane.

    XLA:CPU runs independent operations concurrently, so it may run the independent LAPACK calls
    of a computation at the same time; ``count`` bounds how many are in flight (``None``: no
    bound; ``_lapack_lanes.lane_count`` picks it). A decomposition goes to the lane with the least
    work so far, counted as ``d³`` for a ``d × d`` matrix.

    Bounded lanes can also keep the decompositions apart from the rest of the computation
    (:meth:`start_after`, :meth:`finished`): a multi-threaded LAPACK call slows down when XLA runs
    matmuls next to it, and so do they. Unbounded lanes leave XLA's schedule free.

    This is trace-time bookkeeping: use one instance per traced computation. The results do not
    depend on ``count``.
    """

    def __init__(self, count: int | None = None):
        if count is not None and count < 1:
            raise ValueError(f"count must be None or at least 1, got {count}")
        self._waits_for: list[list[jax.Array]] = [[] for _ in range(count or 0)]
        self._work = [0] * (count or 0)

    def run(self, decompose: Callable[[jax.Array], jax.Array], mat: jax.Array) -> jax.Array:
        """``decompose(mat)``, after the last decomposition of the least busy lane (an empty ``mat``: at
        once, outside the lanes)."""
        if not self._work or mat.size == 0:
            return decompose(mat)
        lane = self._work.index(min(self._work))
        self._work[lane] += mat.shape[-1] ** 3
        out = decompose(after(mat, self._waits_for[lane]))
        self._waits_for[lane] = [out]
        return out

    def start_after(self, arrays: Sequence[jax.Array]) -> None:
        """Bounded lanes: the next decomposition of every lane also waits for all of ``arrays``."""
        for waits_for in self._waits_for:
            waits_for.extend(arrays)

    def finished(self, x: jax.Array) -> jax.Array:
        """Bounded lanes: ``x``, not computable before the last decomposition of every lane."""
        return after(x, [y for waits_for in self._waits_for for y in waits_for])


def eigenvectors(mat: jax.Array) -> jax.Array:
    return jnp.linalg.eigh(mat)[1]


def eigenvectors_descending(mat: jax.Array) -> jax.Array:
    """The eigenvectors of the symmetric ``mat`` as columns, by descending eigenvalue."""
    return eigenvectors(mat)[:, ::-1]


def orthonormal_factor(mat: jax.Array) -> jax.Array:
    return jnp.linalg.qr(mat)[0]


def finite_or(mat: jax.Array, fallback: jax.Array) -> jax.Array:
    """``mat`` if every entry is finite, else ``fallback``."""
    return jnp.where(jnp.all(jnp.isfinite(mat)), mat, fallback.astype(mat.dtype))


def eigh_descending(mat: jax.Array, fallback: jax.Array, lanes: Lanes | None = None) -> jax.Array:
    """Eigenvectors of the symmetric ``mat`` as columns, by descending eigenvalue.

    ``mat`` is decomposed in its own dtype (float32 or wider), in ``lanes`` if given. If the
    decomposition is not finite (an ill-conditioned or non-finite factor), ``fallback`` is returned
    instead.
    """
    vecs = (lanes or Lanes()).run(eigenvectors, mat)
    return finite_or(vecs[:, ::-1], fallback)


def power_iteration_products(factor: jax.Array, basis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The matmul half of SOAP's eigenbasis refresh: ``(P[:, order], order)`` with ``P = F Q``.

    With ``P = F Q`` the estimated eigenvalues are ``diag(Qᵀ F Q) = sum(Q ⊙ P, axis=0)`` (no second
    matmul); ``order`` sorts them in decreasing order.
    """
    p = factor @ basis
    estimates = jnp.sum(basis * p, axis=0)
    order = jnp.argsort(estimates, descending=True)
    return p[:, order], order


def power_iteration_refresh(
    factor: jax.Array, basis: jax.Array, lanes: Lanes | None = None
) -> tuple[jax.Array, jax.Array]:
    """One step of subspace (power) iteration with QR, the cheap SOAP eigenbasis refresh.

    ``P = F Q``, ``order = argsort(diag(Qᵀ F Q), descending)``, ``Q_new = qr(P[:, order]).Q``
    (:func:`power_iteration_products`, then the QR in ``lanes``).

    Args:
      factor: the symmetric factor ``F`` (``(d, d)``).
      basis: the current basis ``Q`` (``(d, d)``).
      lanes: the :class:`Lanes` the QR runs in (default: its own).

    Returns:
      ``(new_basis, order)``: ``order`` is the permutation applied to the columns, which callers
      apply to the matching axis of the second moment. If the QR result is not finite the sorted old
      basis ``Q[:, order]`` is returned (the last good basis, consistent with ``order``).
    """
    new_bases, orders = stacked_power_iteration_refresh(factor[None], basis[None], lanes)
    return new_bases[0], orders[0]


# Batched forms. XLA:CPU runs jaxlib's batched LAPACK kernels (eigh, QR) by fanning the batch out
# over the intra-op thread pool and blocking a pool thread until it is done; two such calls in
# flight at once (e.g. inside a conditional or loop, on a 2-core machine) can deadlock. The
# batched helpers below therefore issue one unbatched decomposition per matrix, in ``lanes`` (the
# matmuls around them stay batched); on accelerators the cost is the same number of solver
# launches.


def stacked_eigh_descending(mats: jax.Array, fallbacks: jax.Array, lanes: Lanes | None = None) -> jax.Array:
    """:func:`eigh_descending` over a leading batch axis (one decomposition per matrix)."""
    return jnp.stack([eigh_descending(mats[b], fallbacks[b], lanes) for b in range(mats.shape[0])])


def stacked_power_iteration_products(factors: jax.Array, bases: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`power_iteration_products` over a leading batch axis, batched: ``(products, orders,
    sorted_bases)``, ``sorted_bases[b] = bases[b][:, orders[b]]`` (the fallback of a failed QR)."""
    products, orders = jax.vmap(power_iteration_products)(factors, bases)
    return products, orders, jax.vmap(lambda q, o: q[:, o])(bases, orders)


def stacked_orthonormal_factors(products: jax.Array, lanes: Lanes) -> list[jax.Array]:
    """``qr(products[b]).Q`` for every ``b``, one decomposition per matrix, in ``lanes``."""
    return [lanes.run(orthonormal_factor, products[b]) for b in range(products.shape[0])]


def stacked_finite_or(mats: Sequence[jax.Array], fallbacks: jax.Array, lanes: Lanes) -> jax.Array:
    """``mats`` stacked, each one replaced by its ``fallbacks`` entry if it is not finite, once ``lanes``
    have :meth:`~Lanes.finished`."""
    return jnp.stack([finite_or(lanes.finished(m), fallbacks[b]) for b, m in enumerate(mats)])


def stacked_power_iteration_refresh(
    factors: jax.Array, bases: jax.Array, lanes: Lanes | None = None
) -> tuple[jax.Array, jax.Array]:
    """:func:`power_iteration_refresh` over a leading batch axis: ``(new_bases, orders)``."""
    lanes = lanes or Lanes()
    products, orders, sorted_bases = stacked_power_iteration_products(factors, bases)
    return stacked_finite_or(stacked_orthonormal_factors(products, lanes), sorted_bases, lanes), orders


class Decomposer:
    """How one traced step runs its decompositions over lists of stacks (``[S, d, d]`` arrays, one per
    stack and preconditioned axis). :class:`LocalDecomposer` runs them here; ``so_optax._distribution``
    spreads them over a device mesh. Both return what :func:`stacked_eigh_descending` and
    :func:`stacked_finite_or` of the QRs return. Use one instance per traced computation."""

    def eigh_descending(self, mats: Sequence[jax.Array], fallbacks: Sequence[jax.Array]) -> list[jax.Array]:
        """Per stack: :func:`eigh_descending` of every matrix (``fallbacks`` where not finite)."""
        raise NotImplementedError

    def orthonormal(
        self, products: Sequence[jax.Array], fallbacks: Sequence[jax.Array], start_after: Sequence[jax.Array] = ()
    ) -> list[jax.Array]:
        """Per stack: ``qr(products[b]).Q`` of every matrix (``fallbacks`` where not finite), started after
        ``start_after`` where that orders anything (:meth:`Lanes.start_after`)."""
        raise NotImplementedError


class LocalDecomposer(Decomposer):
    """Every decomposition on this device, one unbatched call per matrix, in ``lanes``."""

    def __init__(self, lanes: Lanes):
        self.lanes = lanes

    def eigh_descending(self, mats, fallbacks):
        return [stacked_eigh_descending(m, f, self.lanes) for m, f in zip(mats, fallbacks)]

    def orthonormal(self, products, fallbacks, start_after=()):
        self.lanes.start_after(list(start_after))
        qs = [stacked_orthonormal_factors(p, self.lanes) for p in products]
        return [stacked_finite_or(q, f, self.lanes) for q, f in zip(qs, fallbacks)]
