"""SOAP: Shampoo with Adam in the Preconditioner's eigenbasis (Vyas et al., 2024).

SOAP runs Adam in the (slowly changing) eigenbasis of Shampoo's Kronecker factors. For a matrix
parameter with gradient ``G`` (``m × n``) it keeps the factors

    L ← β_s L + (1 − β_s) G Gᵀ,        R ← β_s R + (1 − β_s) Gᵀ G,

their eigenbases ``Q_L``, ``Q_R`` (columns by descending eigenvalue), and Adam's moments in the
rotated coordinates:

    G' = Q_Lᵀ G Q_R
    m ← β1 m + (1 − β1) G'              v ← β2 v + (1 − β2) G'²
    u = Q_L (m / (√v + ε)) Q_Rᵀ

Tensors of any rank use one factor per (work) dimension, ``G' = G ×_1 Q_1ᵀ ×_2 Q_2ᵀ ...``; a
dimension larger than ``max_precond_dim`` (and a 1-D tensor unless ``precondition_1d``) uses the
identity basis, so a tensor without any factor reduces to Adam.

The first call only builds the factors and their eigenbases (``eigh``); the parameters do not move
and Adam's step counter starts at the second call. Every ``precondition_frequency`` Adam steps the
bases are refreshed with one power iteration and a QR decomposition,

    P = F Q,   order = argsort(diag(Qᵀ F Q), descending),   Q ← qr(P[:, order]).Q,

the second moment ``v`` is permuted with ``order`` along the matching axis, and the first moment
``m`` is rotated from the old basis into the new one (only on these refresh steps).

Reference:
  Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
  <https://arxiv.org/abs/2409.11321>`_, 2024.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from so_common.soap_layout import SoapLayout, check_soap_options, soap_layout
from so_common.validation import check_nonnegative
from so_optax import _control, _distribution, _linalg, _params

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]

#: Options of :func:`soap` / :func:`scale_by_soap` that fix shapes and control flow. Pass them as
#: ``static_args`` to ``optax.inject_hyperparams`` (``max_precond_dim`` is the one that is required:
#: it is an ``int`` and would otherwise be traced; the booleans and the string are static anyway).
SOAP_STATIC_ARGS = ("max_precond_dim", "merge_dims", "precondition_1d", "data_format")


# Leaves are stacked with their same-layout peers only if all their factors are at most this size
# and they have at most this many elements (small tensors: batching saves per-op overhead).
_STACK_MAX_DIM = 128
_STACK_MAX_SIZE = 1 << 16


class ScaleBySoapState(NamedTuple):
    """State of :func:`scale_by_soap` and :func:`soap`.

    Every field except ``count`` mirrors the parameter tree (one entry per parameter leaf).

    Attributes:
      count: ``int32`` scalar, number of ``update`` calls so far (Adam's step is ``count - 1``).
      exp_avg: first moment ``m``, in the eigenbasis, in the leaf's *work shape*
        (``so_common.soap_layout``), float32 or wider.
      exp_avg_sq: second moment ``v``, same layout as ``exp_avg``.
      factors: per leaf, a tuple with one entry per work dimension: the ``(d, d)`` factor
        (``L``, ``R``, ...) or ``None`` for a dimension with the identity basis.
      bases: per leaf, a tuple like ``factors``: the ``(d, d)`` orthogonal basis whose columns are
        eigenvectors by descending eigenvalue, or ``None``. A basis may be replaced between calls
        with ``state._replace(bases=...)`` (e.g. to feed two implementations the same basis after
        the first call); note that ``exp_avg`` is expressed in the current basis and is not rotated
        by such a replacement (it is zero right after the first call).
    """

    count: jax.Array
    exp_avg: optax.Updates
    exp_avg_sq: optax.Updates
    factors: Any
    bases: Any


def _is_traced(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


def _validate(learning_rate, **options) -> None:
    check_soap_options(traced=_is_traced, **options)
    if learning_rate is not None and not callable(learning_rate):
        check_nonnegative("learning_rate", learning_rate)


def _to_work(x: jax.Array, layout: SoapLayout) -> jax.Array:
    if layout.permutation is not None:
        x = jnp.transpose(x, layout.permutation)
    return x.reshape(layout.work_shape)


def _from_work(x: jax.Array, layout: SoapLayout) -> jax.Array:
    x = x.reshape(layout.permuted_shape)
    if layout.permutation is not None:
        x = jnp.transpose(x, layout.inverse_permutation)
    return x


@dataclass(frozen=True)
class _Hyper:
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


def _cast(x, dtype):
    return jnp.asarray(x).astype(dtype)


def _init_leaf(leaf, layout: SoapLayout):
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


def _stack(key, members, grads, layouts, leaves, hp: _Hyper, ops: _linalg.Contractions) -> dict:
    """One group's gradients, moments, bases and updated factors ``F ← β_s F + (1 − β_s) G_(i) G_(i)ᵀ``,
    stacked along a new leading axis. ``leaves`` are the state's flat ``(exp_avg, exp_avg_sq, factors,
    bases)``."""
    _, precond, dtype, *_ = key
    exp_avg, exp_avg_sq, factors, bases = leaves
    if isinstance(hp.shampoo_beta, numbers.Real):
        sb = _cast(hp.shampoo_beta if hp.shampoo_beta >= 0 else hp.betas[1], dtype)
    else:
        sb = jnp.where(_cast(hp.shampoo_beta, dtype) >= 0, _cast(hp.shampoo_beta, dtype), _cast(hp.betas[1], dtype))
    g = jnp.stack([_to_work(grads[k], layouts[k]).astype(dtype) for k in members])
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


def _adam_step(stacked, carry, hp: _Hyper, ops: _linalg.Contractions) -> list:
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


def _adam_and_refresh(stacked, carry, hp: _Hyper, decomposer: _linalg.Decomposer, ops: _linalg.Contractions):
    """A refresh call: the Adam step in the current bases, then :func:`_refresh` of the stacks with bases."""
    stepped = _adam_step(stacked, carry, hp, ops)
    todo = [k for k, c in enumerate(stepped) if any(q is not None for q in c["bases"])]
    stacks = [dict(stepped[k], v=stepped[k]["v"].reshape(stepped[k]["m"].shape)) for k in todo]
    refreshed = _refresh(stacks, [stacked[k]["factors"] for k in todo], decomposer, ops)
    out = list(stepped)
    for k, c in zip(todo, refreshed):
        out[k] = dict(c, v=c["v"].reshape(stepped[k]["v"].shape))
    return out


def _branches(stacked, count, hp: _Hyper, where: _distribution.Placement, ops: _linalg.Contractions) -> list:
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


def _direction(u, p, count, lr_now, dtype, hp: _Hyper):
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


def _update(hp: _Hyper, layout_of, where: _distribution.Placement, updates, state, params):
    """One SOAP step (see :func:`scale_by_soap`): ``(directions, new state)``."""
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
    for ((_, _, dtype, *_), members), ops, res in zip(groups, stacked, results):
        tf = t.astype(dtype)
        if hp.correct_bias:
            scale = jnp.sqrt(1 - jnp.power(_cast(b2, dtype), tf)) / (1 - jnp.power(_cast(b1, dtype), tf))
        else:
            scale = jnp.ones([], dtype)
        for j, k in enumerate(members):
            new["exp_avg"][k] = res["m"][j]
            new["exp_avg_sq"][k] = res["v"][j]
            new["factors"][k] = tuple(None if f is None else f[j] for f in ops["factors"])
            new["bases"][k] = tuple(None if q is None else q[j] for q in res["bases"])
            u = scale * _from_work(res["u"][j], layouts[k])  # u is zero on the first call
            out_dtype = jnp.asarray(param_leaves[k]).dtype if params is not None else grads[k].dtype
            new["directions"][k] = _direction(u, param_leaves[k], count, lr_now, dtype, hp).astype(out_dtype)

    new_state = ScaleBySoapState(
        count=optax.safe_increment(count),
        **{name: treedef.unflatten(new[name]) for name in ("exp_avg", "exp_avg_sq", "factors", "bases")},
    )
    return treedef.unflatten(new["directions"]), new_state


def _soap_transform(
    betas,
    shampoo_beta,
    eps,
    weight_decay,
    precondition_frequency,
    max_precond_dim,
    merge_dims,
    precondition_1d,
    normalize_grads,
    data_format,
    correct_bias,
    learning_rate,
    mesh_axes,
) -> optax.GradientTransformation:
    _validate(
        learning_rate,
        betas=betas,
        shampoo_beta=shampoo_beta,
        eps=eps,
        weight_decay=weight_decay,
        precondition_frequency=precondition_frequency,
        max_precond_dim=max_precond_dim,
        merge_dims=merge_dims,
        precondition_1d=precondition_1d,
        normalize_grads=normalize_grads,
        data_format=data_format,
        correct_bias=correct_bias,
    )
    mesh_axes = _distribution.check_mesh_axes(mesh_axes)
    hp = _Hyper(tuple(betas), shampoo_beta, eps, weight_decay, precondition_frequency, normalize_grads,
                correct_bias, learning_rate)

    def layout_of(shape) -> SoapLayout:
        return soap_layout(
            tuple(shape),
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            data_format=data_format,
        )

    def init_fn(params):
        _params.check_real(params, "so_optax.soap", "e.g. optax.contrib.split_real_and_imaginary(so_optax.soap(...))")
        where = _distribution.placement(mesh_axes)
        where.check_tree(params, "params", mesh_axes)
        leaves, treedef = jax.tree.flatten(params)
        per_leaf = [_init_leaf(x, layout_of(jnp.shape(x))) for x in leaves]
        exp_avg, factors, bases = ([leaf[i] for leaf in per_leaf] for i in range(3))
        state = ScaleBySoapState(
            count=jnp.zeros([], jnp.int32),
            exp_avg=treedef.unflatten(exp_avg),
            exp_avg_sq=treedef.unflatten([jnp.zeros_like(m) for m in exp_avg]),
            factors=treedef.unflatten(factors),
            bases=treedef.unflatten(bases),
        )
        return where.store(state)

    def update_fn(updates, state, params=None):
        if not hp.static_zero_decay and params is None:
            raise ValueError(
                "soap with weight_decay needs the parameters: call update(updates, state, params)"
            )
        where = _distribution.placement(mesh_axes)
        where.check_tree(updates, "updates", mesh_axes)
        where.check_tree(params, "params", mesh_axes)
        body = functools.partial(_update, hp, layout_of, where)
        return where.run(body, (updates, state, params), updates_like=updates, state_like=state)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_soap(
    betas: tuple[float, float] = (0.95, 0.95),
    shampoo_beta: float = -1,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    data_format: str = "channels_first",
    correct_bias: bool = True,
    *,
    mesh_axes: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformation:
    r"""Rescales updates by SOAP's preconditioner (no weight decay, no learning rate).

    Per parameter, with ``G`` the gradient reshaped to its work shape (see
    ``so_common.soap_layout``), factors ``F_i`` and eigenbases ``Q_i`` for the preconditioned
    dimensions, ``β_s = shampoo_beta`` if it is ``>= 0`` else ``betas[1]``:

    * first call: ``F_i = (1 − β_s) G_(i) G_(i)ᵀ``, ``Q_i`` = eigenvectors of ``F_i`` by
      descending eigenvalue; the returned direction is zero;
    * call ``t + 1`` (Adam step ``t = 1, 2, ...``)::

        G' = G ×_i Q_iᵀ
        m ← β1 m + (1 − β1) G'          v ← β2 v + (1 − β2) G'²
        u = (m / (√v + ε)) ×_i Q_i       [/ (1e-30 + rms(u)) if normalize_grads]
        direction = f_t u,  f_t = √(1 − β2ᵗ) / (1 − β1ᵗ)  (1 if not correct_bias)
        F_i ← β_s F_i + (1 − β_s) G_(i) G_(i)ᵀ
        if t % precondition_frequency == 0: refresh Q_i (power iteration + QR on the new F_i),
           permute v accordingly and rotate m into the new basis.

    The factors, bases, decompositions and moments are kept in float32 or wider whatever the
    parameter dtype; the direction is returned in the parameter dtype. A non-finite ``eigh`` or QR
    keeps the last good basis (the identity at the first call).

    Args:
      betas: Adam's ``(β1, β2)``.
      shampoo_beta: EMA coefficient of the factors; a negative value means ``betas[1]``.
      eps: added to ``√v``.
      precondition_frequency: refresh the eigenbases every this many Adam steps.
      max_precond_dim: dimensions larger than this use the identity basis.
      merge_dims: greedily merge consecutive dimensions while their product is at most
        ``max_precond_dim``.
      precondition_1d: also precondition 1-D parameters (if not larger than ``max_precond_dim``).
      normalize_grads: divide the preconditioned update of each tensor by its RMS.
      data_format: ``'channels_first'`` (NCHW) or ``'channels_last'`` (NHWC: 4-D tensors are
        permuted to NCHW before merging; only used with ``merge_dims``).
      correct_bias: apply Adam's bias correction ``f_t``.
      mesh_axes: the mesh axes (of the ``jax.set_mesh`` mesh) the optimizer may spread its state and
        decompositions over; default all (see :func:`soap`).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleBySoapState`.

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, 2024.
    """
    return _soap_transform(
        betas,
        shampoo_beta,
        eps,
        0.0,
        precondition_frequency,
        max_precond_dim,
        merge_dims,
        precondition_1d,
        normalize_grads,
        data_format,
        correct_bias,
        None,
        mesh_axes,
    )


def soap(
    betas: tuple[float, float] = (0.95, 0.95),
    shampoo_beta: float = -1,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    data_format: str = "channels_first",
    correct_bias: bool = True,
    learning_rate: ScalarOrSchedule | None = None,
    *,
    mesh_axes: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformation:
    r"""The SOAP optimizer's descent direction, with decoupled weight decay.

    Returns the *direction* ``d``: combine it with a (negative) learning rate,
    ``optax.chain(so_optax.soap(...), optax.scale(-lr))`` or
    ``optax.chain(so_optax.soap(...), optax.scale_by_learning_rate(schedule))``, so that
    ``p_new = p − lr · d``. With ``u`` the (bias-corrected) SOAP update of :func:`scale_by_soap`
    and ``λ = weight_decay``:

    * ``learning_rate=None``: ``d = u + λ p`` (AdamW's decoupled decay,
      ``p_new = p − lr·u − lr·λ·p``);
    * ``learning_rate`` given (a float or a schedule of the call count, 0 at the first call, the
      counter of ``optax.scale_by_learning_rate``): ``d = u + λ (p − lr·u)``, so that
      ``p_new = p₁ − lr·λ·p₁`` with ``p₁ = p − lr·u``: the reference implementation's order (decay
      of the already-updated parameter). The same ``lr`` must be used in the chain. The two
      conventions differ by a relative ``lr·λ`` in the decay term.

    The first call only builds the preconditioner: its direction is zero (no decay either).

    Args:
      betas: Adam's ``(β1, β2)``.
      shampoo_beta: EMA coefficient of the factors; a negative value means ``betas[1]``.
      eps: added to ``√v``.
      weight_decay: decoupled weight decay coefficient ``λ``.
      precondition_frequency: refresh the eigenbases every this many Adam steps.
      max_precond_dim: dimensions larger than this use the identity basis.
      merge_dims: greedily merge consecutive dimensions while their product is at most
        ``max_precond_dim``.
      precondition_1d: also precondition 1-D parameters (if not larger than ``max_precond_dim``).
      normalize_grads: divide the preconditioned update of each tensor by its RMS.
      data_format: ``'channels_first'`` (NCHW) or ``'channels_last'`` (NHWC), for 4-D tensors
        with ``merge_dims``.
      correct_bias: apply Adam's bias correction.
      learning_rate: optional; only used to reproduce the reference's post-step weight decay
        exactly (see above).
      mesh_axes: under ``jax.set_mesh(mesh)``, the axes (a name or a tuple of names) over which the
        optimizer may spread its state and its eigh/QR work; default ``None``: every axis. Each state
        array is split over them (a ``d × d`` factor by rows where the device count divides ``d``)
        and each device decomposes only its share of the factors. Parameters must not be sharded
        over an axis left out; a name the mesh lacks is a ``ValueError``. Without a mesh nothing
        changes. See ``docs/distributed-jax.md``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleBySoapState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, so_optax
      >>> def f(x): return jnp.sum(jnp.square(x @ jnp.array([[2.0, 0.0], [0.0, 0.5]])))
      >>> params = jnp.ones((3, 2))
      >>> opt = optax.chain(so_optax.soap(weight_decay=0.0), optax.scale(-0.1))
      >>> state = opt.init(params)
      >>> for _ in range(20):
      ...   updates, state = opt.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> bool(f(params) < f(jnp.ones((3, 2))))
      True

    With schedules or injected hyperparameters (numeric options ``eps``, ``weight_decay``,
    ``shampoo_beta``, ``learning_rate``, ``precondition_frequency`` may be traced)::

      opt = optax.inject_hyperparams(so_optax.soap, static_args=so_optax.SOAP_STATIC_ARGS)(
          learning_rate=schedule, weight_decay=0.01)
      # then chain with optax.scale_by_learning_rate(schedule), or read
      # state.hyperparams['learning_rate']. For bf16 parameters pass
      # hyperparam_dtype=jnp.float32, otherwise the injected values are rounded to bf16.

    References:
      Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
      <https://arxiv.org/abs/2409.11321>`_, 2024.
    """
    return _soap_transform(
        betas,
        shampoo_beta,
        eps,
        weight_decay,
        precondition_frequency,
        max_precond_dim,
        merge_dims,
        precondition_1d,
        normalize_grads,
        data_format,
        correct_bias,
        learning_rate,
        mesh_axes,
    )
