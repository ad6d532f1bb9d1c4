"""Command-line options for the training settings, shared by ``compare`` and ``study``.

Every option defaults to ``None``: "the optimizer's own setting", i.e. its entry in
``common.RECIPES`` if it has one, else the ``common.TrainConfig`` default (the official / paper
values). A value given on the command line applies to every optimizer the setting concerns.
"""

from __future__ import annotations

import argparse
import dataclasses

from . import common

# option name -> TrainConfig field
FIELDS = {
    "weight_decay": "weight_decay",
    "warmup_frac": "warmup_frac",
    "clip_grad_norm": "clip_grad_norm",
    "sophia_gamma": "sophia_gamma",
    "sophia_betas": "sophia_betas",
    "sophia_hessian_bias_correction": "sophia_hessian_bias_correction",
    "sophia_early_refresh_steps": "sophia_early_refresh_steps",
    "sophia_eps": "sophia_eps",
}


def _pair(s: str) -> tuple[float, float]:
    values = tuple(float(x) for x in s.split(","))
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {s!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = common.TrainConfig
    g = p.add_argument_group("training settings (default: each optimizer's own, see common.RECIPES)")
    g.add_argument("--weight-decay", type=float, help=f"decoupled weight decay (default {d.weight_decay})")
    g.add_argument("--warmup-frac", type=float, help=f"linear warm-up fraction of the steps (default {d.warmup_frac})")
    g.add_argument("--clip-grad-norm", type=float,
                   help="clip the gradient's global norm to this before every optimizer (default 0: off)")
    g.add_argument("--sophia-gamma", type=float,
                   help="Sophia's gamma (paper form): step = lr·clip(m / max(gamma·h, eps), 1) "
                        f"(default {d.sophia_gamma})")
    g.add_argument("--sophia-betas", type=_pair,
                   help=f"Sophia's beta1,beta2: EMAs of the gradient and of the Hessian estimate "
                        f"(default {','.join(map(str, d.sophia_betas))})")
    g.add_argument("--sophia-hessian-bias-correction", action=argparse.BooleanOptionalAction,
                   help="Sophia: divide h by 1 - beta2^n, n the refreshes so far (default off)")
    g.add_argument("--sophia-early-refresh-steps", type=int,
                   help="Sophia: also refresh h at every step t <= this (default 0)")
    g.add_argument("--sophia-eps", type=float, help=f"Sophia: lower bound of gamma·h (default {d.sophia_eps})")


def explicit(args: argparse.Namespace) -> dict:
    """The TrainConfig fields set on the command line."""
    return {field: getattr(args, name) for name, field in FIELDS.items() if getattr(args, name, None) is not None}


def train_configs(args: argparse.Namespace, base: common.TrainConfig, optimizers) -> dict[str, common.TrainConfig]:
    """Per optimizer: ``base``, then its recipe, then the command line."""
    return {opt: common.recipe_config(opt, base, explicit(args)) for opt in optimizers}


def differences(configs: dict[str, common.TrainConfig], base: common.TrainConfig) -> str:
    """``'sophia-g: sophia_gamma 0.5, ...; ...'``: what each optimizer's configuration changes from ``base``."""
    parts = []
    for opt, cfg in configs.items():
        changed = [f"{f.name} {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                   if getattr(cfg, f.name) != getattr(base, f.name)
                   and (opt.startswith("sophia") or not f.name.startswith("sophia_")
                        or (opt == "signum" and f.name == "sophia_betas"))]
        if changed:
            parts.append(f"{opt}: " + ", ".join(changed))
    return "; ".join(parts)
