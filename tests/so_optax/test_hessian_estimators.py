"""Tests of the Sophia Hessian-diagonal estimators (so_optax.gnb_hessian_estimator, ...).

Statistical checks compare the mean of many independent estimates (vmapped over PRNG keys) with
the exact expectation, computed with jax.hessian / jax.jacobian on a small tanh MLP:

* Hutchinson (raw v ⊙ Hv, Gaussian and Rademacher probes): E = diag(H).
* GNB (ĝ ⊙ ĝ, ĝ the gradient of the mean CE over N positions on labels ŷ_n ~ softmax(f_n)):
  ĝ = (1/N) Σ_n J_nᵀ (p_n − e_{ŷ_n}); the terms are independent with mean 0, so
  E[ĝ ĝᵀ] = (1/N²) Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n = GGN / N, and E[N ĝ ⊙ ĝ] = diag(GGN).

The tolerance for each coordinate is Z standard errors of the mean (sample std / sqrt(S)) plus a
float32 rounding floor; with Z = 5 a false alarm has probability ~6e-7 per coordinate (a few
hundred coordinates in all), and the seeds are fixed, so the tests are deterministic. Each check
also requires a small relative L2 error, so that a wrong expectation (e.g. off by a factor N or
by the diag(p) term) cannot pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import so_optax
from so_optax import _hessian_estimators as est_mod

NUM_SAMPLES = 2000
Z = 5.0


# ----------------------------------------------------------------------------------------------
# A small model: tanh MLP, logits (..., C)
# ----------------------------------------------------------------------------------------------

D_IN, HIDDEN, C = 3, 5, 4


def init_mlp(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "w1": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN),
        "b1": 0.1 * jax.random.normal(k2, (HIDDEN,)),
        "w2": jax.random.normal(k3, (HIDDEN, C)),
        "b2": 0.1 * jax.random.normal(k4, (C,)),
    }


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def problem():
    params = init_mlp(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, D_IN))
    y = jax.random.randint(jax.random.PRNGKey(2), (6,), 0, C)
    return params, x, y


def ce_loss(logits, labels, mask=None):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if mask is None:
        return ce.mean()
    w = mask.astype(ce.dtype)
    return jnp.sum(ce * w) / jnp.sum(w)


def exact_gnb_expectation(logits_fn, params, mask=None):
    """E[ĝ ⊙ ĝ] = diag((1/N²) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n), flat, float64 numpy."""
    flat, unravel = ravel_pytree(params)
    logits = np.asarray(logits_fn(params), np.float64)
    jac = np.asarray(jax.jit(jax.jacobian(lambda f: logits_fn(unravel(f))))(flat), np.float64)
    num_classes, num_params = logits.shape[-1], flat.size
    logits = logits.reshape(-1, num_classes)
    jac = jac.reshape(-1, num_classes, num_params)
    keep = np.ones(logits.shape[0], bool) if mask is None else np.asarray(mask).reshape(-1)
    logits, jac = logits[keep], jac[keep]
    n = logits.shape[0]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = np.einsum("nc,cd->ncd", p, np.eye(num_classes)) - np.einsum("nc,nd->ncd", p, p)
    ggn_sum = np.einsum("nci,ncd,ndi->i", jac, a, jac)  # Σ_n diag(J_nᵀ A_n J_n)
    return ggn_sum / n**2, n


def dense_hessian(obj, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda f: obj(unravel(f))))(flat), np.float64)


def estimate(tx, params, **extra):
    """One jitted estimator call from a fresh state: (estimate, new_state)."""
    return jax.jit(lambda s, p: tx.update(None, s, p, **extra))(tx.init(params), params)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def flat_samples(tree_batch):
    """A vmapped pytree of estimates -> (S, P) float64 numpy, in ravel_pytree order."""
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree_batch), np.float64)


def assert_mean_matches(samples, expected, rel_l2):
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    floor = 1e-5 * np.abs(expected).max()
    z = np.abs(mean - expected) / (se + floor)
    assert np.all(np.abs(mean - expected) <= Z * se + floor), f"max z-score {z.max():.2f}"
    rel = np.linalg.norm(mean - expected) / np.linalg.norm(expected)
    assert rel < rel_l2, f"relative L2 error {rel:.4f}"
    print(f"max z-score {z.max():.2f}, relative L2 error {rel:.4f}")
    return z.max(), rel


# ----------------------------------------------------------------------------------------------
# Hutchinson
# ----------------------------------------------------------------------------------------------


def test_hvp_and_product_match_dense_hessian(problem):
    params, x, y = problem
    obj = lambda p: ce_loss(mlp(p, x), y)  # noqa: E731
    flat, unravel = ravel_pytree(params)
    hess = dense_hessian(obj, params)
    v_flat = jax.random.normal(jax.random.PRNGKey(3), flat.shape)

    @jax.jit
    def both(p, v):
        raw = so_optax.hutchinson_diag_from_probe(obj, p, unravel(v))
        ab = so_optax.hutchinson_diag_from_probe(obj, p, unravel(v), absolute=True)
        return ravel_pytree(raw)[0], ravel_pytree(ab)[0]

    got, got_abs = both(params, v_flat)
    v64 = np.asarray(v_flat, np.float64)
    np.testing.assert_allclose(got, v64 * (hess @ v64), rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(got_abs, jnp.abs(got))


@pytest.mark.parametrize("distribution,rel_l2", [("gaussian", 0.1), ("rademacher", 0.05)])
def test_hutchinson_mean_is_hessian_diagonal(problem, distribution, rel_l2):
    params, x, y = problem
    obj = lambda p: ce_loss(mlp(p, x), y)  # noqa: E731
    exact = np.diag(dense_hessian(obj, params))

    def one(key):
        tx = so_optax.hutchinson_hessian_estimator(key, distribution=distribution)
        h, _ = tx.update(None, tx.init(params), params, obj_fn=obj)
        return h

    keys = jax.random.split(jax.random.PRNGKey(10), NUM_SAMPLES)
    samples = flat_samples(jax.jit(jax.vmap(one))(keys))
    assert_mean_matches(samples, exact, rel_l2)


def test_hutchinson_probe_injection(problem):
    params, x, y = problem
    obj = lambda p: ce_loss(mlp(p, x), y)  # noqa: E731
    probe = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)
    want = jax.jit(lambda p: so_optax.hutchinson_diag_from_probe(obj, p, probe))(params)

    tx = so_optax.hutchinson_hessian_estimator(0)
    got, new_state = estimate(tx, params, obj_fn=obj, probe=probe)
    assert_trees_close(got, want)
    assert int(new_state.count) == 1 and not np.array_equal(new_state.key, tx.init(params).key)

    hooked = so_optax.hutchinson_hessian_estimator(0, probe_fn=lambda key, p: probe)
    got2, _ = estimate(hooked, params, obj_fn=obj)
    assert_trees_close(got2, want)

    # absolute=True (the seed's |v ⊙ Hv|) is the absolute value of the raw estimate.
    absolute = so_optax.hutchinson_hessian_estimator(0, absolute=True, probe_fn=lambda k, p: probe)
    got3, _ = estimate(absolute, params, obj_fn=obj)
    assert_trees_close(got3, jax.tree.map(jnp.abs, want))


def test_hutchinson_default_probe_is_reproducible_and_key_advances(problem):
    params, x, y = problem
    obj = lambda p: ce_loss(mlp(p, x), y)  # noqa: E731
    tx = so_optax.hutchinson_hessian_estimator(3)
    s0 = tx.init(params)
    step = jax.jit(lambda s: tx.update(None, s, params, obj_fn=obj))
    h1, s1 = step(s0)
    h1b, _ = step(s0)
    h2, _ = step(s1)
    jax.tree.map(np.testing.assert_array_equal, h1, h1b)
    assert not np.allclose(ravel_pytree(h1)[0], ravel_pytree(h2)[0])
    # The drawn probe is sample_probe(split(key)[1], params).
    _, sub = jax.random.split(s0.key)
    v = est_mod.sample_probe(sub, params, "gaussian")
    want = jax.jit(lambda p: so_optax.hutchinson_diag_from_probe(obj, p, v))(params)
    assert_trees_close(h1, want)


def test_hutchinson_missing_obj_fn(problem):
    params, _, _ = problem
    tx = so_optax.hutchinson_hessian_estimator()
    with pytest.raises(ValueError, match="obj_fn"):
        tx.update(None, tx.init(params), params)
    with pytest.raises(ValueError, match="obj_fn"):
        jax.jit(lambda s, p: tx.update(None, s, p))(tx.init(params), params)
    with pytest.raises(ValueError, match="distribution"):
        so_optax.hutchinson_hessian_estimator(distribution="uniform")


# ----------------------------------------------------------------------------------------------
# GNB
# ----------------------------------------------------------------------------------------------


def test_exact_ggn_formula_equals_hessian_for_linear_softmax():
    """Sanity check of the reference: for logits linear in θ, GGN = Hessian of the mean CE."""
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 3))
    params = {"w": jax.random.normal(jax.random.PRNGKey(5), (3, C)), "b": jnp.zeros(C)}
    logits_fn = lambda p: x @ p["w"] + p["b"]  # noqa: E731
    y = jnp.array([0, 1, 2, 3, 1])
    hess = dense_hessian(lambda p: ce_loss(logits_fn(p), y), params)
    expectation, n = exact_gnb_expectation(logits_fn, params)
    np.testing.assert_allclose(expectation * n, np.diag(hess), rtol=1e-4, atol=1e-7)


def test_gnb_from_labels_is_squared_grad_of_mean_ce(problem):
    params, x, _ = problem
    logits_fn = lambda p: mlp(p, x)  # noqa: E731
    labels = jnp.array([0, 1, 2, 3, 0, 1])

    @jax.jit
    def run(p):
        g = jax.grad(lambda q: ce_loss(logits_fn(q), labels))(p)
        got = so_optax.gnb_diag_from_labels(logits_fn, p, labels)
        scaled = so_optax.gnb_diag_from_labels(logits_fn, p, labels, scale_by_batch_size=True)
        return g, got, scaled

    g, got, scaled = run(params)
    assert_trees_close(got, jax.tree.map(jnp.square, g), rtol=1e-5, atol=1e-12)
    assert_trees_close(scaled, jax.tree.map(lambda a: 6 * a, got))


@pytest.mark.parametrize("scale", [False, True])
def test_gnb_mean_is_gauss_newton_diagonal(problem, scale):
    params, x, _ = problem
    logits_fn = lambda p: mlp(p, x)  # noqa: E731
    expectation, n = exact_gnb_expectation(logits_fn, params)
    if scale:
        expectation = expectation * n  # diag(GGN) of the mean loss

    def one(key):
        tx = so_optax.gnb_hessian_estimator(key, scale_by_batch_size=scale)
        h, _ = tx.update(None, tx.init(params), params, logits_fn=logits_fn)
        return h

    keys = jax.random.split(jax.random.PRNGKey(11), NUM_SAMPLES)
    samples = flat_samples(jax.jit(jax.vmap(one))(keys))
    assert_mean_matches(samples, expectation, rel_l2=0.1)


def seq_problem():
    """(B, T, C) logits from a per-token tanh MLP; a padding mask with ragged lengths."""
    params = init_mlp(jax.random.PRNGKey(20))
    x = jax.random.normal(jax.random.PRNGKey(21), (3, 4, D_IN))
    lengths = jnp.array([4, 2, 3])
    mask = jnp.arange(4)[None, :] < lengths[:, None]
    return params, x, mask


def test_gnb_sequence_logits_with_mask_expectation():
    params, x, mask = seq_problem()
    logits_fn = lambda p: mlp(p, x)  # noqa: E731
    expectation, n = exact_gnb_expectation(logits_fn, params, mask)
    assert n == 9

    def one(key):
        tx = so_optax.gnb_hessian_estimator(key, scale_by_batch_size=True)
        h, _ = tx.update(None, tx.init(params), params, logits_fn=logits_fn, logits_mask=mask)
        return h

    keys = jax.random.split(jax.random.PRNGKey(12), NUM_SAMPLES)
    samples = flat_samples(jax.jit(jax.vmap(one))(keys))
    assert_mean_matches(samples, expectation * n, rel_l2=0.1)


def test_gnb_mask_ignores_padding_positions():
    params, x, mask = seq_problem()
    labels = jnp.array([[0, 1, 2, 3], [1, 2, 0, 0], [3, 3, 1, 2]])
    # Garbage inputs and labels at the padded positions change nothing.
    x2 = jnp.where(mask[..., None], x, 100.0)
    labels2 = jnp.where(mask, labels, 0)
    full = jnp.ones(mask.shape, bool)
    xm, ym = x[mask], labels[mask]

    @jax.jit
    def run(p):
        a = so_optax.gnb_diag_from_labels(lambda q: mlp(q, x), p, labels, mask)
        b = so_optax.gnb_diag_from_labels(lambda q: mlp(q, x2), p, labels2, mask)
        c = so_optax.gnb_diag_from_labels(lambda q: mlp(q, x), p, labels, full)
        d = so_optax.gnb_diag_from_labels(lambda q: mlp(q, x), p, labels)
        g = jax.grad(lambda q: ce_loss(mlp(q, xm), ym))(p)
        return a, b, c, d, g

    a, b, c, d, g = run(params)
    assert_trees_close(a, b, rtol=1e-5, atol=1e-12)
    # An all-True mask is the same as no mask; the masked mean matches a gathered mean.
    assert_trees_close(c, d)
    assert_trees_close(a, jax.tree.map(jnp.square, g), rtol=1e-4, atol=1e-12)


def test_gnb_label_injection_and_sampling():
    params, x, mask = seq_problem()
    logits_fn = lambda p: mlp(p, x)  # noqa: E731
    labels = jnp.array([[0, 1, 2, 3], [1, 2, 0, 0], [3, 3, 1, 2]])
    from_labels = jax.jit(
        lambda p, lab: so_optax.gnb_diag_from_labels(logits_fn, p, lab, mask)
    )
    want = from_labels(params, labels)

    tx = so_optax.gnb_hessian_estimator(0)
    s0 = tx.init(params)
    got, s1 = estimate(tx, params, logits_fn=logits_fn, logits_mask=mask, sampled_labels=labels)
    assert_trees_close(got, want)
    assert int(s1.count) == 1 and not np.array_equal(s1.key, s0.key)

    hooked = so_optax.gnb_hessian_estimator(0, sample_labels_fn=lambda key, logits: labels)
    got2, _ = estimate(hooked, params, logits_fn=logits_fn, logits_mask=mask)
    assert_trees_close(got2, want)

    # Default sampling: jax.random.categorical(split(key)[1], logits, axis=-1).
    sampled, _ = estimate(tx, params, logits_fn=logits_fn, logits_mask=mask)
    _, sub = jax.random.split(s0.key)
    drawn = jax.random.categorical(sub, jax.jit(logits_fn)(params), axis=-1)
    assert_trees_close(sampled, from_labels(params, drawn))


def test_gnb_errors():
    params, x, mask = seq_problem()
    tx = so_optax.gnb_hessian_estimator()
    state = tx.init(params)
    with pytest.raises(ValueError, match="logits_fn"):
        tx.update(None, state, params, obj_fn=lambda p: 0.0)
    with pytest.raises(ValueError, match="logits_fn"):
        jax.jit(lambda s, p: tx.update(None, s, p))(state, params)
    with pytest.raises(ValueError, match="logits_mask"):
        tx.update(None, state, params, logits_fn=lambda p: mlp(p, x), logits_mask=mask[:, :2])
    with pytest.raises(ValueError, match="labels"):
        tx.update(None, state, params, logits_fn=lambda p: mlp(p, x),
                  sampled_labels=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="scale_by_batch_size"):
        so_optax.gnb_hessian_estimator(scale_by_batch_size=1)


def test_estimates_are_float32_for_bfloat16_params(problem):
    params, x, y = problem
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    logits_fn = lambda p: mlp(p, x.astype(jnp.bfloat16))  # noqa: E731
    h, _ = estimate(so_optax.gnb_hessian_estimator(), p16, logits_fn=logits_fn)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(h))
    htx = so_optax.hutchinson_hessian_estimator(distribution="rademacher")
    obj = lambda p: ce_loss(logits_fn(p).astype(jnp.float32), y)  # noqa: E731
    h2, _ = estimate(htx, p16, obj_fn=obj)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(h2))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(h2))
