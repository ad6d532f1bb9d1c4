"""so_optax in Flax NNX: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` takes the same steps as the plain optax
loop on the split parameters, for SOAP and for Sophia, whose extra functions then receive the parameters'
``nnx.State`` (``logits_fn=lambda p: nnx.merge(graphdef, p)(x)``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import so_optax

nnx = pytest.importorskip("flax.nnx")


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


_X = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
_Y = jax.random.randint(jax.random.PRNGKey(1), (16,), 0, 3)


def _loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, _Y).mean()


def _make_tx(name):
    if name == "soap":
        inner = so_optax.soap(precondition_frequency=2)
    else:
        inner = so_optax.sophia(k=2, rho=0.05, estimator="gnb" if name == "sophia-g" else "hutchinson")
    return optax.chain(inner, optax.scale(-0.05))


def _extra_args(name, apply):
    """The Sophia estimator's function of the parameters (whatever pytree holds them)."""
    if name == "sophia-g":
        return dict(logits_fn=lambda p: apply(p)(_X))
    if name == "sophia-h":
        return dict(obj_fn=lambda p: _loss(apply(p)(_X)))
    return {}


@pytest.mark.parametrize("name", ["soap", "sophia-g", "sophia-h"])
def test_nnx_optimizer_takes_the_plain_optax_steps(name):
    model = _MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(jnp.copy, params)  # the split state shares its variables with the model
    optimizer = nnx.Optimizer(model, _make_tx(name), wrt=nnx.Param)
    merge = lambda p: nnx.merge(graphdef, p)  # noqa: E731

    @nnx.jit
    def nnx_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(_X)))(model)
        optimizer.update(model, grads, **_extra_args(name, merge))
        return loss

    tx = _make_tx(name)
    state = tx.init(params)

    @jax.jit
    def plain_step(params, state):
        loss, grads = jax.value_and_grad(lambda p: _loss(merge(p)(_X)))(params)
        updates, state = tx.update(grads, state, params, **_extra_args(name, merge))
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(6):  # refreshes on calls 2, 4, 6 (SOAP: Adam steps 2 and 4)
        losses.append(float(nnx_step(model, optimizer)))
        params, state, _ = plain_step(params, state)
    moved = nnx.state(model, nnx.Param)
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert losses[-1] < losses[0]
