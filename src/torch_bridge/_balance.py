"""Who computes what when an optimizer's work is spread over the ranks of a process group.

Pure bookkeeping, no communication and no tensors: every rank runs the same function on the same inputs
(the parameter list is checked to agree across ranks before any plan is used) and so reaches the same
plan without exchanging it.

* :func:`assign` -- greedy longest-processing-time-first balancing: items in descending cost order go
  to the rank with the least work so far (ties to the lower rank). Optionally no rank takes more than
  ``cap`` items, so that ``⌈F / world⌉`` bounds what each rank runs of ``F`` equal-priority tasks.
* :func:`soap_cost` -- the cost SOAP's owner of a parameter pays: ``Σ d³`` over its Kronecker factors
  (the eigh/QR of every refresh, and the factor products' ``d²·n`` that grow with it) plus the size of
  the parameter (the elementwise Adam work and the memory of its moments).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from so_common.soap_layout import SoapLayout

__all__ = ["assign", "soap_cost", "decomposition_cost"]


def assign(costs: Sequence[float], world: int, *, cap: int | None = None,
           loads: Sequence[float] | None = None) -> list[int]:
    """The rank (``0 ≤ r < world``) of each item, balancing the summed ``costs`` greedily.

    Args:
      costs: one non-negative cost per item.
      world: the number of ranks.
      cap: at most this many items per rank (``None``: no limit); must satisfy ``cap * world >= len(costs)``.
      loads: work each rank already has (default: none), e.g. from items assigned earlier.

    Returns:
      ``ranks[i]``, the rank of item ``i``. The largest item goes first, to the least-loaded rank; so with
      ``cap = ⌈F / world⌉`` every rank runs at most that many of the ``F`` items and the summed costs
      differ by at most one item's cost where the cap does not bind.
    """
    if world < 1:
        raise ValueError(f"Invalid world: {world!r} (must be >= 1)")
    if cap is not None and cap * world < len(costs):
        raise ValueError(f"Invalid cap: {cap} items on each of {world} ranks cannot hold {len(costs)} items")
    load = [0.0] * world if loads is None else [float(x) for x in loads]
    count = [0] * world
    ranks = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        open_ranks = [r for r in range(world) if cap is None or count[r] < cap]
        rank = min(open_ranks, key=lambda r: (load[r], r))
        ranks[i] = rank
        load[rank] += costs[i]
        count[rank] += 1
    return ranks


def decomposition_cost(d: int) -> float:
    """The cost of one eigh or power-iteration + QR of a ``d × d`` factor: ``d³`` (up to a constant)."""
    return float(d) ** 3


def soap_cost(layout: SoapLayout) -> float:
    """What owning one parameter costs SOAP: ``Σ d³`` over its factors plus its number of entries."""
    return sum(decomposition_cost(d) for d in layout.factor_dims) + float(math.prod(layout.work_shape))
