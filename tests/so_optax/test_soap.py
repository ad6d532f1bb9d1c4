"""Tests of so_optax.soap / so_optax.scale_by_soap (JAX SOAP, arXiv:2409.11321)."""

from __future__ import annotations

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import so_optax
from so_common.soap_layout import soap_layout
from so_optax import _lapack_lanes, _linalg
from tests.so_optax.hlo_text import ancestors, computations, custom_calls, instructions, matmuls


def _grads(shapes, step, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(1000 + step), len(shapes))
    return {name: jax.random.normal(k, shape, dtype) for k, (name, shape) in zip(keys, shapes.items())}


# --------------------------------------------------------------------------------------------
# A straightforward float64 numpy re-statement of the SOAP algorithm (reference semantics).
# --------------------------------------------------------------------------------------------


def _mode(x, mat, axis):
    return np.moveaxis(np.tensordot(x, mat, axes=([axis], [0])), -1, axis)


def _reference_trajectory(p0, grads, *, lr, b1, b2, sb, eps, wd, freq, correct_bias=True, normalize=False):
    """Parameters after every step, for one full-rank N-d tensor (every dimension preconditioned)."""
    p = p0.copy()
    nd = p.ndim
    factors, bases = None, None
    m, v, t, out = np.zeros_like(p), np.zeros_like(p), 0, []
    proj = lambda x, qs: [x := _mode(x, q, i) for i, q in enumerate(qs)][-1]  # noqa: E731
    back = lambda x, qs: [x := _mode(x, q.T, i) for i, q in enumerate(qs)][-1]  # noqa: E731

    def gram(g, i):
        other = [a for a in range(nd) if a != i]
        return np.tensordot(g, g, axes=(other, other))

    for g in grads:
        if factors is None:
            factors = [(1 - sb) * gram(g, i) for i in range(nd)]
            bases = [np.linalg.eigh(f)[1][:, ::-1] for f in factors]
            out.append(p.copy())
            continue
        t += 1
        gp = proj(g, bases)
        m = b1 * m + (1 - b1) * gp
        v = b2 * v + (1 - b2) * gp**2
        u = back(m / (np.sqrt(v) + eps), bases)
        if normalize:
            u = u / (1e-30 + np.sqrt(np.mean(u**2)))
        f = np.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else 1.0
        p = p - lr * f * u
        p = p - lr * wd * p
        factors = [sb * F + (1 - sb) * gram(g, i) for i, F in enumerate(factors)]
        if t % freq == 0:
            m = back(m, bases)
            for i, (F, Q) in enumerate(zip(factors, bases)):
                est = np.diag(Q.T @ F @ Q)
                order = np.argsort(-est, kind="stable")
                v = np.take(v, order, axis=i)
                bases[i] = np.linalg.qr(F @ Q[:, order])[0]
            m = proj(m, bases)
        out.append(p.copy())
    return out


@pytest.mark.parametrize(
    "shape,opts",
    [
        ((5, 5), dict()),
        ((3, 4, 5), dict(betas=(0.9, 0.99), shampoo_beta=0.8, weight_decay=0.1, normalize_grads=True, eps=1e-6,
                         correct_bias=False)),
    ],
)
def test_matches_float64_reference(shape, opts):
    lr, freq, steps = 0.05, 3, 10
    kw = dict(betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8, weight_decay=0.01, correct_bias=True,
              normalize_grads=False)
    kw.update(opts)
    rng = np.random.RandomState(0)
    p0 = rng.randn(*shape)
    grads = [rng.randn(*shape) for _ in range(steps)]
    b1, b2 = kw["betas"]
    sb = kw["shampoo_beta"] if kw["shampoo_beta"] >= 0 else b2
    ref = _reference_trajectory(p0, grads, lr=lr, b1=b1, b2=b2, sb=sb, eps=kw["eps"], wd=kw["weight_decay"],
                                freq=freq, correct_bias=kw["correct_bias"], normalize=kw["normalize_grads"])
    with jax.enable_x64(True):
        opt = optax.chain(so_optax.soap(precondition_frequency=freq, post_step_decay_lr=lr, **kw), optax.scale(-lr))
        p = jnp.asarray(p0)
        state = opt.init(p)
        update = jax.jit(opt.update)
        for g, expected in zip(grads, ref):
            d, state = update(jnp.asarray(g), state, p)
            p = optax.apply_updates(p, d)
            assert p.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(p), expected, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# State bookkeeping: every field advances when it should; no recompilation.
# --------------------------------------------------------------------------------------------

_SHAPES = {"w": (4, 5), "b": (3,), "w2": (4, 5)}
_FREQ = 3
_CALLS = 3 * _FREQ + 1  # covers the first call and three refreshes (calls 4, 7, 10)


@pytest.fixture(scope="module")
def trajectory():
    opt = so_optax.soap(precondition_frequency=_FREQ)
    params = {k: jnp.ones(s) for k, s in _SHAPES.items()}
    traces = []

    @jax.jit
    def step(grads, state, params):
        traces.append(1)  # Python side effect: runs once per trace
        return opt.update(grads, state, params)

    states, updates = [opt.init(params)], []
    for call in range(_CALLS):
        u, s = step(_grads(_SHAPES, call), states[-1], params)
        states.append(s)
        updates.append(u)
    return dict(states=states, updates=updates, traces=len(traces), cache=step._cache_size(), params=params)


def _changed(a, b):
    return not np.array_equal(np.asarray(a), np.asarray(b))


def test_first_call_does_not_move(trajectory):
    first = trajectory["updates"][0]
    for leaf in jax.tree.leaves(first):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    s1 = trajectory["states"][1]
    assert int(s1.count) == 1
    for leaf in jax.tree.leaves((s1.exp_avg, s1.exp_avg_sq)):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    # factors = (1 - beta2) * G G^T etc.; bases = their eigenvectors by descending eigenvalue
    g = np.asarray(_grads(_SHAPES, 0)["w"])
    fl, fr = s1.factors["w"]
    np.testing.assert_allclose(np.asarray(fl), 0.05 * g @ g.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fr), 0.05 * g.T @ g, rtol=1e-5, atol=1e-6)
    for f, q in zip(s1.factors["w"], s1.bases["w"]):
        f, q = np.asarray(f, np.float64), np.asarray(q, np.float64)
        np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-5)
        rotated = q.T @ f @ q
        diag = np.diag(rotated)
        np.testing.assert_allclose(rotated - np.diag(diag), 0.0, atol=1e-5 * np.abs(f).max())
        assert np.all(np.diff(diag) <= 1e-6 * np.abs(f).max())
    assert s1.factors["b"] == (None,) and s1.bases["b"] == (None,)


def test_every_state_field_advances(trajectory):
    states = trajectory["states"]
    for call in range(1, _CALLS + 1):
        prev, cur = states[call - 1], states[call]
        assert int(cur.count) == call
        adam_step = call - 1
        for name in _SHAPES:
            for f_prev, f_cur in zip(prev.factors[name], cur.factors[name]):
                if f_cur is not None:
                    assert _changed(f_prev, f_cur), (call, name, "factors")
            if call > 1:  # moments move on every Adam step, refresh or not
                assert _changed(prev.exp_avg[name], cur.exp_avg[name]), (call, name, "exp_avg")
                assert _changed(prev.exp_avg_sq[name], cur.exp_avg_sq[name]), (call, name, "exp_avg_sq")
                assert jax.tree.all(jax.tree.map(lambda u: bool(jnp.any(u != 0)), trajectory["updates"][call - 1]))
            refresh = call == 1 or adam_step % _FREQ == 0
            for q_prev, q_cur in zip(prev.bases[name], cur.bases[name]):
                if q_cur is not None:
                    assert _changed(q_prev, q_cur) == refresh, (call, name, "bases")


def test_no_recompilation_across_refresh_cycles(trajectory):
    assert trajectory["traces"] == 1
    assert trajectory["cache"] == 1
    chex.assert_trees_all_equal_dtypes(trajectory["states"][1], trajectory["states"][-1])


def _donated_step_hlo(params):
    """Compiled HLO text of a jitted SOAP training step with donated params and state, and the state."""
    opt = optax.chain(so_optax.soap(precondition_frequency=3), optax.scale(-0.1))
    state = opt.init(params)

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text(), state


def _unordered_matmul_qr_pairs(monkeypatch, lanes):
    """In the compiled refresh of a SOAP step whose decompositions run in ``lanes``: how many
    (matmul, QR) pairs have no data dependency either way (XLA:CPU may run them at once)."""
    monkeypatch.setattr(_lapack_lanes, "lane_count", lambda: lanes)
    params = {"w": jnp.ones((6, 5)), "b": jnp.ones((6,)), "k": jnp.ones((3, 4, 5))}
    comps, _ = computations(_donated_step_hlo(params)[0])
    (refresh,) = [lines for lines in comps.values() if any("geqrf" in line for line in lines)]
    insts = instructions(refresh)
    qrs = custom_calls(insts, "geqrf")
    products = matmuls(comps, insts)
    assert len(qrs) == 5 and products
    before = {name: ancestors(insts, name) for name in qrs + products}
    return sum(m not in before[q] and q not in before[m] for q in qrs for m in products)


def test_refresh_runs_its_qrs_apart_from_its_matmuls_in_bounded_lanes(monkeypatch):
    """With a multi-threaded LAPACK (bounded lanes), the refresh's QRs start after every matmul they
    do not feed and end before every other one: LAPACK has the cores to itself."""
    assert _unordered_matmul_qr_pairs(monkeypatch, 1) == 0
    assert _unordered_matmul_qr_pairs(monkeypatch, None) > 0  # unbounded lanes leave XLA free


def test_decompositions_only_on_first_call_and_refresh_steps():
    """eigh/QR must stay inside the run-once/refresh loops: never hoisted into every step."""
    params = {"w": jnp.ones((6, 5)), "b": jnp.ones((6,)), "k": jnp.ones((3, 4, 5))}
    comps, entry = computations(_donated_step_hlo(params)[0])
    decomposition = ("syevd", "geqrf", "orgqr")
    found = {name for name, lines in comps.items() for line in lines if any(d in line for d in decomposition)}
    assert found, "expected LAPACK eigh/QR calls in the compiled step"
    assert entry not in found
    # every computation holding a decomposition is reached only through a while loop's body
    bodies = {line.split("body=")[1].split(",")[0].split()[0].lstrip("%") for lines in comps.values()
              for line in lines if " while(" in line}
    def calls(line, name):
        return re.search(rf"%{re.escape(name)}(?![\w.])", line) is not None

    callers = {name: {c for c, lines in comps.items() for line in lines if c != name and calls(line, name)}
               for name in comps}

    def under_loop(name, seen=()):
        if name in bodies:
            return True
        return bool(callers[name]) and all(
            c not in seen and c != entry and under_loop(c, seen + (name,)) for c in callers[name])

    assert all(under_loop(name) for name in found), found


def test_donated_step_does_not_copy_the_state():
    """Outside its loops, a donated step copies no more than the zeros it starts the direction from.

    Reading a basis before a loop that rewrites it, or a loop layout that differs from the state's,
    makes XLA copy (or transpose) the moments and bases on every call; with them in place the only
    copies left in the entry computation are the zero-filled direction buffers (one per parameter).
    """
    params = {"w": jnp.ones((160, 200)), "b": jnp.ones((200,))}  # not stacked: factors > 128
    hlo, state = _donated_step_hlo(params)
    comps, entry = computations(hlo)
    copy_op = re.compile(r"= f32\[([\d,]*)\]\S* (?:copy\(|fusion\(.*calls=%\w*copy)")
    copied = [math.prod(int(d) for d in m.group(1).split(",") if d) * 4
              for line in comps[entry] if (m := copy_op.search(line))]
    param_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert state_bytes > 4 * param_bytes
    assert sum(copied) <= param_bytes, (copied, param_bytes)


def test_state_mirrors_params_and_leaves_are_independent(trajectory):
    """Stacking same-layout leaves must not mix them: 'w' and 'w2' get the same grads as if alone."""
    s = trajectory["states"][-1]
    assert jax.tree.structure(s.exp_avg) == jax.tree.structure(trajectory["params"])
    opt = so_optax.soap(precondition_frequency=_FREQ)
    alone = {"w": jnp.ones((4, 5))}
    state = opt.init(alone)
    update = jax.jit(opt.update)
    for call in range(_CALLS):
        u, state = update({"w": _grads(_SHAPES, call)["w"]}, state, alone)
        np.testing.assert_allclose(u["w"], trajectory["updates"][call]["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.bases["w"][0], s.bases["w"][0], rtol=1e-5, atol=1e-6)


def test_jit_matches_no_jit():
    shapes = {"w": (3, 4)}
    opt = so_optax.soap(precondition_frequency=1, post_step_decay_lr=0.1)
    params = {k: jnp.full(s, 0.5) for k, s in shapes.items()}
    s_jit = s_eager = opt.init(params)
    update = jax.jit(opt.update)
    for call in range(2):  # the first call, then an Adam step with a refresh
        g = _grads(shapes, call)
        u_jit, s_jit = update(g, s_jit, params)
        u_eager, s_eager = opt.update(g, s_eager, params)
        chex.assert_trees_all_close(u_jit, u_eager, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s_jit, s_eager, rtol=1e-5, atol=1e-6)


def test_decomposition_lanes_do_not_change_the_results(monkeypatch):
    """How many eigh/QR run at once (one, two, or as XLA likes) changes neither directions nor state."""
    shapes = {"w": (6, 5), "w2": (6, 5), "k": (3, 4, 5), "big": (150, 7)}  # stacked, 3-D, unstacked
    params = {k: jnp.full(s, 0.5) for k, s in shapes.items()}
    opt = so_optax.soap(precondition_frequency=2)
    runs = []
    for count in (None, 1, 2):
        monkeypatch.setattr(_lapack_lanes, "lane_count", lambda c=count: c)
        update, state, run = jax.jit(opt.update), opt.init(params), []
        for call in range(5):  # the first call, then refreshes on the 2nd and 4th Adam steps
            u, state = update(_grads(shapes, call), state, params)
            run.append(u)
        runs.append((run, state))
    for run in runs[1:]:
        jax.tree.map(np.testing.assert_array_equal, run, runs[0])


# --------------------------------------------------------------------------------------------
# Conventions: weight decay, learning-rate schedules, feeding a basis.
# --------------------------------------------------------------------------------------------


def test_weight_decay_conventions_and_schedule_count():
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    sched = lambda count: 0.1 * (count + 1.0)  # noqa: E731  (count 0 at the first call)
    wd, small = 0.2, dict(max_precond_dim=3)  # one factor only: keeps compilation short
    base = so_optax.scale_by_soap(**small)
    adamw_like = so_optax.soap(weight_decay=wd, **small)
    seed_like = so_optax.soap(weight_decay=wd, post_step_decay_lr=sched, **small)
    states = [t.init(params) for t in (base, adamw_like, seed_like)]

    @jax.jit
    def step(g, states):
        return [t.update(g, s, params) for t, s in zip((base, adamw_like, seed_like), states)]

    for call in range(3):
        (u, states[0]), (d1, states[1]), (d2, states[2]) = step(_grads({"w": (3, 4)}, call), states)
        p, u = params["w"], u["w"]
        if call == 0:
            for d in (u, d1["w"], d2["w"]):
                np.testing.assert_array_equal(d, 0.0)
            continue
        lr = sched(call)
        np.testing.assert_allclose(d1["w"], u + wd * p, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(d2["w"], u + wd * (p - lr * u), rtol=1e-6, atol=1e-7)


def test_weight_decay_needs_params():
    opt = so_optax.soap(max_precond_dim=1)
    state = opt.init({"w": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="params"):
        opt.update({"w": jnp.ones((2, 2))}, state)
    # without decay no params are needed
    opt = so_optax.scale_by_soap(max_precond_dim=1)
    jax.jit(opt.update)({"w": jnp.ones((2, 2))}, opt.init({"w": jnp.ones((2, 2))}))


def test_fed_basis_is_used():
    """``state._replace(bases=...)`` after the first call is how parity tests share a basis."""
    b1 = b2 = 0.95
    eps = 1e-8
    rng = np.random.RandomState(3)
    ql, qr = np.linalg.qr(rng.randn(3, 3))[0], np.linalg.qr(rng.randn(4, 4))[0]
    opt = so_optax.scale_by_soap()
    update = jax.jit(opt.update)
    params = jnp.zeros((3, 4))
    g0, g1 = rng.randn(3, 4).astype(np.float32), rng.randn(3, 4).astype(np.float32)
    _, state = update(jnp.asarray(g0), opt.init(params))
    state = state._replace(bases=(jnp.asarray(ql, jnp.float32), jnp.asarray(qr, jnp.float32)))
    u, state = update(jnp.asarray(g1), state)
    gp = ql.T @ g1 @ qr
    m, v = (1 - b1) * gp, (1 - b2) * gp**2
    expected = np.sqrt(1 - b2) / (1 - b1) * (ql @ (m / (np.sqrt(v) + eps)) @ qr.T)
    np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.bases[0], ql, rtol=1e-6)  # not a refresh step: kept


# --------------------------------------------------------------------------------------------
# Shapes, dtypes, robustness.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "opts,shapes",
    [
        (dict(max_precond_dim=10), {"scalar": (), "vec": (5,), "t4": (2, 12, 1, 3), "wide": (2, 20)}),
        (dict(merge_dims=True, max_precond_dim=8), {"t4": (3, 2, 4, 5), "scalar": (), "mat": (1, 6)}),
        (dict(merge_dims=True, max_precond_dim=8, data_format="channels_last", precondition_1d=True),
         {"t4": (3, 2, 4, 5), "scalar": (), "vec": (5,), "big_vec": (9,)}),
    ],
    ids=["dims_above_max", "merge_channels_first", "merge_channels_last_1d"],
)
def test_shapes_run_and_are_finite(opts, shapes):
    """0-d, 1-d, 3-d, 4-d tensors, both data formats with merge_dims, dims above max_precond_dim."""
    opt = so_optax.soap(precondition_frequency=2, **opts)
    params = {k: jnp.full(s, 0.1) for k, s in shapes.items()}
    state = opt.init(params)
    update = jax.jit(opt.update)
    for call in range(4):
        u, state = update(_grads(shapes, call), state, params)
        chex.assert_trees_all_equal_shapes(u, params)
        chex.assert_tree_all_finite((u, state))
    assert jax.tree.all(jax.tree.map(lambda x: bool(jnp.any(x != 0)), u))
    for name, shape in shapes.items():
        layout = soap_layout(shape, max_precond_dim=opts.get("max_precond_dim", 10000),
                             merge_dims=opts.get("merge_dims", False),
                             precondition_1d=opts.get("precondition_1d", False),
                             data_format=opts.get("data_format", "channels_first"))
        assert state.exp_avg[name].shape == layout.work_shape
        assert [q is not None for q in state.bases[name]] == list(layout.preconditioned)
        for q, d in zip(state.bases[name], layout.work_shape):
            if q is not None:
                np.testing.assert_allclose(q.T @ q, np.eye(d), atol=1e-5)


@pytest.mark.parametrize("count", [None, 1])
def test_empty_leaves_change_nothing_else(monkeypatch, count):
    """Leaves without elements (a layer of width 0) get empty directions and leave the other leaves'
    directions and state bit for bit as they are without them, in bounded and unbounded lanes."""
    monkeypatch.setattr(_lapack_lanes, "lane_count", lambda: count)
    shapes = {"w": (6, 4), "b": (4,)}
    empty = {"e2": (0, 5), "e3": (2, 0, 3)}
    opt = so_optax.soap(precondition_frequency=2)
    runs = []
    for extra in ({}, empty):
        both = {**shapes, **extra}
        params = {k: jnp.full(s, 0.5) for k, s in both.items()}
        update, state, run = jax.jit(opt.update), opt.init(params), []
        for call in range(5):  # the first call, then refreshes on the 2nd and 4th Adam steps
            grads = {**_grads(shapes, call), **{k: jnp.zeros(s) for k, s in extra.items()}}
            u, state = update(grads, state, params)
            chex.assert_trees_all_equal_shapes(u, params)
            run.append({k: u[k] for k in shapes})
        runs.append((run, jax.tree.map(lambda t: {k: t[k] for k in shapes}, state[1:],
                                       is_leaf=lambda t: isinstance(t, dict) and "w" in t)))
    jax.tree.map(np.testing.assert_array_equal, runs[1], runs[0])
    assert all(bool(jnp.any(step["w"] != 0)) for step in runs[0][0][1:])


def test_bf16_params():
    shapes = {"w": (6, 4), "b": (4,)}
    params = {k: jnp.full(s, 0.5, jnp.bfloat16) for k, s in shapes.items()}
    tx = optax.chain(so_optax.soap(precondition_frequency=2), optax.scale(-1e-2))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for call in range(4):
        u, state = update(_grads(shapes, call, jnp.bfloat16), state, params)
        params = optax.apply_updates(params, u)
    soap_state = state[0]
    for leaf in jax.tree.leaves((soap_state.exp_avg, soap_state.exp_avg_sq, soap_state.factors, soap_state.bases)):
        assert leaf.dtype == jnp.float32
    for leaf in jax.tree.leaves((u, params)):
        assert leaf.dtype == jnp.bfloat16
    chex.assert_tree_all_finite((u, params, soap_state))


def test_nonfinite_decompositions_keep_last_good_basis():
    q = jnp.asarray(np.linalg.qr(np.random.RandomState(0).randn(4, 4))[0], jnp.float32)
    bad = jnp.full((4, 4), jnp.nan)
    np.testing.assert_array_equal(_linalg.eigh_descending(bad, q), q)
    new_q, order = _linalg.power_iteration_refresh(bad, q)
    np.testing.assert_array_equal(new_q, q[:, order])
    # end to end: an inf in the first gradient leaves the identity basis
    opt = so_optax.scale_by_soap(max_precond_dim=3)
    g = jnp.ones((3, 4)).at[0, 0].set(jnp.inf)
    _, state = jax.jit(opt.update)(g, opt.init(jnp.zeros((3, 4))))
    assert state.bases[1] is None
    np.testing.assert_array_equal(state.bases[0], jnp.eye(3))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(betas=(1.0, 0.9)), "betas\\[0\\]"),
        (dict(betas=(0.9, -0.1)), "betas\\[1\\]"),
        (dict(betas=0.9), "betas"),
        (dict(shampoo_beta=1.0), "shampoo_beta"),
        (dict(eps=-1.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(precondition_frequency=0), "precondition_frequency"),
        (dict(precondition_frequency=2.5), "precondition_frequency"),
        (dict(max_precond_dim=0), "max_precond_dim"),
        (dict(merge_dims="yes"), "merge_dims"),
        (dict(precondition_1d=1), "precondition_1d"),
        (dict(normalize_grads=None), "normalize_grads"),
        (dict(correct_bias="no"), "correct_bias"),
        (dict(data_format="NHWC"), "data_format"),
        (dict(post_step_decay_lr=-1.0), "post_step_decay_lr"),
    ],
)
def test_invalid_options_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        so_optax.soap(**kwargs)


def test_complex_params_raise_naming_the_leaf_and_split_parts_run():
    """A complex leaf is rejected at init (the real formulas would run on it and compute something else);
    optax.contrib.split_real_and_imaginary, which the message suggests, optimizes its parts instead."""
    params = {"b": jnp.ones(3), "w": [jnp.ones((4, 3), jnp.complex64)]}
    with pytest.raises(ValueError, match=r"Invalid params: so_optax.soap .*leaf \['w'\]\[0\] has dtype complex64"):
        so_optax.soap().init(params)
    tx = optax.contrib.split_real_and_imaginary(so_optax.soap(precondition_frequency=2))
    state = tx.init(params)
    grads = {"b": jnp.ones(3), "w": [(1.0 + 2.0j) * jnp.arange(12.0).reshape(4, 3).astype(jnp.complex64)]}
    for _ in range(4):
        u, state = jax.jit(tx.update)(grads, state, params)
    chex.assert_tree_all_finite(u)
    assert u["w"][0].dtype == jnp.complex64 and bool(jnp.any(jnp.imag(u["w"][0]) != 0))


def test_inject_hyperparams():
    shapes = {"w": (4, 3), "b": (3,)}
    params = {k: jnp.full(s, 0.3) for k, s in shapes.items()}
    kw = dict(post_step_decay_lr=0.1, eps=1e-6, weight_decay=0.05, shampoo_beta=0.9, precondition_frequency=2,
              max_precond_dim=3)
    injected = optax.inject_hyperparams(so_optax.soap, static_args=so_optax.SOAP_STATIC_ARGS)(**kw)
    plain = so_optax.soap(**kw)
    s_inj, s_plain = injected.init(params), plain.init(params)
    assert set(s_inj.hyperparams) >= {"post_step_decay_lr", "eps", "weight_decay", "shampoo_beta"}
    traces = []

    @jax.jit
    def step(g, s):
        traces.append(1)
        return injected.update(g, s, params)

    plain_update = jax.jit(plain.update)
    for call in range(5):
        g = _grads(shapes, call)
        u_inj, s_inj = step(g, s_inj)
        u_plain, s_plain = plain_update(g, s_plain, params)
        chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-5, atol=1e-6)
    # changing an injected value takes effect without retracing
    s_inj.hyperparams["weight_decay"] = jnp.asarray(0.5, jnp.float32)
    u_changed, _ = step(_grads(shapes, 9), s_inj)
    u_same, _ = plain_update(_grads(shapes, 9), s_plain, params)
    assert not np.allclose(u_changed["w"], u_same["w"])
    assert len(traces) == 1
    # max_precond_dim is structural: without static_args the error says what to do
    with pytest.raises(ValueError, match="max_precond_dim"):
        optax.inject_hyperparams(so_optax.soap)(post_step_decay_lr=0.1).init(params)


# --------------------------------------------------------------------------------------------
# SOAP helps where it should: rotated ill-conditioned least squares.
# --------------------------------------------------------------------------------------------


def test_soap_beats_adamw_on_ill_conditioned_least_squares():
    n, k, N, bs, steps = 12, 12, 1024, 16, 200
    rng = np.random.RandomState(0)
    u, _ = np.linalg.qr(rng.randn(n, n))
    X = (rng.randn(N, n) * np.logspace(0, -2, n)) @ u.T  # rotated features, Hessian condition 1e4
    Y = X @ rng.randn(n, k)
    X, Y = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32)

    def loss(w, idx=None):
        x, y = (X, Y) if idx is None else (X[idx], Y[idx])
        return 0.5 * jnp.mean(jnp.sum(jnp.square(x @ w - y), axis=1))

    def final_loss(make_tx):
        @jax.jit
        def run(lr):
            tx = make_tx(optax.cosine_decay_schedule(lr, steps))
            w = jnp.zeros((n, k))

            def body(carry, key):
                w, st = carry
                idx = jax.random.randint(key, (bs,), 0, N)
                upd, st = tx.update(jax.grad(loss)(w, idx), st, w)
                return (optax.apply_updates(w, upd), st), None

            (w, _), _ = jax.lax.scan(body, (w, tx.init(w)), jax.random.split(jax.random.PRNGKey(0), steps))
            return loss(w)

        return min(float(run(lr)) for lr in (0.03, 0.1, 0.3, 1.0))

    soap_loss = final_loss(lambda s: optax.chain(
        so_optax.soap(weight_decay=0.0, precondition_frequency=5), optax.scale_by_learning_rate(s)))
    adamw_loss = final_loss(lambda s: optax.adamw(s, weight_decay=0.0))
    assert soap_loss < 0.2 * adamw_loss, (soap_loss, adamw_loss)
