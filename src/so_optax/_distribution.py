"""Where the so_optax optimizers keep their state and run their work on a device mesh.

The optimizers' math (``_soap_step.py``, ``_sophia_step.py``) does not know about devices; this module is the
layer that does. Under ``jax.set_mesh(mesh)`` it reads the mesh when a step is traced and

* **stores** every floating-point state array split over the mesh axes the optimizer may use
  (``mesh_axes``, default all): along the first dimension that the number of devices divides (the rows of
  a ``d × d`` factor or basis), else axis by axis on dimensions each axis divides, else whole; counts and
  PRNG keys stay replicated. Nothing is padded;
* keeps the **regular step** XLA SPMD on these sharded operands (exact math), with the operands of SOAP's
  contractions placed by ``_mesh_linalg.MeshContractions`` and the loops' carries pinned to the storage.
  Under an Explicit mesh the SOAP math runs inside ``jax.sharding.auto_axes`` with the state's storage as
  its output sharding, so it is traced as on an Auto mesh (an Explicit mesh would reject ``G Gᵀ`` of a
  row-sharded ``G`` as ambiguous);
* spreads the **decompositions** over the devices (``_mesh_linalg.MeshDecomposer``).

Without a mesh (or with one device among the usable axes and no Explicit axis) nothing changes: the
one-device program is the one the optimizers always compiled.
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

from so_optax import _lapack_lanes, _linalg, _mesh_linalg

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
        return _linalg.Contractions() if self.size == 1 else _mesh_linalg.MeshContractions(self)

    def decomposer(self) -> _linalg.Decomposer:
        """How this step's eigh/QR calls run: in ``Lanes`` here (one device), or spread over the mesh."""
        if self.size == 1:
            return _linalg.LocalDecomposer(_linalg.Lanes(_lapack_lanes.lane_count()))
        _lapack_lanes.one_thread_on_simulated_devices()
        return _mesh_linalg.MeshDecomposer(self)


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
