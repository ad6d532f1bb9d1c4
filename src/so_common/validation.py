"""Hyperparameter checks shared by the JAX and torch optimizers.

Each check names the argument in its ``ValueError``. Values that are not plain Python numbers (a
traced JAX value under ``optax.inject_hyperparams``, a schedule, a tensor) are left to the caller.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_nonnegative(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value >= 0`` (and finite)."""
    if is_number(value) and not (0.0 <= value < float("inf")):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")


def check_learning_rate(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value >= 0`` (and finite), in the words of torch's optimizers."""
    if is_number(value) and not (0.0 <= value < float("inf")):
        raise ValueError(f"Invalid learning rate: {name}={value!r} (must be a finite number >= 0)")


def check_positive(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value > 0`` (and finite)."""
    if is_number(value) and not (0.0 < value < float("inf")):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number > 0)")


def check_beta(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``0 <= value < 1``."""
    if is_number(value) and not (0.0 <= value < 1.0):
        raise ValueError(f"Invalid {name}: {value!r} (must satisfy 0 <= {name} < 1)")


def check_betas(name: str, betas: Any) -> None:
    """Checks a pair of betas, naming ``name[0]`` / ``name[1]`` in the error."""
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r} (must be a pair (beta1, beta2))")
    check_beta(f"{name}[0]", betas[0])
    check_beta(f"{name}[1]", betas[1])


def check_positive_int(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is an ``int`` >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {tuple(choices)})")


def check_bool(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is a ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")


def check_real_params(optimizer: str, named_params: Iterable[tuple[str, Any]], is_complex: Callable[[Any], bool],
                      remedy: str) -> None:
    """Raises ``ValueError`` naming the first complex parameter of ``named_params`` (``(where, param)`` pairs).

    SOAP's eigenbases and Sophia's clipped ratio are defined for real parameters only: neither the papers
    nor the seeds define a complex form, and the real formulas applied to complex numbers run without error
    but compute something else.
    """
    for where, param in named_params:
        if is_complex(param):
            raise ValueError(
                f"Invalid params: {optimizer} does not support complex parameters ({where} has dtype "
                f"{getattr(param, 'dtype', type(param).__name__)}); {remedy}"
            )
