"""Checks on parameter groups that the torch_bridge optimizers share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from so_common import validation


def check_lr(lr: Any) -> None:
    """Checks a learning rate as ``torch.optim``'s optimizers do: a number, or a 1-element tensor (any number of
    dimensions, on any device; e.g. one that an LR scheduler updates in place), finite and ``>= 0``."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element (got shape {tuple(lr.shape)})")
        if lr.is_complex():
            raise ValueError(f"Invalid learning rate: lr={lr!r} (must be real)")
        validation.check_learning_rate("lr", lr.item())
    elif not validation.is_number(lr):
        raise ValueError(f"Invalid learning rate: lr={lr!r} (must be a number or a 1-element tensor)")
    else:
        validation.check_learning_rate("lr", lr)


def scalar(value: Any) -> Any:
    """A hyperparameter as a Python number: a (1-element) tensor is read with ``.item()``.

    Read at every step, so that a Tensor ``lr`` changed in place (``LRScheduler`` does ``lr.fill_``) takes
    effect; on an accelerator that read is a synchronization, so keep such a tensor on the CPU.
    """
    return value.item() if isinstance(value, torch.Tensor) else value


def add_checked_param_group(
    optimizer: Optimizer,
    param_group: dict[str, Any],
    add: Callable[[dict[str, Any]], None],
    check_hyperparameters: Callable[[dict[str, Any]], None],
    name: str,
) -> None:
    """Adds ``param_group`` with ``add`` (``torch.optim.Optimizer.add_param_group``, which fills in the
    defaults), then checks its hyperparameters and that its parameters are real. A ``ValueError`` names the
    argument, and the rejected group is removed again (``add`` only appended it)."""
    add(param_group)
    group, index = optimizer.param_groups[-1], len(optimizer.param_groups) - 1
    try:
        check_hyperparameters(group)
        validation.check_real_params(
            name,
            ((f"parameter {i} of param group {index}", p) for i, p in enumerate(group["params"])),
            torch.is_complex,
            "store it as a real parameter of shape (..., 2) and use torch.view_as_complex in the model",
        )
    except ValueError:
        optimizer.param_groups.pop()
        raise
