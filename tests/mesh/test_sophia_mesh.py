"""so_optax.sophia (Sophia-G and Sophia-H) on device meshes: one device's labels, probes and updates.

The model is an FSDP-style MLP: parameters split over the mesh, gathered for the forward pass
(``reshard(w, P())``), the batch split over the same devices. float64, compared step by step with the same
optimizer on one device through several Hessian refreshes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import so_optax
from so_optax import _hessian_estimators
from tests.mesh.helpers import bytes_per_device, make_mesh, max_rel_err, put, specs

pytestmark = pytest.mark.timeout(300)

_STEPS, _K = 12, 3  # refreshes at steps 3, 6, 9, 12


def _gathered(w):
    return w if jax.sharding.get_abstract_mesh().empty else jax.sharding.reshard(w, P())


def _logits(params, x):
    h = jnp.tanh(x @ _gathered(params["w1"]) + _gathered(params["b1"]))
    return h @ _gathered(params["w2"])


def _loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y).mean()


def _problem():
    rng = np.random.RandomState(0)
    params = {"w1": rng.randn(16, 32) * 0.3, "b1": rng.randn(32) * 0.1, "w2": rng.randn(32, 8) * 0.3}
    x, y = rng.randn(32, 16), rng.randint(0, 8, 32)
    return params, x, y


def _tx(estimator, **kw):
    return optax.chain(so_optax.sophia(estimator=estimator, k=_K, weight_decay=0.1, seed=7, **kw),
                       optax.scale(-0.05))


def _run(estimator, params, x, y, place=lambda t: jax.tree.map(jnp.asarray, t), **kw):
    tx = _tx(estimator, **kw)

    def step(p, s, x, y):
        grads = jax.grad(_loss)(p, x, y)
        extra = (dict(logits_fn=lambda q: _logits(q, x)) if estimator == "gnb"
                 else dict(obj_fn=lambda q: _loss(q, x, y)))
        updates, s = tx.update(grads, s, p, **extra)
        return optax.apply_updates(p, updates), s

    params = place(params)
    state = jax.jit(tx.init)(params)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and jax.sharding.AxisType.Explicit not in mesh.axis_types:
        out = (jax.tree.map(lambda a: a.sharding, params), so_optax.state_shardings(tx, params))
        jitted = jax.jit(step, out_shardings=out)
    else:
        jitted = jax.jit(step)
    where, out = specs(state), []
    for _ in range(_STEPS):
        params, state = jitted(params, state, x, y)
        assert specs(state) == where
        out.append(jax.device_get(params))
    return out, state, jitted


@pytest.fixture(scope="module")
def one_device():
    with jax.enable_x64(True):
        params, x, y = _problem()
        return {est: _run(est, params, x, y)[0] for est in ("gnb", "hutchinson")}


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
@pytest.mark.parametrize(
    "shape,names,kind", [((8,), ("fsdp",), "Explicit"), ((8,), ("fsdp",), "Auto"), ((4,), ("fsdp",), "Auto"),
                         ((2, 4), ("data", "fsdp"), "Explicit")],
    ids=["8-explicit", "8-auto", "4-auto", "2x4-explicit"])
def test_matches_one_device(one_device, estimator, shape, names, kind):
    """Sophia-G and Sophia-H, parameters and batch split over the mesh: ≤ 1e-9 from one device at every
    step, one compilation, the state split over the devices."""
    mesh = make_mesh(shape, names, kind)
    params, x, y = _problem()
    with jax.enable_x64(True), jax.set_mesh(mesh):
        batch = tuple(names)
        xm = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(batch)))
        ym = jax.device_put(jnp.asarray(y), NamedSharding(mesh, P(batch)))
        got, state, jitted = _run(estimator, params, xm, ym, lambda t: put(t, mesh, "rows"))
    assert jitted._cache_size() == 1
    errs = [max_rel_err(g, r) for g, r in zip(got, one_device[estimator])]
    assert max(errs) <= 1e-9, errs
    devices = int(np.prod(shape))
    moments = (state[0].mu, state[0].nu)
    held = bytes_per_device(moments)
    assert len(held) == devices and max(held.values()) == sum(a.nbytes for a in jax.tree.leaves(moments)) / devices


@pytest.fixture(scope="module")
def one_device_draws():
    key = jax.random.PRNGKey(3)
    logits = jax.random.normal(jax.random.PRNGKey(4), (16, 8, 10))
    params = {"w": jnp.ones((16, 24)), "b": jnp.ones(24)}
    return dict(key=key, logits=logits, params=params,
                labels=jax.jit(_hessian_estimators.default_sample_labels)(key, logits),
                probe=jax.jit(_hessian_estimators.sample_probe)(key, params))


@pytest.mark.parametrize("kind", ["Explicit", "Auto"])
def test_labels_and_probes_are_one_devices(one_device_draws, kind):
    """The GNB labels sampled from batch-split logits and the Hutchinson probes drawn for split parameters
    are bit for bit those of one device, for the same key (jax_threefry_partitionable)."""
    assert jax.config.jax_threefry_partitionable
    d = one_device_draws
    mesh = make_mesh((8,), ("fsdp",), kind)
    with jax.set_mesh(mesh):
        split_logits = jax.device_put(d["logits"], NamedSharding(mesh, P("fsdp")))
        labels = jax.jit(_hessian_estimators.default_sample_labels)(d["key"], split_logits)
        probe = jax.jit(_hessian_estimators.sample_probe)(d["key"], put(d["params"], mesh, "cols"))
        if kind == "Explicit":  # each device draws its own part
            assert specs(labels) == P("fsdp", None)
            assert specs(probe) == {"w": P(None, "fsdp"), "b": P("fsdp")}
    np.testing.assert_array_equal(labels, d["labels"])
    jax.tree.map(np.testing.assert_array_equal, probe, d["probe"])


def test_bad_mesh_axes_raise_naming_them():
    mesh = make_mesh((2, 4), ("data", "fsdp"), "Explicit")
    with pytest.raises(ValueError, match="mesh_axes"):
        so_optax.sophia(mesh_axes=["fsdp", 1])
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match="no axis 'tensor'"):
            jax.jit(so_optax.sophia(mesh_axes="tensor").init)({"w": jnp.ones((8, 8))})
        on_data = {"w": jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("data")))}
        with pytest.raises(ValueError, match=r"params: leaf \['w'\] is sharded over mesh axis 'data'"):
            jax.jit(so_optax.sophia(mesh_axes="fsdp").init)(on_data)
