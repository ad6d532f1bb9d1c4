"""Tests of torch_bridge.Sophia: step-for-step equality with the seed class, estimators, API conventions.

The reference implementation (the Sophia class this one replaces, "the seed") is not part of the repository:
tests that need it load its source at run time from ``$SO_OPTAX_REFERENCE_DIR`` and skip without it (see
``tests/reference_impl.py``).
"""

from __future__ import annotations

import contextlib
import gc
import io
import re
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.reference_impl import SOPHIA_DOC, reference_document
from torch_bridge import Sophia
from torch_bridge import _hessian_estimators as hessian_estimators
from torch_bridge._hessian_estimators import (
    gnb_hessian_diagonal,
    hessian_vector_product,
    sample_labels,
)

RTOL = 1e-6


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add contention on a shared CI machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- seed loading
def _seed_document() -> Path:
    return reference_document(SOPHIA_DOC, "that torch_bridge.Sophia steps exactly as the reference Sophia class "
                                          "does and runs its two example scripts with only the import changed")


def _seed_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", _seed_document().read_text(), re.S)


def _seed_class():
    blocks = [b for b in _seed_blocks() if "class Sophia" in b]
    if not blocks:
        pytest.skip("no `class Sophia` block in the seed document")
    namespace: dict = {"__name__": "sophia_seed"}
    exec(compile(blocks[0], str(_seed_document()), "exec"), namespace)
    return namespace["Sophia"]


def _seed_example(estimator: str) -> str:
    marker = "hessian_computation_type='hutchinson'" if estimator == "hutchinson" else "optimizer.step(logits=logits)"
    blocks = [b for b in _seed_blocks() if "from sophia_optimizer import Sophia" in b and marker in b]
    if not blocks:
        pytest.skip(f"no {estimator} example in the seed document")
    return blocks[0]


# ----------------------------------------------------------------------------- helpers
class InjectedSophia(Sophia):
    """Sophia whose labels / probes come from the test (the parity-injection hooks)."""

    labels: torch.Tensor | None = None
    probes: list[torch.Tensor] | None = None  # one per parameter, in self.param_groups order

    def _sample_labels(self, logits):
        assert self.labels is not None
        return self.labels

    def _draw_probes(self, params):
        order = {id(p): i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}
        return [self.probes[order[id(p)]] for p in params]


def _classifier(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)


def _regressor(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).to(dtype)


def _copy(model):
    clone = _classifier() if model[0].in_features == 6 else _regressor()
    clone.load_state_dict(model.state_dict())
    return clone


def _max_rel(ours, ref) -> float:
    worst = 0.0
    with torch.no_grad():
        for a, b in zip(ours, ref):
            worst = max(worst, float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()))
    return worst


def _assert_params_close(ours, ref):
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)


# ----------------------------------------------------------------------------- equality with the seed
def test_matches_seed_gnb_float64(monkeypatch):
    SeedSophia = _seed_class()
    torch.manual_seed(1)
    x = torch.randn(16, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (16,))
    ref_model = _classifier()
    our_model = _copy(ref_model)
    kw = dict(lr=0.05, betas=(0.9, 0.95), rho=0.5, weight_decay=0.01, k=3)
    ref_opt = SeedSophia(ref_model.parameters(), **kw)
    our_opt = InjectedSophia(our_model.parameters(), **kw)
    gen = torch.Generator().manual_seed(7)
    worst, win_rates = 0.0, []
    for _ in range(36):
        labels = torch.randint(0, 4, (16,), generator=gen)
        for model, opt in ((ref_model, ref_opt), (our_model, our_opt)):
            opt.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward(retain_graph=True)
            if opt is ref_opt:  # the seed samples per parameter: give every sample the same labels
                with monkeypatch.context() as mp:
                    mp.setattr(
                        torch, "multinomial", lambda probs, num_samples, labels=labels, **_: labels.unsqueeze(-1)
                    )
                    opt.step(logits=logits)
            else:
                opt.labels = labels
                opt.step(logits=logits)
        win_rates.append(our_opt.win_rate)
        ours, ref = list(our_model.parameters()), list(ref_model.parameters())
        _assert_params_close(ours, ref)
        worst = max(worst, _max_rel(ours, ref))
    for p_ours, p_ref in zip(our_model.parameters(), ref_model.parameters()):
        for key in ("momentum_buffer", "hessian_buffer"):
            torch.testing.assert_close(our_opt.state[p_ours][key], ref_opt.state[p_ref][key], rtol=RTOL, atol=1e-15)
        assert int(our_opt.state[p_ours]["step"]) == ref_opt.state[p_ref]["step"] == 36
    assert any(0.0 < w < 1.0 for w in win_rates), win_rates  # both clipped and unclipped coordinates
    print(f"\n[sophia gnb vs seed] 36 steps float64: max rel diff {worst:.3e}")


def test_matches_seed_hutchinson_float64(monkeypatch):
    SeedSophia = _seed_class()
    torch.manual_seed(2)
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randn(12, 1, dtype=torch.float64)
    ref_model = _regressor()
    our_model = _copy(ref_model)
    kw = dict(lr=0.05, betas=(0.9, 0.95), rho=0.5, weight_decay=0.01, k=3, hessian_computation_type="hutchinson")
    ref_opt = SeedSophia(ref_model.parameters(), **kw)
    our_opt = InjectedSophia(our_model.parameters(), **kw)
    gen = torch.Generator().manual_seed(9)
    worst = 0.0
    for _ in range(33):
        probes = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in ref_model.parameters()]
        results = []
        for model, opt in ((ref_model, ref_opt), (our_model, our_opt)):
            opt.zero_grad()

            def closure(model=model):
                return F.mse_loss(model(x), y)

            if opt is ref_opt:
                it = iter(probes)
                with monkeypatch.context() as mp:
                    mp.setattr(torch, "randn_like", lambda t, *a, it=it, **k: next(it))
                    results.append(opt.step(closure=closure))
            else:
                opt.probes = probes
                results.append(opt.step(closure=closure))
        torch.testing.assert_close(results[1], results[0].detach(), rtol=1e-12, atol=0)
        ours, ref = list(our_model.parameters()), list(ref_model.parameters())
        _assert_params_close(ours, ref)
        worst = max(worst, _max_rel(ours, ref))
    for p_ours, p_ref in zip(our_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(
            our_opt.state[p_ours]["hessian_buffer"], ref_opt.state[p_ref]["hessian_buffer"], rtol=RTOL, atol=1e-15
        )
    print(f"\n[sophia hutchinson vs seed] 33 steps float64: max rel diff {worst:.3e}")


def test_seed_checkpoint_loads_and_continues_in_lockstep(monkeypatch):
    """A state_dict of the seed class (int step, seed key names) loads with weights_only=True."""
    SeedSophia = _seed_class()
    torch.manual_seed(3)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    ref_model = _classifier()
    ref_opt = SeedSophia(ref_model.parameters(), lr=0.05, rho=0.5, k=2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(5)

    def seed_step(labels):
        ref_opt.zero_grad()
        logits = ref_model(x)
        F.cross_entropy(logits, y).backward(retain_graph=True)
        with monkeypatch.context() as mp:
            mp.setattr(torch, "multinomial", lambda probs, num_samples, labels=labels, **_: labels.unsqueeze(-1))
            ref_opt.step(logits=logits)

    for _ in range(5):
        seed_step(torch.randint(0, 4, (8,), generator=gen))
    buf = io.BytesIO()
    torch.save(ref_opt.state_dict(), buf)
    buf.seek(0)
    our_model = _copy(ref_model)
    our_opt = InjectedSophia(our_model.parameters(), lr=0.05, rho=0.5, k=2, weight_decay=0.01)
    our_opt.load_state_dict(torch.load(buf, weights_only=True))
    assert our_opt.param_groups[0]["form"] == "seed"  # __setstate__ defaults
    for _ in range(6):
        labels = torch.randint(0, 4, (8,), generator=gen)
        seed_step(labels)
        our_opt.zero_grad()
        logits = our_model(x)
        F.cross_entropy(logits, y).backward(retain_graph=True)
        our_opt.labels = labels
        our_opt.step(logits=logits)
        _assert_params_close(list(our_model.parameters()), list(ref_model.parameters()))


# ----------------------------------------------------------------------------- the seed's example scripts
@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_seed_example_scripts_run_and_loss_falls(estimator):
    code = _seed_example(estimator)
    code = code.replace("from sophia_optimizer import Sophia", "from torch_bridge import Sophia")
    code, n = re.subn(r"range\(1001\)", "range(201)", code)
    assert n == 1
    torch.manual_seed(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"seed_example_{estimator}", "exec"), {"__name__": "__main__"})
    losses = [float(v) for v in re.findall(r"Loss: ([0-9.]+)", out.getvalue())]
    assert len(losses) == 2, out.getvalue()
    assert losses[-1] < losses[0], out.getvalue()


# ----------------------------------------------------------------------------- estimators
def _tiny_problem():
    torch.manual_seed(4)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, dtype=torch.float64)

    def f(w, a):
        return (torch.tanh(x @ w) ** 2).sum() + (torch.sin(a @ w) * a.sum()).sum() + (a**4).sum()

    return f, [w, a]


def test_hessian_vector_product_matches_exact_hessian_and_finite_differences():
    f, params = _tiny_problem()
    vectors = [torch.randn_like(p) for p in params]
    hv = hessian_vector_product(f(*params), params, vectors)
    sizes = [p.numel() for p in params]

    def flat_f(theta):
        w, a = torch.split(theta, sizes)
        return f(w.view(params[0].shape), a.view(params[1].shape))

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(flat_f, theta)
    expected = hessian @ torch.cat([v.reshape(-1) for v in vectors])
    torch.testing.assert_close(torch.cat([h.reshape(-1) for h in hv]), expected, rtol=1e-10, atol=1e-12)

    # central differences of the gradient along v
    step = 1e-5
    vflat = torch.cat([v.reshape(-1) for v in vectors])
    grad = torch.func.grad(flat_f)
    fd = (grad(theta + step * vflat) - grad(theta - step * vflat)) / (2 * step)
    torch.testing.assert_close(torch.cat([h.reshape(-1) for h in hv]), fd, rtol=1e-6, atol=1e-8)


def test_autograd_calls_per_step(monkeypatch):
    """One label sample and ONE backward for all parameters; HVP only on refresh steps."""
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *args, **kwargs):
        calls.append(bool(kwargs.get("create_graph", False)))
        return real_grad(outputs, inputs, *args, **kwargs)

    model = _classifier()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    opt = Sophia(model.parameters(), k=2)
    sampled = []
    real_sample = opt._sample_labels
    opt._sample_labels = lambda logits: sampled.append(1) or real_sample(logits)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    for step in range(1, 5):
        calls.clear()
        sampled.clear()
        opt.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, y).backward(retain_graph=True)
        opt.step(logits=logits)
        assert calls == ([False] if step % 2 == 0 else []), (step, calls)
        assert len(sampled) == (1 if step % 2 == 0 else 0)

    model = _regressor()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt = Sophia(model.parameters(), k=2, hessian_computation_type="hutchinson")
    for step in range(1, 5):
        calls.clear()
        opt.step(closure=lambda: F.mse_loss(model(x), y))
        assert calls == ([True, False] if step % 2 == 0 else [False]), (step, calls)


class _TinyLM(nn.Module):
    def __init__(self, vocab=5, dim=4):
        super().__init__()
        torch.manual_seed(6)
        self.emb = nn.Embedding(vocab, dim).double()
        self.out = nn.Linear(dim, vocab).double()

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)))


@pytest.mark.parametrize("form", ["seed", "paper"])
def test_gnb_btc_logits_with_mask(form):
    model = _TinyLM()
    tokens = torch.randint(0, 5, (3, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    labels = torch.randint(0, 5, (3, 4))
    opt = InjectedSophia(model.parameters(), k=1, betas=(0.0, 0.0), form=form)
    opt.labels = labels
    ce = F.cross_entropy(model(tokens)[mask], labels[mask])  # mean over real positions only
    grads = torch.autograd.grad(ce, list(model.parameters()))
    direct = gnb_hessian_diagonal(model(tokens), list(model.parameters()), labels, scale_by_positions=True)
    ce_all = F.cross_entropy(model(tokens).reshape(-1, 5), labels.reshape(-1))
    grads_all = torch.autograd.grad(ce_all, list(model.parameters()))

    logits = model(tokens)  # (B, T, C)
    logits.sum().backward(retain_graph=True)
    opt.step(logits=logits, logits_mask=mask)
    scale = int(mask.sum()) if form == "paper" else 1
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(opt.state[p]["hessian_buffer"], scale * g * g, rtol=1e-12, atol=1e-15)

    # without a mask: all B*T positions
    for d, g in zip(direct, grads_all):
        torch.testing.assert_close(d, 12 * g * g, rtol=1e-12, atol=1e-15)


def test_sample_labels_shape_and_distribution():
    logits = torch.tensor([[[0.0, 50.0, 0.0]] * 4] * 2)  # (2, 4, 3), class 1 almost surely
    labels = sample_labels(logits)
    assert labels.shape == (2, 4) and labels.dtype == torch.int64
    assert bool((labels == 1).all())


def test_sample_labels_frequencies_and_chunking(monkeypatch):
    """Inverse-CDF labels follow softmax(logits), and the float64 CDF's row chunks do not change them."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log().expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    labels = sample_labels(logits, generator=gen)
    freq = torch.bincount(labels, minlength=4).double() / labels.numel()
    assert torch.all((freq - probs).abs() < 4 * (probs * (1 - probs) / labels.numel()).sqrt())
    mixed = torch.randn(37, 5, 11, generator=torch.Generator().manual_seed(1))
    whole = sample_labels(mixed, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(hessian_estimators, "_CDF_CHUNK_ELEMENTS", 23)  # two rows per chunk
    assert torch.equal(sample_labels(mixed, generator=torch.Generator().manual_seed(2)), whole)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(rho=-0.1), "rho"),
        (dict(weight_decay=-1e-3), "weight_decay"),
        (dict(k=0), "k"),
        (dict(k=2.5), "k"),
        (dict(hessian_computation_type="newton"), "hessian_computation_type"),
        (dict(eps=-1e-8), "eps"),
        (dict(form="official"), "form"),
        (dict(gamma=0.0), "gamma"),
        (dict(bias_correction=1), "bias_correction"),
        (dict(probe="uniform"), "probe"),
        (dict(form="paper", eps=0.0), "eps"),
        (dict(hessian_bias_correction=1), "hessian_bias_correction"),
        (dict(early_refresh_steps=-1), "early_refresh_steps"),
        (dict(early_refresh_steps=2.0), "early_refresh_steps"),
        (dict(hessian_bias_correction=True, hessian_computation_type="manual"), "hessian_bias_correction"),
        (dict(early_refresh_steps=3, hessian_computation_type="manual"), "early_refresh_steps"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"Invalid {name}:"):
        Sophia([torch.zeros(2, requires_grad=True)], **kwargs)


def test_invalid_param_group_hyperparameter():
    opt = Sophia([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="Invalid rho"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "rho": -1.0})
    assert len(opt.param_groups) == 1  # a rejected group is not left behind


def test_complex_params_raise():
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid params: torch_bridge.Sophia .*parameter 0 of param group 0 "
                                         "has dtype torch.complex64"):
        Sophia([z])
    opt = Sophia([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="param group 1 has dtype torch.complex64"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


def test_a_step_without_logits_or_closure_raises_at_once():
    """Not only on the first refresh step (the k-th): a 5-step smoke test with k = 10 must see it."""
    model = _classifier()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 4, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    opt = Sophia(model.parameters(), k=10)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="needs `logits` at every step"):
        opt.step()  # step 1 does not refresh
    assert not opt.state and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    frozen = Sophia([torch.ones(2, requires_grad=False)])  # nothing to train: nothing needed
    frozen.step()

    # logits without their graph
    opt = Sophia(model.parameters(), k=1)
    with pytest.raises(ValueError, match="logits"):
        opt.step(logits=model(x).detach())

    # graph already freed by loss.backward() without retain_graph
    opt = Sophia(model.parameters(), k=1)
    opt.zero_grad()
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        opt.step(logits=logits)

    model = _regressor()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    opt = Sophia(model.parameters(), k=10, hessian_computation_type="hutchinson")
    F.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match="needs `closure` at every step"):
        opt.step()  # step 1 does not refresh
    assert not opt.state
    opt = Sophia(model.parameters(), k=1, hessian_computation_type="hutchinson")

    def backward_closure():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="without calling backward"):
        opt.step(closure=backward_closure)


# ----------------------------------------------------------------------------- torch.optim conventions
def _gnb_train(opt, model, x, y, steps, gen, retain=lambda opt: True):
    for _ in range(steps):
        opt.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, y).backward(retain_graph=retain(opt))
        opt.labels = torch.randint(0, 4, (x.shape[0],), generator=gen)
        opt.step(logits=logits)


def test_refreshes_next_step_keeps_the_graph_only_for_refresh_steps():
    """``backward(retain_graph=opt.refreshes_next_step())`` makes the same steps as the seed's
    always-retain pattern; the flag is set exactly before the steps that change the Hessian estimate, and a
    refresh step after a backward that freed the graph fails in autograd."""
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    model_a, model_b = _classifier(), _classifier()
    kw = dict(lr=0.02, k=3, weight_decay=0.01)
    opt_a, opt_b = InjectedSophia(model_a.parameters(), **kw), InjectedSophia(model_b.parameters(), **kw)
    flags, changed = [], []
    for t in range(1, 10):
        flags.append(opt_b.refreshes_next_step())
        before = [opt_b.state[p]["hessian_buffer"].clone() for p in model_b.parameters()] if t > 1 else None
        _gnb_train(opt_a, model_a, x, y, 1, torch.Generator().manual_seed(t))
        _gnb_train(opt_b, model_b, x, y, 1, torch.Generator().manual_seed(t), lambda o: o.refreshes_next_step())
        after = [opt_b.state[p]["hessian_buffer"] for p in model_b.parameters()]
        changed.append(before is not None and any(not torch.equal(u, v) for u, v in zip(before, after)))
    assert flags == [t % 3 == 0 for t in range(1, 10)] and changed == flags
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    assert opt_b.refreshes_next_step() is False
    _gnb_train(opt_b, model_b, x, y, 2, torch.Generator().manual_seed(0), lambda o: False)
    assert opt_b.refreshes_next_step() is True
    with pytest.raises(RuntimeError, match="graph behind `logits` was already freed"):
        _gnb_train(opt_b, model_b, x, y, 1, torch.Generator().manual_seed(0), lambda o: False)


def test_refreshes_next_step_ignores_manual_groups_and_frozen_params():
    a, frozen = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=False)
    h = torch.ones(2, requires_grad=True)
    opt = Sophia([{"params": [a], "hessian_computation_type": "manual"}, {"params": [frozen]}], k=1)
    assert opt.refreshes_next_step() is False
    opt.add_param_group({"params": [h], "hessian_computation_type": "hutchinson"})
    assert opt.refreshes_next_step() is True  # k = 1: every step refreshes


@pytest.mark.parametrize("form", ["seed", "paper"])
def test_state_dict_round_trip_weights_only_lockstep(form):
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    model_a = _classifier()
    kw = dict(lr=0.02, k=3, weight_decay=0.01, form=form, bias_correction=form == "paper")
    opt_a = InjectedSophia(model_a.parameters(), **kw)
    _gnb_train(opt_a, model_a, x, y, 7, torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model_b = _copy(model_a)
    opt_b = InjectedSophia(model_b.parameters(), **kw)
    opt_b.load_state_dict(state)
    for p in model_b.parameters():
        assert opt_b.state[p]["step"].dtype == torch.int64 and int(opt_b.state[p]["step"]) == 7
    _gnb_train(opt_a, model_a, x, y, 8, torch.Generator().manual_seed(1))
    _gnb_train(opt_b, model_b, x, y, 8, torch.Generator().manual_seed(1))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
        for key in ("momentum_buffer", "hessian_buffer"):
            assert torch.equal(opt_a.state[a][key], opt_b.state[b][key])


def test_params_without_grad_are_skipped_and_per_group_hyperparameters():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    frozen = torch.ones(4, requires_grad=True)
    opt = Sophia([{"params": [a, frozen]}, {"params": [b], "lr": 0.5, "weight_decay": 0.1}], lr=0.1, rho=0.03, k=5,
                 hessian_computation_type="manual")
    a.grad = torch.ones(3)
    b.grad = -torch.ones(2)
    opt.step()
    assert frozen not in opt.state and torch.equal(frozen, torch.ones(4))
    # h = 0 so every coordinate is clipped to +-rho; group 2 decays then steps with its own lr
    torch.testing.assert_close(a, torch.full((3,), 1 - 0.1 * 0.03))
    torch.testing.assert_close(b, torch.full((2,), 0.9 + 0.5 * 0.03))
    assert opt.win_rate == 0.0


def test_no_autograd_graph_kept_alive_by_the_seed_gnb_pattern():
    model = _classifier(dtype=torch.float32)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    opt = Sophia(model.parameters(), lr=1e-2, k=3)
    refs = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a leak through a reference cycle must not be hidden by the collector either
    try:
        for _ in range(60):
            opt.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward(retain_graph=True)
            opt.step(logits=logits)
            refs.append((weakref.ref(logits), weakref.ref(loss)))
            del logits, loss
            assert all(r() is None for pair in refs for r in pair), "a retained graph outlived its step"
    finally:
        if gc_was_enabled:
            gc.enable()
    # state holds exactly the three seed tensors per parameter, nothing grows
    for p in model.parameters():
        assert set(opt.state[p]) == {"step", "momentum_buffer", "hessian_buffer"}
        assert not opt.state[p]["hessian_buffer"].requires_grad


def test_update_hessian_official_pattern():
    model = _TinyLM()
    tokens = torch.randint(0, 5, (2, 3))
    targets = torch.randint(0, 5, (2, 3))
    k, b2 = 2, 0.9
    opt = Sophia(model.parameters(), lr=0.01, betas=(0.9, b2), k=k, hessian_computation_type="manual", form="paper")
    expected = {p: torch.zeros_like(p) for p in model.parameters()}
    gen = torch.Generator().manual_seed(3)
    for it in range(6):
        logits = model(tokens)
        F.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1)).backward()
        h_before = [opt.state[p]["hessian_buffer"].clone() for p in model.parameters() if p in opt.state]
        opt.step()  # manual: never estimates, no logits needed
        for p, h in zip(model.parameters(), h_before):
            assert torch.equal(opt.state[p]["hessian_buffer"], h)
        opt.zero_grad()
        if it % k == k - 1:
            logits = model(tokens)
            y_hat = torch.multinomial(torch.softmax(logits.detach().reshape(-1, 5), -1), 1, generator=gen).squeeze(-1)
            F.cross_entropy(logits.reshape(-1, 5), y_hat).backward()
            for p in model.parameters():
                expected[p] = b2 * expected[p] + (1 - b2) * 6 * p.grad * p.grad
            opt.update_hessian(batch_size=6)
            opt.zero_grad()
    for p in model.parameters():
        assert int(opt.state[p]["step"]) == 6  # update_hessian does not count as a step
        torch.testing.assert_close(opt.state[p]["hessian_buffer"], expected[p], rtol=1e-12, atol=1e-15)


def test_seed_form_equals_paper_form_under_the_documented_mapping():
    """seed(lr, rho, wd) == paper(lr*rho, gamma=rho, wd/(lr*rho)) given the same Hessian estimates."""
    lr, rho, wd = 0.1, 0.05, 0.02
    torch.manual_seed(8)
    p_seed = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    p_paper = p_seed.detach().clone().requires_grad_()
    seed = Sophia([p_seed], lr=lr, rho=rho, weight_decay=wd, hessian_computation_type="manual", eps=1e-300)
    paper = Sophia(
        [p_paper], lr=lr * rho, gamma=rho, weight_decay=wd / (lr * rho), hessian_computation_type="manual",
        form="paper", eps=1e-300,
    )
    for t in range(20):
        g = torch.randn(4, 3, dtype=torch.float64)
        for p, opt in ((p_seed, seed), (p_paper, paper)):
            p.grad = g.clone()
            if t % 3 == 2:
                p.grad = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
                opt.update_hessian()
                p.grad = g.clone()
            opt.step()
        torch.testing.assert_close(p_paper, p_seed, rtol=1e-12, atol=1e-14)
        assert seed.win_rate == pytest.approx(paper.win_rate)


def test_paper_form_bias_correction_and_win_rate():
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = Sophia([p], lr=1.0, betas=(0.5, 0.5), gamma=1.0, form="paper", bias_correction=True,
                 hessian_computation_type="manual")
    p.grad = torch.tensor([1.0, -1.0, 0.25, 8.0], dtype=torch.float64)
    opt.update_hessian()  # h = 0.5 g^2 = [0.5, 0.5, 0.03125, 32]
    opt.step()  # m_hat = g; ratio = g / max(h, eps) = [2, -2, 8, 0.25] -> clip to [1, -1, 1, 0.25]
    torch.testing.assert_close(p.detach(), -torch.tensor([1.0, -1.0, 1.0, 0.25], dtype=torch.float64))
    assert opt.win_rate == pytest.approx(0.25)


@pytest.mark.parametrize("form", ["seed", "paper"])
def test_short_horizon_options_refresh_schedule_and_win_rate(form):
    """early_refresh_steps refreshes at every t <= E and at multiples of k after it; hessian_bias_correction
    divides h by 1 - beta2**n (n refreshes so far) in the step and in the win rate, and leaves h itself alone."""
    torch.manual_seed(3)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    k, early, b2, steps = 3, 4, 0.8, 11
    rho = 30.0  # seed form: GNB without the N scaling, small h
    kw = dict(lr=0.02 if form == "paper" else 1e-3, k=k, betas=(0.9, b2), form=form, gamma=0.3, rho=rho)
    models = [_classifier(), _classifier()]
    plain = InjectedSophia(models[0].parameters(), **kw)
    fixed = InjectedSophia(models[1].parameters(), **kw, hessian_bias_correction=True, early_refresh_steps=early)
    n = 0
    for t in range(1, steps + 1):
        due = t % k == 0 or t <= early
        assert fixed.refreshes_next_step() is due and plain.refreshes_next_step() is (t % k == 0)
        n += due
        before = [p.detach().clone() for p in models[1].parameters()]
        h_before = [fixed.state[p]["hessian_buffer"].clone() for p in models[1].parameters()] if t > 1 else None
        for opt, model in ((plain, models[0]), (fixed, models[1])):
            _gnb_train(opt, model, x, y, 1, torch.Generator().manual_seed(t))
        changed = h_before is not None and any(
            not torch.equal(u, fixed.state[p]["hessian_buffer"]) for u, p in zip(h_before, models[1].parameters()))
        assert changed == (due and t > 1)
        # The step, restated: u = clip(m / max(gamma * h / (1 - b2**n), eps), 1) (paper) or
        # clip(m / (h / (1 - b2**n) + eps), rho) (seed), with p <- p - lr * u (no weight decay).
        unclipped = total = 0
        for p, p0 in zip(models[1].parameters(), before):
            st = fixed.state[p]
            h_hat = st["hessian_buffer"] / (1 - b2**n)
            if form == "paper":
                ratio, bound = st["momentum_buffer"] / (0.3 * h_hat).clamp(min=1e-12), 1.0
            else:
                ratio, bound = st["momentum_buffer"] / (h_hat + 1e-12), rho
            lr = kw["lr"]
            torch.testing.assert_close(p.detach(), p0 - lr * ratio.clamp(-bound, bound), rtol=1e-12, atol=1e-15)
            unclipped += int((ratio.abs() < bound).sum())
            total += ratio.numel()
        assert fixed.win_rate == pytest.approx(unclipped / total)
    assert 0.0 < fixed.win_rate < 1.0 and fixed.win_rate != plain.win_rate


def test_short_horizon_options_default_off_and_restored_for_old_checkpoints():
    p = torch.zeros(2, requires_grad=True)
    opt = Sophia([p])
    assert opt.defaults["hessian_bias_correction"] is False and opt.defaults["early_refresh_steps"] == 0
    state = opt.state_dict()
    for group in state["param_groups"]:  # a checkpoint written before the options existed
        del group["hessian_bias_correction"], group["early_refresh_steps"]
    opt.__setstate__({"state": opt.state, "param_groups": state["param_groups"]})
    assert opt.param_groups[0]["hessian_bias_correction"] is False and opt.param_groups[0]["early_refresh_steps"] == 0
