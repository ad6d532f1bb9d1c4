"""Ordering of the LAPACK decompositions (``_linalg.Lanes``) and how many run at once (``_lapack_lanes``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from so_optax import _lapack_lanes, _linalg
from tests.so_optax.hlo_text import ancestors, computations, custom_calls, instructions, matmuls


def test_after_is_the_identity_bit_for_bit():
    # subnormals are left out: XLA:CPU flushes them to zero in every floating-point op
    x = jnp.array([-0.0, 0.0, 1.5, -2.25, 1e-37, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    singles = (jnp.array([jnp.nan]), jnp.array([jnp.inf, 1.0]), jnp.array([-jnp.inf]), jnp.array([-5.0]))
    for previous in singles + (list(singles), [jnp.array([3.4e38]), jnp.array([3.4e38])], []):
        out = jax.jit(_linalg.after)(x, previous)
        np.testing.assert_array_equal(np.asarray(out).view(np.uint32), np.asarray(x).view(np.uint32))


def _isolation(count):
    """A compiled computation with a matmul, two QRs in ``Lanes(count)`` started after it, and an eigh
    of a matrix that must wait for the lanes to finish: (QRs that wait for the matmul, QRs the eigh
    waits for)."""

    def f(x, ys, w):
        lanes = _linalg.Lanes(count)
        product = x @ x
        lanes.start_after([product])
        qs = [lanes.run(_linalg.orthonormal_factor, y) for y in ys]
        return product, qs, jnp.linalg.eigh(lanes.finished(w))[1]

    x = jnp.eye(8) * 2
    comps, entry = computations(jax.jit(f).lower(x, [x + 1, x + 2], x).compile().as_text())
    insts = instructions(comps[entry])
    (dot,) = matmuls(comps, insts)
    qrs, (eigh,) = custom_calls(insts, "geqrf"), custom_calls(insts, "syevd")
    assert len(qrs) == 2
    return sum(dot in ancestors(insts, q) for q in qrs), sum(q in ancestors(insts, eigh) for q in qrs)


def test_bounded_lanes_run_their_decompositions_apart():
    assert _isolation(1) == (2, 2)
    assert _isolation(2) == (2, 2)


def test_unbounded_lanes_leave_the_schedule_free():
    assert _isolation(None) == (0, 0)


def _qr_dependencies(lanes, n=4, d=8):
    """For each QR (LAPACK geqrf) of a compiled stacked refresh run in ``lanes``: how many other QRs it waits for."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    a = jax.random.normal(keys[0], (n, d, d))
    factors = a @ jnp.swapaxes(a, 1, 2)
    bases = jnp.linalg.qr(jax.random.normal(keys[1], (n, d, d)))[0]
    refresh = jax.jit(lambda f, q: _linalg.stacked_power_iteration_refresh(f, q, _linalg.Lanes(lanes)))
    comps, entry = computations(refresh.lower(factors, bases).compile().as_text())
    insts = instructions(comps[entry])
    qrs = custom_calls(insts, "geqrf")
    assert len(qrs) == n
    return sorted(len(ancestors(insts, q) & set(qrs)) for q in qrs)


def test_one_lane_runs_the_qrs_one_after_the_other():
    assert _qr_dependencies(1) == [0, 1, 2, 3]


def test_two_lanes_run_two_sequences_of_qrs():
    assert _qr_dependencies(2) == [0, 0, 1, 1]


def test_unbounded_lanes_leave_the_qrs_independent():
    assert _qr_dependencies(None) == [0, 0, 0, 0]


def test_an_empty_decomposition_does_not_break_its_lane():
    """A 0×0 QR runs outside the lanes (nothing to read or wait for); the QR after it in its lane still
    waits for the one before it."""
    a, b = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 6))

    def chain(x, y, empty):
        lanes = _linalg.Lanes(1)
        first = lanes.run(_linalg.orthonormal_factor, x)
        middle = lanes.run(_linalg.orthonormal_factor, empty)
        return first, middle, lanes.run(_linalg.orthonormal_factor, y)

    compiled = jax.jit(chain).lower(a, b, jnp.zeros((0, 0))).compile()
    comps, entry = computations(compiled.as_text())
    insts = instructions(comps[entry])
    qrs = custom_calls(insts, "geqrf")
    assert sorted(len(ancestors(insts, q) & set(qrs)) for q in qrs) == [0, 1]
    first, middle, last = compiled(a, b, jnp.zeros((0, 0)))
    assert middle.shape == (0, 0)
    np.testing.assert_array_equal(last, jax.jit(_linalg.orthonormal_factor)(b))


def test_lanes_do_not_change_the_results():
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    a = jax.random.normal(keys[0], (3, 6, 6))
    factors = a @ jnp.swapaxes(a, 1, 2)
    bases = jnp.linalg.qr(jax.random.normal(keys[1], (3, 6, 6)))[0]
    outs = [jax.jit(lambda f, q, c=count: (_linalg.stacked_power_iteration_refresh(f, q, _linalg.Lanes(c)),
                                           _linalg.stacked_eigh_descending(f, q, _linalg.Lanes(c))))(factors, bases)
            for count in (None, 1, 2)]
    for out in outs[1:]:
        jax.tree.map(np.testing.assert_array_equal, out, outs[0])


def test_lanes_count_is_validated():
    with pytest.raises(ValueError, match="count"):
        _linalg.Lanes(0)


@pytest.mark.parametrize("cores, threads, expected", [(2, 2, 1), (2, 1, None), (8, 2, 4), (4, 16, 1), (1, 1, None)])
def test_lane_count_leaves_each_decomposition_its_lapack_threads(monkeypatch, cores, threads, expected):
    monkeypatch.setattr(_lapack_lanes, "_cores", lambda: cores)
    monkeypatch.setattr(_lapack_lanes, "lapack_threads", lambda default: threads)
    assert _lapack_lanes.lane_count() == expected


def test_lane_count_is_unbounded_off_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_lapack_lanes, "lapack_threads", lambda default: 4)
    assert _lapack_lanes.lane_count() is None


def test_lapack_threads_follows_threadpoolctl_limits():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert _lapack_lanes.lapack_threads(default=99) == 1
    assert _lapack_lanes.lapack_threads(default=99) >= 1
