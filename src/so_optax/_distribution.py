"""Where the so_optax optimizers keep their state and run their decompositions on a device mesh.

The optimizers' math (``_soap.py``, ``_sophia.py``) does not know about devices; this module is the
layer that does. Under ``jax.set_mesh(mesh)`` it reads the mesh when a step is traced and

* **stores** every state array split over the mesh axes the optimizer may use (``mesh_axes``, default
  all): along the first dimension that the number of devices divides (the rows of a ``d × d`` factor
  or basis), else axis by axis on dimensions each axis divides, else whole. Nothing is padded;
* keeps the **regular step** XLA SPMD on these sharded operands (exact math, communication of the
  order of the parameter and factor sizes). Under an Explicit mesh the math runs inside
  ``jax.sharding.auto_axes`` with the state's storage as its output sharding, so it is traced as on an
  Auto mesh (an Explicit mesh would reject ``G Gᵀ`` of a row-sharded ``G`` as ambiguous);
* spreads the **decompositions** (eigh at the first call, QR at refreshes) over the devices: each
  matrix goes whole to one owner (:func:`balance`: greedy by ``d³`` within per-size stacks), one
  all-to-all per size moves the stacks there, ``jax.shard_map`` decomposes each device's own share
  (so the compiled per-device program holds only its share) and one all-to-all brings the results
  back to their storage. Sizes too varied for ``⌈F/N⌉ + 2`` decompositions per device are merged by
  exact block-diagonal padding: ``diag(F, −I)`` for eigh (a PSD factor's eigenvectors come first,
  the pad's ``−1`` sort last) and ``diag(P, I)`` for QR (``qr(diag(P, I)).Q = diag(qr(P).Q, I)``).

Without a mesh (or with one device among the usable axes and no Explicit axis) nothing changes: the
one-device program is the one the optimizers always compiled.

Meta's Distributed Shampoo keeps distribution in a layer the preconditioner does not know, assigns
blocks by a greedy load balancer (cost ~ d³); Google's JAX Shampoo stacks padded factors into one array
sharded over the devices. This module stacks per size instead (no padding unless sizes must merge).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from so_optax import _lapack_lanes, _linalg

MeshAxes = str | Sequence[str] | None


def check_mesh_axes(mesh_axes: MeshAxes) -> tuple[str, ...] | None:
    """``mesh_axes`` as a tuple of names (``None``: every axis of the mesh); ``ValueError`` if malformed."""
    if mesh_axes is None:
        return None
    names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"Invalid mesh_axes: {mesh_axes!r} (must be None, an axis name or a sequence of axis names)")
    if len(set(names)) != len(names):
        raise ValueError(f"Invalid mesh_axes: {mesh_axes!r} names an axis twice")
    return tuple(names)


def _spec_axes(spec: P) -> set[str]:
    names = set()
    for entry in spec:
        names.update((entry,) if isinstance(entry, str) else (entry or ()))
    return names


def storage_spec(shape: Sequence[int], axes: Sequence[tuple[str, int]]) -> P:
    """Where an array of ``shape`` is kept over ``axes`` (``(name, size)`` pairs, in mesh order).

    The first dimension divisible by the product of the sizes takes every axis; otherwise each axis,
    largest first, goes to the first dimension whose remaining length it divides; an axis that
    divides none leaves the array whole along it (replicated over it).
    """
    shape = tuple(shape)
    total = math.prod(size for _, size in axes)
    if total == 1:
        return P()
    for dim, length in enumerate(shape):
        if length % total == 0:
            entry = axes[0][0] if len(axes) == 1 else tuple(name for name, _ in axes)
            return P(*([None] * dim), entry)
    per_dim: list[list[str]] = [[] for _ in shape]
    left = list(shape)
    for name, size in sorted(axes, key=lambda a: -a[1]):
        for dim in range(len(shape)):
            if left[dim] % size == 0:
                per_dim[dim].append(name)
                left[dim] //= size
                break
    order = [name for name, _ in axes]
    entries = [None if not names else (names[0] if len(names) == 1 else tuple(sorted(names, key=order.index)))
               for names in per_dim]
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def _leaf_spec(x: Any) -> P | None:
    """The partition spec of ``x`` where it is known: a concrete array's ``NamedSharding``, or a traced
    array's sharding type (Explicit axes only)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return sharding.spec
    try:
        spec = jax.typeof(x).sharding.spec
    except (TypeError, AttributeError):
        return None
    return spec if _spec_axes(spec) else None


def explicit_spec(x: Any, drop_last: bool = False) -> P | None:
    """The partition spec in ``x``'s type where it names an Explicit mesh axis (``drop_last``: of
    ``x[..., 0]``), else ``None``: what to pass as ``out_sharding`` to a sampler, so that each device
    draws only its shard (``jax_threefry_partitionable``: the same numbers as one device)."""
    try:
        spec = jax.typeof(x).sharding.spec
    except (TypeError, AttributeError):
        return None
    entries = tuple(spec)[:-1] if drop_last else tuple(spec)
    return P(*entries) if _spec_axes(P(*entries)) else None


@dataclass(frozen=True)
class Placement:
    """The mesh an optimizer step is traced under, and the axes it may use.

    Attributes:
      mesh: the current abstract mesh (``None`` without one).
      axes: ``(name, size)`` of the usable axes of size > 1, in mesh order.
      explicit: the mesh's Explicit axes (the math then runs inside ``auto_axes`` over them).
    """

    mesh: Any
    axes: tuple[tuple[str, int], ...]
    explicit: tuple[str, ...]

    @property
    def size(self) -> int:
        """How many devices the optimizer spreads its state and decompositions over."""
        return math.prod(size for _, size in self.axes)

    @property
    def is_local(self) -> bool:
        """True when nothing is distributed and no Explicit axis needs handling: the one-device program."""
        return self.size == 1 and not self.explicit

    def spec(self, shape: Sequence[int]) -> P:
        return storage_spec(shape, self.axes)

    def check_tree(self, tree: Any, what: str, allowed: tuple[str, ...] | None) -> None:
        """``ValueError`` naming the first leaf of ``tree`` sharded over an axis the optimizer may not use."""
        if allowed is None:
            return
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            spec = _leaf_spec(leaf)
            if spec is None:
                continue
            forbidden = sorted(_spec_axes(spec) - set(allowed))
            if forbidden:
                raise ValueError(
                    f"Invalid {what}: leaf {jax.tree_util.keystr(path) or '(root)'} is sharded over mesh axis "
                    f"{forbidden[0]!r} ({spec}), which mesh_axes={allowed!r} does not allow"
                )

    def constrain(self, x: jax.Array, spec: P) -> jax.Array:
        """``x`` placed as ``spec`` (``reshard`` over Explicit axes, a sharding constraint over Auto ones)."""
        if self.size == 1 and not _spec_axes(spec) and not self.explicit:
            return x
        mesh = jax.sharding.get_abstract_mesh()
        if any(mesh._name_to_type[name] == AxisType.Explicit for name in mesh.axis_names):
            return jax.sharding.reshard(x, spec)
        return jax.lax.with_sharding_constraint(x, spec)

    def store(self, tree: Any) -> Any:
        """Every array of ``tree`` placed as its storage: floating-point arrays as :func:`storage_spec`
        says, the others (counts, PRNG keys, whose key data must stay whole) replicated."""
        if self.is_local:
            return tree
        return jax.tree.map(lambda x: self.constrain(x, self.spec_of(x)), tree)

    def spec_of(self, x: Any) -> P:
        """The storage spec of the state array ``x`` (see :meth:`store`)."""
        return self.spec(jnp.shape(x)) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else P()

    def like(self, tree: Any, like: Any) -> Any:
        """Under an Explicit mesh, every array of ``tree`` resharded like its counterpart in ``like`` (the
        updates an optimizer returns must be typed like the gradients); elsewhere ``tree`` unchanged."""
        if not self.explicit:
            return tree
        return jax.tree.map(lambda x, r: jax.sharding.reshard(x, _explicit_spec(self.explicit, r)), tree, like)

    def store_stacked(self, tree: Any) -> Any:
        """Every array of ``tree``, stacks of same-shape arrays along axis 0, placed as the storage of one
        of them (``P(None, *storage_spec(x.shape[1:]))``): it pins a loop's carry to where the state lives
        (XLA would otherwise pick a loop sharding and gather the bases into it on every step)."""
        if self.size == 1:
            return tree
        return jax.tree.map(lambda x: self.constrain(x, P(None, *self.spec(x.shape[1:]))), tree)

    def run(self, body: Callable[..., tuple[Any, Any]], args: tuple, updates_like: Any, state_like: Any):
        """``body(*args) -> (updates, state)``, the state (shaped like ``state_like``) in its storage and,
        under an Explicit mesh, the updates sharded like ``updates_like`` (elsewhere XLA places them)."""
        if self.is_local:
            return body(*args)
        if not self.explicit:
            updates, state = body(*args)
            return updates, self.store(state)
        out_sharding = (
            jax.tree.map(functools.partial(_explicit_spec, self.explicit), updates_like),
            jax.tree.map(self.spec_of, state_like),
        )
        return jax.sharding.auto_axes(body, axes=self.explicit, out_sharding=out_sharding)(*args)

    def along(self, shape: Sequence[int], dim: int) -> P | None:
        """The spec that splits ``dim`` of ``shape`` over every usable axis (``None`` if it does not divide)."""
        if shape[dim] % self.size:
            return None
        names = tuple(name for name, _ in self.axes)
        return P(*([None] * dim), names[0] if len(names) == 1 else names)

    def contractions(self) -> _linalg.Contractions:
        """The step's projections and Gram matrices: as on one device, or with their operands placed."""
        return _linalg.Contractions() if self.size == 1 else MeshContractions(self)

    def decomposer(self) -> _linalg.Decomposer:
        """How this step's eigh/QR calls run: in ``Lanes`` here (one device), or spread over the mesh."""
        if self.size == 1:
            return _linalg.LocalDecomposer(_linalg.Lanes(_lapack_lanes.lane_count()))
        return MeshDecomposer(self)


def _explicit_spec(explicit: tuple[str, ...], x: Any) -> P:
    spec = jax.typeof(x).sharding.spec
    return P(*(_keep(entry, explicit) for entry in spec))


def _keep(entry, names):
    if entry is None or isinstance(entry, str):
        return entry if entry in names else None
    kept = tuple(n for n in entry if n in names)
    return kept if kept else None


def placement(mesh_axes: tuple[str, ...] | None) -> Placement:
    """The :class:`Placement` of the step being traced, under the current ``jax.set_mesh`` mesh.

    Raises ``ValueError`` naming an axis of ``mesh_axes`` that the mesh lacks (or any, without a mesh).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        if mesh_axes:
            raise ValueError(
                f"Invalid mesh_axes: {mesh_axes!r} names mesh axes, but no mesh is set (use jax.set_mesh(mesh))"
            )
        return Placement(None, (), ())
    names = tuple(mesh.axis_names)
    for name in mesh_axes or ():
        if name not in names:
            raise ValueError(f"Invalid mesh_axes: the mesh has no axis {name!r} (its axes: {names})")
    types = mesh._name_to_type
    usable = [n for n in names if (mesh_axes is None or n in mesh_axes) and types[n] != AxisType.Manual]
    axes = tuple((n, mesh.shape[n]) for n in usable if mesh.shape[n] > 1)
    explicit = tuple(n for n in names if types[n] == AxisType.Explicit)
    return Placement(mesh, axes, explicit)


# ----------------------------------------------------------------------------------- contractions


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
        flat = [(i, s) for i, m in enumerate(mats) for s in range(m.shape[0]) if m.shape[-1]]
        out: list[list[Any]] = [[None] * m.shape[0] for m in mats]
        for i, m in enumerate(mats):  # 0 × 0 matrices: nothing to move
            if not m.shape[-1]:
                out[i] = [decompose(m[s]) for s in range(m.shape[0])]
        devices, entry = self._where.size, self._names if len(self._names) > 1 else self._names[0]
        decompose_share = jax.shard_map(
            functools.partial(_decompose_local, decompose), in_specs=P(entry), out_specs=P(entry)
        )
        for cls in balance([mats[i].shape[-1] for i, _ in flat], devices):
            dtype, eye = mats[0].dtype, jnp.eye(cls.size, dtype=mats[0].dtype)
            stack = jnp.stack([eye if k is None else _padded(mats[flat[k][0]][flat[k][1]], cls.size, pad_value)
                               for row in cls.owners for k in row]).astype(dtype)
            stack = self._where.constrain(stack.reshape(devices, cls.slots, cls.size, cls.size), P(entry))
            done = decompose_share(stack).reshape(devices * cls.slots, cls.size, cls.size)
            for j, k in enumerate(k for row in cls.owners for k in row):
                if k is not None:
                    i, s = flat[k]
                    d = mats[i].shape[-1]
                    out[i][s] = done[j, :d, :d]
        return [self._where.constrain(jnp.stack(o), P(None, *self._where.spec(m.shape[1:]))) for o, m in zip(out, mats)]

    def eigh_descending(self, mats, fallbacks):
        vecs = self._spread(_linalg.eigenvectors_descending, -1.0, mats)
        return [jax.vmap(_linalg.finite_or)(v, f) for v, f in zip(vecs, fallbacks)]

    def orthonormal(self, products, fallbacks, start_after=()):
        del start_after  # the all-to-all orders the QRs after the products already
        qs = self._spread(_linalg.orthonormal_factor, 1.0, products)
        return [jax.vmap(_linalg.finite_or)(q, f) for q, f in zip(qs, fallbacks)]


# ------------------------------------------------------------------------------------ public helper


def state_shardings(tx: Any, params: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
    """The ``NamedSharding`` of every leaf of ``tx.init(params)``, without running ``init``.

    For ``jax.jit(tx.init, out_shardings=...)``, a jitted step's ``out_shardings`` and checkpoint
    restore (e.g. orbax's ``ArrayRestoreArgs`` / ``jax.ShapeDtypeStruct(..., sharding=...)``), on an Auto
    mesh as on an Explicit one. Under an Explicit mesh ``jax.eval_shape(tx.init, params)`` carries the
    same shardings in its result's types.

    Args:
      tx: any optax transformation (``so_optax.soap``/``sophia`` or a chain holding them).
      params: the parameters, or ``jax.ShapeDtypeStruct``s of them with their ``sharding``; leaves
        without a ``NamedSharding`` count as replicated.
      mesh: the mesh (default: the one set by ``jax.set_mesh``).

    Returns:
      A pytree like ``tx.init(params)`` of ``NamedSharding``s on ``mesh``.
    """
    mesh = mesh if mesh is not None else jax.sharding.get_mesh()
    if mesh is None or mesh.empty:
        raise ValueError("Missing mesh: pass mesh= or call state_shardings under jax.set_mesh(mesh)")
    explicit = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Explicit,) * len(mesh.axis_names))

    def as_explicit(x):
        spec = _leaf_spec(x)
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=NamedSharding(explicit, spec or P()))

    with jax.sharding.set_mesh(explicit):
        shapes = jax.eval_shape(tx.init, jax.tree.map(as_explicit, params))
    auto = AxisType.Explicit not in mesh.axis_types

    def sharding(s):
        entries = list(s.sharding.spec)
        while auto and entries and entries[-1] is None:
            entries.pop()  # as a jitted computation writes it on an Auto mesh (else the next call retraces)
        return NamedSharding(mesh, P(*entries))

    return jax.tree.map(sharding, shapes)
