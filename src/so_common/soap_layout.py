"""How SOAP lays out one parameter tensor (Vyas et al., 2024, arXiv:2409.11321).

SOAP keeps one Kronecker factor per dimension of a (possibly reshaped) gradient. This module decides,
from the shape alone, the *work shape* the algorithm sees and which of its dimensions get an
eigenbasis; the others use the identity. The rules are those of the reference implementation:

* a 1-D tensor is preconditioned only with ``precondition_1d`` and only if its length is at most
  ``max_precond_dim``;
* with ``merge_dims``, consecutive dimensions are merged greedily while their product stays at most
  ``max_precond_dim`` (a 4-D ``channels_last`` kernel is first permuted to channels-first order);
  a 0-d tensor becomes a length-1 vector;
* any dimension larger than ``max_precond_dim`` gets the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DATA_FORMATS = ("channels_first", "channels_last")
_TO_CHANNELS_FIRST = (0, 3, 1, 2)
_TO_CHANNELS_LAST = (0, 2, 3, 1)


def merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """Greedily merges consecutive dimensions while their product stays <= ``max_precond_dim``."""
    merged: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_precond_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


@dataclass(frozen=True)
class SoapLayout:
    """The work layout of one parameter.

    Attributes:
      shape: the parameter's own shape.
      permutation: axes permutation applied before reshaping to ``work_shape`` (``None`` if none).
      work_shape: the shape SOAP's moments and projections live in.
      preconditioned: one flag per work dimension; ``False`` means the identity basis.
    """

    shape: tuple[int, ...]
    permutation: tuple[int, ...] | None
    work_shape: tuple[int, ...]
    preconditioned: tuple[bool, ...]

    @property
    def inverse_permutation(self) -> tuple[int, ...] | None:
        return None if self.permutation is None else _TO_CHANNELS_LAST

    @property
    def permuted_shape(self) -> tuple[int, ...]:
        """Shape after the permutation, before merging."""
        if self.permutation is None:
            return self.shape
        return tuple(self.shape[axis] for axis in self.permutation)

    @property
    def factor_dims(self) -> tuple[int, ...]:
        """Sizes of the Kronecker factors that exist (preconditioned work dimensions only)."""
        return tuple(d for d, on in zip(self.work_shape, self.preconditioned) if on)

    @property
    def is_identity(self) -> bool:
        return not any(self.preconditioned)


def soap_layout(
    shape: tuple[int, ...],
    *,
    max_precond_dim: int,
    merge_dims: bool,
    precondition_1d: bool,
    data_format: str,
) -> SoapLayout:
    """Returns the :class:`SoapLayout` of a parameter of the given shape."""
    shape = tuple(int(s) for s in shape)
    if data_format not in DATA_FORMATS:
        raise ValueError(f"Invalid data_format: {data_format!r}; expected one of {DATA_FORMATS}")
    if len(shape) == 1:
        return SoapLayout(shape, None, shape, (bool(precondition_1d) and shape[0] <= max_precond_dim,))
    permutation = None
    work_shape = shape
    if merge_dims:
        if data_format == "channels_last" and len(shape) == 4:
            permutation = _TO_CHANNELS_FIRST
        permuted = shape if permutation is None else tuple(shape[a] for a in permutation)
        work_shape = merged_shape(permuted, max_precond_dim)
    assert math.prod(work_shape) == math.prod(shape)
    return SoapLayout(shape, permutation, work_shape, tuple(d <= max_precond_dim for d in work_shape))


def check_soap_options(
    *,
    betas,
    shampoo_beta,
    eps,
    weight_decay,
    precondition_frequency,
    max_precond_dim,
    merge_dims,
    precondition_1d,
    normalize_grads,
    data_format,
    correct_bias,
    traced=lambda value: False,
) -> None:
    """Checks SOAP's options (the seed's names), raising a ``ValueError`` that names the bad one.

    ``traced(value)`` tells which values are framework arrays (a JAX tracer under
    ``optax.inject_hyperparams``): those numeric options are left unchecked, except
    ``max_precond_dim``, which decides shapes and so must be a Python int.
    """
    from so_common import validation

    validation.check_betas("betas", betas)
    if not traced(shampoo_beta):
        if not validation.is_number(shampoo_beta):
            raise ValueError(f"Invalid shampoo_beta: {shampoo_beta!r} (must be a number; < 0 means betas[1])")
        if shampoo_beta >= 0:
            validation.check_beta("shampoo_beta", shampoo_beta)
    validation.check_nonnegative("eps", eps)
    validation.check_nonnegative("weight_decay", weight_decay)
    if not traced(precondition_frequency):
        validation.check_positive_int("precondition_frequency", precondition_frequency)
    if traced(max_precond_dim):
        raise ValueError(
            "Invalid max_precond_dim: it must be a static Python int (under optax.inject_hyperparams "
            "pass static_args=so_optax.SOAP_STATIC_ARGS)"
        )
    validation.check_positive_int("max_precond_dim", max_precond_dim)
    for name, value in (
        ("merge_dims", merge_dims),
        ("precondition_1d", precondition_1d),
        ("normalize_grads", normalize_grads),
        ("correct_bias", correct_bias),
    ):
        validation.check_bool(name, value)
    validation.check_choice("data_format", data_format, DATA_FORMATS)
