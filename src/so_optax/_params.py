"""Checks on the parameter pytree that the so_optax optimizers share."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from so_common import validation


def check_real(params: Any, optimizer: str, example: str) -> None:
    """Raises ``ValueError`` naming the first complex leaf of ``params`` (by its path in the pytree)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    validation.check_real_params(
        optimizer,
        ((f"leaf {jax.tree_util.keystr(path) or '(root)'}", leaf) for path, leaf in leaves),
        jnp.iscomplexobj,
        f"optimize the real and imaginary parts as separate real parameters, {example}",
    )
