"""Checkpoints of sharded so_optax states (orbax-checkpoint): saved on 8 devices, restored onto 4 devices and
onto 1, training then continues as the uninterrupted run does (float64, ≤ 1e-9 relative)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import so_optax
from tests.mesh.helpers import full_spec, make_mesh, max_rel_err, put, specs

pytestmark = pytest.mark.timeout(300)

_SAVED_AT, _MORE = 7, 6  # SOAP refreshes at calls 6 and 11, Sophia at 3, 6, 9, 12


def _problem():
    rng = np.random.RandomState(5)
    params = {"w1": rng.randn(16, 32) * 0.3, "b1": rng.randn(32) * 0.1, "w2": rng.randn(32, 8) * 0.3}
    x, y = rng.randn(32, 16), rng.randint(0, 8, 32)
    return params, x, y


def _logits(params, x):
    gather = (lambda w: w) if jax.sharding.get_abstract_mesh().empty else (lambda w: jax.sharding.reshard(w, P()))
    return jnp.tanh(x @ gather(params["w1"]) + gather(params["b1"])) @ gather(params["w2"])


def _loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y).mean()


_OPTIMIZERS = {
    "soap": lambda: optax.chain(so_optax.soap(precondition_frequency=5), optax.scale(-0.05)),
    "sophia": lambda: optax.chain(so_optax.sophia(estimator="gnb", k=3, seed=1), optax.scale(-0.05)),
}


def _steps(tx, params, state, x, y, count):
    """``count`` training steps on the batch; the parameters after each."""

    def step(p, s):
        updates, s = tx.update(jax.grad(_loss)(p, x, y), s, p, logits_fn=lambda q: _logits(q, x))
        return optax.apply_updates(p, updates), s

    mesh = jax.sharding.get_abstract_mesh()
    out_shardings = None
    if not mesh.empty and jax.sharding.AxisType.Explicit not in mesh.axis_types:
        out_shardings = (jax.tree.map(lambda a: a.sharding, params), so_optax.state_shardings(tx, params))
    jitted = jax.jit(step, out_shardings=out_shardings)
    out = []
    for _ in range(count):
        params, state = jitted(params, state)
        out.append(jax.device_get(params))
    return out, state


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


@pytest.mark.parametrize("name", ["soap", "sophia"])
def test_restore_onto_4_and_1_devices_continues_the_run(name, tmp_path):
    tx = _OPTIMIZERS[name]()
    params, x, y = _problem()
    with jax.enable_x64(True):
        eight = make_mesh((8,), ("fsdp",), "Explicit")
        with jax.set_mesh(eight):
            xs = jax.device_put(jnp.asarray(x), NamedSharding(eight, P("fsdp")))
            ys = jax.device_put(jnp.asarray(y), NamedSharding(eight, P("fsdp")))
            p8 = put(params, eight, "rows")
            trained, state8 = _steps(tx, p8, jax.jit(tx.init)(p8), xs, ys, _SAVED_AT)
            p8 = put(trained[-1], eight, "rows")
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(tmp_path / "ckpt", {"params": p8, "opt_state": state8})
            checkpointer.wait_until_finished()
            uninterrupted, _ = _steps(tx, p8, state8, xs, ys, _MORE)
            saved_shapes = jax.eval_shape(lambda t: t, {"params": p8, "opt_state": state8})

        four = make_mesh((4,), ("fsdp",), "Auto")
        with jax.set_mesh(four):
            p_shardings = jax.tree.map(lambda a: NamedSharding(four, P("fsdp")), params)
            target = {"params": p_shardings,
                      "opt_state": so_optax.state_shardings(tx, _abstract(saved_shapes["params"], p_shardings))}
            restored = checkpointer.restore(tmp_path / "ckpt", _abstract(saved_shapes, target))
            assert specs(restored["opt_state"]) == jax.tree.map(lambda s, a: full_spec(s.spec, a.ndim),
                                                                 target["opt_state"], restored["opt_state"])
            on_four, _ = _steps(tx, restored["params"], restored["opt_state"],
                                jax.device_put(jnp.asarray(x), NamedSharding(four, P("fsdp"))),
                                jax.device_put(jnp.asarray(y), NamedSharding(four, P("fsdp"))), _MORE)

        one = SingleDeviceSharding(jax.devices()[0])
        restored = checkpointer.restore(tmp_path / "ckpt", _abstract(saved_shapes, jax.tree.map(lambda _: one,
                                                                                                saved_shapes)))
        on_one, _ = _steps(tx, restored["params"], restored["opt_state"], jnp.asarray(x), jnp.asarray(y), _MORE)

    for got in (on_four, on_one):
        errs = [max_rel_err(g, w) for g, w in zip(got, uninterrupted)]
        assert max(errs) <= 1e-9, errs
    assert max_rel_err(uninterrupted[-1], trained[-1]) > 1e-6  # the continued steps do move the parameters
