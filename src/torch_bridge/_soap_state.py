"""The layout of one parameter's SOAP state, and the states SOAP builds without a step.

A state holds ``step`` (an int64 0-d CPU tensor: Adam steps taken, 0 after the first call, -1 for a blank
state), ``exp_avg`` and ``exp_avg_sq`` (work shape, in the eigenbasis), ``GG`` and ``Q`` (one entry per work
dimension: a ``(d, d)`` factor / basis, or an empty tensor for an identity dimension). Here: the blank state
``torch.distributed.checkpoint`` asks for before it loads, the conversion of a state saved by the reference
(seed) implementation, and the restoring of saved tensors with their own dtypes.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from so_common.soap_layout import SoapLayout, soap_layout

from ._linalg import compute_dtype

__all__ = ["STEP", "EXP_AVG", "EXP_AVG_SQ", "GG", "Q", "blank_state", "column_major", "from_seed_state", "from_work",
           "layout_of", "restore", "restored_state", "to_work"]

STEP, EXP_AVG, EXP_AVG_SQ, GG, Q = "step", "exp_avg", "exp_avg_sq", "GG", "Q"


@functools.lru_cache(maxsize=1024)
def _layout(shape: tuple[int, ...], max_precond_dim: int, merge_dims: bool, precondition_1d: bool,
            data_format: str) -> SoapLayout:
    return soap_layout(shape, max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                       precondition_1d=precondition_1d, data_format=data_format)


def layout_of(p: torch.Tensor, group: dict[str, Any]) -> SoapLayout:
    """The work layout of parameter ``p`` under its param group's options (cached by shape and options)."""
    return _layout(tuple(p.shape), group["max_precond_dim"], group["merge_dims"],
                   group["precondition_1d"], group["data_format"])


def from_work(x: torch.Tensor, layout: SoapLayout) -> torch.Tensor:
    """Inverse of :func:`to_work` (a view where possible)."""
    if layout.permutation is None:
        return x.reshape(layout.shape)
    return x.reshape(layout.permuted_shape).permute(layout.inverse_permutation)


def to_work(x: torch.Tensor, layout: SoapLayout) -> torch.Tensor:
    """``x`` (parameter shape) in the work layout: permuted (channels_last kernels) and reshaped."""
    if layout.permutation is not None:
        x = x.permute(layout.permutation)
    return x.reshape(layout.work_shape)


def blank_state(layout: SoapLayout, dtype: torch.dtype, device: torch.device, whole: bool) -> dict[str, Any]:
    """Every tensor of a first step's state, zero, with ``step = -1`` so that the next real step is still a
    first step (``whole=False``: only the step, for a parameter another rank owns)."""
    state: dict[str, Any] = {STEP: torch.tensor(-1, dtype=torch.int64)}
    if whole:
        state[EXP_AVG] = torch.zeros(layout.work_shape, dtype=dtype, device=device)
        state[EXP_AVG_SQ] = torch.zeros(layout.work_shape, dtype=dtype, device=device)
        state[GG] = [torch.zeros((d, d) if on else (0,), dtype=dtype, device=device)
                     for d, on in zip(layout.work_shape, layout.preconditioned)]
        state[Q] = [m.clone() for m in state[GG]]
    return state


def from_seed_state(state: dict[str, Any], layout: SoapLayout, dtype: torch.dtype) -> dict[str, Any]:
    """A parameter state saved by the seed's SOAP, in this class's layout and compute ``dtype``.

    The seed keeps an ``int`` step, the moments in the parameter's shape and dtype, ``[]`` (not a tensor)
    for a dimension with the identity basis, and its own copies of ``precondition_frequency`` and
    ``shampoo_beta``, which the param group holds here. Its moments are already in the eigenbasis, as here.
    """
    empty = state[EXP_AVG].new_empty(0, dtype=dtype)

    def matrices(values: list) -> list[torch.Tensor]:
        return [v.to(dtype) if torch.is_tensor(v) and v.numel() else empty for v in values]

    return {
        STEP: torch.tensor(int(state[STEP]), dtype=torch.int64),
        EXP_AVG: to_work(state[EXP_AVG], layout).to(dtype).contiguous(),
        EXP_AVG_SQ: to_work(state[EXP_AVG_SQ], layout).to(dtype).contiguous(),
        GG: matrices(state[GG]),
        Q: matrices(state[Q]),
    }


def restored_state(saved: dict[str, Any], layout: SoapLayout, p: torch.Tensor) -> dict[str, Any]:
    """A copy of a saved parameter state on ``p``'s device with its own dtypes, in this class's layout (a
    state saved by the reference implementation converted), its bases column-major (:func:`column_major`)."""
    state = {key: restore(value, torch.device("cpu") if key == STEP else p.device) for key, value in saved.items()}
    if "precondition_frequency" in state or "shampoo_beta" in state:  # only the reference keeps these per state
        state = from_seed_state(state, layout, compute_dtype(p.dtype))
    if STEP in state and not torch.is_tensor(state[STEP]):  # a checkpoint with a plain-number step
        state[STEP] = torch.tensor(int(state[STEP]), dtype=torch.int64)
    if Q in state:
        state[Q] = [column_major(q) for q in state[Q]]
    return state


def column_major(m: torch.Tensor) -> torch.Tensor:
    """A basis laid out as LAPACK returns it (column-major), as ``eigh`` and the QR refresh produce them.

    The layout decides how BLAS runs the projections and so their rounding: a basis restored row-major (as
    checkpoints store it) would make a resumed run differ from the uninterrupted one in the last bits.
    """
    return m.t().contiguous().t() if m.dim() == 2 else m


def restore(value: Any, device: torch.device) -> Any:
    """A copy of saved state on ``device``, keeping its dtype."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, copy=True)
    if isinstance(value, list):
        return [restore(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(restore(v, device) for v in value)
    return value
