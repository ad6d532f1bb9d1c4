"""A cell of the Sophia study (one training run: framework, optimizer, peak lr, steps, seed and the TrainConfig
fields it sets) and the pick of the best recorded cells; the phases are in ``study_plan.py``."""

from __future__ import annotations

import dataclasses
import json
import math

from . import common


@dataclasses.dataclass(frozen=True)
class Cell:
    framework: str
    optimizer: str
    lr: float
    steps: int = 600
    seed: int = 0
    settings: tuple = ()  # sorted (TrainConfig field, value) pairs, the fields that differ from the defaults

    @classmethod
    def make(cls, optimizer: str, lr: float, framework: str = "jax", steps: int = 600, seed: int = 0,
             **settings) -> Cell:
        defaults = common.TrainConfig()
        for name in settings:
            if not hasattr(defaults, name):
                raise ValueError(f"settings: {name!r} is not a TrainConfig field")
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
        settings = {k: v for k, v in settings.items() if v != getattr(defaults, k)}
        if not optimizer.startswith("sophia"):  # Signum's beta is Sophia's beta1
            settings = {k: v for k, v in settings.items() if not k.startswith("sophia_")
                        or (optimizer == "signum" and k == "sophia_betas")}
        return cls(framework, optimizer, float(f"{lr:.6g}"), steps, seed, tuple(sorted(settings.items())))

    def settings_dict(self) -> dict:
        return dict(self.settings)

    def get(self, name: str):
        """A TrainConfig field's value in this cell (the default if the cell does not set it)."""
        return self.settings_dict().get(name, getattr(common.TrainConfig(), name))

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
                 "sophia_early_refresh_steps": "early", "warmup_frac": "warm-up", "clip_grad_norm": "clip",
                 "sophia_eps": "eps", "weight_decay": "wd"}
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
