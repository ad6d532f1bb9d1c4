"""How an optimizer's parameters are spread over processes, and the step-time checks that go with it.

The optimizers' math (``soap.py``, ``sophia.py``) sees whole tensors; this layer decides what is
communicated. Three layouts, found from the parameters themselves and the ``process_group`` argument:

* ``"local"`` -- plain tensors and no ``process_group``: one process, or today's redundant data parallelism
  (every rank does all the work on identical, all-reduced gradients).
* ``"replicated"`` -- plain tensors and a ``process_group`` (DDP): every rank holds every tensor and
  identical gradients; the expensive parts (SOAP's eigh/QR) are split over the ranks and shared.
* ``"sharded"`` -- FSDP2 (``torch.distributed.fsdp.fully_shard``): every parameter is a ``DTensor`` sharded
  along dim 0 (``Shard(0)``) on one 1-D device mesh; a rank holds rows ``[s·c, (s+1)·c)`` of each
  parameter with ``c = ⌈d₀ / W⌉`` (``torch.chunk``'s cut: trailing ranks may hold fewer rows, or none).

:class:`StepGuard` makes every rank check, before a step communicates, that all ranks hold the same
parameters in the same state (a digest of shapes, dtypes, which have gradients and their step counts),
so that a rank without some parameter or with a different model is a ``ValueError`` on every rank rather
than mismatched collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ._collectives import Collectives, digest

__all__ = ["Distribution", "StepGuard", "chunk_rows", "describe_params", "is_dtensor", "local", "structure_key"]

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch: no FSDP2
    DTensor, Shard = None, None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a ``DTensor``'s local shard (an alias, so in-place ops update it), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def chunk_rows(d0: int, world: int) -> tuple[int, ...]:
    """Dim-0 rows of a ``d0``-row tensor on each of ``world`` ranks, cut as ``torch.chunk`` (and FSDP2) cut."""
    size = -(-d0 // world) if d0 else 0
    return tuple(max(0, min(size, d0 - s * size)) for s in range(world))


class Distribution:
    """The layout of an optimizer's parameters over processes (see the module docstring).

    Built incrementally, one parameter group at a time (``add_param_group``), so that every group's
    parameters are checked against the ones before: one kind, one device mesh, one process group.
    """

    def __init__(self, name: str, process_group: dist.ProcessGroup | None = None):
        self.name = name
        self.process_group = process_group
        self.kind = "local"
        self.mesh = None
        self.comm: Collectives | None = None
        self._seen = 0
        self._rows: dict[torch.Tensor, tuple[int, ...]] = {}
        if process_group is not None:
            _check_member(name, process_group)

    @property
    def rank(self) -> int:
        return self.comm.rank if self.comm is not None else 0

    @property
    def world(self) -> int:
        return self.comm.world if self.comm is not None else 1

    @property
    def stats(self) -> dict[str, int]:
        """Bytes this rank sent and received, and its collectives, since the optimizer was built."""
        if self.comm is None:
            return {"bytes_sent": 0, "bytes_received": 0, "collectives": 0}
        return self.comm.stats.as_dict()

    def add(self, params: Iterable[torch.Tensor]) -> None:
        """Takes in one parameter group's parameters; raises ``ValueError`` if they do not fit the others."""
        params = list(params)
        sharded = [p for p in params if is_dtensor(p)]
        if sharded and len(sharded) != len(params) or (sharded and self._seen and self.kind != "sharded") or (
                params and not sharded and self.kind == "sharded"):
            raise ValueError(
                f"Invalid params: {self.name} got both DTensor (FSDP2) and regular parameters; shard the whole "
                "model with fully_shard (or none of it) so that every parameter is laid out the same way")
        for p in sharded:
            self._add_sharded(p)
        if params and not sharded and self.process_group is not None and self.comm is None:
            self.kind = "replicated"
            self.comm = Collectives(self.process_group, _comm_device(self.process_group))
        self._seen += len(params)

    def add_last_group(self, param_groups: list[dict]) -> None:
        """:meth:`add` for the group ``add_param_group`` just appended; a group that does not fit is removed."""
        try:
            self.add(param_groups[-1]["params"])
        except ValueError:
            param_groups.pop()
            raise

    @classmethod
    def of(cls, name: str, param_groups: list[dict]) -> Distribution:
        """The layout of an unpickled optimizer's parameters (a process group does not pickle: none)."""
        distribution = cls(name)
        for group in param_groups:
            distribution.add(group["params"])
        return distribution

    def _add_sharded(self, p: torch.Tensor) -> None:
        mesh, placements = p.device_mesh, tuple(p.placements)
        if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
            raise ValueError(
                f"Invalid params: {self.name} supports DTensor parameters sharded along dim 0 on a 1-D device mesh "
                f"(FSDP2's fully_shard); got placements {placements} on {mesh}")
        if self.mesh is None:
            group = mesh.get_group()
            if self.process_group is not None and (
                    dist.get_process_group_ranks(self.process_group) != dist.get_process_group_ranks(group)):
                raise ValueError(
                    f"Invalid process_group: its ranks {dist.get_process_group_ranks(self.process_group)} are not "
                    f"those of the parameters' device mesh {mesh.mesh.tolist()}; FSDP2 parameters need no "
                    "process_group (it is taken from their mesh)")
            self.kind, self.mesh = "sharded", mesh
            self.comm = Collectives(group, torch.device(mesh.device_type, _device_index(mesh.device_type)))
        elif mesh != self.mesh:
            raise ValueError(
                f"Invalid params: {self.name} needs every DTensor parameter on one device mesh; got {self.mesh} "
                f"and {mesh} (shard the whole model with one mesh)")

    # ------------------------------------------------------------------------------------ per tensor
    def rows(self, p: torch.Tensor) -> tuple[int, ...]:
        """The dim-0 rows of parameter ``p`` on each rank (all of them on every rank unless sharded)."""
        rows = self._rows.get(p)
        if rows is not None:
            return rows
        d0 = p.shape[0] if p.dim() else 1
        if self.kind != "sharded":
            return (d0,) * self.world
        rows = chunk_rows(d0, self.world)
        if local(p).shape[0] != rows[self.rank]:
            raise ValueError(
                f"Invalid params: {self.name} expects FSDP2's even dim-0 sharding (rows {rows}); a parameter of "
                f"shape {tuple(p.shape)} has {local(p).shape[0]} rows on rank {self.rank}")
        self._rows[p] = rows
        return rows

    def offset(self, p: torch.Tensor) -> int:
        """The first dim-0 row of ``p`` this rank holds."""
        return sum(self.rows(p)[:self.rank]) if self.kind == "sharded" else 0


class StepGuard:
    """Checks, before a step communicates, that all ranks hold the same parameters in the same state.

    ``check(key, describe, communicates)``: ``describe()`` lists this rank's view of the step, one line per
    parameter group and per parameter (its shape, dtype, whether it has a gradient, its step count), and
    its digest is compared across the ranks -- on the first step, whenever ``key()`` (the structure, cheap
    to build) changes here, and on every step that communicates. A step that does not communicate and looks
    as before skips the check, so a regular step costs nothing; if ranks disagree about whether a step
    communicates, the one that checks reports it (at the latest after the process group's timeout) instead
    of waiting for ever.
    """

    def __init__(self, distribution: Distribution):
        self.distribution = distribution
        self._key: int | None = None

    def check(self, key: Callable[[], Any], describe: Callable[[], list[str]], communicates: bool) -> None:
        comm = self.distribution.comm
        if comm is None:
            return
        current = hash(key())
        if not communicates and current == self._key:
            return
        lines = describe()
        comm.check_agreement(digest(lines), lambda: lines, f"{self.distribution.name}.step")
        self._key = current


def describe_params(groups: Sequence[dict], options: Sequence[str], state: dict, extra: Callable | None = None
                    ) -> list[str]:
    """One line per parameter group (its ``options``) and per parameter (shape, dtype, gradient, step count);
    ``extra(p)`` adds to a parameter's line."""
    lines = []
    for i, group in enumerate(groups):
        lines.append(f"param group {i}: " + ", ".join(f"{k}={group[k]!r}" for k in options))
        for j, p in enumerate(group["params"]):
            step = state.get(p, {}).get("step")
            line = (f"param group {i}, parameter {j}: shape {tuple(p.shape)}, {p.dtype}, "
                    f"{'a' if p.grad is not None else 'no'} gradient, step {-1 if step is None else int(step)}")
            lines.append(line + (extra(p) if extra is not None else ""))
    return lines


def structure_key(groups: Sequence[dict], options: Sequence[str]) -> tuple:
    """What :func:`describe_params` describes, but the step counts (for :class:`StepGuard`'s change test)."""
    return tuple((tuple(group[k] for k in options),
                  tuple((tuple(p.shape), p.dtype, p.grad is not None) for p in group["params"])) for group in groups)


def _check_member(name: str, group: Any) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"Invalid process_group: {name} got one, but torch.distributed is not initialized")
    if not isinstance(group, dist.ProcessGroup) or dist.get_rank(group) < 0:
        raise ValueError(
            f"Invalid process_group: {group!r} is not a process group this rank (global rank {dist.get_rank()}) "
            "belongs to; pass e.g. torch.distributed.group.WORLD, or None for the redundant behaviour")


def _comm_device(group: dist.ProcessGroup) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _device_index(device_type: str) -> int | None:
    if device_type == "cpu":
        return None
    module = getattr(torch, device_type, None)
    return module.current_device() if module is not None and hasattr(module, "current_device") else None


def width(shape: Sequence[int]) -> int:
    """Entries per dim-0 row of a tensor of ``shape`` (1 for a 0-d or 1-D tensor)."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1
