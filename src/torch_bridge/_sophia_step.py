r"""One step of :class:`torch_bridge.Sophia` on a parameter group's tensors: the elementwise math.

Sophia (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", arXiv:2305.14342). Per parameter at step :math:`t` (``n`` refreshes so far):

.. math::

    m \leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
    h \leftarrow \beta_2 h + (1 - \beta_2)\,\hat h \ \text{(refresh steps only)}, \qquad
    \tilde m = m / c_t, \quad \bar h = s_n h

with :math:`c_t = 1 - \beta_1^t` (``bias_correction``, else 1) and :math:`s_n = 1 / (1 - \beta_2^n)`
(``hessian_bias_correction`` after :math:`n \ge 1` refreshes, else 1); then

* seed form: :math:`r = \tilde m / (\bar h + \epsilon)`, :math:`\theta \leftarrow \theta (1 - \mathrm{wd})`,
  :math:`\theta \leftarrow \theta - \mathrm{lr}\,\operatorname{clip}(r, -\rho, \rho)`;
* paper form: :math:`r = \tilde m / \max(\gamma \bar h, \epsilon)`,
  :math:`\theta \leftarrow \theta (1 - \mathrm{lr}\cdot\mathrm{wd})`,
  :math:`\theta \leftarrow \theta - \mathrm{lr}\,\operatorname{clip}(r, -1, 1)`.

On CPU one tensor at a time through a reused scratch buffer (in-place ops, no per-step allocations);
elsewhere ``torch._foreach_*`` over the group (one launch per stage). The win rate (the fraction with
:math:`|r| <` the bound) is counted on demand from a record of the tensors the step used. Also here: the
checks of the hyperparameters these formulas take.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from so_common import validation
from torch_bridge._distributed import local
from torch_bridge._params import check_lr, scalar

_ESTIMATORS = ("gnb", "hutchinson", "manual")
_FORMS = ("seed", "paper")
_PROBES = ("gaussian", "rademacher")


class Coefficients(NamedTuple):
    """A group's scalars of one step (``lr`` read now: a tensor ``lr`` changed in place takes effect)."""

    beta1: float
    beta2: float
    lr: Any
    eps: float
    gamma: float
    bound: float  # rho (seed form) or 1 (paper form)
    decay: Any  # 1 - wd (seed form) or 1 - lr * wd (paper form)
    apply_decay: bool
    paper: bool


def coefficients(group: dict[str, Any]) -> Coefficients:
    beta1, beta2 = group["betas"]
    lr, wd, eps = scalar(group["lr"]), group["weight_decay"], group["eps"]
    paper = group["form"] == "paper"
    return Coefficients(
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        eps=eps,
        gamma=group["gamma"],
        bound=1.0 if paper else group["rho"],
        decay=(1.0 - lr * wd) if paper else (1.0 - wd),
        apply_decay=(wd != 0) if paper else (wd > 0),
        paper=paper,
    )


def refreshes(t: int, k: int, early_refresh_steps: int) -> int:
    """Number of refresh steps among ``1..t``: every ``t' <= early_refresh_steps`` and every multiple of
    ``k`` after it (the count ``so_optax.sophia`` uses)."""
    return min(t, early_refresh_steps) + max(0, t // k - early_refresh_steps // k)


def corrections(group: dict[str, Any], steps: list[torch.Tensor]) -> tuple[list | None, list | None]:
    """Per tensor, :math:`c_t = 1 - \\beta_1^t` and :math:`s_n = 1 / (1 - \\beta_2^n)` (``None`` when off);
    ``n`` is counted from the step as in so_optax."""
    beta1, beta2 = group["betas"]
    bias = None
    if group["bias_correction"]:
        bias = [1.0 - beta1 ** int(t) for t in steps]
    scales = None
    if group["hessian_bias_correction"]:
        counts = [refreshes(int(t), group["k"], group["early_refresh_steps"]) for t in steps]
        scales = [1.0 / (1.0 - beta2**n) if n > 0 else 1.0 for n in counts]
    return bias, scales


def scratch_buffer(cache: dict, like: torch.Tensor, slot: int) -> torch.Tensor:
    """A reused work buffer shaped like ``like`` (one per dtype/device/slot in ``cache``, grown to the
    largest parameter; not part of the optimizer state)."""
    key = (like.dtype, like.device, slot)
    buf = cache.get(key)
    n = like.numel()
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=like.dtype, device=like.device)
        cache[key] = buf
    return buf[:n].view(like.shape)


def update_one_at_a_time(params, grads, ms, hs, refreshed: dict, bias, scales, c: Coefficients,
                         scratch: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """The step on CPU: one tensor at a time through reused scratch buffers (no per-step allocations,
    which page-fault, and the tensor stays in cache across the stages). ``refreshed`` maps ``id(h)`` to
    the estimate of each refreshed ``h``."""
    for i, (p, g, m, h) in enumerate(zip(params, grads, ms, hs)):
        m.mul_(c.beta1).add_(g, alpha=1.0 - c.beta1)
        est = refreshed.get(id(h))
        if est is not None:
            h.mul_(c.beta2).add_(est, alpha=1.0 - c.beta2)
        d = scratch(h, 0)
        if c.paper:
            torch.mul(h, c.gamma if scales is None else c.gamma * scales[i], out=d).clamp_(min=c.eps)
        elif scales is None:
            torch.add(h, c.eps, out=d)
        else:
            torch.mul(h, scales[i], out=d).add_(c.eps)
        numer = torch.div(m, bias[i], out=scratch(h, 1)) if bias is not None else m
        torch.div(numer, d, out=d)
        if c.apply_decay:
            p.mul_(c.decay)
        p.add_(d.clamp_(min=-c.bound, max=c.bound), alpha=-c.lr)


def update_foreach(params, grads, ms, hs, h_refresh, est_refresh, bias, scales, c: Coefficients) -> None:
    """The step with ``torch._foreach_*`` ops over the group (one launch per stage)."""
    torch._foreach_mul_(ms, c.beta1)
    torch._foreach_add_(ms, grads, alpha=1.0 - c.beta1)
    if h_refresh:
        torch._foreach_mul_(h_refresh, c.beta2)
        torch._foreach_add_(h_refresh, est_refresh, alpha=1.0 - c.beta2)
    if c.paper:
        denom = torch._foreach_mul(hs, c.gamma if scales is None else [c.gamma * s for s in scales])
        torch._foreach_clamp_min_(denom, c.eps)
    elif scales is None:
        denom = torch._foreach_add(hs, c.eps)
    else:
        denom = torch._foreach_mul(hs, scales)
        torch._foreach_add_(denom, c.eps)
    if c.apply_decay:
        torch._foreach_mul_(params, c.decay)
    if bias is not None:
        ratio = torch._foreach_div(ms, bias)
        torch._foreach_div_(ratio, denom)
    else:
        ratio = torch._foreach_div(ms, denom)
    del denom
    torch._foreach_clamp_min_(ratio, -c.bound)
    torch._foreach_clamp_max_(ratio, c.bound)
    torch._foreach_add_(params, ratio, alpha=-c.lr)


def update_group(
    group: dict[str, Any],
    grad_of: Callable[[torch.Tensor], torch.Tensor | None],
    estimates: dict[torch.Tensor, torch.Tensor],
    state_of: Callable[[torch.Tensor], dict[str, Any]],
    sharded: bool,
    scratch: Callable[[torch.Tensor, int], torch.Tensor],
) -> tuple | None:
    """One Sophia step for every parameter of ``group`` with a gradient; returns the win-rate record of
    the group (``None`` without such parameters). ``sharded``: FSDP2, the math on this rank's rows."""
    params, grads, ms, hs, steps = [], [], [], [], []
    h_refresh, est_refresh = [], []
    for p in group["params"]:
        grad = grad_of(p)
        if grad is None:
            continue
        if grad.is_sparse:
            raise RuntimeError("Sophia does not support sparse gradients")
        state = state_of(p)
        params.append(p)
        grads.append(grad)
        ms.append(state["momentum_buffer"])
        hs.append(state["hessian_buffer"])
        steps.append(state["step"])
        est = estimates.get(p)
        if est is not None:
            h_refresh.append(state["hessian_buffer"])
            est_refresh.append(est)
    if not params:
        return None
    if sharded:
        params, grads, ms, hs, h_refresh = ([local(t) for t in ts] for ts in (params, grads, ms, hs, h_refresh))
    torch._foreach_add_(steps, 1)  # 0-d CPU int64 counters (no device sync)
    bias, scales = corrections(group, steps)
    c = coefficients(group)
    if all(p.device.type == "cpu" for p in params):
        refreshed = {id(h): e for h, e in zip(h_refresh, est_refresh)}
        update_one_at_a_time(params, grads, ms, hs, refreshed, bias, scales, c, scratch)
    else:
        update_foreach(params, grads, ms, hs, h_refresh, est_refresh, bias, scales, c)
    return ms, hs, bias, scales, c


def unclipped_counts(record: list[tuple]) -> tuple[list[torch.Tensor], int]:
    """The win rate's counts of ``|r| < bound`` (same arithmetic as the step) per tensor of the record's
    groups, and the number of coordinates."""
    counts: list[torch.Tensor] = []
    total = 0
    for ms, hs, bias, scales, c in record:
        for i, (m, h) in enumerate(zip(ms, hs)):
            numer = m / bias[i] if bias is not None else m
            scale = scales[i] if scales is not None else 1.0
            if c.paper:
                ratio = numer / (h * (c.gamma * scale)).clamp_(min=c.eps)
            else:
                ratio = numer / (h * scale + c.eps if scales is not None else h + c.eps)
            counts.append((ratio.abs() < c.bound).sum())
            total += ratio.numel()
    return counts, total


def check_hyperparameters(
    *,
    lr: Any,
    betas: Any,
    rho: Any,
    weight_decay: Any,
    k: Any,
    hessian_computation_type: Any,
    eps: Any,
    form: Any,
    gamma: Any,
    bias_correction: Any,
    hessian_bias_correction: Any,
    early_refresh_steps: Any,
    probe: Any,
) -> None:
    """Raises a ``ValueError`` naming the first invalid hyperparameter of a group."""
    check_lr(lr)
    validation.check_betas("betas", betas)
    validation.check_nonnegative("rho", rho)
    validation.check_nonnegative("weight_decay", weight_decay)
    validation.check_positive_int("k", k)
    validation.check_choice("hessian_computation_type", hessian_computation_type, _ESTIMATORS)
    validation.check_nonnegative("eps", eps)
    validation.check_choice("form", form, _FORMS)
    validation.check_positive("gamma", gamma)
    validation.check_bool("bias_correction", bias_correction)
    validation.check_bool("hessian_bias_correction", hessian_bias_correction)
    validation.check_nonnegative_int("early_refresh_steps", early_refresh_steps)
    short_horizon = (("hessian_bias_correction", hessian_bias_correction), ("early_refresh_steps", early_refresh_steps))
    for name, on in short_horizon:
        if on and hessian_computation_type == "manual":
            raise ValueError(
                f"Invalid {name}: {on!r} with hessian_computation_type='manual' (the optimizer does not "
                "schedule manual refreshes; leave it at its default)"
            )
    validation.check_choice("probe", probe, _PROBES)
    if form == "paper":
        validation.check_positive("eps", eps)
