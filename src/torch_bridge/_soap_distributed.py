"""SOAP over processes: who computes which parameter's preconditioner, and what is communicated.

:func:`soap_distributor` picks one of three strategies from the parameters' :class:`Distribution`; the SOAP
step (``soap.py``) calls the same methods on each, so its math knows no ranks:

* :class:`SoapDistributor` (one process, or redundant data parallelism): everything here, nothing sent.
* :class:`ReplicatedSoap` (DDP, ``process_group=``): every rank keeps the whole state and runs the cheap
  per-step work on its identical gradients, but each refresh's (and the first step's) decompositions are
  split over the ranks -- greedily by ``d³`` with at most ``⌈F / W⌉`` of the ``F`` per rank -- and the
  results (bases and sort orders) are all-gathered. The bits equal the redundant run's.
* :class:`OwnerSoap` (FSDP2): each parameter has one owner rank, balanced greedily by SOAP's cost
  (``Σ d³ + size``, :func:`torch_bridge._balance.soap_cost`). Per step one all-to-all brings every
  gradient's shards to its owner, which keeps that parameter's whole state (so state memory per rank is
  about ``1/W``), computes the whole preconditioned direction and refreshes its bases; a second all-to-all
  returns each rank its rows of the directions, applied to the local shards with the same elementwise
  operations one process applies to the whole tensor. Exact SOAP: every preconditioner is the whole
  parameter's, never per-shard blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._balance import assign, soap_cost
from ._checkpoint import owner_state_from_dtensors, owner_state_to_dtensors
from ._distributed import Distribution, StepGuard, describe_params, local, structure_key
from ._linalg import compute_dtype

__all__ = ["soap_distributor", "SoapDistributor", "ReplicatedSoap", "OwnerSoap"]

Like = list[tuple[tuple[int, ...], torch.dtype]]


class SoapDistributor:
    """One process (or the redundant default): every method does the local thing."""

    def __init__(self, distribution: Distribution, layout_of: Callable):
        self.distribution = distribution
        self.layout_of = layout_of  # (param, group) -> SoapLayout
        self.guard = StepGuard(distribution)

    def begin_step(self, optimizer: Any, template: bool = False) -> None:
        """Checks that the ranks agree on this step (see :class:`StepGuard`) before it communicates."""
        if self.distribution.comm is None:
            return
        self.assign(optimizer)
        groups = optimizer.param_groups
        self.guard.check(
            lambda: (template, structure_key(groups, _PLAN_OPTIONS)),
            lambda: [f"checkpoint template step: {template}"]
            + describe_params(groups, _PLAN_OPTIONS, optimizer.state) + self.fingerprint(optimizer),
            template or self.communicates(optimizer))

    def fingerprint(self, optimizer: Any) -> list[str]:
        """What else the ranks must agree on (nothing here)."""
        return []

    def communicates(self, optimizer: Any) -> bool:
        return True

    def assign(self, optimizer: Any) -> None:
        """Decides which rank computes each parameter (nothing to decide here)."""

    def owns(self, p: torch.Tensor) -> bool:
        return True

    def gradients(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """The whole gradient of each parameter this rank computes (``None`` for the others)."""
        return [p.grad for p in params]

    def update(self, p: torch.Tensor, direction: torch.Tensor, step_size: float) -> None:
        """``p ← p − step_size · direction`` (the direction of a parameter this rank computes)."""
        p.add_(direction, alpha=-step_size)

    def finish_updates(self, params: Sequence[torch.Tensor], step_sizes: Sequence[float]) -> None:
        """Completes the updates of ``params`` (every parameter that took a step) after the last :meth:`update`."""

    def local_params(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(params)

    def share(self, costs: Sequence[float], run: Callable[[int], list[torch.Tensor]],
              like: Callable[[int], Like], device: torch.device) -> list[list[torch.Tensor]]:
        """Runs tasks ``0 .. F-1`` of the given ``costs``; ``run(i)`` returns tensors described by ``like(i)``
        (their shapes and dtypes) on ``device``. Returns every task's results."""
        return [run(i) for i in range(len(costs))]

    def export_state(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def import_state(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict


class ReplicatedSoap(SoapDistributor):
    """DDP: whole state on every rank; the decompositions of a refresh are split over the ranks and shared."""

    def communicates(self, optimizer: Any) -> bool:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                step = _step_of(optimizer.state.get(p))
                if step < 0 or (step + 1) % group["precondition_frequency"] == 0:
                    return True
        return False

    def fingerprint(self, optimizer: Any) -> list[str]:
        """The sum of each gradient: the ranks' gradients must be identical (all-reduced by DDP), or each rank
        would mix its own moments with bases computed from another rank's factors."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        sums = torch.stack([g.sum(dtype=torch.float64) for g in grads]).tolist() if grads else []
        return [f"gradient sums (identical gradients on every rank, as DDP makes them): {sums!r}"]

    def share(self, costs: Sequence[float], run: Callable[[int], list[torch.Tensor]],
              like: Callable[[int], Like], device: torch.device) -> list[list[torch.Tensor]]:
        comm = self.distribution.comm
        if not costs:
            return []
        ranks = assign(costs, comm.world, cap=math.ceil(len(costs) / comm.world))
        results: list[list[torch.Tensor] | None] = [run(i) if r == comm.rank else None for i, r in enumerate(ranks)]
        # Each result travels in its memory order with its strides, so that every rank holds it laid out as the
        # rank that computed it did (a column-major basis multiplies with other rounding than a row-major one).
        slots = [(i, j, shape, dtype) for i in range(len(costs)) for j, (shape, dtype) in enumerate(like(i))]
        slots += [(i, (j, "stride"), (len(shape),), torch.int64) for i, j, shape, _ in list(slots)]
        received_slots: dict[tuple, torch.Tensor] = {}
        for dtype in dict.fromkeys(dtype for *_, dtype in slots):
            mine = [_memory_order(results[i], j) for i, j, _, d in slots if d == dtype and ranks[i] == comm.rank]
            numels = [sum(math.prod(shape) for i, _, shape, d in slots if d == dtype and ranks[i] == r)
                      for r in range(comm.world)]
            flat = torch.cat(mine).to(comm.device) if mine else torch.empty(0, dtype=dtype, device=comm.device)
            received = comm.all_gather_uneven(flat, numels)
            offsets = [0] * comm.world
            for i, j, shape, d in slots:
                if d == dtype:
                    r, n = ranks[i], math.prod(shape)
                    received_slots[i, j] = received[r][offsets[r]:offsets[r] + n]
                    offsets[r] += n
        shared = {(i, j): received_slots[i, j].as_strided(shape, received_slots[i, (j, "stride")].tolist())
                  .to(device, copy=True) for i in range(len(costs)) for j, (shape, _) in enumerate(like(i))}
        return [[shared[i, j] for j in range(len(like(i)))] for i in range(len(costs))]


class OwnerSoap(SoapDistributor):
    """FSDP2: one owner rank per parameter holds its whole state and computes its whole update."""

    def __init__(self, distribution: Distribution, layout_of: Callable):
        super().__init__(distribution, layout_of)
        self.owner: dict[torch.Tensor, int] = {}
        self._loads = [0.0] * distribution.world
        self._pending: dict[torch.Tensor, torch.Tensor] = {}

    def assign(self, optimizer: Any) -> None:
        new = [(p, g) for g in optimizer.param_groups for p in g["params"] if p not in self.owner]
        if not new:
            return
        costs = [soap_cost(self.layout_of(p, g)) for p, g in new]
        for (p, _), rank in zip(new, assign(costs, self.distribution.world, loads=self._loads)):
            self.owner[p] = rank
        for (p, _), cost in zip(new, costs):
            self._loads[self.owner[p]] += cost

    def owns(self, p: torch.Tensor) -> bool:
        return self.owner[p] == self.distribution.rank

    def gradients(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        d = self.distribution
        wholes = d.comm.gather_rows([local(p.grad) for p in params], [self.owner[p] for p in params],
                                    [d.rows(p) for p in params])
        return [w.view(p.shape) if w is not None else None for p, w in zip(params, wholes)]

    def update(self, p: torch.Tensor, direction: torch.Tensor, step_size: float) -> None:
        self._pending[p] = direction

    def finish_updates(self, params: Sequence[torch.Tensor], step_sizes: Sequence[float]) -> None:
        d = self.distribution
        pieces = d.comm.scatter_rows([self._pending.get(p) for p in params], [self.owner[p] for p in params],
                                     [d.rows(p) for p in params],
                                     [(tuple(p.shape[1:]), compute_dtype(p.dtype)) for p in params])
        self._pending.clear()
        for p, piece, size in zip(params, pieces, step_sizes):
            shard = local(p)
            shard.add_(piece.view(shard.shape), alpha=-size)

    def local_params(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [local(p) for p in params]

    def export_state(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        return owner_state_to_dtensors(self, optimizer, state_dict)

    def import_state(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        self.assign(optimizer)
        return owner_state_from_dtensors(self, optimizer, state_dict)


def soap_distributor(distribution: Distribution, layout_of: Callable) -> SoapDistributor:
    """The strategy for ``distribution.kind`` (``"local"``, ``"replicated"`` or ``"sharded"``); ``layout_of(p,
    group)`` is a parameter's :class:`~so_common.soap_layout.SoapLayout`."""
    return {"local": SoapDistributor, "replicated": ReplicatedSoap, "sharded": OwnerSoap}[distribution.kind](
        distribution, layout_of)


_PLAN_OPTIONS = ("max_precond_dim", "merge_dims", "precondition_1d", "data_format", "precondition_frequency")


def _memory_order(results: list[torch.Tensor], j: Any) -> torch.Tensor:
    """Result ``j`` flattened in its memory order, or (``j = (k, "stride")``) the strides of result ``k``."""
    if isinstance(j, tuple):
        return torch.tensor(results[j[0]].stride(), dtype=torch.int64)
    t = results[j]
    if t.stride() != torch.empty_like(t).stride():  # not dense: send it row-major
        t = t.contiguous()
    return t.as_strided((t.numel(),), (1,))


def _step_of(state: dict[str, Any] | None) -> int:
    """A parameter's step count (``-1`` before its first step, or for a blank checkpoint template)."""
    if not state or "step" not in state:
        return -1
    return int(state["step"])

