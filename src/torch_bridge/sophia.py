"""Sophia (Sophia-G and Sophia-H) as a ``torch.optim.Optimizer``.

Reference: Hong Liu, Zhiyuan Li, David Hall, Percy Liang, Tengyu Ma, "Sophia: A Scalable Stochastic
Second-order Optimizer for Language Model Pre-training", arXiv:2305.14342 (2023).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from so_common import validation
from torch_bridge._checkpoint import is_state_template_step, shard_like
from torch_bridge._distributed import Distribution, local
from torch_bridge._hessian_estimators import (
    check_step_arguments,
    draw_probes,
    sample_labels,
    sophia_closure_estimates,
    sophia_gnb_estimates,
)
from torch_bridge._params import add_checked_param_group
from torch_bridge._sophia_distributed import SophiaDistributor
from torch_bridge._sophia_step import check_hyperparameters, scratch_buffer, unclipped_counts, update_group

__all__ = ["Sophia"]

class Sophia(Optimizer):
    r"""Sophia: clipped, diagonally preconditioned momentum (Liu et al. 2023, arXiv:2305.14342).

    Per parameter, with gradient :math:`g_t` at step :math:`t = 1, 2, \dots`:

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        h_t = \begin{cases} \beta_2 h_{t-1} + (1 - \beta_2)\,\hat h_t & t \bmod k = 0 \\
                            h_{t-1} & \text{otherwise} \end{cases}

    with :math:`m_0 = h_0 = 0` and :math:`\hat h_t` a stochastic estimate of the Hessian diagonal
    computed only on refresh steps (:math:`t \bmod k = 0`). Two parameterisations of the step:

    * ``form='seed'`` (default; the semantics of the from-scratch seed implementation this class
      replaces, and of its constructor):

      .. math::
          u_t = \operatorname{clip}\!\big(m_t / (h_t + \epsilon), -\rho, \rho\big), \quad
          \theta \leftarrow \theta (1 - \mathrm{wd}), \quad \theta \leftarrow \theta - \mathrm{lr}\, u_t

      GNB uses :math:`\hat h = \hat g \odot \hat g`, Hutchinson :math:`\hat h = |v \odot Hv|`.

    * ``form='paper'`` (Algorithm 3 of the paper and the official SophiaG code):

      .. math::
          \theta \leftarrow \theta (1 - \mathrm{lr}\cdot\mathrm{wd}), \quad
          u_t = \operatorname{clip}\!\big(\tilde m_t / \max(\gamma h_t, \epsilon), -1, 1\big), \quad
          \theta \leftarrow \theta - \mathrm{lr}\, u_t

      with :math:`\tilde m_t = m_t / (1 - \beta_1^t)` if ``bias_correction`` else :math:`m_t` (the
      seed form uses :math:`\tilde m_t` the same way); with ``hessian_bias_correction`` both forms use
      :math:`h_t / (1 - \beta_2^{n_t})` in place of :math:`h_t`, :math:`n_t \ge 1` the number of refreshes
      so far (see ``so_optax.sophia``, *Short runs*); GNB uses
      :math:`\hat h = N\, \hat g \odot \hat g` (:math:`N` label positions), Hutchinson
      :math:`\hat h = v \odot Hv`. ``rho`` is not used.

    Mapping: ``Sophia(lr=a, rho=r)`` (seed form) makes the same steps as
    ``Sophia(lr=a*r, gamma=r, form='paper')`` up to the handling of ``eps`` (added vs. a floor) and the
    ``N`` scaling of the GNB estimate; seed ``weight_decay=w`` is paper ``weight_decay=w/lr``.

    Hessian estimators (``hessian_computation_type``, per parameter group):

    * ``'gnb'`` (Sophia-G, default): Gauss-Newton-Bartlett. On refresh steps pass the model's
      ``logits`` (``(B, C)`` or ``(B, T, C)``; leading dims are flattened) and optionally
      ``logits_mask`` (``True`` = real position, ``False`` = padding, left out of the mean). One label
      sample :math:`\hat y \sim \mathrm{softmax}(\text{logits})` for the whole batch and one autograd
      call for all parameters: :math:`\hat g = \nabla_\theta \operatorname{mean} \mathrm{CE}(\text{logits},
      \hat y)`. Usage (the seed's pattern)::

          loss = criterion(logits := model(x), y)
          loss.backward(retain_graph=True)      # keep the graph for the estimate
          optimizer.step(logits=logits)

      Only a refresh step needs the graph: ``loss.backward(retain_graph=optimizer.refreshes_next_step())``
      lets the other backward passes free it as they go (:meth:`refreshes_next_step`).

    * ``'hutchinson'`` (Sophia-H): pass a ``closure`` that returns the loss **without** calling
      ``backward()``; the optimizer differentiates it for every parameter (``p.grad`` is neither read
      nor written). On refresh steps the gradient is taken with ``create_graph=True`` and one double
      backward gives :math:`Hv` for probes :math:`v` (``probe='gaussian'`` or ``'rademacher'``); on
      other steps only the plain gradient is computed. Usage::

          def closure():
              return criterion(model(x), y)
          loss = optimizer.step(closure=closure)

      A step without a closure raises (it would need one at the next refresh).

    * ``'manual'``: :meth:`step` never estimates; the Hessian EMA changes only through
      :meth:`update_hessian` (the official SophiaG training loop)::

          loss.backward(); optimizer.step(); optimizer.zero_grad()
          if it % k == k - 1:
              logits = model(x)
              y_hat = torch.distributions.Categorical(logits=logits.detach()).sample()
              F.cross_entropy(logits.view(-1, C), y_hat.view(-1)).backward()
              optimizer.update_hessian(batch_size=num_positions)
              optimizer.zero_grad()

    A step of ``'gnb'`` without ``logits`` or of ``'hutchinson'`` without ``closure`` raises a ``ValueError``
    naming the missing argument at once, not only on the first refresh step (so a short smoke test sees it).
    The optimizer never keeps ``logits`` or any graph: the GNB backward releases the graph behind ``logits``.

    Args:
      params: iterable of parameters or parameter groups.
      lr: learning rate (default ``1e-3``).
      betas: ``(beta1, beta2)``, EMA coefficients of the gradient and of the Hessian estimate.
      rho: clipping threshold of the seed form (default ``0.03``).
      weight_decay: decoupled weight decay; seed form ``p *= 1 - wd``, paper form ``p *= 1 - lr*wd``.
      k: the Hessian estimate is refreshed at steps ``t`` with ``t % k == 0`` (default ``10``).
      hessian_computation_type: ``'gnb'``, ``'hutchinson'`` or ``'manual'``.
      eps: added to ``h`` (seed form) or lower bound of ``gamma*h`` (paper form, must be ``> 0``).
      form: ``'seed'`` or ``'paper'`` (keyword-only).
      gamma: the paper's scale of ``h`` (keyword-only, paper form only, default ``0.01``).
      bias_correction: divide ``m`` by ``1 - beta1**t`` in the ratio (keyword-only, both forms).
      hessian_bias_correction: divide ``h`` by ``1 - beta2**n`` in the ratio, ``n`` the number of refreshes
        so far (keyword-only, both forms; not with ``'manual'``, whose refreshes the optimizer does not
        schedule).
      early_refresh_steps: also refresh ``h`` at every step ``t <= early_refresh_steps`` (keyword-only,
        default ``0``: only at ``t = k, 2k, ...``; not with ``'manual'``).
      probe: Hutchinson probe distribution, ``'gaussian'`` (seed) or ``'rademacher'`` (keyword-only).
      process_group: (keyword-only) under DDP, the group (e.g. ``torch.distributed.group.WORLD``) over which
        the Hessian estimates (and a closure's gradients) are averaged, so that they are the whole batch's;
        FSDP2 parameters need nothing. Labels and probes then come from group rank 0's generator state.
        See ``docs/distributed-torch.md``.

    State per parameter: ``'step'`` (0-d int64 tensor), ``'momentum_buffer'`` (:math:`m`) and
    ``'hessian_buffer'`` (:math:`h`), the seed's names, so seed checkpoints load.

    Diagnostics: :attr:`win_rate`, the fraction of coordinates whose update was not clipped in the
    latest :meth:`step`.

    Randomness hooks (override in a subclass to inject labels / probes, e.g. for cross-framework
    parity tests): :meth:`_sample_labels` and :meth:`_draw_probes`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        rho: float = 0.03,
        weight_decay: float = 0.0,
        k: int = 10,
        hessian_computation_type: str = "gnb",
        eps: float = 1e-12,
        *,
        form: str = "seed",
        gamma: float = 0.01,
        bias_correction: bool = False,
        hessian_bias_correction: bool = False,
        early_refresh_steps: int = 0,
        probe: str = "gaussian",
        process_group: Any = None,
    ):
        self._distribution = Distribution("torch_bridge.Sophia", process_group)
        defaults = dict(
            lr=lr,
            betas=betas,
            rho=rho,
            weight_decay=weight_decay,
            k=k,
            hessian_computation_type=hessian_computation_type,
            eps=eps,
            form=form,
            gamma=gamma,
            bias_correction=bias_correction,
            hessian_bias_correction=hessian_bias_correction,
            early_refresh_steps=early_refresh_steps,
            probe=probe,
        )
        check_hyperparameters(**defaults)
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults)
        self._dist = SophiaDistributor(self._distribution)
        self._win_counts: list[torch.Tensor] = []
        self._win_total = 0
        self._win_record: list[tuple] | None = None  # pending win-rate inputs of the latest step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a parameter group after checking its hyperparameters (named in the ``ValueError``) and that
        its parameters are real. An invalid group is not added."""
        add_checked_param_group(
            self, param_group, super().add_param_group,
            lambda group: check_hyperparameters(**{name: group[name] for name in self.defaults}),
            "torch_bridge.Sophia",
        )
        self._distribution.add_last_group(self.param_groups)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("form", "seed")
            group.setdefault("gamma", 0.01)
            group.setdefault("bias_correction", False)
            group.setdefault("hessian_bias_correction", False)
            group.setdefault("early_refresh_steps", 0)
            group.setdefault("probe", "gaussian")
            group.setdefault("hessian_computation_type", "gnb")
            for p in group["params"]:
                st = self.state.get(p, {})
                if "step" in st and not torch.is_tensor(st["step"]):  # seed checkpoints: int step
                    st["step"] = torch.tensor(int(st["step"]), dtype=torch.int64)
        if not hasattr(self, "_win_counts"):
            self._win_counts, self._win_total = [], 0
        if not hasattr(self, "_win_record"):
            self._win_record = None
        if not hasattr(self, "_dist"):  # unpickled: a process group does not pickle
            self._distribution = Distribution.of("torch_bridge.Sophia", self.param_groups)
            self._dist = SophiaDistributor(self._distribution)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._materialize_win_rate()  # the latest step's win rate refers to the buffers replaced here
        super().load_state_dict(state_dict)
        if self._distribution.kind == "sharded":  # a whole (one-process) state: keep this rank's rows
            for p, state in self.state.items():
                for key, value in state.items():
                    state[key] = shard_like(p, value)

    # ------------------------------------------------------------------ hooks for injected randomness
    def _sample_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Returns labels ``ŷ ~ softmax(logits)`` of shape ``logits.shape[:-1]`` (one sample per step).

        Override to inject labels (parity tests). ``logits`` is passed detached, with the shape the user
        gave (``(B, C)`` or ``(B, T, C)``); under FSDP2 or with ``process_group`` it holds this rank's positions
        and the labels are this rank's part of one sample of the whole batch's.
        """
        if self._dist.distributed:
            return self._dist.labels(logits)
        return sample_labels(logits)

    def _draw_probes(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Returns Hutchinson probes, one per parameter in ``params`` (override to inject probes).

        ``params`` holds exactly the parameters refreshed this step, in parameter-group order. Probes are of
        whole parameters (an FSDP2 parameter's global shape), the same on every rank.
        """
        distribution = {id(p): g["probe"] for g in self.param_groups for p in g["params"]}
        if self._dist.distributed:
            return self._dist.probes(params, [distribution[id(p)] for p in params])
        return [draw_probes([p], distribution[id(p)])[0] for p in params]

    # ------------------------------------------------------------------ diagnostics
    @property
    def win_rate(self) -> float | None:
        """Fraction of coordinates whose update was NOT clipped in the latest step (``None`` before)."""
        self._materialize_win_rate()
        if self._win_total == 0:
            return None
        return float(torch.stack([c.to(torch.float64).cpu() for c in self._win_counts]).sum()) / float(
            self._win_total
        )

    def _scratch(self, like: torch.Tensor, slot: int) -> torch.Tensor:
        """A reused work buffer shaped like ``like`` (not part of the optimizer state)."""
        return scratch_buffer(self.__dict__.setdefault("_scratch_buffers", {}), like, slot)

    def _materialize_win_rate(self) -> None:
        """Evaluates the pending win-rate record of the latest step (same arithmetic as the step)."""
        record = getattr(self, "_win_record", None)
        if record is None:
            return
        self._win_record = None
        with torch.no_grad():
            self._win_counts, self._win_total = unclipped_counts(record)

    # ------------------------------------------------------------------ internals
    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0, dtype=torch.int64)
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _next_step_refreshes(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        state = self.state.get(p)
        step = int(state["step"]) if state else 0
        return (step + 1) % group["k"] == 0 or step + 1 <= group["early_refresh_steps"]

    # ------------------------------------------------------------------ public API
    def refreshes_next_step(self) -> bool:
        """Whether the next :meth:`step` refreshes the Hessian estimate of some ``'gnb'`` or
        ``'hutchinson'`` parameter (one that requires grad), i.e. needs ``logits`` or the closure.

        A ``'gnb'`` refresh differentiates ``logits`` again, so only the backward before it has to keep
        the graph: ``loss.backward(retain_graph=optimizer.refreshes_next_step())``. Keeping it on every
        step (the seed's pattern, also correct) made the benchmark GPT's training step ~8% slower on a
        CPU: the backward cannot free the saved activations as it goes.
        """
        return any(
            self._next_step_refreshes(p, group)
            for group in self.param_groups
            if group["hessian_computation_type"] in ("gnb", "hutchinson")
            for p in group["params"]
            if p.requires_grad
        )

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], torch.Tensor] | None = None,
        logits: torch.Tensor | None = None,
        *,
        logits_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Performs one Sophia step.

        Args:
          closure: for ``'hutchinson'`` groups, a callable returning the loss without calling
            ``backward()`` (the optimizer differentiates it for all parameters). If no group uses
            ``'hutchinson'`` the closure follows the torch convention (it computes the loss and calls
            ``backward()`` itself) and ``p.grad`` is used.
          logits: model output with its graph; required at every step of ``'gnb'`` groups (used on their
            refresh steps).
          logits_mask: optional ``logits.shape[:-1]`` mask, ``True`` at real positions, ``False`` at
            padding positions (excluded from the GNB loss and from ``N``).

        Returns:
          The closure's loss, or ``None`` without a closure.
        """
        if is_state_template_step(self, closure, logits):  # torch.distributed.checkpoint asks for a state
            self._dist.begin_step(self, communicates=lambda: False, template=True)
            for p in (p for group in self.param_groups for p in group["params"] if p.grad is not None):
                self._init_state(p)
            return None
        check_step_arguments(self.param_groups, closure, logits)
        loss = None
        groups = self.param_groups
        hutch_groups = [g for g in groups if g["hessian_computation_type"] == "hutchinson"]
        closure_grads: dict[torch.Tensor, torch.Tensor] | None = None
        estimates: dict[torch.Tensor, torch.Tensor] = {}
        uses_closure = closure is not None and any(p.requires_grad for g in hutch_groups for p in g["params"])
        self._dist.begin_step(self, communicates=lambda: uses_closure or self._gnb_refresh_due())

        # --- gradients (and the Hutchinson estimate) from a loss-returning closure
        if uses_closure:
            loss, closure_grads, estimates = self._closure_gradients(closure, hutch_groups)
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()

        def grad_of(p: torch.Tensor) -> torch.Tensor | None:
            if closure_grads is not None:
                return closure_grads.get(p)
            return p.grad

        # --- refresh bookkeeping: which parameters need a new estimate now
        gnb_refresh: list[tuple[torch.Tensor, dict[str, Any]]] = []
        for group in groups:
            kind = group["hessian_computation_type"]
            for p in group["params"]:
                if grad_of(p) is None or not self._next_step_refreshes(p, group):
                    continue
                if kind == "gnb":
                    gnb_refresh.append((p, group))
        if gnb_refresh:
            estimates.update(self._gnb_estimates(logits, logits_mask, gnb_refresh))

        # --- the update: foreach (multi-tensor) ops over each group's parameters
        self._win_record = []
        sharded = self._distribution.kind == "sharded"
        for group in groups:
            record = update_group(group, grad_of, estimates, self._init_state, sharded, self._scratch)
            if record is not None:
                self._win_record.append(record)
        return loss

    def _gnb_refresh_due(self) -> bool:
        return any(p.grad is not None and self._next_step_refreshes(p, g)
                   for g in self.param_groups if g["hessian_computation_type"] == "gnb" for p in g["params"])

    @property
    def communication(self) -> dict[str, int]:
        """What this rank has communicated since the optimizer was built (``bytes_sent``, ``bytes_received``,
        ``collectives``); zeros in one process or without ``process_group`` (FSDP2's own collectives, in the
        model's forward and backward, are not counted)."""
        return self._distribution.stats

    def _gnb_estimates(
        self,
        logits: torch.Tensor | None,
        logits_mask: torch.Tensor | None,
        refresh: list[tuple[torch.Tensor, dict[str, Any]]],
    ) -> dict[torch.Tensor, torch.Tensor]:
        """One label sample and one backward for all refreshed 'gnb' parameters."""
        everything = [p for group in self.param_groups for p in group["params"]]
        return sophia_gnb_estimates(logits, logits_mask, refresh, everything, self._sample_labels, self._dist)

    def _closure_gradients(
        self, closure: Callable[[], torch.Tensor], hutch_groups: list[dict[str, Any]]
    ) -> tuple[torch.Tensor, dict[torch.Tensor, torch.Tensor], dict[torch.Tensor, torch.Tensor]]:
        """Evaluates a loss-returning closure; returns (loss, grads, Hutchinson estimates)."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        refresh_group = {
            p: g
            for g in hutch_groups
            for p in g["params"]
            if p.requires_grad and self._next_step_refreshes(p, g)
        }
        return sophia_closure_estimates(closure, params, refresh_group, self._dist, self._draw_probes)

    @torch.no_grad()
    def update_hessian(self, batch_size: float | None = None) -> None:
        r"""Folds the Gauss-Newton-Bartlett estimate from ``p.grad`` into the Hessian EMA.

        The official SophiaG pattern: after ``loss_of_sampled_labels.backward()`` (labels sampled from
        the model's own softmax), call ``update_hessian()``; for every parameter with a gradient
        :math:`\hat g`:

        .. math:: h \leftarrow \beta_2 h + (1 - \beta_2)\, B\, \hat g \odot \hat g

        with :math:`B` = ``batch_size`` (the number of label positions averaged over; pass it for the
        paper's form) or 1 by default (the seed's form). The step counter does not advance. Use
        ``hessian_computation_type='manual'`` so that :meth:`step` does not also refresh. Under FSDP2 or DDP
        ``p.grad`` is the whole batch's, and ``batch_size`` is the whole batch's number of positions.
        """
        self._materialize_win_rate()  # h changes in place below
        scale = 1.0
        if batch_size is not None:
            validation.check_positive("batch_size", batch_size)
            scale = float(batch_size)
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                h, g = local(self._init_state(p)["hessian_buffer"]), local(p.grad)
                h.mul_(beta2).addcmul_(g, g, value=(1.0 - beta2) * scale)

