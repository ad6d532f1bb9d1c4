"""What the JAX and the PyTorch sides share: the configuration, the learning-rate schedule, the
optimizer hyperparameters and one NumPy initialisation of the weights.

Both models are loaded from :func:`init_params`, so they start from the same numbers; with the same
batches (``data.BatchSampler``) the two frameworks run the same experiment up to float32 rounding
(AdamW curves of the two agree to a few 1e-3 in loss).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A pre-LayerNorm GPT: learned positional embedding, causal multi-head attention,
    GELU MLP of width 4·d, final LayerNorm, linear head (optionally tied to the embedding)."""

    vocab_size: int
    context: int = 64
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    tie_embeddings: bool = False
    ln_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 32
    warmup_frac: float = 0.1      # linear warm-up over this fraction of the steps,
    final_lr_frac: float = 0.1    # then cosine down to this fraction of the peak
    weight_decay: float = 0.1     # decoupled, lr-scaled (p <- p·(1 - lr·wd)), every optimizer, all params
    clip_grad_norm: float = 0.0   # clip the gradient's global norm to this before the optimizer (0: off)
    eval_every: int = 25
    eval_batches: int = 8
    data_seed: int = 0            # the training-batch stream
    init_seed: int = 0            # the weights
    opt_seed: int = 0             # Sophia's sampling (GNB labels / Hutchinson probes)
    sophia_gamma: float = 0.05    # Sophia (paper form): the step is lr·clip(m / max(gamma·h, eps), 1)
    sophia_betas: tuple[float, float] = (0.965, 0.99)  # EMA of the gradient, EMA of the Hessian estimate
    sophia_hessian_bias_correction: bool = False  # the ratio uses h / (1 - beta2^n), n refreshes so far
    sophia_early_refresh_steps: int = 0           # also refresh h at every step t <= this
    sophia_eps: float = 1e-12     # lower bound of gamma·h (paper form)

    @property
    def warmup_steps(self) -> int:
        return max(1, int(round(self.warmup_frac * self.steps)))


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Schedule as a fraction of the peak for update number ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup`` (the first update is not wasted at lr 0), then a cosine
    from 1 down to ``final_lr_frac`` at the last step. The JAX side evaluates the same formula on a
    traced counter (``train_jax.make_schedule``); a test checks that the two agree.
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - 1 - warmup))
    return cfg.final_lr_frac + (1.0 - cfg.final_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- Optimizer hyperparameters (everything except the peak learning rate, which is swept) -------

OPTIMIZERS = ("adamw", "soap", "sophia-g", "sophia-h")
# Controls (JAX only): sign descent, which Sophia becomes when every coordinate is clipped.
# Signum is sign(m) with m the EMA of the gradients at Sophia's beta1 (``sophia_betas[0]``; optax.lion
# with b1 = b2): what Sophia is where it clips every coordinate;
# Lion is sign(b1·m + (1 - b1)·g) with m the EMA at b2 (Chen et al. 2023).
CONTROLS = ("signum", "lion")
ALL_OPTIMIZERS = OPTIMIZERS + CONTROLS

# Base peak learning rates; the sweep multiplies them by the same relative grid for everyone.
BASE_LR = {
    "adamw": 3e-3,   # the reference point (held-out loss ~1.44 after 600 steps)
    "soap": 3e-3,    # the SOAP reference implementation's default lr
    # Sophia, paper form: the step is lr·clip(m / max(gamma·h, eps), 1) per coordinate, at most lr. The study
    # (README.md, "The Sophia study"): with the official betas (0.965, 0.99) and warm-up 10 % nothing above 3e-4
    # works (1.74) and Sophia runs as sign descent; beta1 0.9 and a 70 % warm-up (RECIPES) move the optimum to
    # 3e-3, half of AdamW's (1.5e-3 -> 1.39 / 1.38, 3e-3 -> 1.375 / 1.350, 6e-3 -> 1.40 / 1.40, Sophia-G / -H).
    "sophia-g": 3e-3,
    "sophia-h": 3e-3,
    "signum": 3e-4,
    "lion": 3e-4,
}

ADAMW = dict(b1=0.9, b2=0.95, eps=1e-8)
SOAP = dict(betas=(0.95, 0.95), eps=1e-8, precondition_frequency=10)
# Sophia in the official / paper parameterisation (Liu et al. 2023, GPT-2 recipe):
# betas (0.965, 0.99), k = 10, gamma ("rho" in the official code) 0.01-0.05, GNB scaled by the
# number of predicted tokens, weight decay lr-scaled.
# gamma, betas and eps are TrainConfig fields (``sophia_gamma``, ...): command-line options.
SOPHIA = dict(k=10)
LION = dict(b1=0.9, b2=0.99)

# The example's own settings per optimizer: TrainConfig fields that differ from the TrainConfig
# defaults above (which are the official / paper values) when an optimizer runs with the example's
# defaults. Command-line options override them. See README.md, "The Sophia study".
RECIPES: dict[str, dict[str, Any]] = {
    # The study's best Sophia cells (JAX, 600 steps, seed 0): beta1 0.9 instead of the official 0.965 (at lr 8.5e-4:
    # 1.431 against 1.525; 0.95: 1.481, 0.98: 1.809), a 70 % warm-up (the lr × gamma grid's; 50 % is as good within
    # the noise: 1.422 / 1.403 / 1.380 against 1.431 / 1.393 / 1.392 at lr 8.5e-4 / 1.2e-3 / 1.7e-3, gamma 0.1), gamma
    # 0.2 (at lr 3e-3: 0.05 -> 1.393 / 1.372, 0.1 -> 1.378 / 1.360, 0.2 -> 1.375 / 1.350, Sophia-G / -H). Sophia-G
    # keeps the Hessian bias correction (without: +0.023 at beta1 0.965); Sophia-H goes without (with it, +0.032 at
    # the official recipe).
    "sophia-g": dict(warmup_frac=0.7, sophia_betas=(0.9, 0.99), sophia_gamma=0.2, sophia_hessian_bias_correction=True),
    "sophia-h": dict(warmup_frac=0.7, sophia_betas=(0.9, 0.99), sophia_gamma=0.2),
}


def recipe_config(optimizer: str, cfg: TrainConfig, explicit: dict[str, Any] | None = None) -> TrainConfig:
    """``cfg`` with ``optimizer``'s :data:`RECIPES` entries, then the ``explicit`` fields, applied."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return dataclasses.replace(cfg, **{k: v for k, v in {**RECIPES.get(optimizer, {}), **(explicit or {})}.items()
                                       if k in fields})


# --- One initialisation for both frameworks -----------------------------------------------------

def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical names and shapes. Linear weights are stored (in, out) as in Flax; the torch
    model transposes them into ``nn.Linear``'s (out, in)."""
    d, v = cfg.d_model, cfg.vocab_size
    shapes = {"wte": (v, d), "wpe": (cfg.context, d)}
    for i in range(cfg.n_layer):
        p = f"h{i}."
        shapes.update({
            p + "ln1.scale": (d,), p + "ln1.bias": (d,),
            p + "attn.qkv.w": (d, 3 * d), p + "attn.qkv.b": (3 * d,),
            p + "attn.proj.w": (d, d), p + "attn.proj.b": (d,),
            p + "ln2.scale": (d,), p + "ln2.bias": (d,),
            p + "mlp.fc.w": (d, 4 * d), p + "mlp.fc.b": (4 * d,),
            p + "mlp.proj.w": (4 * d, d), p + "mlp.proj.b": (d,),
        })
    shapes.update({"lnf.scale": (d,), "lnf.bias": (d,)})
    if not cfg.tie_embeddings:
        shapes["head.w"] = (d, v)
    return shapes


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2 initialisation: N(0, 0.02) for embeddings and weights, N(0, 0.02/sqrt(2·n_layer))
    for the two residual projections, zero biases, LayerNorm scale 1 and shift 0. float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".scale"):
            out[name] = np.ones(shape, np.float32)
        elif name.endswith(".bias") or name.endswith(".b"):
            out[name] = np.zeros(shape, np.float32)
        else:
            std = 0.02
            if name.endswith("proj.w"):
                std = 0.02 / math.sqrt(2 * cfg.n_layer)
            out[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out


# --- What one training run reports ---------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
    framework: str                 # "jax" or "torch"
    optimizer: str                 # one of OPTIMIZERS
    lr: float                      # peak learning rate
    steps: int
    eval_steps: list[int]          # number of updates done when evaluated (0, eval_every, ..., steps)
    eval_loss: list[float]         # mean cross-entropy (nats / char) on the fixed held-out batches
    train_loss: list[float]        # loss of every training batch, before its update
    wall_s: float = 0.0            # training time, first step (compilation) excluded
    first_step_s: float = 0.0      # the first step alone (JAX: tracing + compilation)
    diverged: bool = False
    win_rate: list[float] = dataclasses.field(default_factory=list)  # Sophia: unclipped fraction, per eval
    settings: dict = dataclasses.field(default_factory=dict)  # the TrainConfig the run used

    @property
    def final_eval(self) -> float:
        return self.eval_loss[-1] if self.eval_loss and not self.diverged else float("inf")

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.wall_s / max(1, self.steps - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(final_eval=self.final_eval, ms_per_step=self.ms_per_step)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def settings(cfg: TrainConfig) -> dict:
    """``cfg`` as a JSON-ready dict (what a :class:`RunResult` records)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def eval_schedule(cfg: TrainConfig) -> list[int]:
    """The update counts at which the held-out loss is measured: 0, every ``eval_every``, last."""
    points = list(range(0, cfg.steps, cfg.eval_every))
    return points + [cfg.steps]


def run_training(result: RunResult, cfg: TrainConfig, sampler: Iterator[tuple[np.ndarray, np.ndarray]],
                 train_step: Callable[[np.ndarray, np.ndarray], Any], evaluate: Callable[[], float], *,
                 win_rate: Callable[[], float] | None = None, sync: Callable[[Any], Any] = lambda x: x,
                 desc: str = "", progress: bool = True, position: int | None = None) -> RunResult:
    """The framework-independent loop: ``cfg.steps`` calls of ``train_step(x, y) -> loss``, evaluations
    at :func:`eval_schedule`, a progress bar, and a stop at the first non-finite loss.

    Losses stay where ``train_step`` returns them (on device) until the next evaluation; ``sync``
    waits for the first step so that its time (JAX: compilation) is reported on its own.
    """
    eval_at = set(eval_schedule(cfg))
    result.eval_steps.append(0)
    result.eval_loss.append(evaluate())
    pending: list[Any] = []
    bar = tqdm(total=cfg.steps, desc=desc, file=sys.stderr, disable=not progress, dynamic_ncols=True,
               mininterval=0.5, position=position, leave=position is None)
    t_start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x, y = next(sampler)
        pending.append(train_step(x, y))
        if step == 1:
            sync(pending[-1])
            result.first_step_s = time.perf_counter() - t_start
            t_start = time.perf_counter()
        if step in eval_at:
            losses = [float(loss) for loss in pending]
            pending.clear()
            result.train_loss.extend(losses)
            ev = evaluate()
            result.eval_steps.append(step)
            result.eval_loss.append(ev)
            if win_rate is not None:
                result.win_rate.append(win_rate())
            bar.set_postfix(train=f"{np.mean(losses):.3f}", eval=f"{ev:.3f}", refresh=False)
            if not (np.isfinite(ev) and np.all(np.isfinite(losses))):
                result.diverged = True
                bar.update(step - bar.n)
                break
        bar.update(1)
    result.wall_s = time.perf_counter() - t_start
    bar.close()
    return result
