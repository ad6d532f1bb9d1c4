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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from so_common.soap_layout import SoapLayout, check_soap_options, soap_layout
from so_common.validation import check_nonnegative
from so_optax import _distribution, _factories, _params, _soap_step

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]

#: Options of :func:`soap` / :func:`scale_by_soap` that fix shapes and control flow. Pass them as
#: ``static_args`` to ``optax.inject_hyperparams`` (``max_precond_dim`` is the one that is required:
#: it is an ``int`` and would otherwise be traced; the booleans and the string are static anyway).
SOAP_STATIC_ARGS = ("max_precond_dim", "merge_dims", "precondition_1d", "data_format")


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
    hp = _soap_step.Hyper(tuple(betas), shampoo_beta, eps, weight_decay, precondition_frequency, normalize_grads,
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
        per_leaf = [_soap_step.init_leaf(x, layout_of(jnp.shape(x))) for x in leaves]
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

        def body(updates, state, params, arrays):
            directions, fields = _soap_step.update(hp.with_arrays(arrays), layout_of, where, updates, state, params)
            return directions, ScaleBySoapState(**fields)

        return where.run(body, (updates, state, params, hp.arrays()), updates_like=updates, state_like=state)

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
    mesh_axes: str | tuple[str, ...] | None = None,
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
        mesh_axes,
    )
