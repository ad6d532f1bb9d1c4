"""The parts of the ``torch.optim.Optimizer`` contract that PyTorch's own generic optimizer tests
(``test/test_optim.py``) check and that SOAP and Sophia used to miss, for both classes:

* a Tensor ``lr`` is handled as torch's optimizers handle it: a 1-element tensor of any number of
  dimensions is accepted and takes the same steps as the float (also when an LR scheduler changes it in
  place); more elements, or a negative value, are a ``ValueError`` at construction (and in
  ``add_param_group``), with torch's wording;
* ``load_state_dict`` honours ``register_load_state_dict_pre_hook`` (the state a pre-hook returns or edits
  is the one loaded) and ``register_load_state_dict_post_hook`` (what a post-hook sets stays).

Sophia runs with ``hessian_computation_type='manual'`` here: the contract is the step's, the estimators
have their own tests.
"""

from __future__ import annotations

import copy

import pytest
import torch

from torch_bridge import SOAP, Sophia

OPTIMIZERS = {
    "SOAP": (SOAP, dict(precondition_frequency=2, weight_decay=0.1)),
    "Sophia": (Sophia, dict(hessian_computation_type="manual", weight_decay=0.01, rho=0.5)),
}


def _problem():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    xs = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(6)]
    return w, b, xs


def _train(name, lr, steps=6, scheduler=None, state_dict=None):
    """``steps`` steps on a least-squares loss (a fresh copy of the same parameters each call)."""
    cls, options = OPTIMIZERS[name]
    w0, b0, xs = _problem()
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = cls([w, b], lr=lr, **options)
    sched = scheduler(opt) if scheduler else None
    for x in xs[:steps]:
        opt.zero_grad()
        (w @ x + b[:, None]).square().sum().backward()
        opt.step()
        if sched is not None:
            sched.step()
    return opt, (w.detach(), b.detach())


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_one_element_tensor_lr_takes_the_float_lr_steps(name, shape):
    _, expected = _train(name, 1e-2)
    opt, got = _train(name, torch.tensor(1e-2, dtype=torch.float64).reshape(shape))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.is_tensor(opt.param_groups[0]["lr"])  # kept as given, as torch does


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tensor_lr_changed_in_place_by_a_scheduler(name):
    """StepLR writes a Tensor lr in place (``lr.fill_``); the steps follow it as they follow a float."""
    def step_lr(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)

    _, expected = _train(name, 1e-2, scheduler=step_lr)
    _, got = _train(name, torch.tensor([1e-2], dtype=torch.float64), scheduler=step_lr)
    _, constant = _train(name, 1e-2)
    for a, b, c in zip(got, expected, constant):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize(
    "lr, match",
    [
        (torch.tensor([1e-3, 1e-3]), "Tensor lr must be 1-element"),
        (torch.zeros(0), "Tensor lr must be 1-element"),
        (torch.tensor(-1e-2), "Invalid learning rate: lr="),
        (torch.tensor([float("nan")]), "Invalid learning rate: lr="),
        (-1e-2, "Invalid learning rate: lr=-0.01"),
        ("1e-3", "Invalid learning rate: lr='1e-3'"),
    ],
)
def test_invalid_lr_is_a_value_error_at_construction(name, lr, match):
    cls, options = OPTIMIZERS[name]
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=match):
        cls([p], lr=lr, **options)
    opt = cls([p], **options)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr})
    assert len(opt.param_groups) == 1


def _first_state(opt):
    return opt.state[opt.param_groups[0]["params"][0]]


def _saved_and_fresh(name):
    """A state dict after 4 steps, the name of its first moment, and a fresh optimizer to load it into."""
    trained, _ = _train(name, 1e-2, steps=4)
    fresh, _ = _train(name, 1e-2, steps=0)
    return trained.state_dict(), "exp_avg" if name == "SOAP" else "momentum_buffer", fresh


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_load_state_dict_pre_hook_edits_the_loaded_state(name):
    saved, key, fresh = _saved_and_fresh(name)

    def zero_the_moment(optimizer, state_dict):  # returns a new state dict, as torch allows
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0][key].zero_()
        return state_dict

    def set_the_step(optimizer, state_dict):  # edits in place and returns None
        state_dict["state"][0]["step"] = torch.tensor(100, dtype=torch.int64)

    fresh.register_load_state_dict_pre_hook(zero_the_moment)
    fresh.register_load_state_dict_pre_hook(set_the_step)
    fresh.load_state_dict(copy.deepcopy(saved))
    state = _first_state(fresh)
    assert bool(saved["state"][0][key].abs().sum() > 0)
    assert torch.equal(state[key], torch.zeros_like(saved["state"][0][key]))
    assert int(state["step"]) == 100 and state["step"].dtype == torch.int64


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_load_state_dict_post_hook_sees_and_keeps_the_restored_state(name):
    saved, key, fresh = _saved_and_fresh(name)
    seen = {}

    def post_hook(optimizer):
        state = _first_state(optimizer)
        seen["step"] = int(state["step"])
        state[key] = torch.full_like(state[key], 7.0)

    fresh.register_load_state_dict_post_hook(post_hook)
    fresh.load_state_dict(saved)
    assert seen["step"] == int(saved["state"][0]["step"])
    assert bool((_first_state(fresh)[key] == 7.0).all())
