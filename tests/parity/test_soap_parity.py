"""so_optax.soap against torch_bridge.SOAP in float64 lockstep on identical gradient sequences.

Each case builds both optimizers from one dict of torch-style options (translated by
``option_table``), feeds them the same gradients for ``STEPS`` calls and compares every parameter
update at ``RTOL`` relative (max |Δ| over max |update|, per tensor and step).

Eigenvectors of a repeated eigenvalue are arbitrary, and the first factors of a non-square
gradient are rank-deficient (their null-space eigenvectors are a free choice of each LAPACK). Where
a case has such a factor, torch's basis after the first call (when exp_avg is still zero, so nothing
needs rotating) is handed to JAX through ``state._replace(bases=...)``; all later bases are computed
independently by both sides, so every case refreshes only once its factors have become full rank
(a vector's factor gains one rank per call). Full-rank cases are compared with no help at all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import so_optax
import torch_bridge
from tests.parity.option_table import soap_jax_options

STEPS = 32
RTOL = 1e-6

CASES = {
    # name: (parameter shapes, torch options, bases need feeding after the first call)
    "square-2d": ([(6, 6), (4, 4)], dict(), False),
    "square-freq3-wd": ([(5, 5)], dict(precondition_frequency=3, weight_decay=0.05, lr=0.01), False),
    "rectangular-2d": ([(5, 8), (7, 3)], dict(precondition_frequency=4), True),
    "1d-plain": ([(7,), (4, 4)], dict(), False),
    "1d-preconditioned": ([(7,)], dict(precondition_1d=True, precondition_frequency=8), True),
    "0d": ([(), (3, 3)], dict(), False),
    # A rank-one-per-step factor (a vector's) is full rank only after d calls: refresh after that.
    "0d-merge": ([(), (3, 3)], dict(merge_dims=True), True),  # (3, 3) merges to a 9-vector
    "3d": ([(3, 4, 5)], dict(precondition_frequency=5), True),
    "4d-channels-first": ([(4, 3, 2, 2)], dict(precondition_frequency=5), True),
    "4d-channels-first-merge": (
        [(4, 3, 2, 2)], dict(merge_dims=True, max_precond_dim=6, precondition_frequency=5), True
    ),
    "4d-channels-last-merge": (
        [(4, 2, 2, 3)],
        dict(merge_dims=True, max_precond_dim=6, data_format="channels_last", precondition_frequency=5),
        True,
    ),
    "above-max-precond-dim": ([(4, 12), (12, 3)], dict(max_precond_dim=8, precondition_frequency=4), True),
    "merge-dims": ([(2, 3, 4), (6, 2)], dict(merge_dims=True, max_precond_dim=8, precondition_frequency=4), True),
    "normalize-grads": ([(5, 5), (6,)], dict(normalize_grads=True), False),
    "no-bias-correction": ([(5, 5)], dict(correct_bias=False, precondition_frequency=4), False),
    "shampoo-beta": ([(6, 6)], dict(shampoo_beta=0.8, betas=(0.9, 0.99), precondition_frequency=3), False),
    "eps-and-wd": ([(5, 5)], dict(eps=1e-6, weight_decay=0.2, lr=0.02), False),
}


def gradient_sequence(shapes, seed):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s) for s in shapes] for _ in range(STEPS)]


def to_jax_bases(torch_bases):
    return tuple(None if q.numel() == 0 else jnp.asarray(q.numpy()) for q in torch_bases)


@pytest.mark.parametrize("case", sorted(CASES))
def test_soap_lockstep_float64(case):
    shapes, torch_options, feed_bases = CASES[case]
    grads = gradient_sequence(shapes, seed=sorted(CASES).index(case))
    rng = np.random.default_rng(100)
    init = [rng.normal(size=s) for s in shapes]

    torch_params = [torch.tensor(p, dtype=torch.float64) for p in init]
    opt = torch_bridge.SOAP(torch_params, **torch_options)

    with jax.enable_x64(True):
        jax_options, lr = soap_jax_options(torch_options)
        tx = optax.chain(so_optax.soap(**jax_options), optax.scale(-lr))
        params = [jnp.asarray(p) for p in init]
        state = tx.init(params)
        step = jax.jit(lambda g, s, p: tx.update(g, s, p))

        worst = 0.0
        for t, g in enumerate(grads):
            before = [p.clone() for p in torch_params]
            for p, gi in zip(torch_params, g):
                p.grad = torch.tensor(gi)
            opt.step()
            updates, state = step([jnp.asarray(gi) for gi in g], state, params)
            for k, (p, u) in enumerate(zip(torch_params, updates)):
                torch_update = (p - before[k]).numpy()
                jax_update = np.asarray(u)
                assert jax_update.dtype == np.float64 and jax_update.shape == torch_update.shape
                scale = np.max(np.abs(torch_update))
                if t == 0:
                    assert scale == 0 and np.all(jax_update == 0), "the first call must not move parameters"
                    continue
                worst = max(worst, float(np.max(np.abs(jax_update - torch_update)) / scale))
            params = optax.apply_updates(params, updates)
            if t == 0 and feed_bases:
                soap_state = state[0]
                bases = [to_jax_bases(opt.state[p]["Q"]) for p in torch_params]
                state = (soap_state._replace(bases=bases),) + tuple(state[1:])
        print(f"[soap parity] {case}: max relative update difference {worst:.2e}")
        assert worst <= RTOL, f"{case}: max relative difference of the updates {worst:.3e}"
        for p, q in zip(torch_params, params):
            np.testing.assert_allclose(np.asarray(q), p.numpy(), rtol=RTOL, atol=1e-12)


def test_float32_parity_square():
    """In float32 the two sides still agree closely on a full-rank problem (no basis feeding)."""
    shapes = [(8, 8)]
    grads = gradient_sequence(shapes, seed=7)
    torch_params = [torch.zeros(s, dtype=torch.float32) for s in shapes]
    opt = torch_bridge.SOAP(torch_params, lr=1e-2, precondition_frequency=5)
    tx = optax.chain(so_optax.soap(post_step_decay_lr=1e-2, precondition_frequency=5), optax.scale(-1e-2))
    params = [jnp.zeros(s, jnp.float32) for s in shapes]
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads[:20]:
        for p, gi in zip(torch_params, g):
            p.grad = torch.tensor(gi, dtype=torch.float32)
        opt.step()
        updates, state = step([jnp.asarray(gi, jnp.float32) for gi in g], state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params[0]), torch_params[0].numpy(), rtol=2e-4, atol=2e-6)
