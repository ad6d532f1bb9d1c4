"""SOAP for PyTorch: Adam in the eigenbasis of Shampoo's preconditioner.

Reference: Nikhil Vyas, Depen Morwani, Rosie Zhao, Itai Shapira, David Brandfonbrener, Lucas Janson,
Sham Kakade, "SOAP: Improving and Stabilizing Shampoo using Adam", 2024, arXiv:2409.11321.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from so_common.soap_layout import check_soap_options

from ._balance import decomposition_cost
from ._checkpoint import is_state_template_step
from ._distributed import Distribution
from ._linalg import (
    compute_dtype,
    eigh_descending,
    project,
    project_back,
    refresh_basis,
    update_factors,
)
from ._params import add_checked_param_group, check_lr, scalar
from ._soap_distributed import soap_distributor
from ._soap_state import EXP_AVG as _EXP_AVG
from ._soap_state import EXP_AVG_SQ as _EXP_AVG_SQ
from ._soap_state import GG as _GG
from ._soap_state import STEP as _STEP
from ._soap_state import Q as _Q
from ._soap_state import blank_state, from_work, layout_of, restored_state, to_work

__all__ = ["SOAP"]

_DEFAULTS: dict[str, Any] = {
    "lr": 3e-3,
    "betas": (0.95, 0.95),
    "shampoo_beta": -1,
    "eps": 1e-8,
    "weight_decay": 0.01,
    "precondition_frequency": 10,
    "max_precond_dim": 10000,
    "merge_dims": False,
    "precondition_1d": False,
    "normalize_grads": False,
    "data_format": "channels_first",
    "correct_bias": True,
}


def _validate(options: dict[str, Any]) -> None:
    """Raises ``ValueError`` naming the first invalid hyperparameter in ``options``."""
    check_lr(options["lr"])
    check_soap_options(**{name: options[name] for name in _DEFAULTS if name != "lr"})


class SOAP(Optimizer):
    r"""SOAP: Adam run in the slowly changing eigenbasis of Shampoo's preconditioner.

    For a parameter whose gradient, in its work layout, is ``G`` (a matrix ``m×n`` in the common case),
    SOAP keeps Shampoo's Kronecker factors and their eigenbases

    .. math::
        L \leftarrow \beta_s L + (1-\beta_s)\, G G^\top, \qquad
        R \leftarrow \beta_s R + (1-\beta_s)\, G^\top G, \qquad
        L \approx Q_L \Lambda_L Q_L^\top,\; R \approx Q_R \Lambda_R Q_R^\top,

    and runs Adam on the rotated gradient :math:`G' = Q_L^\top G Q_R`:

    .. math::
        M \leftarrow \beta_1 M + (1-\beta_1) G', \qquad
        V \leftarrow \beta_2 V + (1-\beta_2) G'^{\odot 2}, \qquad
        U = Q_L \frac{M}{\sqrt{V} + \epsilon} Q_R^\top,

    .. math::
        p \leftarrow p - \eta\, \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, U, \qquad
        p \leftarrow (1 - \eta\lambda)\, p .

    Tensors of other ranks work alike, with one factor per dimension (``x ×_i Q_iᵀ`` along each).
    The schedule follows the reference implementation (Vyas et al., 2024, arXiv:2409.11321):

    * the first call for a parameter only builds the factors from its gradient and their eigenbases
      (``eigh``, eigenvectors in descending eigenvalue order); the parameter does not move and the Adam
      step ``t`` starts counting at the second call;
    * the factors are updated with the raw gradient after each parameter update;
    * every ``precondition_frequency`` Adam steps the bases are refreshed from the updated factors by
      one power iteration and a QR decomposition, after sorting the old basis by its Rayleigh quotients
      ``diag(Qᵀ GG Q)``; ``exp_avg_sq`` is permuted with the sort and ``exp_avg`` is rotated into the
      new basis. ``exp_avg`` lives in the eigenbasis and is rotated only on these refresh steps;
    * weight decay is applied after the update, to the updated parameter (decoupled, as in AdamW);
    * with ``normalize_grads`` the direction ``U`` is divided by its root mean square.

    A dimension larger than ``max_precond_dim`` (and a 1-D tensor unless ``precondition_1d``) keeps the
    identity basis: Adam is applied along it unrotated. With ``merge_dims``, consecutive dimensions are
    merged while their product stays at most ``max_precond_dim`` (4-D ``channels_last`` tensors are first
    permuted to channels-first order); see :mod:`so_common.soap_layout`.

    Numerics: factors, bases and moments are kept in the parameter dtype promoted with float32 (float32
    for bf16/fp16 parameters, float64 for float64 ones); the update is applied to the parameter in its
    own dtype. If ``eigh`` fails (an exception or non-finite values) it is retried in float64 and then
    falls back to the identity; a non-finite QR refresh keeps the last good (re-sorted) basis.

    The constructor matches the reference implementation's, so code written for it only changes its
    import. Every option is a per-parameter-group hyperparameter (``data_format`` included).

    Args:
        params: iterable of parameters or of dicts defining parameter groups.
        lr: learning rate :math:`\eta` (default ``3e-3``).
        betas: Adam's :math:`(\beta_1, \beta_2)` (default ``(0.95, 0.95)``).
        shampoo_beta: :math:`\beta_s`, the factors' moving-average coefficient; a negative value
            (default ``-1``) means ``betas[1]``.
        eps: added to :math:`\sqrt{V}` (default ``1e-8``).
        weight_decay: decoupled weight decay :math:`\lambda` (default ``0.01``).
        precondition_frequency: Adam steps between basis refreshes (default ``10``).
        max_precond_dim: largest dimension that gets a basis (default ``10000``).
        merge_dims: merge consecutive dimensions up to ``max_precond_dim`` (default ``False``).
        precondition_1d: also precondition 1-D tensors (default ``False``).
        normalize_grads: divide the direction by its RMS per tensor (default ``False``).
        data_format: ``"channels_first"`` (NCHW) or ``"channels_last"`` (NHWC) for 4-D tensors; only
            used with ``merge_dims`` (default ``"channels_first"``).
        correct_bias: use Adam's bias correction (default ``True``).
        process_group: (keyword-only) under DDP, the group (e.g. ``torch.distributed.group.WORLD``) over
            which each refresh's decompositions are split and shared; ``None`` (default): every rank does
            all of them. FSDP2 parameters (``fully_shard``) need nothing: each parameter's whole state and
            update go to one owner rank. Same results as one process; see ``docs/distributed-torch.md``.

    State (``optimizer.state[p]``): ``"step"`` (int64 scalar tensor, Adam steps taken; 0 after the first
    call), ``"exp_avg"`` and ``"exp_avg_sq"`` (work shape, in the eigenbasis), ``"GG"`` and ``"Q"``
    (lists with one entry per work dimension: a ``(d, d)`` factor/basis, or an empty tensor for an
    identity dimension). Bases may be replaced by assigning ``optimizer.state[p]["Q"][i]`` (e.g. to give
    two implementations the same basis); ``exp_avg`` is expressed in the current basis.

    Example:
        >>> model = torch.nn.Linear(8, 4)
        >>> opt = SOAP(model.parameters(), lr=3e-3, weight_decay=0.01)
        >>> loss = model(torch.randn(16, 8)).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
        *,
        process_group: Any = None,
    ):
        self._distribution = Distribution("torch_bridge.SOAP", process_group)
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            data_format=data_format,
            correct_bias=correct_bias,
        )
        _validate(defaults)
        super().__init__(params, defaults)
        self._distributor = soap_distributor(self._distribution, layout_of)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a parameter group; its hyperparameters are validated like the constructor's, and its
        parameters must be real and laid out like the others (all FSDP2 DTensors on one mesh, or none).
        An invalid group is not added."""
        add_checked_param_group(self, param_group, super().add_param_group, _validate, "torch_bridge.SOAP")
        self._distribution.add_last_group(self.param_groups)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _DEFAULTS.items():
                group.setdefault(key, value)
        if "_distributor" not in self.__dict__:  # unpickled: a process group does not pickle
            self._distribution = Distribution.of("torch_bridge.SOAP", self.param_groups)
            self._distributor = soap_distributor(self._distribution, layout_of)

    def state_dict(self) -> dict[str, Any]:
        """The state as ``torch.optim.Optimizer.state_dict`` gives it; under FSDP2 (a collective call) each
        owner-held tensor of the state is given as a ``DTensor`` sharded along dim 0 on the parameters' mesh,
        so that ``torch.distributed.checkpoint`` saves it in pieces and reshards it to any world size."""
        return self._distributor.export_state(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict, keeping the state's own dtypes; a checkpoint of the reference SOAP loads too.

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the parameter dtype;
        SOAP's moments, factors and bases must stay float32 (or wider) for bf16/fp16 parameters, so they
        are restored with their saved dtype, moved to the parameter's device. A parameter state saved by
        the reference implementation (an ``int`` step and its own ``precondition_frequency``) is converted
        to this class's layout; options its param groups do not hold (its ``data_format``) keep the values
        this optimizer was built with. Hooks registered with ``register_load_state_dict_pre_hook`` /
        ``register_load_state_dict_post_hook`` run as in ``torch.optim.Optimizer``: the state restored here
        is the one the pre-hooks returned, and the post-hooks see (and may change) the restored state.
        """
        loaded: dict[str, Any] = {}

        def prepare(optimizer: SOAP, state_dict: dict[str, Any]) -> dict[str, Any]:  # after the user's pre-hooks
            state_dict = optimizer._distributor.import_state(optimizer, state_dict)  # FSDP2: DTensors to owners
            loaded["state"] = state_dict["state"]
            loaded["ids"] = [pid for group in state_dict["param_groups"] for pid in group["params"]]
            # An option the checkpoint lacks keeps this optimizer's value (the reference holds data_format
            # outside its param groups), not the class default that __setstate__ fills in.
            groups = [dict(saved) for saved in state_dict["param_groups"]]
            for saved, current in zip(groups, optimizer.param_groups):
                for key, value in current.items():
                    saved.setdefault(key, value)
            return dict(state_dict, param_groups=groups)

        def restore_states(optimizer: SOAP) -> None:  # before the user's post-hooks
            members = ((p, g) for g in optimizer.param_groups for p in g["params"])
            for pid, (p, group) in zip(loaded["ids"], members):
                if pid in loaded["state"]:
                    optimizer.state[p] = restored_state(loaded["state"][pid], layout_of(p, group), p)

        pre = self.register_load_state_dict_pre_hook(prepare)
        post = self.register_load_state_dict_post_hook(restore_states, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it runs with
                gradients enabled.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        template = is_state_template_step(self, closure)
        self._distributor.begin_step(self, template)
        for group in self.param_groups:
            if template:
                self._blank_group(group)
            else:
                self._step_group(group)
        return loss

    @property
    def communication(self) -> dict[str, int]:
        """What this rank has communicated since the optimizer was built (``bytes_sent``, ``bytes_received``,
        ``collectives``); zeros in one process or without ``process_group``."""
        return self._distribution.stats

    # ----------------------------------------------------------------------------------------------
    def _step_group(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
        distributor = self._distributor

        with_grad = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in with_grad):
            raise RuntimeError("SOAP does not support sparse gradients; use dense gradients "
                               "(e.g. nn.Embedding(sparse=False))")
        # ``stepping``: every parameter that takes a step; ``params``: those whose update this rank computes
        # (all of them in one process), with their whole gradients in the work layout.
        starting, stepping, params, grads, layouts = [], [], [], [], []
        for p, grad in zip(with_grad, distributor.gradients(with_grad)):
            layout = layout_of(p, group)
            state = self.state[p]
            step = state.get(_STEP)
            if step is None or int(step) < 0:
                starting.append((p, grad, layout))
                continue
            stepping.append(p)
            if grad is not None:
                params.append(p)
                grads.append(to_work(grad, layout).to(compute_dtype(p.dtype)))
                layouts.append(layout)
        if starting:
            self._init_states(starting, shampoo_beta)
        if not stepping:
            return

        states = [self.state[p] for p in params]
        exp_avgs = [s[_EXP_AVG] for s in states]
        exp_avg_sqs = [s[_EXP_AVG_SQ] for s in states]
        torch._foreach_add_([self.state[p][_STEP] for p in stepping], 1)

        # Adam's moments on the rotated gradient G' (work shape, eigenbasis).
        rotated = [project(g, s[_Q]) for g, s in zip(grads, states)]
        torch._foreach_lerp_(exp_avgs, rotated, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, rotated, rotated, value=1.0 - beta2)
        del rotated
        # M / (sqrt(V) + eps), computed in place in one temporary per tensor.
        ratios = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(ratios, group["eps"])
        torch._foreach_reciprocal_(ratios)
        torch._foreach_mul_(ratios, exp_avgs)

        lr = scalar(group["lr"])
        step_sizes = {p: _step_size(group, int(self.state[p][_STEP])) for p in stepping}
        for p, s, ratio, layout in zip(params, states, ratios, layouts):
            direction = from_work(project_back(ratio, s[_Q]), layout)
            if group["normalize_grads"]:
                rms = torch.linalg.vector_norm(direction).div_(math.sqrt(max(direction.numel(), 1)))
                direction = direction / rms.add_(1e-30)
            distributor.update(p, direction, step_sizes[p])
        del ratios
        distributor.finish_updates(stepping, list(step_sizes.values()))
        if group["weight_decay"] > 0:
            torch._foreach_mul_(distributor.local_params(stepping), 1.0 - lr * group["weight_decay"])

        # Factors from the raw gradient, then (every precondition_frequency steps) the basis refresh.
        frequency = group["precondition_frequency"]
        due = []
        for g, s in zip(grads, states):
            update_factors(s[_GG], g, shampoo_beta)
            if int(s[_STEP]) % frequency == 0:
                due.append(s)
        _refresh(due, distributor)

    def _init_states(self, starting: list[tuple], shampoo_beta: float) -> None:
        """First call for these parameters: factors from the gradient and their eigenbases; no update.

        A parameter whose update another rank computes (FSDP2) only starts its step count here.
        """
        built = []
        for p, grad, layout in starting:
            state = self.state[p]
            state.clear()  # a blank checkpoint template's zeros
            state[_STEP] = torch.tensor(0, dtype=torch.int64)
            if grad is None:
                continue
            g = to_work(grad, layout).to(compute_dtype(p.dtype))
            state[_EXP_AVG] = torch.zeros_like(g, memory_format=torch.contiguous_format)
            state[_EXP_AVG_SQ] = torch.zeros_like(g, memory_format=torch.contiguous_format)
            factors = [g.new_zeros(d, d) if on else g.new_empty(0)
                       for d, on in zip(layout.work_shape, layout.preconditioned)]
            update_factors(factors, g, shampoo_beta)
            state[_GG] = factors
            built.append(state)
        factors = [gg for s in built for gg in s[_GG] if gg.numel()]
        bases = iter(self._distributor.share(  # the eigh of each factor, where the distributor puts it
            [decomposition_cost(gg.shape[0]) for gg in factors], lambda k: [eigh_descending(factors[k])],
            lambda k: [(tuple(factors[k].shape), factors[k].dtype)], _device(factors)))
        for s in built:
            s[_Q] = [next(bases)[0] if gg.numel() else gg for gg in s[_GG]]

    def _blank_group(self, group: dict[str, Any]) -> None:
        """The state ``torch.distributed.checkpoint`` asks for before loading (its zero-gradient, ``lr = 0``
        step): blank, of the right shapes (:func:`~torch_bridge._soap_state.blank_state`). No step is taken."""
        for p in (p for p in group["params"] if p.grad is not None):
            self.state[p] = blank_state(layout_of(p, group), compute_dtype(p.dtype), p.device,
                                        self._distributor.owns(p))


def _step_size(group: dict[str, Any], t: int) -> float:
    """The learning rate times Adam's bias correction ``√(1-β₂ᵗ) / (1-β₁ᵗ)`` (if ``correct_bias``)."""
    lr = scalar(group["lr"])
    if not group["correct_bias"]:
        return lr
    beta1, beta2 = group["betas"]
    return lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


def _refresh(states: list[dict[str, Any]], distributor: Any) -> None:
    """Power iteration + QR on every factor of ``states``; ``exp_avg`` follows the new bases, ``exp_avg_sq``
    the sort. The decompositions run where ``distributor`` puts them (all here in one process)."""
    states = [s for s in states if any(q.numel() for q in s[_Q])]
    pairs = [(gg, q) for s in states for gg, q in zip(s[_GG], s[_Q]) if gg.numel()]
    if not pairs:
        return
    results = iter(distributor.share(  # (basis, order) = refresh_basis(GG, Q) of each factor
        [decomposition_cost(gg.shape[0]) for gg, _ in pairs],
        lambda k: list(refresh_basis(*pairs[k])),
        lambda k: [(tuple(pairs[k][0].shape), pairs[k][0].dtype), ((pairs[k][0].shape[0],), torch.int64)],
        _device([gg for gg, _ in pairs])))
    for state in states:
        bases = state[_Q]
        exp_avg = project_back(state[_EXP_AVG], bases)
        exp_avg_sq = state[_EXP_AVG_SQ]
        new_bases = []
        for dim, (gg, q) in enumerate(zip(state[_GG], bases)):
            if gg.numel():
                q, order = next(results)
                exp_avg_sq = exp_avg_sq.index_select(dim, order)
            new_bases.append(q)
        state[_Q] = new_bases
        state[_EXP_AVG_SQ] = exp_avg_sq
        state[_EXP_AVG] = project(exp_avg, new_bases).contiguous()


def _device(tensors: list[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")
