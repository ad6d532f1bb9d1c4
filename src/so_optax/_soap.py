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

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from so_common.soap_layout import SoapLayout, check_soap_options, soap_layout
from so_common.validation import check_nonnegative
from so_optax import _control, _factories, _lapack_lanes, _linalg, _params

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


def _validate(post_step_decay_lr, **options) -> None:
    check_soap_options(traced=_is_traced, **options)
    if post_step_decay_lr is not None and not callable(post_step_decay_lr):
        check_nonnegative("post_step_decay_lr", post_step_decay_lr)


def _to_work(x: jax.Array, layout: SoapLayout) -> jax.Array:
    if layout.permutation is not None:
        x = jnp.transpose(x, layout.permutation)
    return x.reshape(layout.work_shape)


def _from_work(x: jax.Array, layout: SoapLayout) -> jax.Array:
    x = x.reshape(layout.permuted_shape)
    if layout.permutation is not None:
        x = jnp.transpose(x, layout.inverse_permutation)
    return x


def _init_bases(factors, bases, lanes):
    """First call: eigenbases of the stacked factors (descending, decomposed in ``lanes``);
    identity dims stay ``None``."""
    return tuple(None if f is None else _linalg.stacked_eigh_descending(f, q, lanes) for f, q in zip(factors, bases))


def _refresh(stacks, factors, lanes):
    """Refresh of every stack: power iteration + QR per factor, permute ``v``, rotate ``m``.

    ``stacks`` are the stacks' carries after the Adam step (``m``, ``v`` in the work shape,
    ``bases``, ``u``) and ``factors`` their updated factors; returns their refreshed carries.
    ``exp_avg`` is taken back to the original coordinates with the old bases and projected onto the
    new ones; ``exp_avg_sq`` is permuted along each axis with the order of the refreshed basis.

    It runs in three phases over all stacks: the matmuls (``m`` back to the original coordinates,
    the power-iteration products), the QRs in ``lanes``, then the rest. With bounded lanes (a
    multi-threaded LAPACK on a CPU) the QRs start after every matmul of the first phase, the Adam
    step's included, and the third phase starts after the last QR, so LAPACK has the cores to itself.
    """
    originals = [jax.vmap(_linalg.project_back)(c["m"], c["bases"]) for c in stacks]
    products = [  # per axis: (sorted products, order, old basis in that order) or None
        tuple(None if q is None else _linalg.stacked_power_iteration_products(f, q) for f, q in zip(fac, c["bases"]))
        for fac, c in zip(factors, stacks)
    ]
    lanes.start_after([c["u"] for c in stacks] + originals + [ax[0] for axes in products for ax in axes if ax])
    new_qs = [
        tuple(None if ax is None else _linalg.stacked_orthonormal_factors(ax[0], lanes) for ax in axes)
        for axes in products
    ]
    out = []
    for c, original, axes, qs in zip(stacks, originals, products, new_qs):
        v, new_bases = c["v"], []
        for axis, (ax, q_new) in enumerate(zip(axes, qs)):
            if ax is None:
                new_bases.append(None)
                continue
            _, order, sorted_old = ax
            new_bases.append(_linalg.stacked_finite_or(q_new, sorted_old, lanes))
            v = jax.vmap(lambda x, o, a=axis: jnp.take(x, o, axis=a))(v, order)
        new_bases = tuple(new_bases)
        out.append(dict(c, m=jax.vmap(_linalg.project)(original, new_bases), v=v, bases=new_bases))
    return out


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
    b1, b2 = betas
    static_zero_decay = isinstance(weight_decay, numbers.Real) and weight_decay == 0

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
        leaves, treedef = jax.tree.flatten(params)
        exp_avg, factors, bases = [], [], []
        for leaf in leaves:
            layout = layout_of(jnp.shape(leaf))
            dtype = _linalg.compute_dtype(jnp.asarray(leaf).dtype)
            exp_avg.append(jnp.zeros(layout.work_shape, dtype))
            factors.append(
                tuple(
                    jnp.zeros((d, d), dtype) if on else None
                    for d, on in zip(layout.work_shape, layout.preconditioned)
                )
            )
            bases.append(
                tuple(
                    jnp.eye(d, dtype=dtype) if on else None
                    for d, on in zip(layout.work_shape, layout.preconditioned)
                )
            )
        return ScaleBySoapState(
            count=jnp.zeros([], jnp.int32),
            exp_avg=treedef.unflatten(exp_avg),
            exp_avg_sq=treedef.unflatten([jnp.zeros_like(m) for m in exp_avg]),
            factors=treedef.unflatten(factors),
            bases=treedef.unflatten(bases),
        )

    def update_fn(updates, state, params=None):
        grads, treedef = jax.tree.flatten(updates)
        n = len(grads)
        if not static_zero_decay and params is None:
            raise ValueError(
                "soap with weight_decay needs the parameters: call update(updates, state, params)"
            )
        param_leaves = treedef.flatten_up_to(params) if params is not None else [None] * n
        exp_avg = treedef.flatten_up_to(state.exp_avg)
        exp_avg_sq = treedef.flatten_up_to(state.exp_avg_sq)
        factors = treedef.flatten_up_to(state.factors)
        bases = treedef.flatten_up_to(state.bases)
        layouts = [layout_of(g.shape) for g in grads]

        count = state.count
        first = count == 0
        refresh = jnp.logical_and(~first, jnp.remainder(count, precondition_frequency) == 0)

        # Group the leaves whose per-tensor math is identical, so that each group is one batched
        # (vmapped) computation: same work shape, same preconditioned dims, same compute dtype.
        # Large tensors are not stacked: their matmuls are big enough on their own and stacking
        # would copy their factors, bases and moments on every step.
        group_of: dict = {}
        for k, (layout, m) in enumerate(zip(layouts, exp_avg)):
            key = (layout.work_shape, layout.preconditioned, jnp.dtype(m.dtype))
            if max(layout.factor_dims, default=0) > _STACK_MAX_DIM or m.size > _STACK_MAX_SIZE:
                key = key + (k,)
            group_of.setdefault(key, []).append(k)
        groups = list(group_of.items())

        def cast(x, dtype):
            return jnp.asarray(x).astype(dtype)

        stacked = []
        for (_, precond, dtype, *_), members in groups:
            sb_raw = shampoo_beta
            if isinstance(sb_raw, numbers.Real):
                sb = cast(sb_raw if sb_raw >= 0 else b2, dtype)
            else:
                sb = jnp.where(cast(sb_raw, dtype) >= 0, cast(sb_raw, dtype), cast(b2, dtype))
            g = jnp.stack([_to_work(grads[k], layouts[k]).astype(dtype) for k in members])
            fac, bas = [], []
            for axis, on in enumerate(precond):
                if not on:
                    fac.append(None)
                    bas.append(None)
                    continue
                old = jnp.stack([factors[k][axis].astype(dtype) for k in members])
                new = jax.vmap(lambda x, a=axis: _linalg.gram(x, a))(g)
                fac.append(sb * old + (1 - sb) * new)
                bas.append(jnp.stack([bases[k][axis].astype(dtype) for k in members]))
            stacked.append(
                dict(
                    g=g,
                    m=jnp.stack([exp_avg[k].astype(dtype) for k in members]),
                    v=jnp.stack([exp_avg_sq[k].astype(dtype) for k in members]),
                    factors=tuple(fac),
                    bases=tuple(bas),
                )
            )

        # Each call runs exactly one of three in-place branches (``_control.run_if``): the first
        # call builds the bases; a refresh call takes the Adam step in the current bases and then
        # refreshes them; any other call takes the Adam step alone. The direction ``u`` is carried
        # through the branches (zero on the first call). Taking the Adam step inside the branches
        # rather than before them lets XLA update the moments and bases in their donated buffers:
        # a basis read outside a loop that rewrites it is copied on every call. ``v`` is carried
        # flat, which keeps it row-major through the loops (the refresh's permutation along an axis
        # otherwise makes XLA pick a transposed loop layout and transpose ``v`` on every call).
        def adam_fn(carry):
            out = []
            for o, c in zip(stacked, carry):
                dtype = o["g"].dtype
                one = jnp.ones([], dtype)
                beta1, beta2, epsilon = cast(b1, dtype), cast(b2, dtype), cast(eps, dtype)
                gp = jax.vmap(_linalg.project)(o["g"], c["bases"])
                m = beta1 * c["m"] + (one - beta1) * gp
                v = beta2 * c["v"].reshape(gp.shape) + (one - beta2) * jnp.square(gp)
                u = jax.vmap(_linalg.project_back)(m / (jnp.sqrt(v) + epsilon), c["bases"])
                if normalize_grads:
                    axes = tuple(range(1, u.ndim))
                    rms = jnp.sqrt(jnp.mean(jnp.square(u), axis=axes, keepdims=True))
                    u = u / (cast(1e-30, dtype) + rms)
                out.append(dict(c, m=m, v=v.reshape(c["v"].shape), u=u))
            return out

        # The eigh/QR calls of all stacks share one ``_linalg.Lanes``: on a CPU, as many run at once
        # as LAPACK's threads leave cores for (``_lapack_lanes``).
        def first_fn(carry):  # the factors get their eigenbases
            out, lanes = [], _linalg.Lanes(_lapack_lanes.lane_count())
            for o, c in zip(stacked, carry):
                factors = _control.tied_to(o["factors"], c["bases"])
                out.append(dict(c, bases=_init_bases(factors, c["bases"], lanes)))
            return out

        def refresh_fn(carry):
            lanes = _linalg.Lanes(_lapack_lanes.lane_count())
            stepped = adam_fn(carry)
            todo = [k for k, c in enumerate(stepped) if any(q is not None for q in c["bases"])]
            stacks = [dict(stepped[k], v=stepped[k]["v"].reshape(stepped[k]["m"].shape)) for k in todo]
            refreshed = _refresh(stacks, [stacked[k]["factors"] for k in todo], lanes)
            out = list(stepped)
            for k, c in zip(todo, refreshed):
                out[k] = dict(c, v=c["v"].reshape(stepped[k]["v"].shape))
            return out

        carry = []
        for o in stacked:
            v_flat = o["v"].reshape(len(o["v"]), math.prod(o["v"].shape[1:]))
            carry.append(dict(m=o["m"], v=v_flat, bases=o["bases"], u=jnp.zeros_like(o["g"])))
        carry = _control.run_if(first, first_fn, carry)
        carry = _control.run_if(refresh, refresh_fn, carry)
        carry = _control.run_if(~first & ~refresh, adam_fn, carry)
        results = [dict(c, v=c["v"].reshape(c["m"].shape)) for c in carry]

        new_exp_avg, new_exp_avg_sq = [None] * n, [None] * n
        new_factors, new_bases, directions = [None] * n, [None] * n, [None] * n
        t = jnp.maximum(count, 1)
        lr_now = None
        if learning_rate is not None and not static_zero_decay:
            lr_now = learning_rate(count) if callable(learning_rate) else learning_rate
        for ((_, _, dtype, *_), members), ops, res in zip(groups, stacked, results):
            tf = t.astype(dtype)
            if correct_bias:
                scale = jnp.sqrt(1 - jnp.power(cast(b2, dtype), tf)) / (1 - jnp.power(cast(b1, dtype), tf))
            else:
                scale = jnp.ones([], dtype)
            for j, k in enumerate(members):
                layout = layouts[k]
                new_exp_avg[k] = res["m"][j]
                new_exp_avg_sq[k] = res["v"][j]
                new_factors[k] = tuple(None if f is None else f[j] for f in ops["factors"])
                new_bases[k] = tuple(None if q is None else q[j] for q in res["bases"])
                d = scale * _from_work(res["u"][j], layout)  # u is zero on the first call
                out_dtype = grads[k].dtype
                if params is not None:
                    out_dtype = jnp.asarray(param_leaves[k]).dtype
                if not static_zero_decay:
                    p = jnp.asarray(param_leaves[k]).astype(dtype)
                    wd = jnp.where(first, jnp.zeros([], dtype), cast(weight_decay, dtype))
                    if lr_now is None:
                        d = d + wd * p  # AdamW ordering
                    else:
                        # The reference decays the already-updated parameter: p1 = p - lr*d0,
                        # p2 = p1 - lr*wd*p1, i.e. direction d0 + wd*(p - lr*d0).
                        d = d * (1 - cast(lr_now, dtype) * wd) + wd * p
                directions[k] = d.astype(out_dtype)

        new_state = ScaleBySoapState(
            count=optax.safe_increment(count),
            exp_avg=treedef.unflatten(new_exp_avg),
            exp_avg_sq=treedef.unflatten(new_exp_avg_sq),
            factors=treedef.unflatten(new_factors),
            bases=treedef.unflatten(new_bases),
        )
        return treedef.unflatten(directions), new_state

    return optax.GradientTransformation(init_fn, update_fn)


@_factories.keyword_only("scale_by_soap")
def scale_by_soap(
    *,
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
    )


@_factories.keyword_only(
    "soap",
    notes={"learning_rate": "To apply the weight decay after the step, as the reference implementation does, "
                            "pass the chain's learning rate (or schedule) as post_step_decay_lr= as well."},
)
def soap(
    *,
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
    post_step_decay_lr: ScalarOrSchedule | None = None,
) -> optax.GradientTransformation:
    r"""The SOAP optimizer's descent direction, with decoupled weight decay.

    Returns the *direction* ``d``: combine it with a (negative) learning rate,
    ``optax.chain(so_optax.soap(...), optax.scale(-lr))`` or
    ``optax.chain(so_optax.soap(...), optax.scale_by_learning_rate(schedule))``, so that
    ``p_new = p − lr · d``. With ``u`` the (bias-corrected) SOAP update of :func:`scale_by_soap`
    and ``λ = weight_decay``:

    * ``post_step_decay_lr=None``: ``d = u + λ p`` (AdamW's decoupled decay,
      ``p_new = p − lr·u − lr·λ·p``);
    * ``post_step_decay_lr=lr`` (the chain's learning rate: a float, or a schedule of the call count,
      0 at the first call, the counter of ``optax.scale_by_learning_rate``): ``d = u + λ (p − lr·u)``,
      so that ``p_new = p₁ − lr·λ·p₁`` with ``p₁ = p − lr·u``: the reference implementation's order
      (decay of the already-updated parameter). It does not scale the step: the chain still needs
      ``optax.scale(-lr)`` with the same ``lr``. The two conventions differ by a relative ``lr·λ`` in
      the decay term.

    All options are keyword-only. A positional argument (``soap(1e-3)``, the ``optax.adamw(lr)``
    habit), ``lr=`` or ``learning_rate=`` raises a ``TypeError`` that shows the chain.

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
      post_step_decay_lr: optional; the chain's learning rate (or schedule), given only to apply the
        weight decay after the step exactly as the reference implementation does (see above).

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
    ``shampoo_beta``, ``post_step_decay_lr``, ``precondition_frequency`` may be traced)::

      opt = optax.inject_hyperparams(so_optax.soap, static_args=so_optax.SOAP_STATIC_ARGS)(
          post_step_decay_lr=schedule, weight_decay=0.01)
      # then chain with optax.scale_by_learning_rate(schedule), or read
      # state.hyperparams['post_step_decay_lr']. For bf16 parameters pass
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
        post_step_decay_lr,
    )
