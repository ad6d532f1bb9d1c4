"""Checks on parameter groups that the torch_bridge optimizers share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from so_common import validation


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
