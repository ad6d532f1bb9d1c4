"""Tests of so_optax.sophia (Sophia-G / Sophia-H as an optax transformation).

The update rule is checked step by step against a direct numpy re-statement, with the Hessian
estimate injected through a user estimator transformation (the pattern parity tests use).
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import so_optax

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def injected_estimator():
    """An estimator returning the estimate passed as ``update(..., hessian_estimate=tree)``."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, hessian_estimate=None, **extra_args):
        del updates, params, extra_args
        return hessian_estimate, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def numpy_sophia_directions(grads, params, estimates, *, betas, rho, weight_decay, k, eps, form,
                            gamma, bias_correction, hessian_bias_correction=False, early_refresh_steps=0):
    """The update rule, re-stated in float64 numpy on lists of per-step arrays."""
    b1, b2 = betas
    m = np.zeros_like(grads[0], np.float64)
    h = np.zeros_like(grads[0], np.float64)
    n = 0  # refreshes so far
    out = []
    for t, (g, p, e) in enumerate(zip(grads, params, estimates), start=1):
        m = b1 * m + (1 - b1) * g
        if t % k == 0 or t <= early_refresh_steps:
            h = b2 * h + (1 - b2) * e
            n += 1
        m_hat = m / (1 - b1**t) if bias_correction else m
        h_hat = h / (1 - b2**n) if hessian_bias_correction and n > 0 else h
        if form == "seed":
            ratio, thr = m_hat / (h_hat + eps), rho
        else:
            ratio, thr = m_hat / np.maximum(gamma * h_hat, eps), 1.0
        d = np.clip(ratio, -thr, thr) + weight_decay * p
        out.append((d, h.copy(), np.mean(np.abs(ratio) < thr)))
    return out


def tree_of(flat):
    """Splits a length-17 vector into a two-leaf pytree (to exercise tree handling)."""
    return {"w": flat[:12].reshape(3, 4), "b": flat[12:]}


def flat_of(tree):
    return np.concatenate([np.asarray(tree["w"]).reshape(-1), np.asarray(tree["b"])])


def linear_problem(batch=8, dim=5, classes=3):
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, dim))
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, classes)
    params = {"w": 0.1 * jax.random.normal(jax.random.PRNGKey(3), (dim, classes)),
              "b": jnp.zeros(classes)}
    logits_fn_of = lambda xx: (lambda p: xx @ p["w"] + p["b"])  # noqa: E731
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        logits_fn_of(x)(p), y).mean()
    return params, x, y, logits_fn_of(x), loss


def make_step(tx, loss, **extra_args):
    """A jitted train step passing ``extra_args`` (e.g. logits_fn=...) to ``tx.update``."""

    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params, **extra_args)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


# ----------------------------------------------------------------------------------------------
# The update rule
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["seed", "paper"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_update_rule_matches_numpy(form, bias_correction):
    rng = np.random.default_rng(0)
    steps, k, size = 13, 3, 17
    grads = [0.05 * rng.standard_normal(size).astype(np.float32) for _ in range(steps)]
    params = [rng.standard_normal(size).astype(np.float32) for _ in range(steps)]
    if form == "seed":
        estimates = [rng.uniform(0.2, 3.0, size).astype(np.float32) for _ in range(steps)]
    else:  # the paper's raw estimates can be negative
        estimates = [rng.normal(1.0, 1.0, size).astype(np.float32) for _ in range(steps)]
    opts = dict(betas=(0.9, 0.95), rho=0.03, weight_decay=0.1, k=k, eps=1e-12, form=form,
                gamma=0.05, bias_correction=bias_correction)
    want = numpy_sophia_directions(
        [g.astype(np.float64) for g in grads], [p.astype(np.float64) for p in params],
        [e.astype(np.float64) for e in estimates], **opts)

    tx = so_optax.sophia(estimator=injected_estimator(), **opts)
    update = jax.jit(lambda g, s, p, e: tx.update(g, s, p, hessian_estimate=e))
    state = tx.init(tree_of(params[0]))
    win_rates = []
    for t in range(steps):
        d, state = update(tree_of(grads[t]), state, tree_of(params[t]), tree_of(estimates[t]))
        want_d, want_h, want_win = want[t]
        np.testing.assert_allclose(flat_of(d), want_d, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(flat_of(state.nu), want_h, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(float(state.win_rate), want_win, atol=1e-6)
        assert int(state.count) == t + 1
        win_rates.append(float(state.win_rate))
    assert 0.0 < max(win_rates) < 1.0  # the case has clipped and unclipped coordinates


@pytest.mark.parametrize("form", ["seed", "paper"])
@pytest.mark.parametrize("hessian_bias_correction,early_refresh_steps", [(True, 0), (False, 5), (True, 4)])
def test_short_horizon_options_match_numpy(form, hessian_bias_correction, early_refresh_steps):
    """h / (1 − β2ⁿ) with n the refreshes so far, and refreshes at every t <= early_refresh_steps."""
    rng = np.random.default_rng(2)
    steps, k, size = 14, 3, 17
    grads = [0.05 * rng.standard_normal(size) for _ in range(steps)]
    params = [rng.standard_normal(size) for _ in range(steps)]
    estimates = [rng.uniform(0.2, 3.0, size) for _ in range(steps)]
    opts = dict(betas=(0.9, 0.8), rho=0.03, weight_decay=0.1, k=k, eps=1e-12, form=form, gamma=0.05,
                bias_correction=False, hessian_bias_correction=hessian_bias_correction,
                early_refresh_steps=early_refresh_steps)
    want = numpy_sophia_directions(grads, params, estimates, **opts)
    plain = numpy_sophia_directions(grads, params, estimates, **dict(opts, hessian_bias_correction=False,
                                                                    early_refresh_steps=0))
    tx = so_optax.sophia(estimator=injected_estimator(), **opts)
    update = jax.jit(lambda g, s, p, e: tx.update(g, s, p, hessian_estimate=e))
    state = tx.init(tree_of(params[0].astype(np.float32)))
    for t in range(steps):
        g, p, e = (tree_of(a[t].astype(np.float32)) for a in (grads, params, estimates))
        d, state = update(g, state, p, e)
        want_d, want_h, want_win = want[t]
        np.testing.assert_allclose(flat_of(d), want_d, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(flat_of(state.nu), want_h, rtol=1e-6, atol=1e-9)  # h itself: uncorrected
        np.testing.assert_allclose(float(state.win_rate), want_win, atol=1e-6)
    # The options change the steps (the case is not one where they make no difference).
    assert max(np.max(np.abs(a[0] - b[0])) for a, b in zip(want, plain)) > 1e-3


def test_seed_trajectory_with_seed_weight_decay():
    """chain(sophia(weight_decay=w/lr), scale(-lr)) reproduces the seed's p(1-w) - lr·u loop."""
    rng = np.random.default_rng(1)
    lr, w, rho, k, steps = 0.5, 0.01, 0.05, 2, 10
    betas, eps = (0.9, 0.999), 1e-12
    a = rng.uniform(0.5, 2.0, 17)
    c = rng.standard_normal(17)
    estimates = [rng.uniform(0.1, 2.0, 17) for _ in range(steps)]

    # The seed's torch loop, transcribed.
    p = rng.standard_normal(17)
    p0 = p.astype(np.float32)
    m, h, traj = np.zeros(17), np.zeros(17), []
    p = p0.astype(np.float64)
    for t in range(1, steps + 1):
        g = a * p + c
        m = betas[0] * m + (1 - betas[0]) * g
        if t % k == 0:
            h = betas[1] * h + (1 - betas[1]) * estimates[t - 1]
        u = np.clip(m / (h + eps), -rho, rho)
        p = p * (1 - w)
        p = p - lr * u
        traj.append(p.copy())

    tx = optax.chain(
        so_optax.sophia(betas=betas, rho=rho, weight_decay=w / lr, k=k, eps=eps,
                        estimator=injected_estimator()),
        optax.scale(-lr))
    a32, c32 = tree_of(a.astype(np.float32)), tree_of(c.astype(np.float32))

    @jax.jit
    def step(params, state, e):
        grads = jax.tree.map(lambda ai, pi, ci: ai * pi + ci, a32, params, c32)
        updates, state = tx.update(grads, state, params, hessian_estimate=e)
        return optax.apply_updates(params, updates), state

    params = tree_of(p0)
    state = tx.init(params)
    for t in range(steps):
        params, state = step(params, state, tree_of(estimates[t].astype(np.float32)))
        np.testing.assert_allclose(flat_of(params), traj[t], rtol=1e-5, atol=1e-6)


def test_win_rate_constructed_case():
    g = np.array([0.01, -0.02, 0.029, 0.05, -0.1, 0.031, 1.0, -1.0, 0.5, 0.04, 0.0, 0.0, 2.0,
                  -2.0, 3.0, 0.6, -0.7], np.float32)
    ones = tree_of(np.ones(17, np.float32))
    params = tree_of(np.zeros(17, np.float32))
    # b1 = 0 (m = g), k = 1, h = ĥ·(1 - b2) with b2 = 0 -> h = 1.
    seed_tx = so_optax.sophia(betas=(0.0, 0.0), rho=0.03, k=1, estimator=injected_estimator())
    _, s = seed_tx.update(tree_of(g), seed_tx.init(params), params, hessian_estimate=ones)
    assert float(s.win_rate) == pytest.approx(5 / 17)  # |g| < 0.03: 0.01, -0.02, 0.029, 0, 0
    paper_tx = so_optax.sophia(betas=(0.0, 0.0), k=1, form="paper", gamma=0.5,
                               estimator=injected_estimator())
    _, s = paper_tx.update(tree_of(g), paper_tx.init(params), params, hessian_estimate=ones)
    assert float(s.win_rate) == pytest.approx(9 / 17)  # |2g| < 1 (0.5 -> ratio 1: clipped)
    assert s.win_rate.dtype == jnp.float32


def test_win_rate_is_evaluated_on_read_not_in_the_step():
    tx = so_optax.sophia(betas=(0.0, 0.0), k=2, estimator=injected_estimator())
    params = tree_of(np.zeros(17, np.float32))
    state = tx.init(params)
    assert float(state.win_rate) == 1.0  # before the first step nothing was clipped
    step = jax.jit(lambda g, s, e: tx.update(g, s, params, hessian_estimate=e))
    hlo = step.lower(params, state, params).compile().as_text()
    assert " reduce(" not in hlo and "wrapped_reduce" not in hlo  # no count in the step itself
    g = tree_of(np.linspace(-0.05, 0.05, 17, dtype=np.float32))
    ones = tree_of(np.ones(17, np.float32))
    _, state = step(g, state, ones)  # t = 1: h = 0, every coordinate but g = 0 is clipped
    assert float(state.win_rate) == pytest.approx(1 / 17)
    _, state = step(g, state, ones)  # t = 2: refresh, m = g, h = 1: |g| < 0.03 for 9 of 17
    # Read inside a jitted function and outside: the same value, from the state's m and h.
    assert float(jax.jit(lambda s: s.win_rate)(state)) == float(state.win_rate) == pytest.approx(9 / 17)


def test_sophia_win_rate_finds_the_state_in_wrappers():
    params = tree_of(np.zeros(17, np.float32))
    make = optax.inject_hyperparams(so_optax.sophia, static_args=so_optax.SOPHIA_STATIC_ARGS)
    tx = optax.chain(optax.scale(1.0), make(rho=30.0, k=1, estimator=injected_estimator()),
                     optax.scale(-0.1))
    state = tx.init(params)
    g = tree_of(np.linspace(-1.0, 1.0, 17, dtype=np.float32))
    _, state = tx.update(g, state, params, hessian_estimate=tree_of(np.ones(17, np.float32)))
    inner = state[1].inner_state
    assert float(so_optax.sophia_win_rate(state)) == float(inner.win_rate)
    # The rule holds the injected rho of that step; m = 0.1·g and h = 0.001 after one step, so the
    # ratio is 100·g: |g| < 0.3 for 5 of the 17 coordinates.
    assert float(inner.win_rate) == pytest.approx(5 / 17)
    with pytest.raises(ValueError, match="opt_state"):
        so_optax.sophia_win_rate(optax.adam(1e-3).init(params))
    with pytest.raises(ValueError, match="found 2"):
        so_optax.sophia_win_rate((inner, inner))


# ----------------------------------------------------------------------------------------------
# Refresh schedule, jit, recompilation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("early_refresh_steps", [0, 4])
def test_refresh_only_every_k_steps_and_no_recompilation(early_refresh_steps):
    params, x, y, logits_fn, loss = linear_problem()
    calls = []

    def counted_logits_fn(p):
        jax.debug.callback(lambda: calls.append(1))
        return logits_fn(p)

    k, steps = 3, 8
    tx = so_optax.sophia(k=k, estimator="gnb", early_refresh_steps=early_refresh_steps,
                         hessian_bias_correction=True)
    step = make_step(tx, loss, logits_fn=counted_logits_fn)
    state = tx.init(params)
    previous_nu = state.nu
    refreshed = 0
    for t in range(1, steps + 1):
        params, state = step(params, state)
        jax.block_until_ready(state)
        changed = not all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.nu),
                                                 jax.tree.leaves(previous_nu)))
        due = t % k == 0 or t <= early_refresh_steps
        refreshed += due
        assert changed == due, t
        assert int(state.estimator_state.count) == refreshed
        assert len(calls) == refreshed  # logits_fn ran on refresh steps only
        b2 = 0.999  # the default betas[1]
        np.testing.assert_allclose(float(state.clip_rule.hessian_scale),
                                   1 / (1 - b2**refreshed) if refreshed else 1.0, rtol=1e-6)
        previous_nu = state.nu
    assert step._cache_size() == 1


def test_every_state_field_advances_on_every_step():
    params, x, y, logits_fn, loss = linear_problem()
    tx = so_optax.sophia(k=2, estimator="gnb", rho=1e-4)  # small rho: all clipped, then some not
    step = make_step(tx, loss, logits_fn=logits_fn)
    state = tx.init(params)
    for t in range(1, 5):
        new_params, new_state = step(params, state)
        assert int(new_state.count) == t
        assert not np.array_equal(new_state.mu["w"], state.mu["w"])
        assert not np.array_equal(new_params["w"], params["w"])
        params, state = new_params, new_state


def test_jit_and_no_jit_agree():
    params, x, y, logits_fn, loss = linear_problem()
    tx = so_optax.sophia(k=2, estimator="gnb", weight_decay=0.1)

    def run(jit):
        p, s = params, tx.init(params)
        if jit:
            update = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn))
        else:
            update = lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn)  # noqa: E731
        grad = jax.jit(jax.grad(loss))
        outs = []
        for _ in range(3):  # refresh at t = 2
            d, s = update(grad(p), s, p)
            p = jax.tree.map(lambda a, b: a - 0.1 * b, p, d)
            outs.append(d)
        return outs, s

    eager, s_eager = run(False)
    jitted, s_jit = run(True)
    for a, b in zip(eager, jitted):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), a, b)
    np.testing.assert_array_equal(s_eager.estimator_state.key, s_jit.estimator_state.key)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5), s_eager.nu, s_jit.nu)


# ----------------------------------------------------------------------------------------------
# The two parameterisations (docstring mapping)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_seed_form_equals_paper_form_with_mapped_hyperparameters(estimator):
    params, x, y, logits_fn, loss = linear_problem()
    batch = x.shape[0]
    lr, rho, k = 0.2, 0.05, 2
    seed_tx = optax.chain(so_optax.sophia(rho=rho, k=k, estimator=estimator), optax.scale(-lr))
    if estimator == "gnb":  # paper GNB is B·ĝ⊙ĝ: gamma·B = rho
        paper_est, gamma = "gnb", rho / batch
    else:  # same |v ⊙ Hv| estimate, same key: gamma = rho
        paper_est = so_optax.hutchinson_hessian_estimator(0, absolute=True)
        gamma = rho
    paper_tx = optax.chain(
        so_optax.sophia(k=k, estimator=paper_est, form="paper", gamma=gamma, eps=rho * 1e-12),
        optax.scale(-lr * rho))
    extra = dict(logits_fn=logits_fn, obj_fn=loss)
    seed_step, paper_step = make_step(seed_tx, loss, **extra), make_step(paper_tx, loss, **extra)
    ps, ss = params, seed_tx.init(params)
    pp, sp = params, paper_tx.init(params)
    for _ in range(8):
        ps, ss = seed_step(ps, ss)
        pp, sp = paper_step(pp, sp)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ps, pp)
    np.testing.assert_allclose(float(ss[0].win_rate), float(sp[0].win_rate))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_missing_extra_args_raise_at_trace_time():
    params, x, y, logits_fn, loss = linear_problem()
    grads = jax.tree.map(jnp.ones_like, params)
    gnb = so_optax.sophia(estimator="gnb")
    with pytest.raises(ValueError, match="logits_fn"):
        jax.jit(lambda g, s, p: gnb.update(g, s, p, obj_fn=loss))(grads, gnb.init(params), params)
    hut = so_optax.sophia(estimator="hutchinson")
    with pytest.raises(ValueError, match="obj_fn"):
        hut.update(grads, hut.init(params), params, logits_fn=logits_fn)
    chained = optax.chain(hut, optax.scale(-1.0))
    with pytest.raises(ValueError, match="obj_fn"):
        jax.jit(lambda g, s, p: chained.update(g, s, p))(grads, chained.init(params), params)
    with pytest.raises(ValueError, match="params"):
        gnb.update(grads, gnb.init(params), None, logits_fn=logits_fn)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(betas=0.9), "betas"),
        (dict(rho=-1.0), "rho"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(k=0), "k"),
        (dict(k=2.5), "k"),
        (dict(eps=-1e-8), "eps"),
        (dict(gamma=-1.0), "gamma"),
        (dict(gamma=0.0), "gamma"),
        (dict(form="paper", eps=0.0), "eps"),
        (dict(form="official"), "form"),
        (dict(estimator="fisher"), "estimator"),
        (dict(estimator=42), "estimator"),
        (dict(bias_correction=1), "bias_correction"),
        (dict(hessian_bias_correction=1), "hessian_bias_correction"),
        (dict(early_refresh_steps=-1), "early_refresh_steps"),
        (dict(early_refresh_steps=2.5), "early_refresh_steps"),
        (dict(early_refresh_steps=True), "early_refresh_steps"),
    ],
)
def test_invalid_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        so_optax.sophia(**kwargs)


# ----------------------------------------------------------------------------------------------
# Options: custom estimator, weight-decay mask, dtypes, inject_hyperparams
# ----------------------------------------------------------------------------------------------


def test_custom_estimator_receives_grads_and_extra_args():
    seen = {}

    def init_fn(params):
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra):
        seen.update(extra)
        return jax.tree.map(jnp.square, updates), state  # empirical Fisher diagonal

    tx = so_optax.sophia(betas=(0.9, 0.5), k=1,
                         estimator=optax.GradientTransformationExtraArgs(init_fn, update_fn))
    params = {"w": jnp.zeros(3)}
    g = {"w": jnp.array([1.0, 2.0, -3.0])}
    _, s = tx.update(g, tx.init(params), params, foo=1)
    np.testing.assert_allclose(s.nu["w"], 0.5 * np.array([1.0, 4.0, 9.0]))
    assert seen == {"foo": 1}


def test_injected_labels_and_probes_are_forwarded_to_the_estimators():
    params, x, y, logits_fn, loss = linear_problem()
    grads = jax.tree.map(jnp.zeros_like, params)
    labels = jnp.arange(x.shape[0]) % 3
    probe = jax.tree.map(jnp.ones_like, params)
    b2 = 0.5

    @jax.jit
    def run(p):
        gnb = so_optax.sophia(betas=(0.9, b2), k=1, estimator="gnb", form="paper")
        _, sg = gnb.update(grads, gnb.init(p), p, logits_fn=logits_fn, sampled_labels=labels)
        hut = so_optax.sophia(betas=(0.9, b2), k=1, estimator="hutchinson")
        _, sh = hut.update(grads, hut.init(p), p, obj_fn=loss, probe=probe)
        want_g = so_optax.gnb_diag_from_labels(logits_fn, p, labels, scale_by_batch_size=True)
        want_h = so_optax.hutchinson_diag_from_probe(loss, p, probe, absolute=True)
        return sg.nu, sh.nu, want_g, want_h

    nu_g, nu_h, want_g, want_h = run(params)
    for got, want in ((nu_g, want_g), (nu_h, want_h)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, (1 - b2) * b, rtol=1e-5,
                                                             atol=1e-9), got, want)


def test_weight_decay_mask():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    grads = jax.tree.map(lambda p: 0.1 * p, params)

    def direction(**kw):
        tx = so_optax.sophia(k=1, estimator=injected_estimator(), **kw)
        update = jax.jit(lambda g, s, p: tx.update(g, s, p, hessian_estimate=p))
        return update(grads, tx.init(params), params)[0]

    d0, d1 = direction(weight_decay=0.0), direction(weight_decay=0.5)
    for mask in ({"w": True, "b": False}, lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)):
        dm = direction(weight_decay=0.5, weight_decay_mask=mask)
        np.testing.assert_allclose(dm["w"], d1["w"])
        np.testing.assert_allclose(dm["b"], d0["b"])
        np.testing.assert_allclose(d1["w"], d0["w"] + 0.5)


def test_bfloat16_params_keep_float32_state():
    params, x, y, logits_fn, loss = linear_problem()
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    tx = so_optax.sophia(k=1, estimator="gnb")
    state = tx.init(p16)
    grads = jax.tree.map(lambda a: (0.01 * jnp.ones_like(a)), p16)
    d, state = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn))(grads, state, p16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(d))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves((state.mu, state.nu)))
    assert all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in jax.tree.leaves(d))


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_empty_leaves_change_nothing_else(estimator):
    """A parameter without elements gets an empty direction; the others take the same steps, bit for
    bit, as without it (refreshes included)."""
    params, x, y, logits_fn, loss = linear_problem()
    runs = []
    for extra in ({}, {"empty": jnp.zeros((0, 3))}):
        p = {**params, **extra}
        tx = so_optax.sophia(k=2, estimator=estimator, weight_decay=0.1)
        kw = dict(logits_fn=logits_fn) if estimator == "gnb" else dict(obj_fn=loss)
        state = tx.init(p)
        step = jax.jit(lambda g, s, q, tx=tx, kw=kw: tx.update(g, s, q, **kw))
        for _ in range(4):
            d, state = step(jax.grad(loss)(p), state, p)
            p = optax.apply_updates(p, jax.tree.map(lambda u: -0.01 * u, d))
        chex.assert_trees_all_equal_shapes(d, p)
        runs.append({k: p[k] for k in params})
    jax.tree.map(np.testing.assert_array_equal, runs[1], runs[0])
    assert not np.array_equal(runs[0]["w"], params["w"])


def test_complex_params_raise_naming_the_leaf():
    params = {"w": jnp.ones((2, 3)), "z": jnp.ones(3, jnp.complex64)}
    with pytest.raises(ValueError, match=r"Invalid params: so_optax.sophia .*leaf \['z'\] has dtype complex64"):
        so_optax.sophia(estimator="hutchinson").init(params)


def test_inject_hyperparams():
    params, x, y, logits_fn, loss = linear_problem()
    make = optax.inject_hyperparams(so_optax.sophia, static_args=so_optax.SOPHIA_STATIC_ARGS)
    injected = make(rho=0.03, k=2, weight_decay=0.0, estimator="gnb")
    plain = so_optax.sophia(rho=0.03, k=2, estimator="gnb")
    step_i = make_step(optax.chain(injected, optax.scale(-0.1)), loss, logits_fn=logits_fn)
    step_p = make_step(optax.chain(plain, optax.scale(-0.1)), loss, logits_fn=logits_fn)
    pi, si = params, optax.chain(injected, optax.scale(-0.1)).init(params)
    pp, sp = params, optax.chain(plain, optax.scale(-0.1)).init(params)
    for _ in range(4):
        pi, si = step_i(pi, si)
        pp, sp = step_p(pp, sp)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), pi, pp)
    # Changing rho (and k) in the state takes effect without recompiling.
    hp = dict(si[0].hyperparams, rho=jnp.asarray(1e-3, jnp.float32), k=jnp.asarray(1))
    si = (si[0]._replace(hyperparams=hp), si[1])
    new_p, si = step_i(pi, si)
    step = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), new_p, pi)
    assert max(float(v) for v in jax.tree.leaves(step)) <= 0.1 * 1e-3 + 1e-6  # lr·rho + float32
    assert int(si[0].inner_state.estimator_state.count) == 3  # refreshed at t = 2, 4, 5
    assert step_i._cache_size() == 1


# ----------------------------------------------------------------------------------------------
# Flax models train with Sophia-G and Sophia-H in a jitted train step
# ----------------------------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(16)(x)))


class TinyLM(nn.Module):
    vocab: int = 7

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab, 8)(tokens)
        return nn.Dense(self.vocab)(nn.tanh(nn.Dense(16)(h)))


def ce(logits, labels, mask=None):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if mask is None:
        return losses.mean()
    w = mask.astype(losses.dtype)
    return jnp.sum(losses * w) / jnp.sum(w)


@pytest.mark.parametrize(
    "estimator,form,lr,kw",
    [
        ("gnb", "paper", 0.05, dict(gamma=0.05)),
        ("hutchinson", "seed", 1.0, dict(rho=0.05)),
        ("hutchinson", "paper", 0.05, dict(gamma=0.05)),
    ],
)
def test_flax_mlp_trains(estimator, form, lr, kw):
    model = MLP()
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 5))
    y = jnp.argmax(x @ jax.random.normal(jax.random.PRNGKey(1), (5, 3)), axis=-1)
    params = model.init(jax.random.PRNGKey(2), x)
    tx = optax.chain(so_optax.sophia(k=5, estimator=estimator, form=form, **kw), optax.scale(-lr))
    state = tx.init(params)

    @jax.jit
    def train_step(params, state):
        logits_fn = lambda p: model.apply(p, x)  # noqa: E731
        obj_fn = lambda p: ce(logits_fn(p), y)  # noqa: E731
        loss, grads = jax.value_and_grad(obj_fn)(params)
        updates, state = tx.update(grads, state, params, logits_fn=logits_fn, obj_fn=obj_fn)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(60):
        params, state, loss = train_step(params, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])
    assert 0.0 <= float(state[0].win_rate) <= 1.0


def test_flax_sequence_model_trains_with_masked_gnb():
    model = TinyLM()
    tokens = jax.random.randint(jax.random.PRNGKey(0), (8, 6), 0, 7)
    targets = (tokens * 3 + 1) % 7
    mask = jnp.arange(6)[None, :] < jax.random.randint(jax.random.PRNGKey(1), (8, 1), 2, 7)
    params = model.init(jax.random.PRNGKey(2), tokens)
    tx = optax.chain(so_optax.sophia(k=4, form="paper", gamma=0.05), optax.scale(-0.05))
    state = tx.init(params)

    @jax.jit
    def train_step(params, state):
        logits_fn = lambda p: model.apply(p, tokens)  # noqa: E731  (B, T, C)
        loss, grads = jax.value_and_grad(lambda p: ce(logits_fn(p), targets, mask))(params)
        updates, state = tx.update(grads, state, params, logits_fn=logits_fn, logits_mask=mask)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(60):
        params, state, loss = train_step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert int(state[0].estimator_state.count) == 15
