"""Optimizer state for ``torch.distributed.checkpoint`` (DCP) and its ``state_dict`` helpers.

``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (``torch.distributed.checkpoint.state_dict``)
need a state to save into or load into, even from a fresh optimizer: when ``optimizer.state`` is empty and
no parameter has a gradient, they give every trainable parameter a zero gradient, set every ``lr`` to 0
and call ``step()``. For SOAP that call would be a real first step (factors and eigenbases from zero
gradients, which the next real step would then use), and for Sophia it would advance the step count;
:func:`is_state_template_step` recognises it so that the optimizers build a blank state of the right
shapes instead.

Under FSDP2 SOAP keeps each parameter's whole state on one owner rank. DCP saves and reshards
``DTensor`` s, so :func:`owner_state_to_dtensors` presents every owner-held tensor as a ``DTensor`` sharded
along dim 0 on the parameters' mesh (its rows scattered to the ranks: each holds about ``1/W`` of it),
and :func:`owner_state_from_dtensors` gathers loaded ones back to the (possibly different) owner; a plain
tensor (a full state dict) stays with the owner as it is. Sophia's state is elementwise and sharded like
its parameter already; :func:`shard_like` cuts a full tensor loaded into an FSDP2 Sophia to the local rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ._distributed import chunk_rows, is_dtensor, local

__all__ = ["is_state_template_step", "owner_state_to_dtensors", "owner_state_from_dtensors", "shard_like"]


def is_state_template_step(optimizer: torch.optim.Optimizer, closure: Any, *extra: Any) -> bool:
    """Whether this ``step()`` is DCP's: empty state, no closure (nor ``extra`` argument), every ``lr`` 0 and
    every trainable parameter's gradient all zeros."""
    if optimizer.state or closure is not None or any(e is not None for e in extra):
        return False
    if any(float(group["lr"]) != 0.0 for group in optimizer.param_groups):
        return False
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    return bool(params) and all(p.grad is not None and not bool(local(p.grad).any()) for p in params)


def _spec(value: torch.Tensor) -> tuple:
    return tuple(value.shape), str(value.dtype).removeprefix("torch.")


def owner_state_to_dtensors(distributor: Any, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """``state_dict`` (from ``Optimizer.state_dict``) with every owner-held non-empty tensor (beside
    ``step``) replaced by a ``DTensor`` ``Shard(0)`` on the mesh; collective (all ranks call it)."""
    d = distributor.distribution
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
    state = state_dict["state"]
    mine = {pid: {key: (isinstance(value, list), [_spec(t) for t in _tensors(value)])
                  for key, value in sorted(state[pid].items()) if key != "step" and _tensors(value)}
            for pid, p in zip(ids, params) if pid in state and distributor.owns(p)}
    everyone: list[dict] = [{}] * d.world
    dist.all_gather_object(everyone, mine, group=d.comm.group)
    specs = {pid: (rank, entry) for rank, part in enumerate(everyone) for pid, entry in part.items()}
    items = [(pid, key, j, shape, dtype) for pid in ids if pid in specs
             for key, (_, shapes) in specs[pid][1].items() for j, (shape, dtype) in enumerate(shapes)
             if 0 not in shape]
    owners = [specs[pid][0] for pid, *_ in items]
    wholes = [_tensors(state[pid][key])[j] if owner == d.rank else None
              for (pid, key, j, *_), owner in zip(items, owners)]
    pieces = d.comm.scatter_rows(wholes, owners, [chunk_rows(shape[0], d.world) for *_, shape, _ in items],
                                 [(shape[1:], getattr(torch, dtype)) for *_, shape, dtype in items])
    sharded = {(pid, key, j): _as_dtensor(piece, shape, d.mesh)
               for (pid, key, j, shape, _), piece in zip(items, pieces)}
    out = {}
    for pid in ids:
        if pid not in state:
            continue
        entry = {"step": state[pid]["step"]}
        for key, (is_list, shapes) in specs.get(pid, (0, {}))[1].items():
            values = [sharded.get((pid, key, j)) for j in range(len(shapes))]
            values = [v if v is not None else torch.empty(shape, dtype=getattr(torch, dtype), device=d.comm.device)
                      for v, (shape, dtype) in zip(values, shapes)]
            entry[key] = values if is_list else values[0]
        out[pid] = entry
    return dict(state_dict, state=out)


def owner_state_from_dtensors(distributor: Any, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """The inverse of :func:`owner_state_to_dtensors`: loaded ``DTensor`` s gathered whole to each parameter's
    owner (collective); plain tensors kept by the owner; other ranks keep only ``step``."""
    d = distributor.distribution
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
    state = state_dict["state"]
    items = [(pid, key, j, t) for pid, p in zip(ids, params) if pid in state
             for key, value in sorted(state[pid].items()) for j, t in enumerate(_tensors(value)) if is_dtensor(t)]
    owner_of = dict(zip(ids, (distributor.owner[p] for p in params)))
    wholes = d.comm.gather_rows([local(t) for *_, t in items], [owner_of[pid] for pid, *_ in items],
                                [chunk_rows(t.shape[0], d.world) for *_, t in items])
    gathered = {(pid, key, j): w for (pid, key, j, _), w in zip(items, wholes)}
    out = {}
    for pid, p in zip(ids, params):
        if pid not in state:
            continue
        if not distributor.owns(p):
            out[pid] = {key: value for key, value in state[pid].items() if key == "step" or not _tensors(value)}
            continue
        entry = {}
        for key, value in state[pid].items():
            tensors = [gathered.get((pid, key, j), t) for j, t in enumerate(_tensors(value))]
            entry[key] = tensors if isinstance(value, list) else (tensors[0] if tensors else value)
        out[pid] = entry
    return dict(state_dict, state=out)


def shard_like(p: torch.Tensor, value: Any) -> Any:
    """A whole tensor loaded for the FSDP2 parameter ``p`` as a ``DTensor`` sharded like ``p`` (this rank's
    rows of it, no communication); anything else unchanged."""
    if not (is_dtensor(p) and isinstance(value, torch.Tensor)) or is_dtensor(value) or value.shape != p.shape:
        return value
    rows = chunk_rows(p.shape[0], p.device_mesh.size())
    rank = p.device_mesh.get_local_rank()
    start = sum(rows[:rank])
    return _as_dtensor(value.to(local(p).device)[start:start + rows[rank]].clone(), tuple(p.shape), p.device_mesh)


def _as_dtensor(piece: torch.Tensor, shape: tuple[int, ...], mesh: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(piece, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return []

