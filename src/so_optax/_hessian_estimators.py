"""Stochastic estimators of the Hessian diagonal used by Sophia.

Two estimators from Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training" (arXiv:2305.14342), section 2.3:

* **Gauss-Newton-Bartlett (GNB, Sophia-G).** For a loss that is a cross-entropy on logits
  ``f(θ)`` (shape ``(..., C)``), sample labels ``ŷ ~ softmax(f(θ))`` once for the batch and take
  the gradient of the mean cross-entropy on the *sampled* labels::

      ĝ = ∇_θ (1/N) Σ_n CE(f_n(θ), ŷ_n) = (1/N) Σ_n J_nᵀ (p_n − e_{ŷ_n}),     ĥ = ĝ ⊙ ĝ

  where ``J_n = ∂f_n/∂θ``, ``p_n = softmax(f_n)`` and ``N`` is the number of (unmasked) label
  positions. Because ``E[p_n − e_{ŷ_n}] = 0`` and the samples are independent across positions,
  ``E[ĝ ĝᵀ] = (1/N²) Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n = GGN / N`` with the Gauss-Newton matrix
  ``GGN = (1/N) Σ_n J_nᵀ H_n J_n`` of the mean loss (``H_n`` the Hessian of CE in the logits).
  The paper therefore uses ``ĥ = N · ĝ ⊙ ĝ`` (``scale_by_batch_size=True``), an unbiased
  estimate of ``diag(GGN)``; the seed implementation uses the unscaled ``ĝ ⊙ ĝ``.
  Cost: one forward and one backward pass (a single VJP through ``logits_fn``), for all
  parameters at once.

* **Hutchinson (Sophia-H).** For a scalar objective ``L(θ)`` and a probe ``v`` with
  ``E[v vᵀ] = I``::

      ĥ = v ⊙ (H v),     E[ĥ] = diag(H)

  with ``H v`` computed forward-over-reverse as ``jax.jvp(jax.grad(L), (θ,), (v,))[1]``: one
  Hessian-vector product for the whole parameter pytree. Probes are Gaussian (the seed's and the
  paper's choice) or Rademacher (lower variance: ``Var = Σ_{j≠i} H_ij²`` instead of
  ``2 H_ii² + Σ_{j≠i} H_ij²``). The seed takes ``|v ⊙ Hv|`` (``absolute=True``), which keeps the
  estimate non-negative but biases it; the paper uses the raw product.

Both are :class:`optax.GradientTransformationExtraArgs` whose ``update(updates, state, params,
**extra_args)`` returns ``(hessian_diagonal_estimate, new_state)`` with the estimate a pytree
shaped like ``params``; the incoming ``updates`` are ignored. Their state holds the PRNG key. Any
transformation with that contract can be passed to :func:`so_optax.sophia` as ``estimator``.

For deterministic use (tests, cross-checks with another framework) the randomness can be
injected: per call through the extra arguments ``sampled_labels=`` / ``probe=``, at construction
through the hooks ``sample_labels_fn(key, logits)`` / ``probe_fn(key, params)``, or by calling
the pure functions :func:`gnb_diag_from_labels` / :func:`hutchinson_diag_from_probe` directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from so_common import validation
from so_optax import _distribution

__all__ = [
    "GNBState",
    "HutchinsonState",
    "gnb_hessian_estimator",
    "hutchinson_hessian_estimator",
    "gnb_diag_from_labels",
    "hutchinson_diag_from_probe",
]

PyTree = Any
Seed = int | jax.Array


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _as_key(seed: Seed) -> jax.Array:
    """An int (or int array) seed -> ``jax.random.PRNGKey(seed)``; a PRNG key passes through."""
    if isinstance(seed, jax.Array) or isinstance(seed, np.ndarray):
        if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
            return seed
        if seed.shape == (2,) and seed.dtype == jnp.uint32:
            return jnp.asarray(seed)
    return jax.random.PRNGKey(seed)


def _work_dtype(dtype) -> jnp.dtype:
    """Float dtype used for estimates: the parameter dtype promoted to at least float32."""
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    return jnp.promote_types(dtype, jnp.float32)


def _missing(name: str, estimator: str, what: str) -> ValueError:
    return ValueError(
        f"Missing {name}: the {estimator} Hessian estimator needs "
        f"update(..., {name}=...), {what}. Pass it on every call (it is only evaluated on "
        "Hessian refresh steps)."
    )


def _zero_count() -> jax.Array:
    return jnp.zeros([], jnp.int32)


# --------------------------------------------------------------------------------------------
# GNB (Sophia-G)
# --------------------------------------------------------------------------------------------


class GNBState(NamedTuple):
    """State of :func:`gnb_hessian_estimator`.

    Attributes:
      key: PRNG key used to sample the labels (split once per estimate).
      count: number of estimates computed so far (int32).
    """

    key: jax.Array
    count: jax.Array


def default_sample_labels(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Samples ``ŷ ~ softmax(logits)`` along the last axis (``jax.random.categorical``; on an Explicit
    mesh each device samples its part of the batch, the same labels as one device)."""
    out_sharding = _distribution.explicit_spec(logits, drop_last=True)
    return jax.random.categorical(key, logits.astype(_work_dtype(logits.dtype)), axis=-1, out_sharding=out_sharding)


def _check_mask(mask: jax.Array | None, logits: jax.Array) -> None:
    if mask is not None and tuple(jnp.shape(mask)) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"Invalid logits_mask: shape {tuple(jnp.shape(mask))} (must equal logits.shape[:-1] "
            f"= {tuple(logits.shape[:-1])}; True/1 marks the positions that count)"
        )


def _gnb_diag(
    logits_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    labels_or_sampler: jax.Array | Callable[[jax.Array], jax.Array],
    mask: jax.Array | None,
    scale_by_batch_size: bool,
) -> PyTree:
    """One forward + one backward (a VJP through ``logits_fn``): ``ĝ ⊙ ĝ`` (times N if asked)."""
    logits, vjp_fn = jax.vjp(logits_fn, params)
    if not hasattr(logits, "shape") or logits.ndim < 1:
        raise ValueError(
            "Invalid logits_fn: it must return an array of logits with the classes on the last "
            f"axis, shape (..., C); got {type(logits).__name__} of shape {jnp.shape(logits)}"
        )
    _check_mask(mask, logits)
    labels = labels_or_sampler(logits) if callable(labels_or_sampler) else labels_or_sampler
    if tuple(jnp.shape(labels)) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"Invalid sampled labels: shape {tuple(jnp.shape(labels))} (must equal "
            f"logits.shape[:-1] = {tuple(logits.shape[:-1])})"
        )
    work = _work_dtype(logits.dtype)
    probs = jax.nn.softmax(logits.astype(work), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=work)
    # d mean-CE / d logits = (p - e_ŷ) / N on each counted position.
    if mask is None:
        n = jnp.asarray(max(math.prod(logits.shape[:-1]), 1), work)
        cotangent = (probs - onehot) / n
    else:
        weights = jnp.asarray(mask).astype(work)
        n = jnp.maximum(jnp.sum(weights), 1.0)
        cotangent = (probs - onehot) * (weights / n)[..., None]
    (g_hat,) = vjp_fn(cotangent.astype(logits.dtype))

    def square(g):
        g = g.astype(_work_dtype(g.dtype))
        h = g * g
        return h * n.astype(h.dtype) if scale_by_batch_size else h

    return jax.tree.map(square, g_hat)


def gnb_diag_from_labels(
    logits_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    labels: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale_by_batch_size: bool = False,
) -> PyTree:
    """The GNB estimate for *given* labels: ``ĝ ⊙ ĝ`` with ``ĝ = ∇ mean CE(logits_fn(params), labels)``.

    This is exactly what :func:`gnb_hessian_estimator` computes after sampling the labels; call
    it directly to reproduce an estimate with externally chosen labels (e.g. the ones a torch run
    sampled).

    Args:
      logits_fn: ``params -> logits`` of shape ``(..., C)`` (e.g. ``(B, C)`` or ``(B, T, C)``).
      params: the parameters (pytree).
      labels: integer labels of shape ``logits.shape[:-1]``.
      mask: optional array of shape ``logits.shape[:-1]``; positions where it is ``False``/0
        (padding) do not count, and the mean is over the ``N = sum(mask)`` counted positions.
      scale_by_batch_size: multiply by ``N`` (the paper's ``B · ĝ ⊙ ĝ``, an unbiased estimate of
        the Gauss-Newton diagonal of the mean loss).

    Returns:
      A pytree like ``params`` (float32 or wider) with the estimate.
    """
    return _gnb_diag(logits_fn, params, labels, mask, scale_by_batch_size)


def gnb_hessian_estimator(
    seed: Seed = 0,
    *,
    scale_by_batch_size: bool = False,
    sample_labels_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Gauss-Newton-Bartlett estimator of the Hessian diagonal (Sophia-G).

    Samples ``ŷ ~ softmax(logits)`` once for the whole batch, takes one backward pass of the mean
    cross-entropy on the sampled labels, and returns ``ĥ = ĝ ⊙ ĝ`` (or ``N · ĝ ⊙ ĝ``, the
    paper's form, with ``N`` the number of counted label positions). See the module docstring for
    the expectation: ``E[N · ĝ ⊙ ĝ] = diag(GGN)``.

    ``update(updates, state, params, *, logits_fn, logits_mask=None, sampled_labels=None)``:

    * ``logits_fn``: ``params -> logits`` of shape ``(..., C)``, classes last: ``(B, C)``,
      ``(B, T, C)``, ... (required; a clear ``ValueError`` at trace time if missing).
    * ``logits_mask``: optional, shape ``logits.shape[:-1]``; ``False``/0 marks padding positions,
      which are left out of the mean (and of ``N``).
    * ``sampled_labels``: optional labels of shape ``logits.shape[:-1]`` used instead of
      sampling (injected randomness for cross-checks); the key is still advanced.

    Args:
      seed: an int or a ``jax.random`` key; the key lives in :class:`GNBState`.
      scale_by_batch_size: return ``N · ĝ ⊙ ĝ`` (paper / official Sophia-G) instead of ``ĝ ⊙ ĝ``
        (seed).
      sample_labels_fn: optional hook ``(key, logits) -> labels`` replacing
        :func:`jax.random.categorical` sampling.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` returns
      ``(hessian_diagonal_estimate, new_state)``.

    References:
      Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
      Pre-training <https://arxiv.org/abs/2305.14342>`_, 2023 (Algorithm 2).
    """
    validation.check_bool("scale_by_batch_size", scale_by_batch_size)
    sampler = default_sample_labels if sample_labels_fn is None else sample_labels_fn

    def init_fn(params):
        del params
        return GNBState(key=_as_key(seed), count=_zero_count())

    def update_fn(
        updates,
        state: GNBState,
        params=None,
        *,
        logits_fn=None,
        logits_mask=None,
        sampled_labels=None,
        **extra_args,
    ):
        del updates, extra_args
        if params is None:
            raise ValueError("Missing params: the GNB Hessian estimator needs update(..., params)")
        if logits_fn is None:
            raise _missing("logits_fn", "GNB (Sophia-G)", "a function params -> logits (..., C)")
        key, subkey = jax.random.split(state.key)
        labels = (lambda logits: sampler(subkey, logits)) if sampled_labels is None else sampled_labels
        h = _gnb_diag(logits_fn, params, labels, logits_mask, scale_by_batch_size)
        return h, GNBState(key=key, count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Hutchinson (Sophia-H)
# --------------------------------------------------------------------------------------------


class HutchinsonState(NamedTuple):
    """State of :func:`hutchinson_hessian_estimator`.

    Attributes:
      key: PRNG key used to draw the probe vectors (split once per estimate).
      count: number of estimates computed so far (int32).
    """

    key: jax.Array
    count: jax.Array


_DISTRIBUTIONS = ("gaussian", "rademacher")


def sample_probe(key: jax.Array, params: PyTree, distribution: str = "gaussian") -> PyTree:
    """A probe ``v`` like ``params`` with i.i.d. entries, ``E[v vᵀ] = I``.

    Each leaf gets its own subkey and the leaf's dtype (float32 for non-float leaves); on an Explicit
    mesh each device draws only its shard of a sharded leaf (the same numbers as one device).
    """
    validation.check_choice("distribution", distribution, _DISTRIBUTIONS)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    draw = jax.random.normal if distribution == "gaussian" else jax.random.rademacher
    out = []
    for k, leaf in zip(keys, leaves):
        dtype = leaf.dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else jnp.float32
        out.append(draw(k, jnp.shape(leaf), dtype=dtype, out_sharding=_distribution.explicit_spec(leaf)))
    return jax.tree.unflatten(treedef, out)


def hutchinson_diag_from_probe(
    obj_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    probe: PyTree,
    *,
    absolute: bool = False,
) -> PyTree:
    """The Hutchinson estimate for a *given* probe: ``v ⊙ (H v)`` (or ``|v ⊙ (H v)|``).

    ``H v = jax.jvp(jax.grad(obj_fn), (params,), (v,))[1]``: one forward-over-reverse
    Hessian-vector product for the whole pytree. This is exactly what
    :func:`hutchinson_hessian_estimator` computes after drawing the probe.

    Args:
      obj_fn: ``params -> scalar loss``.
      params: the parameters (pytree).
      probe: a pytree like ``params`` (cast to each parameter's dtype).
      absolute: return ``|v ⊙ Hv|`` (the seed's choice) instead of the unbiased ``v ⊙ Hv``.

    Returns:
      A pytree like ``params`` (float32 or wider) with the estimate.
    """
    probe = jax.tree.map(lambda v, p: jnp.asarray(v).astype(jnp.result_type(p)), probe, params)
    hvp = jax.jvp(jax.grad(obj_fn), (params,), (probe,))[1]

    def product(v, hv):
        work = _work_dtype(jnp.result_type(v))
        h = v.astype(work) * hv.astype(work)
        return jnp.abs(h) if absolute else h

    return jax.tree.map(product, probe, hvp)


def hutchinson_hessian_estimator(
    seed: Seed = 0,
    *,
    distribution: str = "gaussian",
    absolute: bool = False,
    probe_fn: Callable[[jax.Array, PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Hutchinson estimator of the Hessian diagonal (Sophia-H): ``ĥ = v ⊙ (H v)``.

    ``E[v ⊙ Hv] = diag(H)`` for any probe with ``E[v vᵀ] = I``. ``H v`` is one
    forward-over-reverse product, ``jax.jvp(jax.grad(obj_fn), (params,), (v,))[1]``, for the
    whole parameter pytree (optax.contrib.sophia's ``obj_fn`` convention).

    ``update(updates, state, params, *, obj_fn, probe=None)``:

    * ``obj_fn``: ``params -> scalar loss`` (required; a clear ``ValueError`` at trace time if
      missing). Close over the batch: ``obj_fn=lambda p: loss(p, batch)``.
    * ``probe``: optional pytree like ``params`` used instead of a random probe (injected
      randomness for cross-checks); the key is still advanced.

    Args:
      seed: an int or a ``jax.random`` key; the key lives in :class:`HutchinsonState`.
      distribution: ``'gaussian'`` (seed and paper) or ``'rademacher'`` (lower variance).
      absolute: return ``|v ⊙ Hv|`` (seed) instead of the raw, unbiased ``v ⊙ Hv`` (paper).
      probe_fn: optional hook ``(key, params) -> probe`` replacing the built-in sampler.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` returns
      ``(hessian_diagonal_estimate, new_state)``.

    References:
      Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
      Pre-training <https://arxiv.org/abs/2305.14342>`_, 2023 (Algorithm 1).

      Hutchinson, `A stochastic estimator of the trace of the influence matrix for Laplacian
      smoothing splines`, 1989.
    """
    validation.check_choice("distribution", distribution, _DISTRIBUTIONS)
    validation.check_bool("absolute", absolute)
    if probe_fn is None:
        probe_fn = lambda key, params: sample_probe(key, params, distribution)  # noqa: E731

    def init_fn(params):
        del params
        return HutchinsonState(key=_as_key(seed), count=_zero_count())

    def update_fn(
        updates, state: HutchinsonState, params=None, *, obj_fn=None, probe=None, **extra_args
    ):
        del updates, extra_args
        if params is None:
            raise ValueError(
                "Missing params: the Hutchinson Hessian estimator needs update(..., params)"
            )
        if obj_fn is None:
            raise _missing("obj_fn", "Hutchinson (Sophia-H)", "a function params -> scalar loss")
        key, subkey = jax.random.split(state.key)
        v = probe_fn(subkey, params) if probe is None else probe
        h = hutchinson_diag_from_probe(obj_fn, params, v, absolute=absolute)
        return h, HutchinsonState(key=key, count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
