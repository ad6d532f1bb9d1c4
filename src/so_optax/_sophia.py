r"""Sophia (Sophia-G and Sophia-H) as a pure optax transformation.

Liu, Li, Hall, Liang and Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
Model Pre-training", 2023, arXiv:2305.14342.

Sophia keeps an EMA ``m`` of the gradients and an EMA ``h`` of a stochastic estimate ``ĥ`` of the
Hessian diagonal, refreshed every ``k`` steps only, and steps along the element-wise clipped
ratio ``m / h``: a Newton-like step where the curvature is trusted and a sign-momentum step of
bounded size where it is not (small, negative or stale ``h``). Here: the options, the state and its
win rate; the step's math is in ``_sophia_step``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from so_common import validation
from so_optax import _distribution, _factories, _params
from so_optax import _hessian_estimators as _est
from so_optax import _sophia_step as _step

__all__ = ["SOPHIA_STATIC_ARGS", "SophiaClipRule", "SophiaState", "sophia", "sophia_win_rate"]

# Arguments of :func:`sophia` that ``optax.inject_hyperparams`` must treat as static (a callable
# ``weight_decay_mask`` would otherwise be taken for a schedule; the seed only matters at init).
# Strings, bools, tuples and transformations are static anyway; rho, weight_decay, eps, gamma and
# k may be injected.
SOPHIA_STATIC_ARGS = ("seed", "weight_decay_mask")

PyTree = Any

_FORMS = ("seed", "paper")
_ESTIMATORS = ("gnb", "hutchinson")


def _state_dtype(dtype) -> jnp.dtype:
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dtype, jnp.float32)


def _make_estimator(estimator, form: str, seed) -> optax.GradientTransformationExtraArgs:
    if isinstance(estimator, str):
        validation.check_choice("estimator", estimator, _ESTIMATORS)
        if estimator == "gnb":
            return _est.gnb_hessian_estimator(seed, scale_by_batch_size=(form == "paper"))
        return _est.hutchinson_hessian_estimator(
            seed, distribution="gaussian", absolute=(form == "seed")
        )
    if not (callable(getattr(estimator, "init", None)) and callable(getattr(estimator, "update", None))):
        raise ValueError(
            f"Invalid estimator: {estimator!r} (must be 'gnb', 'hutchinson' or an optax "
            "GradientTransformation whose update returns the Hessian-diagonal estimate)"
        )
    return optax.with_extra_args_support(estimator)


class SophiaClipRule(NamedTuple):
    """The ratio and clipping rule of one :func:`sophia` transformation, as arrays in its state.

    Both forms are ``r = m̂ / max(gamma·hessian_scale·h + shift, floor)`` clipped to ``±bound``,
    with ``m̂ = m / (1 − bias_decay^t)``: the seed form is ``gamma = 1, shift = eps, floor = −inf,
    bound = rho``, the paper form ``shift = 0, floor = eps, bound = 1``; ``bias_decay`` is ``β1``
    with ``bias_correction`` and ``0`` (no correction) without; ``hessian_scale`` is
    ``1 / (1 − β2ⁿ)`` after ``n ≥ 1`` refreshes with ``hessian_bias_correction`` and ``1``
    otherwise (it is the one field that changes between steps). The step and
    :attr:`SophiaState.win_rate` both evaluate this one rule, so they agree exactly.
    """

    gamma: jax.Array
    shift: jax.Array
    floor: jax.Array
    bound: jax.Array
    bias_decay: jax.Array
    hessian_scale: jax.Array


def _clip_rule(form: str, rho, gamma, eps, b1, bias_correction: bool) -> SophiaClipRule:
    def scalar(x):
        return jnp.asarray(x, jnp.result_type(float))

    if form == "seed":
        rule = (1.0, eps, -jnp.inf, rho)
    else:
        rule = (gamma, 0.0, eps, 1.0)
    return SophiaClipRule(*map(scalar, rule), bias_decay=scalar(b1 if bias_correction else 0.0),
                          hessian_scale=scalar(1.0))


@jax.jit
def _win_rate(state: SophiaState) -> jax.Array:
    leaves = jax.tree.leaves(_step.ratios(state.mu, state.nu, state.count, state.clip_rule))
    size = sum(int(np.prod(np.shape(r))) for r in leaves)
    if not size:
        return jnp.ones([], jnp.float32)
    rate = _step.count_below(leaves, state.clip_rule.bound) / size
    return jnp.where(state.count > 0, rate, 1.0).astype(jnp.float32)


class SophiaState(NamedTuple):
    """State of :func:`sophia` (all arrays; jits, checkpoints and shards like any optax state).

    Attributes:
      count: int32, number of ``update`` calls so far (the step ``t`` of the last call).
      mu: EMA of the gradients ``m`` (pytree like params, float32 or wider).
      nu: EMA of the Hessian-diagonal estimates ``h`` (pytree like params, float32 or wider). It
        starts at 0 and changes only on refresh steps ``t = k, 2k, ...``. Tests may replace it with
        ``state._replace(nu=...)``.
      estimator_state: the Hessian estimator's state (holds its PRNG key).
      clip_rule: the :class:`SophiaClipRule` of the last step (scalars; traced hyperparameters, e.g.
        under ``optax.inject_hyperparams``, are recorded as they were at that step).
    """

    count: jax.Array
    mu: PyTree
    nu: PyTree
    estimator_state: Any
    clip_rule: SophiaClipRule

    @property
    def win_rate(self) -> jax.Array:
        """float32 scalar: the fraction of coordinates whose ratio was *not* clipped at the last step.

        The paper's diagnostic (the authors suggest keeping it roughly in 0.1-0.5, raising
        ``rho``/``gamma`` if it is lower). Evaluated when read, from ``mu``, ``nu`` and ``count``
        (which are the ``m`` and ``h`` the last step used) and ``clip_rule``: the step itself does
        not count (a count is a full pass over the parameters, about a quarter of an AdamW step).
        Works on device, inside or outside ``jit``; 1.0 before the first step. For a state nested
        in a chain or wrapper, :func:`sophia_win_rate` finds it.
        """
        return _win_rate(self)


def sophia_win_rate(opt_state: Any) -> jax.Array:
    """The :attr:`SophiaState.win_rate` of the one :func:`sophia` state inside ``opt_state``.

    ``opt_state`` may be any optimizer state containing it (``optax.chain``,
    ``optax.inject_hyperparams``, ...). Raises ``ValueError`` if it holds no or several.
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SophiaState))
        if isinstance(s, SophiaState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"Invalid opt_state: sophia_win_rate needs exactly one so_optax.sophia state in it, found "
            f"{len(found)}"
        )
    return found[0].win_rate


@_factories.keyword_only("sophia")
def sophia(
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    rho: float = 0.03,
    weight_decay: float = 0.0,
    k: int = 10,
    estimator: str | optax.GradientTransformation = "gnb",
    eps: float = 1e-12,
    form: str = "seed",
    gamma: float = 0.01,
    bias_correction: bool = False,
    hessian_bias_correction: bool = False,
    early_refresh_steps: int = 0,
    seed: int | jax.Array = 0,
    weight_decay_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    mesh_axes: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Sophia: clipped, diagonally preconditioned momentum (Sophia-G / Sophia-H).

    Returns the *direction* ``d``; compose with a learning rate,
    ``optax.chain(so_optax.sophia(...), optax.scale(-lr))`` (or
    ``optax.scale_by_learning_rate(schedule)``), for the parameter update ``p ← p − lr·d``. All
    options are keyword-only: a positional argument, ``lr=`` or ``learning_rate=`` raises a
    ``TypeError`` that shows the chain.

    At call ``t = 1, 2, ...`` with gradient ``g``::

        m ← β1·m + (1 − β1)·g                        (m̂ = m / (1 − β1^t) if bias_correction)
        if t % k == 0 or t <= early_refresh_steps:
            ĥ = estimator(params);  h ← β2·h + (1 − β2)·ĥ;  n ← n + 1     (h and n start at 0)
        ĥ̄ = h / (1 − β2ⁿ) if hessian_bias_correction and n > 0, else h
        seed form:   u = clip(m̂ / (ĥ̄ + eps), −rho, rho)
        paper form:  u = clip(m̂ / max(gamma·ĥ̄, eps), −1, 1)
        d = u + weight_decay·p

    The estimate is computed *only* on refresh steps (under ``lax.cond``; one compiled program
    for all steps) and the refreshed ``h`` is used in the same step. Early steps (``h = 0``) are
    sign-momentum steps of size ``rho`` (seed) or 1 (paper).

    Estimators (``estimator=``):

    * ``'gnb'`` (Sophia-G, :func:`so_optax.gnb_hessian_estimator`): sample ``ŷ ~ softmax(logits)``
      once for the batch, ``ĥ = ĝ ⊙ ĝ`` with ``ĝ`` the gradient of the mean cross-entropy on the
      sampled labels. Paper form scales by the number ``B`` of counted label positions
      (``ĥ = B·ĝ ⊙ ĝ``, an unbiased estimate of the Gauss-Newton diagonal); the seed form does not.
      Needs ``update(..., logits_fn=lambda p: logits(p))``, logits ``(..., C)`` (e.g. ``(B, C)``
      or ``(B, T, C)``), and optionally ``logits_mask=`` of shape ``logits.shape[:-1]``
      (``False`` = padding, left out of the mean and of ``B``).
    * ``'hutchinson'`` (Sophia-H, :func:`so_optax.hutchinson_hessian_estimator`): Gaussian probe
      ``v``, ``ĥ = |v ⊙ Hv|`` in the seed form (as the seed does) and the unbiased ``v ⊙ Hv`` in
      the paper form (negative entries are handled by ``max(gamma·h, eps)``). Needs
      ``update(..., obj_fn=lambda p: loss(p))``.
    * any optax transformation whose ``update(grads, state, params, **extra_args)`` returns a
      Hessian-diagonal estimate shaped like ``params`` (e.g. the estimators above built with
      other options, such as Rademacher probes). It receives the gradients and every extra
      argument given to ``update``.

    Deterministic randomness (tests, cross-checks against another framework): the extra
    arguments ``sampled_labels=`` (GNB, shape ``logits.shape[:-1]``) and ``probe=`` (Hutchinson, a
    pytree like params) are forwarded to the built-in estimators and replace their sampling; a
    fixed estimate can be injected with a user transformation such as
    ``GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
    lambda u, s, p=None, *, hessian_estimate=None, **kw: (hessian_estimate, s))`` and
    ``update(..., hessian_estimate=tree)``.

    A missing ``logits_fn`` / ``obj_fn`` raises a ``ValueError`` naming it when ``update`` is
    traced, on every step (pass it every step; it is evaluated on refresh steps only).

    **The two parameterisations.** Writing ``h_seed`` for the EMA of the seed-form estimates::

        seed:   u = clip(m/(h_seed + eps), −ρ, ρ) = ρ · clip(m/(ρ·h_seed + ρ·eps), −1, 1)

    so ``form='seed'`` with ``(lr, rho)`` takes the same steps as ``form='paper'`` with
    ``lr_paper = lr·rho`` and ``gamma·c = rho`` where ``h_paper = c·h_seed``, up to the eps
    handling (additive ``rho·eps`` vs ``max(·, eps)``): ``c = 1`` for Hutchinson (``gamma = rho``;
    the paper form drops the seed's absolute value), ``c = B`` for GNB (``gamma = rho / B``; the
    paper form scales ĥ by the batch size ``B``). The official SophiaG GPT-2 recipe
    (``p ← p(1 − lr·wd) − lr·clip(m / (ρ·bs·h + 1e-15), 1)`` with ``h`` the EMA of ``ĝ ⊙ ĝ``,
    lr 3e-4 to 6e-4 with warmup and cosine decay, betas (0.965, 0.99), ρ 0.03–0.05,
    weight_decay 0.2 on matrices only, k = 10) is::

        tx = optax.chain(
            so_optax.sophia(betas=(0.965, 0.99), weight_decay=0.2, k=10, form='paper',
                            gamma=0.05, estimator='gnb',
                            weight_decay_mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
            optax.scale_by_learning_rate(lr_schedule))

    Here ``B`` is the number of counted label positions of the ``logits_fn`` batch; the official
    script multiplies by its own ``bs`` argument instead, so to reproduce its numbers exactly use
    ``gamma = ρ·bs / B``.
    (the official loop refreshes ``h`` after the step of iteration ``t ≡ 0 mod k`` at the new
    parameters, so it is used from step ``t + 1``; here it is refreshed at the current parameters
    and used at step ``t``, as in the seed.)

    **Short runs.** With ``h`` started at 0, the EMA holds only ``1 − β2ⁿ`` of the curvature's
    scale after ``n`` refreshes (45% after 60 refreshes at β2 = 0.99), so ``gamma·h`` is several
    times too small, and more coordinates are clipped, for much of a short run.
    ``hessian_bias_correction=True`` divides by ``1 − β2ⁿ`` (Adam's correction, applied to the
    refresh count; ``h`` itself and the checkpointed state are unchanged), and
    ``early_refresh_steps=E`` also refreshes at every step ``t ≤ E``, so that the first steps are not
    sign steps and the first ``h`` averages ``E`` estimates (``E`` more estimator calls in all).
    Both are off by default: the seed's and the paper's rules are the default.

    **Weight decay.** ``d = u + weight_decay·p``, so ``p ← p·(1 − lr·weight_decay) − lr·u`` (the
    AdamW / official Sophia convention). The seed's torch optimizer applies ``p ← p·(1 − w)`` with
    its ``weight_decay = w``, i.e. ``weight_decay = w / lr`` here.

    Args:
      betas: ``(β1, β2)``: EMA rates of the gradient and of the Hessian estimate (the
        effective per-step rate of ``h`` is about ``1 − (1 − β2)/k``).
      rho: clipping threshold of the seed form (unused in the paper form).
      weight_decay: decoupled weight decay added to the direction (see above).
      k: refresh the Hessian estimate every ``k`` steps (``t = k, 2k, ...``).
      estimator: ``'gnb'``, ``'hutchinson'`` or a transformation (see above).
      eps: seed form: added to ``h``; paper form: lower bound of ``gamma·h`` (must be ``> 0``).
      form: ``'seed'`` (default; the seed optimizer's rule) or ``'paper'`` (the paper's).
      gamma: the paper form's curvature scale, ``> 0`` (called ρ in the paper's code; unused in the
        seed form).
      bias_correction: divide ``m`` by ``1 − β1^t`` (Adam-style); off in the seed and in the
        official SophiaG, on in the official SophiaH.
      hessian_bias_correction: divide ``h`` by ``1 − β2ⁿ`` in the ratio, ``n`` the number of
        refreshes so far (see *Short runs*); off in the seed and the paper.
      early_refresh_steps: also refresh ``h`` at every step ``t ≤ early_refresh_steps`` (default 0:
        only at ``t = k, 2k, ...``).
      seed: int or PRNG key for the built-in estimators (ignored for a user transformation).
      weight_decay_mask: optional pytree of bools with the structure of params (or a prefix of
        it), or a function ``params -> such a pytree``; weight decay applies where ``True``.
      mesh_axes: under ``jax.set_mesh(mesh)``, the mesh axes (a name or a tuple of names) the state
        may be split over; default ``None``: every axis. ``m`` and ``h`` are stored split along their
        first dimension the device count divides (as so_optax.soap's state; the returned direction
        is sharded like the gradients); the estimators' randomness does not depend on the mesh.
        Parameters must not be sharded over an axis left out; a name the mesh lacks is a
        ``ValueError``. See ``docs/distributed-jax.md``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with :class:`SophiaState`. Its ``update``
      is ``update(grads, state, params, *, logits_fn=None, logits_mask=None, obj_fn=None,
      **estimator_extra_args)``; ``params`` is required. Numeric options (``rho``,
      ``weight_decay``, ``eps``, ``gamma``, ``k``, ``early_refresh_steps``) may be traced, e.g. under
      ``optax.inject_hyperparams(so_optax.sophia, static_args=so_optax.SOPHIA_STATIC_ARGS)``.

    Example (Sophia-G in a jitted step)::

        tx = optax.chain(so_optax.sophia(estimator='gnb'), optax.scale(-1e-3))
        state = tx.init(params)

        @jax.jit
        def train_step(params, state, x, y):
            logits_fn = lambda p: model.apply(p, x)
            grads = jax.grad(lambda p: loss(logits_fn(p), y))(params)
            updates, state = tx.update(grads, state, params, logits_fn=logits_fn)
            return optax.apply_updates(params, updates), state

    References:
      Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
      Pre-training <https://arxiv.org/abs/2305.14342>`_, 2023.
    """
    validation.check_betas("betas", betas)
    validation.check_choice("form", form, _FORMS)
    validation.check_nonnegative("rho", rho)
    validation.check_nonnegative("weight_decay", weight_decay)
    validation.check_nonnegative("eps", eps)
    validation.check_positive("gamma", gamma)
    if form == "paper":  # max(gamma * h, eps) is the divisor: 0 would divide 0 by 0
        validation.check_positive("eps", eps)
    validation.check_bool("bias_correction", bias_correction)
    validation.check_bool("hessian_bias_correction", hessian_bias_correction)
    if _step.is_python_number(early_refresh_steps) or isinstance(early_refresh_steps, (bool, np.generic)):
        validation.check_nonnegative_int("early_refresh_steps", early_refresh_steps)
    if _step.is_python_number(k) or isinstance(k, (bool, np.generic)):
        validation.check_positive_int("k", k)
    est = _make_estimator(estimator, form, seed)
    mesh_axes = _distribution.check_mesh_axes(mesh_axes)
    b1, b2 = betas
    clip_rule = _clip_rule(form, rho, gamma, eps, b1, bias_correction)
    hp = _step.Hyper(b1, b2, k, early_refresh_steps, weight_decay, weight_decay_mask, hessian_bias_correction,
                     clip_rule)

    def init_fn(params):
        _params.check_real(params, "so_optax.sophia", "e.g. a real array of shape (..., 2) viewed as complex "
                           "in the model (obj_fn and logits_fn then see the real parameters)")

        where = _distribution.placement(mesh_axes)
        where.check_tree(params, "params", mesh_axes)

        def zeros(p):
            return jnp.zeros(jnp.shape(p), _state_dtype(jnp.result_type(p)))

        return where.store(SophiaState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
            estimator_state=est.init(params),
            clip_rule=clip_rule,
        ))

    def update_fn(updates, state: SophiaState, params=None, **extra_args):
        if params is None:
            raise ValueError("Missing params: so_optax.sophia needs update(grads, state, params, ...)")
        where = _distribution.placement(mesh_axes)
        where.check_tree(params, "params", mesh_axes)
        direction, fields = _step.update(hp, est, where, updates, state, params, extra_args)
        return direction, where.store(SophiaState(**fields))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
