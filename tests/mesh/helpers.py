"""Shared pieces of the multi-device tests: meshes, placement, trajectories and compiled-program counts."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import so_optax


def make_mesh(shape, names, kind):
    """A mesh of the first ``prod(shape)`` devices, every axis ``kind`` ('Explicit' or 'Auto')."""
    return jax.make_mesh(shape, names, axis_types=(getattr(AxisType, kind),) * len(shape),
                         devices=jax.devices()[: math.prod(shape)])


def full_spec(spec, ndim):
    """``spec`` with one entry per dimension (``P('x')`` and ``P('x', None)`` are the same placement)."""
    entries = tuple(spec)
    return P(*entries, *([None] * (ndim - len(entries))))


def specs(tree):
    """Every array's partition spec, one entry per dimension."""
    def spec(x):
        sharding = getattr(x, "sharding", None)
        return full_spec(sharding.spec, x.ndim) if isinstance(sharding, NamedSharding) else None

    return jax.tree.map(spec, tree)


def spec_for(shape, how, mesh):
    """The partition spec of a parameter, one entry per dimension: ``how`` is 'rows', 'cols',
    'replicated' or a PartitionSpec; rows/cols use every mesh axis (or the last one if the product
    does not divide)."""
    if isinstance(how, P):
        return full_spec(how, len(shape))
    if how == "replicated" or not shape:
        return P(*([None] * len(shape)))
    names = tuple(mesh.axis_names)
    dim = 0 if how == "rows" else len(shape) - 1
    for axes in (names, names[-1:]):
        if shape[dim] % math.prod(mesh.shape[a] for a in axes) == 0:
            entry = axes[0] if len(axes) == 1 else axes
            return P(*([None] * dim), entry, *([None] * (len(shape) - dim - 1)))
    return P(*([None] * len(shape)))


def _as_jax_writes(spec, mesh):
    """``spec`` as a jitted computation's outputs carry it (JAX 0.10): one entry per dimension on an
    Explicit mesh, trailing ``None``s dropped on an Auto one. Inputs placed otherwise make the second
    call of any jitted step recompile (``optax.adamw``'s too)."""
    if AxisType.Explicit in mesh.axis_types:
        return spec
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def put(tree, mesh, how):
    """``tree`` (numpy or jax arrays) placed on ``mesh``, each leaf as ``spec_for(shape, how)``."""

    def place(x):
        spec = _as_jax_writes(spec_for(np.shape(x), how, mesh), mesh)
        return jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))

    return jax.tree.map(place, tree)


def train_step(tx):
    """``(params, state, grads) -> (params, state)``: one ``tx`` update applied."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def trajectory(tx, params, grads, steps, place=lambda t: jax.tree.map(jnp.asarray, t), after_first=None,
               aot=False):
    """Params after each of ``steps`` steps (gradients cycle through ``grads``), the final state, and the
    jitted step (or, ``aot``, the compiled program's HLO text: an ahead-of-time executable rejects inputs
    placed otherwise than it was compiled for, so running one shows that no step needs another program).
    ``after_first(state) -> state`` edits the state after the first call. Asserts that the state keeps
    init's placement and the parameters theirs at every step."""
    params = place(params)
    state = jax.jit(tx.init)(params)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and AxisType.Explicit not in mesh.axis_types:
        # Auto: XLA places the outputs it is not told about; the parameters stay where they are only if the
        # step says so (the optimizer's state is placed by the optimizer, state_shardings says where)
        out = (jax.tree.map(lambda x: x.sharding, params), so_optax.state_shardings(tx, params))
        step = jax.jit(train_step(tx), out_shardings=out)
    else:
        step = jax.jit(train_step(tx))
    if aot:
        step = step.lower(params, state, place(grads[0])).compile()
    where = specs((params, state))
    out = []
    for t in range(steps):
        params, state = step(params, state, place(grads[t % len(grads)]))
        if t == 0 and after_first is not None:
            state = after_first(state)
        assert specs((params, state)) == where, (t, specs((params, state)), where)
        out.append(jax.device_get(params))
    return out, state, (step.as_text() if aot else step)


def max_rel_err(got, want):
    """Largest over leaves of max|got − want| / max|want|."""
    errs = [float(np.max(np.abs(np.asarray(g) - np.asarray(w))) / max(float(np.max(np.abs(w))), 1e-300))
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    return max(errs)


def bytes_per_device(tree):
    """{device id: bytes of the shards of ``tree``'s arrays it holds}."""
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def lapack_calls(hlo_text):
    """How many eigh (syevd) and QR (geqrf) LAPACK calls the compiled per-device program holds, each
    counted times its batch (the product of its operand's leading dimensions)."""
    counts = {"syevd": 0, "geqrf": 0}
    for line in hlo_text.splitlines():
        m = re.search(r'custom_call_target="\w*?(syevd|geqrf)\w*"', line)
        if m:
            shape = re.search(r"custom-call\(\w+\[([\d,]*)\]", line) or re.search(r"= \(?\w+\[([\d,]*)\]", line)
            dims = [int(d) for d in shape.group(1).split(",") if d] if shape else []
            counts[m.group(1)] += math.prod(dims[:-2]) if len(dims) > 2 else 1
    return counts
