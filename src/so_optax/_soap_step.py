"""One SOAP step, the math behind ``so_optax.soap`` (Vyas et al., 2024, arXiv:2409.11321).

The leaves whose per-tensor math is identical are stacked (same work shape, preconditioned dims and
compute dtype) and each stack is one batched computation. Each call runs exactly one of three in-place
branches (``_control.run_if``): the first call builds the bases (eigh), a refresh call takes the Adam step
in the current bases and then refreshes them (power iteration and QR, ``v`` permuted, ``m`` rotated), any
other call takes the Adam step alone. The contractions (``_linalg.Contractions``) and the decompositions
(``_linalg.Decomposer``) come from the step's ``_distribution.Placement``: on one device ``_linalg``'s, on
a mesh ``_mesh_linalg``'s; the math here is the same for both.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from so_common.soap_layout import SoapLayout
from so_optax import _control, _distribution, _linalg

# Leaves are stacked with their same-layout peers only if all their factors are at most this size
# and they have at most this many elements (small tensors: batching saves per-op overhead).
_STACK_MAX_DIM = 128
_STACK_MAX_SIZE = 1 << 16


def to_work(x: jax.Array, layout: SoapLayout) -> jax.Array:
    if layout.permutation is not None:
        x = jnp.transpose(x, layout.permutation)
    return x.reshape(layout.work_shape)


def from_work(x: jax.Array, layout: SoapLayout) -> jax.Array:
    x = x.reshape(layout.permuted_shape)
    if layout.permutation is not None:
        x = jnp.transpose(x, layout.inverse_permutation)
    return x


@dataclass(frozen=True)
class Hyper:
    """The options of one :func:`soap` / :func:`scale_by_soap` transformation (numbers may be traced)."""

    betas: tuple
    shampoo_beta: Any
    eps: Any
    weight_decay: Any
    precondition_frequency: Any
    normalize_grads: bool
    correct_bias: bool
    learning_rate: Any

    @property
    def static_zero_decay(self) -> bool:
        return isinstance(self.weight_decay, numbers.Real) and self.weight_decay == 0

    def arrays(self) -> dict:
        """The options given as arrays (traced ones, e.g. under ``optax.inject_hyperparams``), by name: a
        step that runs its math in another context (``jax.sharding.auto_axes``) passes them in as
        arguments, and :meth:`with_arrays` puts them back."""
        out = {name: getattr(self, name) for name in ("shampoo_beta", "eps", "weight_decay", "precondition_frequency",
                                                      "learning_rate")}
        out.update({f"beta{i}": b for i, b in enumerate(self.betas)})
        return {name: x for name, x in out.items() if isinstance(x, jax.Array)}

    def with_arrays(self, arrays: dict) -> Hyper:
        betas = tuple(arrays.get(f"beta{i}", b) for i, b in enumerate(self.betas))
        return dataclasses.replace(self, betas=betas, **{k: v for k, v in arrays.items() if not k.startswith("beta")})


def _cast(x, dtype):
    return jnp.asarray(x).astype(dtype)


def init_leaf(leaf, layout: SoapLayout):
    """One parameter's ``(exp_avg, factors, bases)``: zeros, zero factors and identity bases."""
    dtype = _linalg.compute_dtype(jnp.asarray(leaf).dtype)
    dims = list(zip(layout.work_shape, layout.preconditioned))
    return (
        jnp.zeros(layout.work_shape, dtype),
        tuple(jnp.zeros((d, d), dtype) if on else None for d, on in dims),
        tuple(jnp.eye(d, dtype=dtype) if on else None for d, on in dims),
    )


def _groups(layouts, exp_avg) -> list:
    """The leaves whose per-tensor math is identical, grouped: each group is one batched (vmapped)
    computation (same work shape, preconditioned dims and compute dtype). Large tensors are not
    stacked: their matmuls are big enough on their own and stacking would copy their factors, bases
    and moments on every step."""
    group_of: dict = {}
    for k, (layout, m) in enumerate(zip(layouts, exp_avg)):
        key = (layout.work_shape, layout.preconditioned, jnp.dtype(m.dtype))
        if max(layout.factor_dims, default=0) > _STACK_MAX_DIM or m.size > _STACK_MAX_SIZE:
            key = key + (k,)
        group_of.setdefault(key, []).append(k)
    return list(group_of.items())


def _stack(key, members, grads, layouts, leaves, hp: Hyper, ops: _linalg.Contractions) -> dict:
    """One group's gradients, moments, bases and updated factors ``F ← β_s F + (1 − β_s) G_(i) G_(i)ᵀ``,
    stacked along a new leading axis. ``leaves`` are the state's flat ``(exp_avg, exp_avg_sq, factors,
    bases)``."""
    _, precond, dtype, *_ = key
    exp_avg, exp_avg_sq, factors, bases = leaves
    if isinstance(hp.shampoo_beta, numbers.Real):
        sb = _cast(hp.shampoo_beta if hp.shampoo_beta >= 0 else hp.betas[1], dtype)
    else:
        sb = jnp.where(_cast(hp.shampoo_beta, dtype) >= 0, _cast(hp.shampoo_beta, dtype), _cast(hp.betas[1], dtype))
    g = jnp.stack([to_work(grads[k], layouts[k]).astype(dtype) for k in members])
    grams = jax.vmap(lambda x: ops.grams(x, precond))(g)
    fac, bas = [], []
    for axis, (on, new) in enumerate(zip(precond, grams)):
        if not on:
            fac.append(None)
            bas.append(None)
            continue
        old = jnp.stack([factors[k][axis].astype(dtype) for k in members])
        fac.append(sb * old + (1 - sb) * new)
        bas.append(jnp.stack([bases[k][axis].astype(dtype) for k in members]))
    return dict(
        g=g,
        m=jnp.stack([exp_avg[k].astype(dtype) for k in members]),
        v=jnp.stack([exp_avg_sq[k].astype(dtype) for k in members]),
        factors=tuple(fac),
        bases=tuple(bas),
    )


def _adam_step(stacked, carry, hp: Hyper, ops: _linalg.Contractions) -> list:
    """Adam in the current bases: ``G' = G ×_i Q_iᵀ``, the moments, ``u = (m / (√v + ε)) ×_i Q_i``."""
    out = []
    for o, c in zip(stacked, carry):
        dtype = o["g"].dtype
        one = jnp.ones([], dtype)
        beta1, beta2, epsilon = _cast(hp.betas[0], dtype), _cast(hp.betas[1], dtype), _cast(hp.eps, dtype)
        gp = jax.vmap(ops.project)(o["g"], c["bases"])
        m = beta1 * c["m"] + (one - beta1) * gp
        v = beta2 * c["v"].reshape(gp.shape) + (one - beta2) * jnp.square(gp)
        u = jax.vmap(ops.project_back)(m / (jnp.sqrt(v) + epsilon), c["bases"])
        if hp.normalize_grads:
            axes = tuple(range(1, u.ndim))
            rms = jnp.sqrt(jnp.mean(jnp.square(u), axis=axes, keepdims=True))
            u = u / (_cast(1e-30, dtype) + rms)
        out.append(dict(c, m=m, v=v.reshape(c["v"].shape), u=u))
    return out


def _first_call(stacked, carry, decomposer: _linalg.Decomposer) -> list:
    """The first call: every factor gets its eigenbasis (identity dims stay ``None``)."""
    todo = [(k, axis) for k, o in enumerate(stacked) for axis, f in enumerate(o["factors"]) if f is not None]
    tied = [_control.tied_to(o["factors"], c["bases"]) for o, c in zip(stacked, carry)]
    found = decomposer.eigh_descending([tied[k][a] for k, a in todo], [carry[k]["bases"][a] for k, a in todo])
    bases = [list(c["bases"]) for c in carry]
    for (k, axis), q in zip(todo, found):
        bases[k][axis] = q
    return [dict(c, bases=tuple(b)) for c, b in zip(carry, bases)]


def _refresh(stacks, factors, decomposer: _linalg.Decomposer, ops: _linalg.Contractions) -> list:
    """Refresh of every stack: power iteration + QR per factor, permute ``v``, rotate ``m``.

    ``stacks`` are the stacks' carries after the Adam step (``m``, ``v`` in the work shape,
    ``bases``, ``u``) and ``factors`` their updated factors; returns their refreshed carries.
    ``exp_avg`` is taken back to the original coordinates with the old bases and projected onto the
    new ones; ``exp_avg_sq`` is permuted along each axis with the order of the refreshed basis.

    It runs in three phases over all stacks: the matmuls (``m`` back to the original coordinates,
    the power-iteration products), the QRs (``decomposer``), then the rest. With bounded lanes (a
    multi-threaded LAPACK on a CPU) the QRs start after every matmul of the first phase, the Adam
    step's included, and the third phase starts after the last QR, so LAPACK has the cores to itself.
    """
    originals = [jax.vmap(ops.project_back)(c["m"], c["bases"]) for c in stacks]
    products = [  # per axis: (sorted products, order, old basis in that order) or None
        tuple(None if q is None else _linalg.stacked_power_iteration_products(f, q) for f, q in zip(fac, c["bases"]))
        for fac, c in zip(factors, stacks)
    ]
    todo = [(k, axis) for k, axes in enumerate(products) for axis, ax in enumerate(axes) if ax is not None]
    new_qs = decomposer.orthonormal(
        [products[k][a][0] for k, a in todo],
        [products[k][a][2] for k, a in todo],
        start_after=[c["u"] for c in stacks] + originals + [products[k][a][0] for k, a in todo],
    )
    new_bases = [[None] * len(c["bases"]) for c in stacks]
    for (k, axis), q in zip(todo, new_qs):
        new_bases[k][axis] = q
    out = []
    for c, original, axes, bases in zip(stacks, originals, products, new_bases):
        v = c["v"]
        for axis, ax in enumerate(axes):
            if ax is not None:
                v = jax.vmap(lambda x, o, a=axis: jnp.take(x, o, axis=a))(v, ax[1])
        out.append(dict(c, m=jax.vmap(ops.project)(original, tuple(bases)), v=v, bases=tuple(bases)))
    return out


def _adam_and_refresh(stacked, carry, hp: Hyper, decomposer: _linalg.Decomposer, ops: _linalg.Contractions):
    """A refresh call: the Adam step in the current bases, then :func:`_refresh` of the stacks with bases."""
    stepped = _adam_step(stacked, carry, hp, ops)
    todo = [k for k, c in enumerate(stepped) if any(q is not None for q in c["bases"])]
    stacks = [dict(stepped[k], v=stepped[k]["v"].reshape(stepped[k]["m"].shape)) for k in todo]
    refreshed = _refresh(stacks, [stacked[k]["factors"] for k in todo], decomposer, ops)
    out = list(stepped)
    for k, c in zip(todo, refreshed):
        out[k] = dict(c, v=c["v"].reshape(stepped[k]["v"].shape))
    return out


def _branches(stacked, count, hp: Hyper, where: _distribution.Placement, ops: _linalg.Contractions) -> list:
    """Runs exactly one of three in-place branches (``_control.run_if``) and returns the stacks' ``m``,
    ``v``, ``bases`` and direction ``u``.

    The first call builds the bases; a refresh call takes the Adam step in the current bases and then
    refreshes them; any other call takes the Adam step alone. ``u`` is carried through the branches
    (zero on the first call). Taking the Adam step inside the branches rather than before them lets
    XLA update the moments and bases in their donated buffers: a basis read outside a loop that
    rewrites it is copied on every call. On one device ``v`` is carried flat, which keeps it row-major
    through the loops (the refresh's permutation along an axis otherwise makes XLA pick a transposed
    loop layout and transpose ``v`` on every call); a sharded ``v`` keeps its shape (flattening one
    split along another axis than its first would move it between devices).
    """
    first = count == 0
    refresh = jnp.logical_and(~first, jnp.remainder(count, hp.precondition_frequency) == 0)
    carry = []
    for o in stacked:
        v = o["v"].reshape(len(o["v"]), math.prod(o["v"].shape[1:])) if where.size == 1 else o["v"]
        carry.append(dict(m=o["m"], v=v, bases=o["bases"], u=jnp.zeros_like(o["g"])))
    pin = where.store_stacked  # the carry stays where the state lives

    def first_fn(c):
        return pin(_first_call(stacked, pin(c), where.decomposer()))

    def refresh_fn(c):
        return pin(_adam_and_refresh(stacked, pin(c), hp, where.decomposer(), ops))

    def adam_fn(c):
        return pin(_adam_step(stacked, pin(c), hp, ops))

    carry = _control.run_if(first, first_fn, pin(carry))
    carry = _control.run_if(refresh, refresh_fn, carry)
    carry = _control.run_if(~first & ~refresh, adam_fn, carry)
    return [dict(c, v=c["v"].reshape(c["m"].shape)) for c in carry]


def _direction(u, p, count, lr_now, dtype, hp: Hyper):
    """The returned direction of one leaf from its SOAP update ``u`` (bias-corrected), with decay."""
    if hp.static_zero_decay:
        return u
    p = jnp.asarray(p).astype(dtype)
    wd = jnp.where(count == 0, jnp.zeros([], dtype), _cast(hp.weight_decay, dtype))
    if lr_now is None:
        return u + wd * p  # AdamW ordering
    # The reference decays the already-updated parameter: p1 = p - lr*d0, p2 = p1 - lr*wd*p1, i.e.
    # direction d0 + wd*(p - lr*d0).
    return u * (1 - _cast(lr_now, dtype) * wd) + wd * p


def update(hp: Hyper, layout_of, where: _distribution.Placement, updates, state, params):
    """One SOAP step (``so_optax.scale_by_soap``'s math) on a ``ScaleBySoapState``: ``(directions, the new
    state's fields as a dict)``. ``where`` supplies the contractions and decompositions (one device, or a
    mesh)."""
    grads, treedef = jax.tree.flatten(updates)
    n = len(grads)
    param_leaves = treedef.flatten_up_to(params) if params is not None else [None] * n
    leaves = tuple(treedef.flatten_up_to(x) for x in (state.exp_avg, state.exp_avg_sq, state.factors, state.bases))
    layouts = [layout_of(g.shape) for g in grads]
    count = state.count
    groups = _groups(layouts, leaves[0])
    ops = where.contractions()
    stacked = [_stack(key, members, grads, layouts, leaves, hp, ops) for key, members in groups]
    results = _branches(stacked, count, hp, where, ops)

    new = {name: [None] * n for name in ("exp_avg", "exp_avg_sq", "factors", "bases", "directions")}
    t = jnp.maximum(count, 1)
    lr_now = None
    if hp.learning_rate is not None and not hp.static_zero_decay:
        lr_now = hp.learning_rate(count) if callable(hp.learning_rate) else hp.learning_rate
    b1, b2 = hp.betas
    for ((_, _, dtype, *_), members), st, res in zip(groups, stacked, results):
        tf = t.astype(dtype)
        if hp.correct_bias:
            scale = jnp.sqrt(1 - jnp.power(_cast(b2, dtype), tf)) / (1 - jnp.power(_cast(b1, dtype), tf))
        else:
            scale = jnp.ones([], dtype)
        for j, k in enumerate(members):
            new["exp_avg"][k] = res["m"][j]
            new["exp_avg_sq"][k] = res["v"][j]
            new["factors"][k] = tuple(None if f is None else f[j] for f in st["factors"])
            new["bases"][k] = tuple(None if q is None else q[j] for q in res["bases"])
            u = scale * from_work(res["u"][j], layouts[k])  # u is zero on the first call
            out_dtype = jnp.asarray(param_leaves[k]).dtype if params is not None else grads[k].dtype
            new["directions"][k] = _direction(u, param_leaves[k], count, lr_now, dtype, hp).astype(out_dtype)

    fields = {name: treedef.unflatten(new[name]) for name in ("exp_avg", "exp_avg_sq", "factors", "bases")}
    return treedef.unflatten(new["directions"]), dict(count=optax.safe_increment(count), **fields)
