"""Training the PyTorch GPT with torch.optim.AdamW, torch_bridge.SOAP or torch_bridge.Sophia.

The schedule is a ``LambdaLR`` over ``common.lr_multiplier`` (the same numbers as the JAX schedule),
stepped once per update. Sophia is used the way its seed documents it:

* Sophia-G: ``loss.backward(retain_graph=opt.refreshes_next_step()); opt.step(logits=logits)`` (the
  optimizer samples labels from ``softmax(logits)`` on its Hessian-refresh steps and backpropagates
  through the logits again, so only the backward before a refresh keeps the graph; the seed's
  ``retain_graph=True`` makes the same steps, slower);
* Sophia-H: ``opt.step(closure)`` with a closure that only computes and returns the loss (the
  optimizer differentiates it, twice on refresh steps).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from . import common, data, model_torch


def make_optimizer(name: str, params, peak_lr: float, cfg: common.TrainConfig) -> torch.optim.Optimizer:
    wd = cfg.weight_decay
    if name == "adamw":
        a = common.ADAMW
        return torch.optim.AdamW(params, lr=peak_lr, betas=(a["b1"], a["b2"]), eps=a["eps"],
                                 weight_decay=wd)
    import torch_bridge  # only needed for our optimizers
    if name == "soap":
        return torch_bridge.SOAP(params, lr=peak_lr, weight_decay=wd, **common.SOAP)
    if name in ("sophia-g", "sophia-h"):
        s = common.SOPHIA
        return torch_bridge.Sophia(
            params, lr=peak_lr, betas=cfg.sophia_betas, weight_decay=wd, k=s["k"], eps=cfg.sophia_eps,
            hessian_computation_type="gnb" if name == "sophia-g" else "hutchinson",
            form="paper", gamma=cfg.sophia_gamma, hessian_bias_correction=cfg.sophia_hessian_bias_correction,
            early_refresh_steps=cfg.sophia_early_refresh_steps)
    raise ValueError(f"optimizer: unknown {name!r}; expected one of {common.OPTIMIZERS} (the controls "
                     f"{common.CONTROLS} are JAX only)")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train(name: str, peak_lr: float, model_cfg: common.ModelConfig, cfg: common.TrainConfig,
          corpus: data.Corpus, *, progress: bool = True, desc: str | None = None,
          position: int | None = None) -> common.RunResult:
    """Trains from ``common.init_params(model_cfg, cfg.init_seed)`` for ``cfg.steps`` updates."""
    if cfg.clip_grad_norm and name == "sophia-h":
        raise ValueError("clip_grad_norm: not available for torch sophia-h (torch_bridge.Sophia differentiates "
                         "the closure itself, so there is no p.grad to clip before the step)")
    torch.manual_seed(cfg.opt_seed)  # Sophia's label sampling / probe vectors
    model = model_torch.build_model(model_cfg, common.init_params(model_cfg, cfg.init_seed))
    opt = make_optimizer(name, model.parameters(), peak_lr, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: common.lr_multiplier(s, cfg))
    eval_set = [(torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in data.eval_batches(
        corpus.val, cfg.eval_batches, cfg.batch_size, model_cfg.context)]

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        out = float(np.mean([cross_entropy(model(x), y).item() for x, y in eval_set]))
        model.train()
        return out

    def clip() -> None:
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if name == "sophia-h":
            def closure():
                return cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss = opt.step(closure)
        else:
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = cross_entropy(logits, y)
            if name == "sophia-g":
                loss.backward(retain_graph=opt.refreshes_next_step())
                clip()
                opt.step(logits=logits)
            else:
                loss.backward()
                clip()
                opt.step()
        sched.step()
        return loss.detach()

    def step(x, y):
        return train_step(torch.from_numpy(x).long(), torch.from_numpy(y).long())

    sampler = data.BatchSampler(corpus.train, cfg.batch_size, model_cfg.context, cfg.data_seed)
    return common.run_training(
        common.RunResult("torch", name, peak_lr, cfg.steps, [], [], [], settings=common.settings(cfg)), cfg,
        sampler, step, evaluate,
        win_rate=(lambda: float(opt.win_rate)) if name.startswith("sophia") else None,
        desc=desc or f"torch {name:8s} lr={peak_lr:.1e}", progress=progress, position=position)
