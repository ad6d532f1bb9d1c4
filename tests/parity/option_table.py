"""The one table mapping torch_bridge constructor options to so_optax factory options.

Parity tests build both optimizers from one dict of torch-style options through these tables, so that a
renamed or reinterpreted option shows up in exactly one place.
"""

# torch_bridge.SOAP keyword -> so_optax.soap keyword. ``lr`` maps to ``post_step_decay_lr``, which so_optax.soap
# uses only to reproduce the seed's post-step weight decay exactly; the step itself is optax.scale(-lr).
SOAP_OPTIONS = {
    "lr": "post_step_decay_lr",
    "betas": "betas",
    "shampoo_beta": "shampoo_beta",
    "eps": "eps",
    "weight_decay": "weight_decay",
    "precondition_frequency": "precondition_frequency",
    "max_precond_dim": "max_precond_dim",
    "merge_dims": "merge_dims",
    "precondition_1d": "precondition_1d",
    "normalize_grads": "normalize_grads",
    "data_format": "data_format",
    "correct_bias": "correct_bias",
}

# torch_bridge.Sophia keyword -> so_optax.sophia keyword. The seed form's torch weight decay is a
# per-step factor p <- p * (1 - wd), while so_optax adds wd * p to the direction that optax.scale(-lr)
# multiplies by lr: so the JAX value is wd / lr (seed form) and wd itself (paper form, p <- p(1 - lr wd)).
# ``hessian_computation_type`` becomes the ``estimator`` name; ``lr`` becomes optax.scale(-lr).
SOPHIA_OPTIONS = {
    "betas": "betas",
    "rho": "rho",
    "weight_decay": "weight_decay",
    "k": "k",
    "hessian_computation_type": "estimator",
    "eps": "eps",
    "form": "form",
    "gamma": "gamma",
    "bias_correction": "bias_correction",
}


def sophia_jax_options(torch_options: dict) -> tuple[dict, float]:
    """Returns (so_optax.sophia kwargs, lr) equivalent to torch_bridge.Sophia(**torch_options)."""
    options = dict(torch_options)
    lr = options.pop("lr", 1e-3)
    jax_options = {SOPHIA_OPTIONS[name]: value for name, value in options.items()}
    if options.get("form", "seed") == "seed" and "weight_decay" in jax_options:
        jax_options["weight_decay"] = options["weight_decay"] / lr
    return jax_options, lr


def soap_jax_options(torch_options: dict) -> tuple[dict, float]:
    """Returns (so_optax.soap kwargs, lr) equivalent to torch_bridge.SOAP(**torch_options)."""
    lr = torch_options.get("lr", 3e-3)
    jax_options = {SOAP_OPTIONS[name]: value for name, value in torch_options.items()}
    jax_options["post_step_decay_lr"] = lr
    return jax_options, lr
