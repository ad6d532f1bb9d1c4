r"""One Sophia step, the math behind ``so_optax.sophia`` (Liu et al. 2023, arXiv:2305.14342).

At call ``t = 1, 2, ...`` with gradient ``g``, elementwise::

    m ← β1·m + (1 − β1)·g                        m̂ = m / (1 − bias_decay^t)
    if t % k == 0 or t <= early_refresh_steps:   h ← β2·h + (1 − β2)·ĥ   (ĥ the estimator's; n refreshes so far)
    r = m̂ / max(gamma·hessian_scale·h + shift, floor)        hessian_scale = 1 / (1 − β2ⁿ) or 1
    d = clip(r, −bound, bound) + weight_decay·p

with the scalars of the transformation's ``SophiaClipRule`` (seed form: ``gamma = 1, shift = eps,
floor = −inf, bound = rho``; paper form: ``shift = 0, floor = eps, bound = 1``). The estimate is computed
only on refresh steps (under ``lax.cond``: one compiled program for all steps). The win rate counts the
coordinates with ``|r| < bound``. Where the state is stored (one device or a mesh) is the step's
``_distribution.Placement``; the math here is the same for both.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from so_optax import _distribution

if TYPE_CHECKING:
    from so_optax._sophia import SophiaClipRule, SophiaState

PyTree = Any

# Leaves below this many elements are concatenated before counting (one reduction instead of one
# per small leaf: on CPU each reduction has a fixed cost); float32 sums of 0/1 are exact below 2**24.
_SMALL_LEAF = 1 << 16
_EXACT_F32 = 1 << 24


def is_python_number(x: Any) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


class Hyper(NamedTuple):
    """The options of one :func:`so_optax.sophia` transformation that its step reads (numbers may be
    traced, e.g. under ``optax.inject_hyperparams``)."""

    b1: Any
    b2: Any
    k: Any
    early_refresh_steps: Any
    weight_decay: Any
    weight_decay_mask: Any
    hessian_bias_correction: bool
    clip_rule: SophiaClipRule

    @property
    def static_k_is_one(self) -> bool:
        return isinstance(self.k, numbers.Integral) and not isinstance(self.k, bool) and self.k == 1

    @property
    def no_early(self) -> bool:
        return is_python_number(self.early_refresh_steps) and self.early_refresh_steps == 0


def count_below(leaves, threshold) -> jax.Array:
    """float32 number of entries with ``|r| < threshold`` over all ``leaves`` (exact per leaf).

    Counts in float32 (a 0/1 float sum fuses with the comparison, an int32 sum of a boolean does
    not on CPU), exact because every partial sum is an integer below 2**24; larger leaves are counted
    in int32 as before.
    """

    def indicator(r):
        return jnp.where(jnp.abs(r) < threshold, 1.0, 0.0).astype(jnp.float32)

    counts = []
    group, group_size = [], 0

    def flush():
        if group:
            flat = group[0] if len(group) == 1 else jnp.concatenate(group)
            counts.append(jnp.sum(flat))

    for r in leaves:
        n = int(np.prod(np.shape(r)))
        if n >= _EXACT_F32:
            counts.append(jnp.sum(jnp.abs(r) < threshold).astype(jnp.float32))
        elif n >= _SMALL_LEAF:
            counts.append(jnp.sum(indicator(r)))
        else:
            if group_size + n >= _EXACT_F32:
                flush()
                group, group_size = [], 0
            group.append(jnp.ravel(indicator(r)))
            group_size += n
    flush()
    return sum(counts, jnp.zeros([], jnp.float32))


def refreshes(count: jax.Array, k, early_refresh_steps) -> jax.Array:
    """Number of refresh steps among ``1..count``: every ``t <= early_refresh_steps`` and every
    multiple of ``k`` after it, ``min(t, E) + max(0, ⌊t/k⌋ − ⌊E/k⌋)``."""
    n = count // k
    if is_python_number(early_refresh_steps) and early_refresh_steps == 0:
        return n
    return jnp.minimum(count, early_refresh_steps) + jnp.maximum(n - early_refresh_steps // k, 0)


def hessian_scale(n: jax.Array, b2: float, like: jax.Array) -> jax.Array:
    """``1 / (1 − β2ⁿ)``, the bias correction of an EMA started at 0 after ``n`` updates (1 for n = 0).

    As ``−1 / expm1(n·log β2)`` with ``log β2`` taken in float64: ``1 − β2`` in float32 would be off by
    1e-5 relative for β2 = 0.999.
    """
    log_b2 = jnp.asarray(math.log(b2) if b2 > 0 else -jnp.inf, like.dtype)
    scale = -1.0 / jnp.expm1(n.astype(like.dtype) * log_b2)
    return jnp.where(n > 0, scale, 1.0).astype(like.dtype)


def ratios(mu: PyTree, nu: PyTree, count: jax.Array, rule: SophiaClipRule) -> PyTree:
    """The unclipped ratios ``m̂ / max(gamma·h + shift, floor)`` (see ``SophiaClipRule``)."""
    m_hat = optax.tree.bias_correction(mu, rule.bias_decay, count)

    def ratio(m, n):
        gamma, shift, floor, scale = (
            x.astype(n.dtype) for x in (rule.gamma, rule.shift, rule.floor, rule.hessian_scale)
        )
        return m / jnp.maximum((gamma * scale) * n + shift, floor)

    return jax.tree.map(ratio, m_hat, nu)


def clip(bound: jax.Array) -> Callable[[jax.Array], jax.Array]:
    def clip_leaf(r):
        b = bound.astype(r.dtype)
        return jnp.clip(r, -b, b)

    return clip_leaf


def _decayed(direction: PyTree, params: PyTree, hp: Hyper, where: _distribution.Placement) -> PyTree:
    """``d + weight_decay·p``, where ``weight_decay_mask`` is ``True`` (everywhere without a mask)."""
    if is_python_number(hp.weight_decay) and hp.weight_decay == 0:
        return direction
    mask = hp.weight_decay_mask(params) if callable(hp.weight_decay_mask) else hp.weight_decay_mask

    stored_params = where.store(params)

    def decay(d, p):
        return d + hp.weight_decay * p.astype(d.dtype)

    if mask is None:
        return jax.tree.map(decay, direction, stored_params)

    def masked_decay(flag, d_sub, p_sub):
        return jax.tree.map(lambda d, p: jnp.where(flag, decay(d, p), d), d_sub, p_sub)

    return jax.tree.map(masked_decay, mask, direction, stored_params)


def update(hp: Hyper, est, where: _distribution.Placement, grads, state: SophiaState, params, extra_args: dict):
    """One Sophia step on a ``SophiaState``: ``(direction, the new state's fields as a dict)``. ``est`` is the
    Hessian-diagonal estimator (evaluated on refresh steps only), ``extra_args`` the ``update`` call's."""
    # The moments' math runs where the state is stored; the estimator sees the user's arrays.
    b1, b2 = hp.b1, hp.b2
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g.astype(m.dtype), state.mu, where.store(grads))

    def refresh(est_state, nu):
        h_hat, est_state = est.update(grads, est_state, params, **extra_args)
        nu = jax.tree.map(lambda n, e: b2 * n + (1.0 - b2) * e.astype(n.dtype), nu, where.store(h_hat))
        return where.store(est_state), where.store(nu)

    def keep(est_state, nu):
        return est_state, nu

    if hp.static_k_is_one:
        est_state, nu = refresh(state.estimator_state, state.nu)
    else:
        due = count % hp.k == 0
        if not hp.no_early:
            due = due | (count <= hp.early_refresh_steps)
        est_state, nu = jax.lax.cond(due, refresh, keep, state.estimator_state, state.nu)

    rule = hp.clip_rule
    if hp.hessian_bias_correction:
        n = count if hp.static_k_is_one else refreshes(count, hp.k, hp.early_refresh_steps)
        rule = rule._replace(hessian_scale=hessian_scale(n, b2, rule.hessian_scale))
    direction = jax.tree.map(clip(rule.bound), ratios(mu, nu, count, rule))
    direction = _decayed(direction, params, hp, where)
    direction = jax.tree.map(lambda d, g: d.astype(jnp.result_type(g)), direction, grads)
    direction = where.like(direction, grads)
    return direction, dict(count=count, mu=mu, nu=nu, estimator_state=est_state, clip_rule=rule)
