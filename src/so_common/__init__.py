"""Framework-free pieces shared by ``so_optax`` (JAX) and ``torch_bridge`` (PyTorch).

Nothing here imports JAX or torch: it holds the shape bookkeeping of SOAP and the
hyperparameter checks, so that both sides lay tensors out and reject bad input identically,
and the version of the distribution (the one place it is written; pyproject.toml reads it).
"""

__version__ = "0.1.0"
