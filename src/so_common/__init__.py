"""Framework-free pieces shared by ``so_optax`` (JAX) and ``torch_bridge`` (PyTorch).

Nothing here imports JAX or torch: it holds the shape bookkeeping of SOAP and the
hyperparameter checks, so that both sides lay tensors out and reject bad input identically.
"""
