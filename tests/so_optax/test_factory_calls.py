"""The factory calls that read as a complete optimizer fail with the chain that makes one.

``so_optax.soap`` / ``so_optax.sophia`` return a direction; ``soap(1e-3)`` (the ``optax.adamw(lr)`` habit) used
to set ``betas`` (and fail with "Invalid betas: 0.001"), ``soap(learning_rate=...)`` was an option that left
the step at size 1 along +direction when the chain lacked ``optax.scale(-lr)``, and ``lr=`` was a bare TypeError.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import optax
import pytest

import so_optax

CHAIN = {name: f"optax.chain(so_optax.{name}(...), optax.scale(-lr))" for name in ("soap", "sophia", "scale_by_soap")}


@pytest.mark.parametrize("name", ["soap", "sophia", "scale_by_soap"])
@pytest.mark.parametrize("args", [(1e-3,), (3e-3, 0.01), ((0.9, 0.99),)])
def test_positional_arguments_raise_with_the_chain(name, args):
    with pytest.raises(TypeError, match=r"keyword arguments only; got \d positional argument") as err:
        getattr(so_optax, name)(*args)
    assert CHAIN[name] in str(err.value)
    assert repr(args[0]) in str(err.value)


@pytest.mark.parametrize("name", ["soap", "sophia", "scale_by_soap"])
@pytest.mark.parametrize("key", ["lr", "learning_rate"])
def test_learning_rate_keywords_raise_with_the_chain(name, key):
    with pytest.raises(TypeError, match=f"has no '{key}' option") as err:
        getattr(so_optax, name)(**{key: 1e-3})
    assert CHAIN[name] in str(err.value)


def test_soap_learning_rate_points_to_post_step_decay_lr():
    with pytest.raises(TypeError, match=re.escape("post_step_decay_lr=")):
        so_optax.soap(learning_rate=1e-3, weight_decay=0.1)
    with pytest.raises(TypeError) as err:
        so_optax.soap(lr=1e-3)
    assert "post_step_decay_lr" not in str(err.value)


def test_keyword_calls_and_injection_still_work():
    params = jnp.ones((3, 2))
    for tx in (
        so_optax.soap(weight_decay=0.1, post_step_decay_lr=1e-2),
        so_optax.sophia(rho=0.05, estimator="hutchinson"),
        optax.inject_hyperparams(so_optax.soap, static_args=so_optax.SOAP_STATIC_ARGS)(post_step_decay_lr=1e-2),
        optax.inject_hyperparams(so_optax.sophia, static_args=so_optax.SOPHIA_STATIC_ARGS)(rho=0.05),
    ):
        tx.init(params)
    assert so_optax.soap.__name__ == "soap" and "direction" in so_optax.soap.__doc__
