"""The collectives the distributed optimizers use, on one process group, with their bytes counted.

Every call here is collective: all ranks of the group make the same calls in the same order with
matching sizes (which :meth:`Collectives.check_agreement` verifies before any plan is used). Byte counts
are per rank and follow the usual ring-algorithm model (what NCCL's tests call bus bytes): an
``all_to_all`` moves exactly what it sends to and receives from the other ranks; an ``all_reduce`` of
``n`` bytes sends and receives ``2 (W-1)/W · n``; a ``reduce_scatter`` of ``n`` bytes ``(W-1)/W · n``; a
``broadcast`` ``n`` (received by every rank but the source, sent by the source).
"""

from __future__ import annotations

import datetime
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["CommStats", "Collectives", "digest"]

_DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class CommStats:
    """Bytes this rank sent and received, and the number of collectives it took part in."""

    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "collectives": self.collectives}


def digest(items: object) -> int:
    """A 63-bit fingerprint of ``repr(items)`` that every process computes alike (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(items).encode(), digest_size=8).digest(), "little") >> 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Collectives:
    """Collectives on ``group`` with tensors on ``device`` (the CPU for gloo, the accelerator for NCCL)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.stats = CommStats()
        try:
            self.timeout = group._get_backend(device).options._timeout
        except (AttributeError, RuntimeError):
            self.timeout = _DEFAULT_TIMEOUT

    # ------------------------------------------------------------------------------------------ checks
    def check_agreement(self, value: int, describe: Callable[[], object], what: str) -> None:
        """Raises ``ValueError`` on every rank unless all ranks hold the same ``value`` (a digest).

        ``describe()`` gives the readable form of what was digested; it is exchanged only when the values
        differ, to name the first difference. A rank that does not arrive within the process group's
        timeout is reported as such instead of blocking for ever.
        """
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        values = torch.empty(self.world, dtype=torch.int64, device=self.device)
        self._wait(dist.all_gather_into_tensor(values, mine, group=self.group, async_op=True), what)
        self._count(sent=8 * (self.world - 1), received=8 * (self.world - 1))
        if bool((values == values[0]).all()):
            return
        descriptions: list[object] = [None] * self.world
        dist.all_gather_object(descriptions, describe(), group=self.group)
        raise ValueError(
            f"{what}: the ranks of the process group disagree: {_first_difference(descriptions)}. Every rank must "
            "build the optimizer over the same parameters (in the same order) and call step() at the same steps")

    def _wait(self, work: dist.Work, what: str) -> None:
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as err:
            raise RuntimeError(
                f"{what}: not every rank of the process group (size {self.world}) reached this step within "
                f"{self.timeout}; every rank must call step() (and state_dict()/load_state_dict()) together"
            ) from err

    # ------------------------------------------------------------------------------------------ data
    def exchange(self, send: Sequence[torch.Tensor], recv_numels: Sequence[int]) -> list[torch.Tensor]:
        """All-to-all: ``send[d]`` (1-D, one dtype) goes to rank ``d``; returns what each rank ``s`` sent here."""
        dtype = send[0].dtype
        send_numels = [t.numel() for t in send]
        inp = torch.cat([t.to(self.device) for t in send]) if sum(send_numels) else torch.empty(0, dtype=dtype,
                                                                                                  device=self.device)
        out = torch.empty(sum(recv_numels), dtype=dtype, device=self.device)
        dist.all_to_all_single(out, inp, list(recv_numels), send_numels, group=self.group)
        size = out.element_size()
        self._count(sent=size * (sum(send_numels) - send_numels[self.rank]),
                    received=size * (sum(recv_numels) - recv_numels[self.rank]))
        return list(out.split(list(recv_numels)))

    def gather_rows(self, pieces: Sequence[torch.Tensor], owners: Sequence[int],
                    rows: Sequence[Sequence[int]]) -> list[torch.Tensor | None]:
        """Whole tensors on their owners, from the dim-0 rows every rank holds of them.

        Item ``i``: rank ``s`` holds ``rows[i][s]`` rows (``pieces[i]`` here, shape ``(rows[i][rank], *rest)``);
        rank ``owners[i]`` gets them concatenated in rank order, shape ``(Σ rows[i], *rest)``; the other ranks
        get ``None``. One all-to-all per dtype.
        """
        out: list[torch.Tensor | None] = [None] * len(pieces)
        for items in _by_dtype([p.dtype for p in pieces]):
            send: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
            for i in items:
                send[owners[i]].append(pieces[i].reshape(-1))
            mine = [i for i in items if owners[i] == self.rank]
            widths = {i: _row_width(pieces[i].shape) for i in mine}
            recv = self.exchange(_flat(send, pieces[items[0]]),
                                 [sum(rows[i][s] * widths[i] for i in mine) for s in range(self.world)])
            parts: dict[int, list[torch.Tensor]] = {i: [] for i in mine}
            for s in range(self.world):
                offset = 0
                for i in mine:
                    n = rows[i][s] * widths[i]
                    parts[i].append(recv[s][offset:offset + n])
                    offset += n
            for i in mine:
                out[i] = torch.cat(parts[i]).view(sum(rows[i]), *pieces[i].shape[1:])
        return out

    def scatter_rows(self, wholes: Sequence[torch.Tensor | None], owners: Sequence[int],
                     rows: Sequence[Sequence[int]], like: Sequence[tuple[tuple[int, ...], torch.dtype]]
                     ) -> list[torch.Tensor]:
        """The inverse of :meth:`gather_rows`: item ``i``'s whole tensor (``wholes[i]``, on rank ``owners[i]``)
        cut into dim-0 rows; this rank gets its ``rows[i][rank]`` rows, shape ``(rows[i][rank], *rest)``, where
        ``like[i] = (rest, dtype)`` (known to every rank). One all-to-all per dtype."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(like)
        for items in _by_dtype([dtype for _, dtype in like]):
            widths = {i: math.prod(like[i][0]) for i in items}
            send: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
            for i in items:
                if owners[i] != self.rank:
                    continue
                flat, start = wholes[i].reshape(sum(rows[i]), widths[i]), 0
                for s in range(self.world):
                    send[s].append(flat[start:start + rows[i][s]].reshape(-1))
                    start += rows[i][s]
            dtype = like[items[0]][1]
            recv = self.exchange(_flat(send, torch.empty(0, dtype=dtype)),
                                 [sum(rows[i][self.rank] * widths[i] for i in items if owners[i] == o)
                                  for o in range(self.world)])
            offsets = [0] * self.world
            for i in items:
                o, n = owners[i], rows[i][self.rank] * widths[i]
                out[i] = recv[o][offsets[o]:offsets[o] + n].view(rows[i][self.rank], *like[i][0])
                offsets[o] += n
        return out

    def all_gather_uneven(self, local: torch.Tensor, numels: Sequence[int]) -> list[torch.Tensor]:
        """Every rank's 1-D ``local`` (of ``numels[r]`` entries on rank ``r``) on every rank, in rank order."""
        return self.exchange([local] * self.world, [numels[self.rank] if r == self.rank else n
                                                    for r, n in enumerate(numels)])

    def all_reduce_(self, tensors: Sequence[torch.Tensor], scale: float) -> None:
        """Replaces every tensor in place by its sum over the ranks times ``scale`` (one all-reduce per dtype)."""
        for items in _by_dtype([t.dtype for t in tensors]):
            flat = torch.cat([tensors[i].reshape(-1) for i in items]).to(self.device)
            dist.all_reduce(flat, group=self.group)
            if scale != 1.0:
                flat.mul_(scale)
            n = _nbytes(flat) * 2 * (self.world - 1) // self.world
            self._count(sent=n, received=n)
            offset = 0
            for i in items:
                t = tensors[i]
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def reduce_scatter_rows(self, tensors: Sequence[torch.Tensor], rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The mean over the ranks of each whole tensor, cut to this rank's rows.

        ``rows[i][s]`` is the number of dim-0 rows of ``tensors[i]`` on rank ``s`` (in rank order, as
        ``torch.chunk`` cuts them); the ranks' pieces are padded to the largest so that one
        ``reduce_scatter`` per dtype handles every tensor.
        """
        out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        for items in _by_dtype([t.dtype for t in tensors]):
            width = {i: _row_width(tensors[i].shape) for i in items}
            pad = {i: max(rows[i]) for i in items}
            segment = sum(pad[i] * width[i] for i in items)
            inp = torch.zeros(self.world, segment, dtype=tensors[items[0]].dtype, device=self.device)
            for s in range(self.world):
                offset = 0
                for i in items:
                    start, n = sum(rows[i][:s]), rows[i][s]
                    inp[s, offset:offset + n * width[i]] = tensors[i].reshape(-1, width[i])[start:start + n].reshape(-1)
                    offset += pad[i] * width[i]
            reduced = torch.empty(segment, dtype=inp.dtype, device=self.device)
            dist.reduce_scatter_tensor(reduced, inp.reshape(-1), group=self.group)
            reduced.div_(self.world)
            n = _nbytes(inp) * (self.world - 1) // self.world
            self._count(sent=n, received=n)
            offset = 0
            for i in items:
                mine = rows[i][self.rank]
                out[i] = reduced[offset:offset + mine * width[i]].view(mine, *tensors[i].shape[1:])
                offset += pad[i] * width[i]
        return out

    def broadcast_bytes(self, payload: torch.Tensor | None, numel: int) -> torch.Tensor:
        """Group rank 0's ``uint8`` ``payload`` (``numel`` entries) on every rank (``payload`` unused elsewhere)."""
        buf = (payload.to(self.device) if self.rank == 0 else torch.empty(numel, dtype=torch.uint8,
                                                                           device=self.device))
        dist.broadcast(buf, dist.get_global_rank(self.group, 0), group=self.group)
        self._count(sent=numel * (self.world - 1) if self.rank == 0 else 0, received=0 if self.rank == 0 else numel)
        return buf.cpu()

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's list of ``len(values)`` integers, in rank order."""
        mine = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        out = torch.empty(self.world * len(values), dtype=torch.int64, device=self.device)
        dist.all_gather_into_tensor(out, mine, group=self.group)
        n = 8 * len(values) * (self.world - 1)
        self._count(sent=n, received=n)
        return out.view(self.world, len(values)).tolist()

    def _count(self, *, sent: int, received: int) -> None:
        self.stats.bytes_sent += int(sent)
        self.stats.bytes_received += int(received)
        self.stats.collectives += 1


def _by_dtype(dtypes: Sequence[torch.dtype]) -> list[list[int]]:
    """Item indices grouped by dtype, groups in order of first appearance (the same on every rank)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, dtype in enumerate(dtypes):
        groups.setdefault(dtype, []).append(i)
    return list(groups.values())


def _row_width(shape: Sequence[int]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _flat(send: list[list[torch.Tensor]], like: torch.Tensor) -> list[torch.Tensor]:
    return [torch.cat(parts) if parts else like.new_empty(0) for parts in send]


def _first_difference(descriptions: list[object]) -> str:
    """Names the first line where some rank's description (a list of lines) differs from rank 0's."""
    first = list(descriptions[0])
    for rank, other in enumerate(descriptions[1:], start=1):
        other = list(other)
        for a, b in zip(first, other):
            if a != b:
                return f"rank 0 has {a!r}, rank {rank} has {b!r}"
        if len(first) != len(other):
            longer, owner = (first, 0) if len(first) > len(other) else (other, rank)
            return f"only rank {owner} has {longer[min(len(first), len(other))]!r}"
    return "the descriptions agree, but their digests do not"
