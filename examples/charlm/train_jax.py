"""Training the Flax GPT with optax.adamw, so_optax.soap or so_optax.sophia (Sophia-G / Sophia-H).

Every optimizer is an optax chain ending in ``optax.scale_by_learning_rate(schedule)``; the
so_optax transforms return a direction only:

    tx = optax.chain(so_optax.soap(weight_decay=wd, ...), optax.scale_by_learning_rate(schedule))
    tx = optax.chain(so_optax.sophia(estimator="gnb", form="paper", ...),
                     optax.scale_by_learning_rate(schedule))

The train step is one ``jax.jit`` with the parameters and the optimizer state donated. Sophia needs
a function of the parameters on its Hessian-refresh steps: ``logits_fn`` (Sophia-G, labels are
sampled from the model's own softmax) or ``obj_fn`` (Sophia-H, Hutchinson's v⊙Hv); both close over
the current batch and are only evaluated inside the refresh branch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import common, data, model_flax


def make_schedule(peak_lr: float, cfg: common.TrainConfig):
    """``common.lr_multiplier`` as an optax schedule (a function of the traced update count)."""
    warmup = cfg.warmup_steps
    decay = max(1, cfg.steps - 1 - warmup)
    final = cfg.final_lr_frac

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = (count + 1.0) / warmup
        progress = jnp.clip((count - warmup) / decay, 0.0, 1.0)
        cosine = final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return peak_lr * jnp.where(count < warmup, warm, cosine)

    return schedule


def make_optimizer(name: str, peak_lr: float, cfg: common.TrainConfig) -> optax.GradientTransformation:
    """The optimizer, after ``optax.clip_by_global_norm(cfg.clip_grad_norm)`` if that is set."""
    schedule = make_schedule(peak_lr, cfg)
    wd = cfg.weight_decay
    if name == "adamw":
        tx = optax.adamw(schedule, weight_decay=wd, **common.ADAMW)
    elif name == "signum":  # optax.lion with b1 = b2 = b: sign(m), m the EMA of the gradients at Sophia's beta1
        b = cfg.sophia_betas[0]
        tx = optax.lion(schedule, b1=b, b2=b, weight_decay=wd)
    elif name == "lion":
        tx = optax.lion(schedule, weight_decay=wd, **common.LION)
    else:
        import so_optax  # only needed for our optimizers
        if name == "soap":
            direction = so_optax.soap(weight_decay=wd, **common.SOAP)
        elif name in ("sophia-g", "sophia-h"):
            s = common.SOPHIA
            direction = so_optax.sophia(
                betas=cfg.sophia_betas, weight_decay=wd, k=s["k"], eps=cfg.sophia_eps,
                estimator="gnb" if name == "sophia-g" else "hutchinson",
                form="paper", gamma=cfg.sophia_gamma, seed=cfg.opt_seed,
                hessian_bias_correction=cfg.sophia_hessian_bias_correction,
                early_refresh_steps=cfg.sophia_early_refresh_steps)
        else:
            raise ValueError(f"optimizer: unknown {name!r}; expected one of {common.ALL_OPTIMIZERS}")
        tx = optax.chain(direction, optax.scale_by_learning_rate(schedule))
    if cfg.clip_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), tx)
    return tx


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train(name: str, peak_lr: float, model_cfg: common.ModelConfig, cfg: common.TrainConfig,
          corpus: data.Corpus, *, progress: bool = True, desc: str | None = None,
          position: int | None = None) -> common.RunResult:
    """Trains from ``common.init_params(model_cfg, cfg.init_seed)`` for ``cfg.steps`` updates."""
    apply, params = model_flax.build_model(model_cfg, common.init_params(model_cfg, cfg.init_seed))
    tx = make_optimizer(name, peak_lr, cfg)
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        return cross_entropy(apply(p, x), y)

    def train_step(p, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        if name == "sophia-g":
            extra = dict(logits_fn=lambda q: apply(q, x))
        elif name == "sophia-h":
            extra = dict(obj_fn=lambda q: loss_fn(q, x, y))
        else:
            extra = {}
        updates, state = tx.update(grads, state, p, **extra)
        return optax.apply_updates(p, updates), state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    eval_loss_fn = jax.jit(loss_fn)
    eval_set = [(jnp.asarray(x), jnp.asarray(y)) for x, y in data.eval_batches(
        corpus.val, cfg.eval_batches, cfg.batch_size, model_cfg.context)]

    box = [params, opt_state]  # the donated buffers change on every step

    def step(x, y):
        box[0], box[1], loss = train_step(box[0], box[1], x, y)
        return loss

    def evaluate() -> float:
        return float(np.mean([float(eval_loss_fn(box[0], x, y)) for x, y in eval_set]))

    sampler = data.BatchSampler(corpus.train, cfg.batch_size, model_cfg.context, cfg.data_seed)
    win_rate = None
    if name.startswith("sophia"):
        import so_optax

        def win_rate() -> float:
            return float(so_optax.sophia_win_rate(box[1]))
    return common.run_training(
        common.RunResult("jax", name, peak_lr, cfg.steps, [], [], [], settings=common.settings(cfg)), cfg,
        sampler, step, evaluate, win_rate=win_rate,
        sync=jax.block_until_ready, desc=desc or f"jax   {name:8s} lr={peak_lr:.1e}",
        progress=progress, position=position)
