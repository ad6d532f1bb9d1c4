"""The distribution layer's one-process pieces: the balancer, the row cuts, DCP's template step, arguments."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from torch_bridge import SOAP, Sophia
from torch_bridge._balance import assign
from torch_bridge._distributed import chunk_rows


def test_assign_balances_greedily_and_deterministically():
    costs = [8.0, 1.0, 5.0, 5.0, 3.0, 1.0]
    ranks = assign(costs, 2)
    loads = [sum(c for c, r in zip(costs, ranks) if r == k) for k in range(2)]
    assert ranks == assign(costs, 2) and sorted(loads) == [11.0, 12.0]
    assert assign([1.0, 1.0, 1.0], 3) == [0, 1, 2]  # ties go to the lower rank, in item order
    assert assign([2.0], 2, loads=[5.0, 0.0]) == [1]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_assign_with_a_cap_runs_at_most_ceil_f_over_w_per_rank(world):
    costs = [1000.0] + [1.0] * 10  # uncapped, one rank would take every small item beside the big one's
    ranks = assign(costs, world, cap=math.ceil(len(costs) / world))
    assert max(ranks.count(r) for r in range(world)) <= math.ceil(len(costs) / world)
    assert max(assign(costs, world).count(r) for r in range(world)) > math.ceil(len(costs) / world)
    with pytest.raises(ValueError, match="cap"):
        assign(costs, world, cap=1)


@pytest.mark.parametrize("d0", [0, 1, 3, 5, 6, 7])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_chunk_rows_cuts_as_torch_chunk(d0, world):
    chunks = torch.arange(d0).chunk(world) if d0 else ()
    expected = [len(c) for c in chunks] + [0] * (world - len(chunks))
    assert list(chunk_rows(d0, world)) == expected


def _train(opt_cls, ask_for_state_dict: bool, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    opt = opt_cls(model.parameters(), **options)
    if ask_for_state_dict:  # as DCP's helpers do before a save or a load: a zero-gradient, lr = 0 step()
        state = get_optimizer_state_dict(model, opt)
        assert state["state"], "the template must have the state's tensors (DCP loads into them)"
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        x = torch.randn(8, 4, generator=gen)
        opt.zero_grad()
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, torch.randint(0, 3, (8,), generator=gen)).backward(
            retain_graph=True)
        opt.step(logits=logits) if opt_cls is Sophia else opt.step()
    return model, opt


@pytest.mark.parametrize("opt_cls, options", [
    (SOAP, dict(precondition_frequency=2)),
    (Sophia, dict(k=1)),  # a refresh at the first step: a real step without logits would raise
    (Sophia, dict(k=2, hessian_computation_type="manual")),
])
def test_dcp_state_dict_before_the_first_step_changes_nothing(opt_cls, options):
    plain, plain_opt = _train(opt_cls, False, **options)
    asked, opt = _train(opt_cls, True, **options)
    for p, q in zip(plain.parameters(), asked.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(plain_opt.state[p]["step"], opt.state[q]["step"])
    fresh_model = copy.deepcopy(asked)
    fresh = opt_cls(fresh_model.parameters(), **options)
    set_optimizer_state_dict(fresh_model, fresh, get_optimizer_state_dict(asked, opt))
    for p, q in zip(asked.parameters(), fresh_model.parameters()):
        assert torch.equal(opt.state[p]["step"], fresh.state[q]["step"])


def test_a_real_step_with_zero_gradients_and_lr_0_is_still_a_step_once_state_exists():
    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = SOAP([p], lr=0.0)
    p.grad = torch.randn(3, 3)
    opt.step()
    p.grad = torch.zeros(3, 3)
    opt.step()
    assert int(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("opt_cls", [SOAP, Sophia])
def test_process_group_needs_torch_distributed(opt_cls):
    with pytest.raises(ValueError, match="process_group.*not initialized"):
        opt_cls([torch.nn.Parameter(torch.ones(2))], process_group=object())
