"""Checks on parameter groups that the torch_bridge optimizers share."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from so_common import validation


def check_real_group(optimizer: Optimizer, name: str) -> None:
    """Raises ``ValueError`` naming the first complex parameter of ``optimizer``'s newest parameter group."""
    index = len(optimizer.param_groups) - 1
    validation.check_real_params(
        name,
        ((f"parameter {i} of param group {index}", p) for i, p in enumerate(optimizer.param_groups[-1]["params"])),
        torch.is_complex,
        "store it as a real parameter of shape (..., 2) and use torch.view_as_complex in the model",
    )
