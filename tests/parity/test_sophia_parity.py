"""so_optax.sophia against torch_bridge.Sophia in float64 lockstep, with injected randomness.

Both sides train the same small MLP on the same batches. Torch and JAX random streams cannot be
matched, so the sampled labels (Sophia-G) and probe vectors (Sophia-H) are drawn once with numpy and
handed to both: to torch through its ``_sample_labels`` / ``_draw_probes`` hooks, to JAX through the
``sampled_labels=`` / ``probe=`` extra arguments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import so_optax
import torch_bridge
from tests.parity.option_table import sophia_jax_options

STEPS = 36
RTOL = 1e-6
N, D_IN, HIDDEN, C = 16, 5, 7, 3
SHAPES = {"w1": (D_IN, HIDDEN), "b1": (HIDDEN,), "w2": (HIDDEN, C), "b2": (C,)}


def jax_logits(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def torch_logits(params, x):
    return torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def jax_cross_entropy(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(jax_logits(params, x), y).mean()


class InjectedSophia(torch_bridge.Sophia):
    """torch_bridge.Sophia whose labels / probes come from the test."""

    labels = None
    probes = None

    def _sample_labels(self, logits):
        return torch.as_tensor(self.labels)

    def _draw_probes(self, params):
        return [torch.as_tensor(self.probes[name]) for name in self.names_of(params)]


def make_run(seed):
    rng = np.random.default_rng(seed)
    init = {name: rng.normal(scale=0.5, size=shape) for name, shape in SHAPES.items()}
    batches = [(rng.normal(size=(N, D_IN)), rng.integers(0, C, size=N)) for _ in range(STEPS)]
    labels = [rng.integers(0, C, size=N) for _ in range(STEPS)]
    probes = [{name: rng.normal(size=shape) for name, shape in SHAPES.items()} for _ in range(STEPS)]
    return init, batches, labels, probes


def rel_diff(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize(
    "torch_options",
    [
        dict(lr=0.05, rho=0.03, k=3, weight_decay=0.01),
        dict(lr=0.05, rho=0.1, k=2, weight_decay=0.0, betas=(0.8, 0.95), bias_correction=True),
        dict(lr=0.02, k=3, form="paper", gamma=0.05, eps=1e-10, weight_decay=0.1, bias_correction=True),
        dict(lr=0.05, rho=0.1, k=4, betas=(0.8, 0.9), hessian_bias_correction=True),
        dict(lr=0.02, k=3, form="paper", gamma=0.05, eps=1e-10, weight_decay=0.1, betas=(0.9, 0.95),
             hessian_bias_correction=True, early_refresh_steps=5),
        dict(lr=0.02, k=4, form="paper", gamma=0.2, eps=1e-10, early_refresh_steps=6),
    ],
    ids=["seed-wd", "seed-bias-corrected", "paper", "seed-hessian-bias-corrected",
         "paper-hessian-bias-corrected-early-refresh", "paper-early-refresh"],
)
@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_sophia_lockstep_float64(torch_options, estimator):
    torch_options = dict(torch_options, hessian_computation_type=estimator)
    init, batches, labels, probes = make_run(seed=3)
    names = list(SHAPES)

    torch_params = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in init.items()}
    opt = InjectedSophia([torch_params[n] for n in names], **torch_options)
    ids = {id(torch_params[n]): n for n in names}
    opt.names_of = lambda params: [ids[id(p)] for p in params]

    with jax.enable_x64(True):
        jax_options, lr = sophia_jax_options(torch_options)
        tx = optax.chain(so_optax.sophia(**jax_options), optax.scale(-lr))
        params = {n: jnp.asarray(v) for n, v in init.items()}
        state = tx.init(params)

        @jax.jit
        def jax_step(params, state, x, y, labels, probe):
            grads = jax.grad(jax_cross_entropy)(params, x, y)
            extra = (
                dict(logits_fn=lambda p: jax_logits(p, x), sampled_labels=labels)
                if estimator == "gnb"
                else dict(obj_fn=lambda p: jax_cross_entropy(p, x, y), probe=probe)
            )
            updates, state = tx.update(grads, state, params, **extra)
            return optax.apply_updates(params, updates), state

        worst = 0.0
        for t, (x, y) in enumerate(batches):
            before = {n: torch_params[n].detach().clone() for n in names}
            xt, yt = torch.as_tensor(x), torch.as_tensor(y)
            opt.labels, opt.probes = labels[t], probes[t]
            opt.zero_grad()
            if estimator == "gnb":
                logits = torch_logits(torch_params, xt)
                torch.nn.functional.cross_entropy(logits, yt).backward(retain_graph=True)
                opt.step(logits=logits)
            else:
                def closure(xt=xt, yt=yt):
                    return torch.nn.functional.cross_entropy(torch_logits(torch_params, xt), yt)

                opt.step(closure=closure)
            new_params, state = jax_step(params, state, x, y, labels[t], probes[t])
            for n in names:
                torch_update = (torch_params[n].detach() - before[n]).numpy()
                jax_update = np.asarray(new_params[n] - params[n])
                assert jax_update.dtype == np.float64
                worst = max(worst, rel_diff(jax_update, torch_update))
            params = new_params
        print(f"[sophia parity] {estimator}: max relative update difference {worst:.2e}")
        assert worst <= RTOL, f"max relative difference of the updates {worst:.3e} over {STEPS} steps"
        # The two stayed in lockstep for the whole run, not just for single steps.
        for n in names:
            np.testing.assert_allclose(np.asarray(params[n]), torch_params[n].detach().numpy(), rtol=RTOL, atol=0)


def test_hessian_vector_products_agree():
    """The torch double-backward HVP equals JAX's forward-over-reverse HVP for the same v."""
    from so_optax import hutchinson_diag_from_probe
    from torch_bridge._hessian_estimators import hessian_vector_product

    init, batches, _, probes = make_run(seed=5)
    x, y = batches[0]
    names = list(SHAPES)
    torch_params = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in init.items()}
    loss = torch.nn.functional.cross_entropy(torch_logits(torch_params, torch.as_tensor(x)), torch.as_tensor(y))
    torch_hv = hessian_vector_product(
        loss, [torch_params[n] for n in names], [torch.as_tensor(probes[0][n]) for n in names]
    )

    with jax.enable_x64(True):
        params = {n: jnp.asarray(v) for n, v in init.items()}
        obj = lambda p: jax_cross_entropy(p, x, y)  # noqa: E731
        _, jax_hv = jax.jvp(jax.grad(obj), (params,), (probes[0],))
        diag = hutchinson_diag_from_probe(obj, params, probes[0])
        for n, hv in zip(names, torch_hv):
            np.testing.assert_allclose(np.asarray(jax_hv[n]), hv.detach().numpy(), rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(np.asarray(diag[n]), probes[0][n] * hv.detach().numpy(), rtol=1e-10, atol=1e-14)
