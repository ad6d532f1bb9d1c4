"""PyTorch optimizers of so-optax (``torch.optim.Optimizer`` subclasses); imports no JAX.

* :class:`SOAP` -- Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024, arXiv:2409.11321).
* :class:`Sophia` -- clipped diagonal-Hessian-preconditioned momentum, Sophia-G / Sophia-H
  (Liu et al., 2023, arXiv:2305.14342).
"""

from so_common import __version__

from .soap import SOAP
from .sophia import Sophia

__all__ = ["__version__", "SOAP", "Sophia"]
