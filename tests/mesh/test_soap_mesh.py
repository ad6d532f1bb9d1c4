"""so_optax.soap on device meshes: one device's numbers, state split over the devices, decompositions spread.

Every trajectory here is float64 and compared with the same optimizer on one device, step by step, through
several refreshes. Square leaves keep their own first-call bases (full-rank factors: unique up to signs,
which SOAP's update does not see); non-square leaves get the one-device run's first bases handed over, as
the parity tests do (a rank-deficient factor's null-space basis is arbitrary).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import so_optax
from so_optax import _linalg, _mesh_linalg
from tests.mesh.helpers import (
    bytes_per_device,
    full_spec,
    lapack_calls,
    make_mesh,
    max_rel_err,
    put,
    specs,
    trajectory,
)

pytestmark = pytest.mark.timeout(300)

# 9 factor matrices of sizes 4, 8, 16, 32: one stack per size, ⌈9/8⌉ + 2 = 4 decompositions per device
_SHAPES = {"sq": (16, 16), "sq2": (16, 16), "w": (16, 32), "b": (16,), "k": (8, 4, 8)}
_FACTORS = [d for s in _SHAPES.values() if len(s) > 1 for d in s]
_FREQ, _STEPS = 5, 32  # refreshes at calls 6, 11, ..., 31


def _problem(shapes=_SHAPES, seed=0):
    rng = np.random.RandomState(seed)
    params = {k: rng.randn(*s) * 0.5 for k, s in shapes.items()}
    grads = [{k: rng.randn(*s) for k, s in shapes.items()} for _ in range(4)]
    return params, grads


def _tx(**kw):
    return optax.chain(so_optax.soap(precondition_frequency=_FREQ, post_step_decay_lr=1e-2, **kw), optax.scale(-1e-2))


def _handover(one_device_bases, shapes):
    """Replaces the non-square leaves' first bases by the one-device run's (placed as the state's)."""

    def edit(state):
        soap_state = state[0]
        bases = dict(soap_state.bases)
        for name, shape in shapes.items():
            if len(set(shape)) > 1:
                bases[name] = jax.tree.map(lambda b, like: jax.device_put(b, like.sharding),
                                           one_device_bases[name], soap_state.bases[name])
        return (soap_state._replace(bases=bases),) + tuple(state[1:])

    return edit


def _bound_holds(state, devices):
    held = bytes_per_device(state)
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    largest = max(x.nbytes for x in jax.tree.leaves(state[0].factors))
    return len(held) == devices and max(held.values()) <= 1.25 * total / devices + largest


@pytest.fixture(scope="module")
def one_device():
    """The reference: the float64 trajectory on one device (no mesh), and its first bases."""
    first = {}

    def keep_bases(state):
        first.update(jax.device_get(state[0].bases))
        return state

    with jax.enable_x64(True):
        params, grads = _problem()
        ref, _, _ = trajectory(_tx(), params, grads, _STEPS, after_first=keep_bases)
    return dict(params=params, grads=grads, ref=ref, bases=first)


@pytest.mark.parametrize(
    "shape,names,kind,how",
    [
        ((8,), ("fsdp",), "Explicit", "rows"),
        ((8,), ("fsdp",), "Auto", "cols"),
        ((4,), ("fsdp",), "Explicit", "replicated"),
        ((2,), ("fsdp",), "Auto", "rows"),
        ((2, 4), ("data", "fsdp"), "Explicit", "rows"),
        ((2, 4), ("fsdp", "tensor"), "Auto", P("fsdp", "tensor")),
    ],
    ids=["8-explicit-rows", "8-auto-cols", "4-explicit-replicated", "2-auto-rows", "2x4-explicit-rows",
         "2x4-auto-both"],
)
def test_matches_one_device(one_device, shape, names, kind, how):
    """1-D meshes of 8, 4 and 2 devices and 2-D meshes, Explicit and Auto, parameters split by rows, by
    columns, over both axes or replicated: ≤ 1e-9 relative from one device at every one of 32 steps (6
    refreshes); one compiled program for all steps (ahead of time, so any placement drift would fail); the
    state split 1/N; at most ⌈F/N⌉ + 2 of the F eigh and QR decompositions in each device's program."""
    mesh = make_mesh(shape, names, kind)
    with jax.enable_x64(True), jax.set_mesh(mesh):
        how_of = {k: (how if not isinstance(how, P) or len(s) == 2 else "replicated") for k, s in _SHAPES.items()}

        def place(tree):
            return {k: put(v, mesh, how_of[k]) for k, v in tree.items()}

        got, state, hlo = trajectory(_tx(), one_device["params"], one_device["grads"], _STEPS, place,
                                     after_first=_handover(one_device["bases"], _SHAPES), aot=True)
    errs = [max_rel_err(g, r) for g, r in zip(got, one_device["ref"])]
    assert max(errs) <= 1e-9, errs
    devices = math.prod(shape)
    assert _bound_holds(state, devices)
    bound = math.ceil(len(_FACTORS) / devices) + 2
    counts = lapack_calls(hlo)
    assert 0 < counts["syevd"] <= bound and 0 < counts["geqrf"] <= bound, (counts, bound)


def test_no_recompilation(one_device):
    """A jitted step under an Auto mesh compiles once for all steps (the state stays where init put it and
    the parameters where the step's out_shardings keep them)."""
    mesh = make_mesh((2,), ("fsdp",), "Auto")
    with jax.enable_x64(True), jax.set_mesh(mesh):
        _, _, step = trajectory(_tx(), one_device["params"], one_device["grads"], 2 * _FREQ + 2,
                                lambda t: put(t, mesh, "rows"))
    assert step._cache_size() == 1


def _gpt_like():
    """The benchmark GPT's layer structure at a quarter width: F = 12 factor matrices of 5 sizes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_step import gpt_shapes

    return gpt_shapes(D=64, L=1, V=24, F=256, T=32)


def test_gpt_like_state_split_and_decompositions_spread():
    """FSDP-sharded GPT-like shapes on an 8-device Explicit mesh: each device holds at most
    1.25·total/N + the largest factor of the state, its compiled program runs at most ⌈F/N⌉ + 2 eigh and QR
    decompositions, and the owners' real work (d³) is balanced."""
    shapes = _gpt_like()
    mesh = make_mesh((8,), ("fsdp",), "Explicit")
    tx = optax.chain(so_optax.soap(), optax.scale(-1e-3))
    with jax.set_mesh(mesh):
        params = {f"p{i:02d}": put(np.ones(s, np.float32), mesh, "rows") for i, s in enumerate(shapes)}
        state = jax.jit(tx.init)(params)
        hlo = jax.jit(lambda p, s: tx.update(p, s, p)).lower(params, state).compile().as_text()
    sizes = [d for s in shapes if len(s) == 2 for d in s]
    bound = math.ceil(len(sizes) / 8) + 2
    counts = lapack_calls(hlo)
    assert 0 < counts["syevd"] <= bound and 0 < counts["geqrf"] <= bound, (counts, bound)
    assert _bound_holds(state, 8)
    loads = [0] * 8
    for cls in _mesh_linalg.balance(sizes, 8):
        for device, row in enumerate(cls.owners):
            loads[device] += sum(sizes[k] ** 3 for k in row if k is not None)
    assert max(loads) - sum(loads) / 8 <= max(sizes) ** 3, loads


def test_varied_sizes_merge_into_padded_stacks():
    """Four square leaves of four sizes on 8 devices (F = 8 matrices): one size is merged into the next by
    block-diagonal padding to keep ⌈8/8⌉ + 2 = 3 decompositions per device; the numbers stay one
    device's, through the first call's eigh and a refresh's QR."""
    shapes = {f"s{d}": (d, d) for d in (3, 5, 6, 7)}
    params, grads = _problem(shapes, seed=1)
    with jax.enable_x64(True):
        ref, _, _ = trajectory(_tx(), params, grads, _FREQ + 3)
        mesh = make_mesh((8,), ("fsdp",), "Auto")
        with jax.set_mesh(mesh):
            got, _, hlo = trajectory(_tx(), params, grads, _FREQ + 3, lambda t: put(t, mesh, "replicated"), aot=True)
    assert max(max_rel_err(g, r) for g, r in zip(got, ref)) <= 1e-9
    assert lapack_calls(hlo) == {"syevd": 3, "geqrf": 3}
    assert sorted(cls.size for cls in _mesh_linalg.balance([3, 3, 5, 5, 6, 6, 7, 7], 8)) == [3, 6, 7]


def test_balance_plans():
    """The planner: every matrix gets one slot of at least its size, the slot bound holds, stacks are merged
    only when the bound needs it, and the largest matrices are spread first."""
    gpt = [96, 256, 128, 256] + [256, 768, 256, 256, 256, 1024, 1024, 256] * 4
    for sizes, devices in ((gpt, 8), (gpt, 4), (gpt, 2), ([3, 5, 6, 7, 9, 10, 11, 12, 13], 8), ([7] * 20, 8)):
        plan = _mesh_linalg.balance(sizes, devices)
        slots = [k for cls in plan for row in cls.owners for k in row if k is not None]
        assert sorted(slots) == list(range(len(sizes)))
        assert all(sizes[k] <= cls.size for cls in plan for row in cls.owners for k in row if k is not None)
        assert all(len(cls.owners) == devices and len(row) == cls.slots for cls in plan for row in cls.owners)
        assert sum(cls.slots for cls in plan) <= math.ceil(len(sizes) / devices) + 2
    plan = {cls.size: cls for cls in _mesh_linalg.balance(gpt, 8)}  # 5 sizes in 7 slots: no merging
    assert sorted(plan) == [96, 128, 256, 768, 1024]
    assert all(len([k for k in row if k is not None]) == 1 for row in plan[1024].owners)
    # the devices without a 768 take the 256s first
    with_768 = [dev for dev, row in enumerate(plan[768].owners) if row[0] is not None]
    assert all(None not in plan[256].owners[dev] for dev in range(8) if dev not in with_768)


def test_padded_decompositions_are_exact():
    """eigh of diag(F, −I) and QR of diag(P, I) give F's eigenvectors and P's Q in the top-left block."""
    rng = np.random.RandomState(3)
    a = rng.randn(5, 5)
    f, p = a @ a.T, rng.randn(5, 5)
    vecs = _linalg.eigenvectors_descending(_mesh_linalg._padded(jnp.asarray(f), 8, -1.0))
    want = np.linalg.eigh(f)[1][:, ::-1]
    np.testing.assert_allclose(np.abs(np.asarray(vecs)[:5, :5].T @ want), np.eye(5), atol=1e-5)  # up to signs
    q = np.asarray(_linalg.orthonormal_factor(_mesh_linalg._padded(jnp.asarray(p), 8, 1.0)))
    np.testing.assert_allclose(q[:5, :5], np.linalg.qr(p)[0], atol=1e-5)
    np.testing.assert_allclose(q[5:, 5:], np.eye(3), atol=1e-6)


def test_mesh_axes_limits_the_spread():
    """mesh_axes='fsdp' on a 2×4 ('data', 'fsdp') mesh: the state is split 4 ways and replicated over
    'data', each device decomposes at most ⌈F/4⌉ + 2, and the numbers stay one device's."""
    mesh = make_mesh((2, 4), ("data", "fsdp"), "Explicit")
    shapes = {"sq": (16, 16), "sq3": (8, 8)}
    params, grads = _problem(shapes, seed=2)
    with jax.enable_x64(True):
        ref, _, _ = trajectory(_tx(), params, grads, _FREQ + 2)
        with jax.set_mesh(mesh):
            got, state, hlo = trajectory(_tx(mesh_axes="fsdp"), params, grads, _FREQ + 2,
                                         lambda t: put(t, mesh, P("fsdp")), aot=True)
    assert max(max_rel_err(g, r) for g, r in zip(got, ref)) <= 1e-9
    assert specs(state[0].factors["sq"]) == (P("fsdp", None),) * 2
    held = bytes_per_device(state)
    assert max(held.values()) == min(held.values()) <= sum(x.nbytes for x in jax.tree.leaves(state)) / 4 + 4
    assert lapack_calls(hlo)["geqrf"] <= math.ceil(4 / 4) + 2


def test_bad_mesh_axes_raise_naming_them():
    mesh = make_mesh((2, 4), ("data", "fsdp"), "Explicit")
    params = {"w": np.ones((8, 8), np.float32)}
    with pytest.raises(ValueError, match="mesh_axes"):
        so_optax.soap(mesh_axes=3)
    with pytest.raises(ValueError, match="twice"):
        so_optax.soap(mesh_axes=("fsdp", "fsdp"))
    with pytest.raises(ValueError, match="no mesh is set"):
        so_optax.soap(mesh_axes="fsdp").init(params)
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match="no axis 'model'"):
            jax.jit(so_optax.soap(mesh_axes=("fsdp", "model")).init)(params)
        on_data = {"w": jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("data")))}
        tx = so_optax.soap(mesh_axes="fsdp")
        with pytest.raises(ValueError, match=r"params: leaf \['w'\] is sharded over mesh axis 'data'"):
            jax.jit(tx.init)(on_data)
        state = jax.jit(tx.init)({"w": jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("fsdp")))})
        with pytest.raises(ValueError, match=r"updates: leaf \['w'\] is sharded over mesh axis 'data'"):
            jax.jit(tx.update)(on_data, state, on_data)
    auto = make_mesh((2, 4), ("data", "fsdp"), "Auto")
    with jax.set_mesh(auto):  # Auto: concrete parameters carry their sharding
        on_data = {"w": jax.device_put(jnp.ones((8, 8)), NamedSharding(auto, P("data")))}
        with pytest.raises(ValueError, match="mesh axis 'data'"):
            so_optax.soap(mesh_axes="fsdp").init(on_data)


@pytest.mark.parametrize("kind", ["Explicit", "Auto"])
def test_state_shardings_before_init(kind):
    """so_optax.state_shardings gives, before init, the shardings jax.jit(tx.init) produces (and every
    update keeps, test_matches_one_device), for a chain with SOAP; under Explicit so does eval_shape."""
    mesh = make_mesh((8,), ("fsdp",), kind)
    tx = optax.chain(so_optax.soap(), optax.add_decayed_weights(1e-2), optax.scale(-1e-2))
    with jax.set_mesh(mesh):
        params = {"w": put(np.ones((16, 24), np.float32), mesh, "cols"),
                  "b": put(np.ones(24, np.float32), mesh, "rows"),
                  "odd": put(np.ones((3, 5), np.float32), mesh, "replicated")}
        want = so_optax.state_shardings(tx, params)
        state = jax.jit(tx.init)(params)
        if kind == "Explicit":
            typed = jax.eval_shape(tx.init, params)
            assert jax.tree.map(lambda s: full_spec(s.sharding.spec, len(s.shape)), typed) == specs(state)
    assert jax.tree.map(lambda s, x: full_spec(s.spec, x.ndim), want, state) == specs(state)
    assert specs(state[0].factors["w"]) == (P("fsdp", None),) * 2
    assert specs(state[0].factors["odd"]) == (P(None, None),) * 2
    with pytest.raises(ValueError, match="mesh"):
        so_optax.state_shardings(tx, params)


def test_lapack_runs_one_thread_when_simulated_devices_decompose_at_once(monkeypatch):
    """Several CPU devices in one process decomposing at once with a multi-threaded LAPACK: the limit to
    one thread is set once, with a warning that says how to avoid it (here LAPACK already runs one thread,
    so its count and the limit are stubbed)."""
    from so_optax import _lapack_lanes

    limits = []
    monkeypatch.setattr(_lapack_lanes, "_limit", None)
    monkeypatch.setattr(_lapack_lanes, "lapack_threads", lambda default: 2)
    monkeypatch.setattr("threadpoolctl.threadpool_limits", lambda **kw: limits.append(kw) or kw)
    mesh = make_mesh((8,), ("fsdp",), "Auto")
    with jax.set_mesh(mesh), pytest.warns(RuntimeWarning, match="OPENBLAS_NUM_THREADS=1"):
        jax.jit(_tx().update).lower(*(lambda p: (p, jax.jit(_tx().init)(p), p))({"w": jnp.ones((8, 8))}))
    assert limits == [dict(limits=1, user_api="blas")]
    with jax.set_mesh(mesh):  # once per process
        jax.jit(_tx().update).lower(*(lambda p: (p, jax.jit(_tx().init)(p), p))({"w": jnp.ones((8, 8))}))
    assert len(limits) == 1


def test_injected_hyperparameters_on_an_explicit_mesh():
    """optax.inject_hyperparams (traced options) works on an Explicit mesh, with one device's numbers."""
    shapes = {"sq": (16, 16)}
    params, grads = _problem(shapes, seed=4)

    def tx():
        return optax.chain(optax.inject_hyperparams(so_optax.soap, static_args=so_optax.SOAP_STATIC_ARGS)(
            precondition_frequency=2, weight_decay=0.1, eps=1e-6, post_step_decay_lr=1e-2), optax.scale(-1e-2))

    with jax.enable_x64(True):
        ref, _, _ = trajectory(tx(), params, grads, 4)
        mesh = make_mesh((8,), ("fsdp",), "Explicit")
        with jax.set_mesh(mesh):
            got, _, _ = trajectory(tx(), params, grads, 4, lambda t: put(t, mesh, "rows"))
    assert max(max_rel_err(g, r) for g, r in zip(got, ref)) <= 1e-9
