"""Sophia over processes: estimates of the whole model's Hessian diagonal from each rank's part of the batch.

Sophia's update is elementwise, so under FSDP2 every rank updates its own rows of each parameter and its
state is sharded like the parameter (``DTensor`` s, which ``torch.distributed.checkpoint`` saves as they
are); under DDP every rank repeats the same update. What needs the group is the estimate, which must be
the one one process would make from the whole batch:

* Gauss-Newton-Bartlett (``step(logits=...)``): ``ĝ = ∇ (1/N) Σ_n CE(logits_n, ŷ_n)`` over all ``N``
  label positions of all ranks: each rank differentiates its own positions' sum weighted by ``1/N`` (``N``
  all-reduced) and the pieces are summed -- DDP: an all-reduce of ``ĝ``; FSDP2: FSDP's own backward
  (which averages over the ranks) of the rank's loss times ``W``. The labels are drawn from one
  generator state shared by the ranks (see :meth:`SophiaDistributor.labels`), each rank taking the
  positions it holds, so the sample does not depend on how the batch is split.
* Hutchinson (``step(closure)``): ``H v`` of the mean of the ranks' losses with one probe ``v`` of every
  whole parameter, drawn identically on every rank; the gradient and ``H v`` are averaged over the ranks
  (FSDP2: reduce-scattered to the local rows). FSDP2 keeps the whole (unsharded) parameters only inside
  forward and backward, so the double backward differentiates FSDP's unsharded parameters and re-gathers
  them for its duration (:func:`_fsdp_params`); steps that do not refresh take the plain gradient through
  FSDP's own backward.
* ``'manual'`` + ``update_hessian()``: ``p.grad`` is already the whole batch's (FSDP2/DDP reduced it).

Without FSDP2 or ``process_group`` everything is local, as in one process.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ._distributed import Distribution, StepGuard, describe_params, local, structure_key
from ._hessian_estimators import (
    backward_sampled_label_loss,
    draw_probes,
    hessian_vector_product,
    labels_from_uniforms,
    sampled_label_gradients,
)

__all__ = ["SophiaDistributor"]


class SophiaDistributor:
    """Estimates and randomness for Sophia on one :class:`Distribution`."""

    def __init__(self, distribution: Distribution):
        self.distribution = distribution
        self.guard = StepGuard(distribution)
        self._warned = False

    def warn_if_alone(self) -> None:
        """Warns once when processes run together but this optimizer was given no ``process_group``."""
        if self._warned or self.distributed or not dist.is_available() or not dist.is_initialized():
            return
        if dist.get_world_size() > 1:
            warnings.warn(
                f"torch.distributed runs {dist.get_world_size()} processes but torch_bridge.Sophia got regular "
                "parameters and no process_group: its Hessian estimates (and a closure's gradients) are of this "
                "process's batch alone. Under DDP pass process_group=torch.distributed.group.WORLD.",
                stacklevel=4)
        self._warned = True

    @property
    def distributed(self) -> bool:
        return self.distribution.comm is not None

    # ---------------------------------------------------------------------------------------- checks
    def begin_step(self, optimizer: Any, communicates: Callable[[], bool], template: bool = False) -> None:
        """Checks that the ranks agree on this step (:class:`StepGuard`) if it communicates (``communicates()``)."""
        if not self.distributed:
            return
        groups, options = optimizer.param_groups, ("hessian_computation_type", "k")
        self.guard.check(lambda: (template, structure_key(groups, options)),
                         lambda: [f"checkpoint template step: {template}"]
                         + describe_params(groups, options, optimizer.state),
                         template or communicates())

    # ---------------------------------------------------------------------------------------- randomness
    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator holding group rank 0's default generator state for ``device`` (``None`` in one
        process: the global generator). Pass it back to :meth:`release` after drawing."""
        if not self.distributed:
            return None
        comm = self.distribution.comm
        default = _default_generator(device)
        state = default.get_state()
        shared = comm.broadcast_bytes(state if comm.rank == 0 else None, state.numel())
        generator = torch.Generator(device=device)
        generator.set_state(shared)
        return generator

    def release(self, generator: torch.Generator | None, device: torch.device) -> None:
        """Rank 0's default generator continues after the draws, as if it had made them itself."""
        if generator is not None and self.distribution.rank == 0:
            _default_generator(device).set_state(generator.get_state())

    def labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Labels ``ŷ ~ softmax(logits)`` for this rank's positions, as the whole batch's sample cut to them.

        One uniform per position of the whole batch (ranks in order) comes from the shared generator; the
        label is where it falls in the position's cumulative softmax (inverse-CDF sampling).
        """
        comm = self.distribution.comm
        positions = logits[..., 0].numel()
        counts = [row[0] for row in comm.all_gather_ints([positions])]
        start = sum(counts[:comm.rank])
        generator = self.generator(logits.device)
        uniforms = torch.rand(sum(counts), generator=generator, dtype=torch.float64, device=logits.device)
        self.release(generator, logits.device)
        return labels_from_uniforms(logits, uniforms[start:start + positions])

    def probes(self, params: Sequence[torch.Tensor], distributions: Sequence[str]) -> list[torch.Tensor]:
        """Probes of the whole parameters (global shapes), the same on every rank."""
        device = params[0].device if params else torch.device("cpu")
        generator = self.generator(device)
        probes = [draw_probes([p], kind, generator)[0] for p, kind in zip(params, distributions)]
        self.release(generator, device)
        return probes

    # ---------------------------------------------------------------------------------------- estimates
    def gnb_gradients(self, logits: torch.Tensor, params: Sequence[torch.Tensor], everything: Sequence[torch.Tensor],
                      labels: torch.Tensor, mask: torch.Tensor | None) -> tuple[list[torch.Tensor | None], Any]:
        """``ĝ`` (local rows) of every parameter in ``params`` and the number ``N`` of label positions of the
        whole batch. ``everything``: all the optimizer's parameters (FSDP2's backward reaches them all)."""
        if not self.distributed:
            self.warn_if_alone()
            return sampled_label_gradients(logits, params, labels, mask)
        comm = self.distribution.comm
        n_local = _positions(logits, mask)
        total = float(sum(row[0] for row in comm.all_gather_ints([n_local])))
        if self.distribution.kind == "replicated":
            grads, _ = sampled_label_gradients(logits, params, labels, mask, weight=n_local / total)
            comm.all_reduce_([g for g in grads if g is not None], scale=1.0)
            return grads, total
        weight = n_local * comm.world / total  # FSDP's reduce-scatter averages over the W ranks
        return _fsdp_backward(lambda: backward_sampled_label_loss(logits, labels, mask, weight=weight),
                              params, everything), total

    def closure_gradients(self, loss: torch.Tensor, params: Sequence[torch.Tensor], refresh: Sequence[torch.Tensor],
                          draw: Callable[[list[torch.Tensor]], list[torch.Tensor]]
                          ) -> tuple[dict[torch.Tensor, torch.Tensor], list[tuple]]:
        """The gradient (local rows) of every parameter of ``params`` that the loss reaches, and for each of
        ``refresh`` it reaches ``(p, v, H v)`` (local rows), ``v = draw(...)`` of the whole parameters."""
        kind = self.distribution.kind
        self.warn_if_alone()
        if kind == "sharded" and not refresh:
            grads = _fsdp_backward(loss.backward, params, params)
            return {p: g for p, g in zip(params, grads) if g is not None}, []
        inputs = _fsdp_params(params).unsharded() if kind == "sharded" else list(params)
        grads = _grad(loss, inputs, create_graph=bool(refresh))
        grad_map = {p: g for p, g in zip(params, grads) if g is not None}
        refresh = [p for p in refresh if p in grad_map]
        triples = []
        if refresh:
            probes = draw(refresh)
            if len(probes) != len(refresh):
                raise ValueError(f"_draw_probes returned {len(probes)} probes for {len(refresh)} params")
            for p, v in zip(refresh, probes):
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"Invalid probe from _draw_probes: shape {tuple(v.shape)} for a parameter of "
                                     f"shape {tuple(p.shape)} (probes are of whole parameters)")
            position = {p: i for i, p in enumerate(params)}
            targets = [inputs[position[p]] for p in refresh]
            if kind == "sharded":
                with _fsdp_params(params).gathered():
                    hvps = hessian_vector_product(None, targets, probes, grads=[grad_map[p] for p in refresh])
            else:
                hvps = hessian_vector_product(None, targets, probes, grads=[grad_map[p] for p in refresh])
            triples = list(zip(refresh, probes, hvps))
        grad_map = {p: g.detach() for p, g in grad_map.items()}
        if kind == "replicated":
            comm = self.distribution.comm
            comm.all_reduce_(list(grad_map.values()) + [hv for *_, hv in triples], scale=1.0 / comm.world)
        elif kind == "sharded":
            grad_map, triples = self._reduce_scatter(grad_map, triples)
        return grad_map, triples

    def _reduce_scatter(self, grad_map: dict, triples: list) -> tuple[dict, list]:
        d = self.distribution
        tensors = list(grad_map.values()) + [hv for *_, hv in triples]
        owners = list(grad_map) + [p for p, *_ in triples]
        pieces = d.comm.reduce_scatter_rows(tensors, [d.rows(p) for p in owners])
        grads = dict(zip(grad_map, pieces[:len(grad_map)]))
        out = []
        for (p, v, _), hv in zip(triples, pieces[len(grad_map):]):
            start = d.offset(p)
            out.append((p, v[start:start + hv.shape[0]], hv))
        return grads, out


def _grad(loss: torch.Tensor, inputs: Sequence[torch.Tensor], create_graph: bool) -> tuple:
    try:
        return torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
    except RuntimeError as err:
        if "second time" in str(err) or "already been freed" in str(err):
            raise RuntimeError(
                "Sophia (hutchinson): the closure's graph was already freed; the closure must return the loss "
                "without calling backward()") from err
        raise


def _fsdp_backward(backward: Callable[[], Any], params: Sequence[torch.Tensor],
                   everything: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Runs ``backward()`` (FSDP2 reduce-scatters into ``.grad``) with the optimizer's gradients set aside and
    put back after; returns the local rows of the new gradients of ``params``."""
    saved = [(p, p.grad) for p in everything]
    for p, _ in saved:
        p.grad = None
    try:
        with torch.enable_grad():
            backward()
        return [local(p.grad).detach() if p.grad is not None else None for p in params]
    finally:
        for p, grad in saved:
            p.grad = grad


class _FsdpParams:
    """FSDP2's per-parameter records (``FSDPParam``) and modules of the given sharded parameters."""

    def __init__(self, records: list, modules: list):
        self.records, self.modules = records, modules

    def unsharded(self) -> list[torch.Tensor]:
        """The whole parameters autograd sees in forward and backward."""
        return [r.unsharded_param if hasattr(r, "_unsharded_param") else _unused(r.sharded_param) for r in self.records]

    def gathered(self) -> Any:
        modules = self.modules

        class _Gathered:
            def __enter__(self):
                for m in modules:
                    m.unshard()

            def __exit__(self, *exc):
                for m in modules:
                    m.reshard()

        return _Gathered()


def _fsdp_params(params: Sequence[torch.Tensor]) -> _FsdpParams:
    """FSDP2's records of ``params``, found in the registry of ``fully_shard``'s module states."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError as err:  # pragma: no cover - depends on the torch version
        raise RuntimeError(_NO_FSDP_INTERNALS) from err
    wanted = {id(p): i for i, p in enumerate(params)}
    records: list = [None] * len(params)
    modules: list = []
    for module, ref in list(_module_state_mapping.items()):
        state = ref()
        for group in getattr(state, "_fsdp_param_groups", None) or []:
            for record in group.fsdp_params:
                i = wanted.get(id(getattr(record, "sharded_param", None)))
                if i is not None:
                    records[i] = record
                    if module not in modules:
                        modules.append(module)
    if any(r is None for r in records) or not all(hasattr(m, "unshard") for m in modules):
        raise RuntimeError(_NO_FSDP_INTERNALS)
    return _FsdpParams(records, modules)


_NO_FSDP_INTERNALS = (
    "Sophia (hutchinson) under FSDP2 differentiates FSDP's unsharded parameters, and this torch version's "
    "fully_shard does not expose them as expected (torch.distributed._composable_state._module_state_mapping, "
    "FSDPParam.unsharded_param); use hessian_computation_type='gnb' or 'manual' with FSDP2")


def _unused(p: torch.Tensor) -> torch.Tensor:
    """A stand-in leaf for a parameter the forward did not use (its gradient is ``None``)."""
    return torch.zeros(p.shape, dtype=p.dtype, device=p.device, requires_grad=True)


def _positions(logits: torch.Tensor, mask: torch.Tensor | None) -> int:
    if mask is None:
        return logits.reshape(-1, logits.shape[-1]).shape[0]
    return int(mask.to(torch.bool).sum())


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    module = getattr(torch, device.type)
    return module.default_generators[device.index if device.index is not None else module.current_device()]
