"""SOAP's contractions and decompositions on a device mesh: the mesh side of ``_linalg``'s interfaces.

``_distribution.Placement`` hands these to the SOAP step when a step is spread over several devices:

* :class:`MeshContractions` places the operands of the projections and Gram matrices so that each
  contraction moves the smaller of the tensor and the basis it meets (the math is ``_linalg``'s);
* :class:`MeshDecomposer` runs the eigh / QR decompositions of a step spread over the devices: each matrix
  goes whole to one owner (:func:`balance`: greedy by ``d³`` within per-size stacks), one all-to-all per
  size moves the stacks there, ``jax.shard_map`` decomposes each device's own share (the compiled
  per-device program holds only its share) and one all-to-all brings the results back to their storage.
  Sizes too varied for ``⌈F/N⌉ + 2`` decompositions per device are merged by exact block-diagonal
  padding: ``diag(F, −I)`` for eigh (a PSD factor's eigenvectors come first, the pad's ``−1`` sort last)
  and ``diag(P, I)`` for QR (``qr(diag(P, I)).Q = diag(qr(P).Q, I)``).

Meta's Distributed Shampoo assigns blocks to ranks by a greedy load balancer (cost ~ d³); Google's JAX
Shampoo stacks padded factors into one array sharded over the devices. Here the stacks are per size,
padded only when sizes must merge.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from so_optax import _lapack_lanes, _linalg

if TYPE_CHECKING:
    from so_optax._distribution import Placement


class MeshContractions(_linalg.Contractions):
    """SOAP's contractions with their operands placed so that each costs a transfer of the smaller of
    the tensor and the matrix it meets, instead of what XLA's propagation picks (it all-gathers every
    basis and all-reduces every full factor).

    A mode product ``x ×_i Q`` with the ``d × d`` basis ``Q`` (split by rows): if ``d² ≤ |x|`` the basis
    is gathered (its one all-gather is shared by the projection and the projection back of a step) and
    ``x`` split along another axis, so the product is local; otherwise the tensor moves: projecting
    (``Qᵀ`` contracts ``Q``'s rows) ``x`` is split along axis ``i`` like ``Q``'s rows and the partial
    products are reduce-scattered, projecting back ``x`` is gathered and each device computes its rows.
    The Gram matrices of a tensor gather it once if ``|x| ≤ Σ d_i²`` (then every factor's rows are
    local), else each factor is summed from the local slices and reduce-scattered.
    """

    def __init__(self, where: Placement):
        self._where = where

    def _split_other_than(self, x: jax.Array, axis: int) -> tuple[jax.Array, P | None]:
        for dim in range(x.ndim):
            spec = self._where.along(x.shape, dim) if dim != axis else None
            if spec is not None:
                return self._where.constrain(x, spec), spec
        return x, None

    def _mode(self, x: jax.Array, q: jax.Array, axis: int, contract_rows: bool) -> jax.Array:
        out_spec = None
        if q.size <= x.size:  # the basis moves; the product is local and keeps x's split
            x, out_spec = self._split_other_than(x, axis)
            q = self._where.constrain(q, P())
        elif contract_rows:  # local partial sums over Q's rows; the next placement reduce-scatters them
            spec = self._where.along(x.shape, axis)
            x = x if spec is None else self._where.constrain(x, spec)
        else:  # x moves; each device computes the rows of Q it holds
            x = self._where.constrain(x, P())
            out_spec = self._where.along(x.shape, axis)
        y = _linalg.mode_product(x, q, axis, contract_rows)
        return y if out_spec is None else self._where.constrain(y, out_spec)

    def project(self, x, bases):
        for axis, q in enumerate(bases):
            if q is not None:
                x = self._mode(x, q, axis, contract_rows=True)
        return self._where.constrain(x, self._where.spec(x.shape))

    def project_back(self, x, bases):
        for axis, q in enumerate(bases):
            if q is not None:
                x = self._mode(x, q, axis, contract_rows=False)
        return x

    def grams(self, x, preconditioned):
        dims = [x.shape[a] for a, on in enumerate(preconditioned) if on]
        gathered = self._where.constrain(x, P()) if x.size <= sum(d * d for d in dims) else None
        out = []
        for axis, on in enumerate(preconditioned):
            if not on:
                out.append(None)
                continue
            y = gathered if gathered is not None else self._split_other_than(x, axis)[0]
            f = _linalg.gram(y, axis)
            out.append(self._where.constrain(f, self._where.spec(f.shape)))
        return tuple(out)


# --------------------------------------------------------------------------------- decompositions


@dataclass(frozen=True)
class SizeClass:
    """One stack of decompositions: ``slots`` matrices of size ``size`` per device.

    ``owners[device][slot]`` is the index (in the order given to :func:`balance`) of the matrix that
    slot holds, or ``None`` for an empty slot (an identity, cheap to decompose).
    """

    size: int
    slots: int
    owners: tuple[tuple[int | None, ...], ...]


def _merge_classes(counts: dict[int, int], devices: int, bound: int) -> dict[int, int]:
    """Maps each size to the (equal or larger) size it is decomposed at, so that per device at most
    ``bound`` slots are needed: while the stacks need more, the merge of one size into the next
    larger one that adds the least padded work (``n·(d'³ − d³)``) among those that save a slot (any
    merge if none does) is made."""
    target = {d: d for d in counts}
    classes = dict(counts)

    def slots(cls):
        return sum(-(-n // devices) for n in cls.values())

    while slots(classes) > bound and len(classes) > 1:
        sizes = sorted(classes)
        options = []
        for small, big in zip(sizes, sizes[1:]):
            merged = dict(classes)
            merged[big] += merged.pop(small)
            options.append((slots(merged) >= slots(classes), classes[small] * (big**3 - small**3), small, big))
        _, _, small, big = min(options)
        classes[big] += classes.pop(small)
        for d, t in target.items():
            if t == small:
                target[d] = big
    return target


def balance(sizes: Sequence[int], devices: int) -> list[SizeClass]:
    """Assigns ``d × d`` decompositions (``sizes``) to ``devices``, balanced by cost ``d³``.

    Matrices of one size form a stack of ``⌈n/devices⌉`` slots per device (merged into a larger size
    where needed to keep ``Σ slots ≤ ⌈F/devices⌉ + 2``, see :func:`_merge_classes`). Largest first,
    each matrix goes to the least loaded device (its real ``d³`` so far; ties: lowest index) that has
    a free slot in its stack.
    """
    counts: dict[int, int] = {}
    for d in sizes:
        counts[d] = counts.get(d, 0) + 1
    bound = -(-len(sizes) // devices) + 2
    target = _merge_classes(counts, devices, bound)
    members: dict[int, list[int]] = {}
    for k, d in enumerate(sizes):
        members.setdefault(target[d], []).append(k)
    load = [0] * devices
    classes = []
    for size in sorted(members, reverse=True):
        slots = -(-len(members[size]) // devices)
        owners: list[list[int | None]] = [[] for _ in range(devices)]
        for k in sorted(members[size], key=lambda k: (-sizes[k], k)):
            device = min((dev for dev in range(devices) if len(owners[dev]) < slots), key=lambda dev: (load[dev], dev))
            owners[device].append(k)
            load[device] += sizes[k] ** 3
        classes.append(SizeClass(size, slots, tuple(tuple(o + [None] * (slots - len(o))) for o in owners)))
    return classes


def _padded(mat: jax.Array, size: int, pad_value: float) -> jax.Array:
    """``diag(mat, pad_value · I)`` of ``size × size``."""
    extra = size - mat.shape[-1]
    if not extra:
        return mat
    tail = jnp.concatenate([jnp.zeros(mat.shape[-1], mat.dtype), jnp.full(extra, pad_value, mat.dtype)])
    return jnp.pad(mat, ((0, extra), (0, extra))) + jnp.diag(tail)


def _decompose_local(decompose, block: jax.Array) -> jax.Array:
    """Inside ``shard_map``: this device's ``[1, slots, d, d]`` share, one unbatched call per matrix."""
    lanes = _linalg.Lanes(_lapack_lanes.lane_count())
    return jnp.stack([lanes.run(decompose, block[0, j]) for j in range(block.shape[1])])[None]


class MeshDecomposer(_linalg.Decomposer):
    """Decompositions spread over a :class:`Placement`'s devices (see the module docstring)."""

    def __init__(self, where: Placement):
        self._where = where
        self._names = tuple(name for name, _ in where.axes)

    def _spread(self, decompose, pad_value: float, mats: Sequence[jax.Array]) -> list[jax.Array]:
        """``decompose`` of every matrix of the stacks ``mats``, each on its owner; the results stacked as
        ``mats`` and stored by rows. Matrices of one dtype are balanced together."""
        out: list[list[Any]] = [[None] * m.shape[0] for m in mats]
        by_dtype: dict[Any, list[tuple[int, int]]] = {}
        for i, m in enumerate(mats):
            if not m.shape[-1]:  # 0 × 0 matrices: nothing to move
                out[i] = [decompose(m[s]) for s in range(m.shape[0])]
            else:
                by_dtype.setdefault(jnp.dtype(m.dtype), []).extend((i, s) for s in range(m.shape[0]))
        for dtype, flat in by_dtype.items():
            for cls in balance([mats[i].shape[-1] for i, _ in flat], self._where.size):
                done = self._decompose_class(decompose, pad_value, cls, [mats[i][s] for i, s in flat], dtype)
                for j, k in enumerate(k for row in cls.owners for k in row):
                    if k is not None:
                        i, s = flat[k]
                        out[i][s] = done[j, : mats[i].shape[-1], : mats[i].shape[-1]]
        return [self._where.constrain(jnp.stack(o), P(None, *self._where.spec(m.shape[1:]))) for o, m in zip(out, mats)]

    def _decompose_class(self, decompose, pad_value, cls: SizeClass, matrices, dtype) -> jax.Array:
        """One size's stack: to the owners (one all-to-all), decomposed there, back (one all-to-all)."""
        devices, entry = self._where.size, self._names if len(self._names) > 1 else self._names[0]
        eye = jnp.eye(cls.size, dtype=dtype)
        stack = jnp.stack([eye if k is None else _padded(matrices[k], cls.size, pad_value)
                           for row in cls.owners for k in row])
        stack = self._where.constrain(stack.reshape(devices, cls.slots, cls.size, cls.size), P(entry))
        share = jax.shard_map(functools.partial(_decompose_local, decompose), in_specs=P(entry), out_specs=P(entry))
        return share(stack).reshape(devices * cls.slots, cls.size, cls.size)

    def eigh_descending(self, mats, fallbacks):
        vecs = self._spread(_linalg.eigenvectors_descending, -1.0, mats)
        return [jax.vmap(_linalg.finite_or)(v, f) for v, f in zip(vecs, fallbacks)]

    def orthonormal(self, products, fallbacks, start_after=()):
        del start_after  # the all-to-all orders the QRs after the products already
        qs = self._spread(_linalg.orthonormal_factor, 1.0, products)
        return [jax.vmap(_linalg.finite_or)(q, f) for q, f in zip(qs, fallbacks)]
