"""The cells of the Sophia study, phase by phase (see ``study.py`` and README.md, "The Sophia study").

A phase is a function of the runs recorded so far returning its cells; the later phases pick the best
cells of the earlier ones (lowest final held-out loss, seed 0), so the whole study is reproducible from
the phase order in :data:`ORDER`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

from . import common


@dataclasses.dataclass(frozen=True)
class Cell:
    framework: str
    optimizer: str
    lr: float
    steps: int = 600
    seed: int = 0
    settings: tuple = ()  # sorted (TrainConfig field, value) pairs

    @classmethod
    def make(cls, optimizer: str, lr: float, framework: str = "jax", steps: int = 600, seed: int = 0,
             **settings) -> Cell:
        fields = {f.name for f in dataclasses.fields(common.TrainConfig)}
        for name in settings:
            if name not in fields:
                raise ValueError(f"settings: {name!r} is not a TrainConfig field")
        if not optimizer.startswith("sophia"):
            settings = {k: v for k, v in settings.items() if not k.startswith("sophia_")}
        return cls(framework, optimizer, float(f"{lr:.6g}"), steps, seed,
                   tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in settings.items())))

    def settings_dict(self) -> dict:
        return dict(self.settings)

    def with_(self, **changes) -> Cell:
        top = {k: changes.pop(k) for k in ("framework", "lr", "steps", "seed", "optimizer") if k in changes}
        d = dict(framework=self.framework, optimizer=self.optimizer, lr=self.lr, steps=self.steps,
                 seed=self.seed, **self.settings_dict())
        d.update(top)
        d.update(changes)
        return Cell.make(**d)

    def key(self) -> str:
        return json.dumps([self.framework, self.optimizer, f"{self.lr:.6g}", self.steps, self.seed,
                           [[k, list(v) if isinstance(v, tuple) else v] for k, v in self.settings]])

    def to_dict(self) -> dict:
        return dict(framework=self.framework, optimizer=self.optimizer, lr=self.lr, steps=self.steps,
                    seed=self.seed, settings={k: list(v) if isinstance(v, tuple) else v for k, v in self.settings})

    @classmethod
    def from_dict(cls, d: dict) -> Cell:
        return cls.make(d["optimizer"], d["lr"], d["framework"], d["steps"], d["seed"], **d["settings"])

    def settings_text(self) -> str:
        short = {"sophia_gamma": "γ", "sophia_betas": "betas", "sophia_hessian_bias_correction": "hbc",
                 "sophia_early_refresh_steps": "early", "warmup_frac": "warm-up", "clip_grad_norm": "clip"}
        return ", ".join(f"{short.get(k, k)} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
                         for k, v in self.settings) or "defaults"

    def label(self) -> str:
        return f"{self.framework} {self.optimizer} lr={self.lr:.3g} steps={self.steps} seed={self.seed} " \
               f"[{self.settings_text()}]"

    def cost(self) -> float:
        per_step = {"sophia-h": 2.3, "sophia-g": 1.0, "soap": 1.2}.get(self.optimizer, 0.7)
        return per_step * self.steps * (1.5 if self.framework == "torch" else 1.0)


def _final(run: dict) -> float:
    v = run["result"]["final_eval"]
    return v if v is not None and math.isfinite(v) else float("inf")


def best(runs: list[dict], phases: tuple[str, ...], optimizer: str, n: int = 1) -> list[Cell]:
    """The ``n`` best seed-0 cells of ``optimizer`` recorded in ``phases``."""
    pool = [r for r in runs if r["phase"] in phases and r["cell"]["optimizer"] == optimizer
            and r["cell"]["seed"] == 0 and r["cell"]["steps"] == 600]
    return [Cell.from_dict(r["cell"]) for r in sorted(pool, key=_final)[:n]]


# --- The phases ----------------------------------------------------------------------------------------

OFFICIAL = dict(sophia_gamma=0.05, sophia_betas=(0.965, 0.99))


def probe(runs) -> list[Cell]:
    """First looks: the official recipe with the short-horizon options, and larger gamma with larger lr."""
    g = "sophia-g"
    hbc = dict(OFFICIAL, sophia_hessian_bias_correction=True)
    return [
        Cell.make(g, 3e-4, **hbc),
        Cell.make(g, 3e-4, **hbc, sophia_early_refresh_steps=20),
        Cell.make(g, 1.5e-3, **dict(hbc, sophia_gamma=0.2)),
        Cell.make(g, 3e-3, **dict(hbc, sophia_gamma=0.5)),
        Cell.make(g, 1.5e-3, **dict(hbc, sophia_gamma=0.2, sophia_betas=(0.965, 0.95)), sophia_early_refresh_steps=20),
        Cell.make(g, 6e-4, **dict(hbc, sophia_gamma=0.02)),
        Cell.make("signum", 3e-4),
        Cell.make("adamw", 6e-3),
    ]


# The 2-D sweep: lr ×2 from 3.75e-4 up to AdamW's best (6e-3), gamma ×2 over the range that puts the
# win rate at lr ~3e-4 in the paper's 0.1-0.5 band; the official betas, the Hessian EMA bias-corrected
# (so that gamma means the same scale throughout the run; probe: no effect at the official lr 3e-4).
LRS = (3.75e-4, 7.5e-4, 1.5e-3, 3e-3, 6e-3)
GAMMAS = (0.025, 0.05, 0.1, 0.2)
GRID_BASE = dict(sophia_betas=(0.965, 0.99), sophia_hessian_bias_correction=True)


def grid(optimizer: str) -> Callable[[list[dict]], list[Cell]]:
    def cells(runs) -> list[Cell]:
        return [Cell.make(optimizer, lr, sophia_gamma=g, **GRID_BASE) for g in GAMMAS for lr in LRS]
    cells.__doc__ = f"lr × gamma for {optimizer}"
    return cells


def controls(runs) -> list[Cell]:
    """Sign descent at its own lr (Signum at Sophia's beta1, Lion), AdamW around its best lr, and AdamW with
    the schedule / clipping variations the Sophia cells get."""
    sign_lrs = (7.5e-5, 1.5e-4, 3e-4, 6e-4, 1.2e-3)
    return ([Cell.make(opt, lr) for opt in ("signum", "lion") for lr in sign_lrs]
            + [Cell.make("adamw", lr) for lr in (3e-3, 1.2e-2)]
            + [Cell.make("adamw", 6e-3, warmup_frac=0.3), Cell.make("adamw", 6e-3, clip_grad_norm=1.0)])


PHASES: dict[str, Callable[[list[dict]], list[Cell]]] = {
    "probe": probe,
    "grid-g": grid("sophia-g"),
    "controls": controls,
    "grid-h": grid("sophia-h"),
}
ORDER = tuple(PHASES)
