"""Smoke test of the character-level GPT comparison (examples/charlm): a few steps of every
optimizer in both frameworks on a tiny model; the loss must be finite and go down."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.charlm import common, compare, data  # noqa: E402

STEPS = 24
# Peak learning rates for the tiny model (larger than the GPT's, which are tuned for 600 steps).
TINY_LR = {"adamw": 1e-2, "soap": 1e-2, "sophia-g": 5e-3, "sophia-h": 5e-3, "signum": 3e-3, "lion": 3e-3}


@pytest.fixture(scope="module")
def setup():
    """A tiny model; torch single-threaded meanwhile (tiny matmuls gain nothing from threads, and
    CI runs this file beside other tests on 2 cores)."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    corpus = data.load_corpus()
    model_cfg = common.ModelConfig(vocab_size=corpus.vocab_size, context=16, d_model=32, n_layer=1,
                                   n_head=2)
    train_cfg = common.TrainConfig(steps=STEPS, batch_size=8, eval_every=8, eval_batches=2)
    yield corpus, model_cfg, train_cfg
    if torch is not None:
        torch.set_num_threads(threads)


def test_corpus_and_sampler():
    corpus = data.load_corpus()
    assert corpus.n_chars > 100_000 and 50 < corpus.vocab_size < 200
    assert abs(len(corpus.val) / corpus.n_chars - 0.1) < 1e-3
    assert corpus.decode(corpus.encode("def f(x):")) == "def f(x):"
    a, b = data.BatchSampler(corpus.train, 4, 16, seed=3), data.BatchSampler(corpus.train, 4, 16, seed=3)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert (xa == xb).all() and (ya == yb).all()
        assert xa.shape == (4, 16) and (xa[:, 1:] == ya[:, :-1]).all()


def test_schedules_agree():
    pytest.importorskip("jax")
    import numpy as np

    from examples.charlm import train_jax
    cfg = common.TrainConfig(steps=50)
    got = np.asarray(train_jax.make_schedule(2.0, cfg)(np.arange(cfg.steps)))
    want = [2.0 * common.lr_multiplier(step, cfg) for step in range(cfg.steps)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert math.isclose(common.lr_multiplier(cfg.steps - 1, cfg), cfg.final_lr_frac)


@pytest.mark.parametrize("framework,optimizer", [(fw, opt) for fw in ("jax", "torch") for opt in common.OPTIMIZERS]
                         + [("jax", opt) for opt in common.CONTROLS])
def test_training_decreases_loss(setup, framework, optimizer):
    pytest.importorskip(framework)
    why = compare.available(framework, optimizer)
    if why is not None:
        pytest.skip(why)
    corpus, model_cfg, train_cfg = setup
    if framework == "jax":
        from examples.charlm import train_jax as trainer
    else:
        from examples.charlm import train_torch as trainer
    run = trainer.train(optimizer, TINY_LR[optimizer], model_cfg, train_cfg, corpus,
                        progress=False)
    assert not run.diverged
    assert run.eval_steps == [0, 8, 16, 24]
    assert len(run.train_loss) == STEPS
    assert all(math.isfinite(x) for x in run.train_loss + run.eval_loss)
    assert abs(run.eval_loss[0] - math.log(corpus.vocab_size)) < 0.1  # small init: ~uniform
    assert run.eval_loss[-1] < run.eval_loss[0] - 0.3


def test_frameworks_agree_with_adamw(setup):
    """Same weights, same batches, same schedule: the two AdamW runs give the same losses."""
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    from examples.charlm import train_jax, train_torch
    corpus, model_cfg, train_cfg = setup
    runs = [t.train("adamw", 1e-2, model_cfg, train_cfg, corpus, progress=False)
            for t in (train_jax, train_torch)]
    for a, b in zip(runs[0].eval_loss, runs[1].eval_loss):
        assert abs(a - b) < 2e-3


def test_frameworks_agree_with_clipped_adamw(setup):
    """Gradient-norm clipping is applied the same way in both frameworks (and it binds here)."""
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    import dataclasses

    from examples.charlm import train_jax, train_torch
    corpus, model_cfg, train_cfg = setup
    clipped = dataclasses.replace(train_cfg, clip_grad_norm=0.05)
    runs = [t.train("adamw", 1e-2, model_cfg, clipped, corpus, progress=False) for t in (train_jax, train_torch)]
    for a, b in zip(runs[0].eval_loss, runs[1].eval_loss):
        assert abs(a - b) < 2e-3
    plain = train_jax.train("adamw", 1e-2, model_cfg, train_cfg, corpus, progress=False)
    assert abs(plain.eval_loss[-1] - runs[0].eval_loss[-1]) > 1e-2
    assert runs[0].settings["clip_grad_norm"] == 0.05


def test_recipes_then_command_line(monkeypatch):
    """Each optimizer's settings: TrainConfig defaults, then its common.RECIPES entry, then the options given."""
    import argparse

    from examples.charlm import options
    monkeypatch.setitem(common.RECIPES, "sophia-g", dict(sophia_gamma=0.7, warmup_frac=0.3))
    p = argparse.ArgumentParser()
    options.add_arguments(p)
    base = common.TrainConfig(steps=40)
    cfgs = options.train_configs(p.parse_args(["--warmup-frac", "0.2"]), base, ["adamw", "sophia-g"])
    assert (cfgs["adamw"].warmup_frac, cfgs["sophia-g"].warmup_frac, cfgs["sophia-g"].sophia_gamma) == (0.2, 0.2, 0.7)
    args = p.parse_args(["--sophia-betas", "0.9,0.95", "--sophia-hessian-bias-correction",
                         "--sophia-early-refresh-steps", "20", "--clip-grad-norm", "1"])
    cfgs = options.train_configs(args, base, ["adamw", "sophia-g"])
    g = cfgs["sophia-g"]
    assert (g.warmup_frac, g.sophia_betas, g.sophia_hessian_bias_correction, g.sophia_early_refresh_steps,
            g.clip_grad_norm, cfgs["adamw"].clip_grad_norm) == (0.3, (0.9, 0.95), True, 20, 1.0, 1.0)
    assert "sophia-g: warmup_frac 0.3" in options.differences(cfgs, cfgs["adamw"])


def test_sophia_options_reach_both_optimizers():
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    import dataclasses

    import jax
    import jax.numpy as jnp
    import torch

    from examples.charlm import train_jax, train_torch
    cfg = dataclasses.replace(common.TrainConfig(steps=40), sophia_hessian_bias_correction=True,
                              sophia_early_refresh_steps=3, sophia_gamma=0.3, clip_grad_norm=1.0)
    opt = train_torch.make_optimizer("sophia-g", [torch.zeros(2, requires_grad=True)], 1e-3, cfg)
    assert (opt.defaults["hessian_bias_correction"], opt.defaults["early_refresh_steps"], opt.defaults["gamma"]) \
        == (True, 3, 0.3)
    tx = train_jax.make_optimizer("sophia-g", 1e-3, cfg)
    params = {"w": jnp.ones((2, 3))}
    state = tx.init(params)
    _, state = tx.update({"w": 100.0 * jnp.ones((2, 3))}, state, params, logits_fn=lambda p: p["w"])
    sophia_state = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "clip_rule"))
                    if hasattr(s, "clip_rule")][0]
    assert int(sophia_state.estimator_state.count) == 1  # refreshed at t = 1 <= 3 (k = 10)
    assert float(sophia_state.clip_rule.hessian_scale) == pytest.approx(1 / (1 - cfg.sophia_betas[1]), rel=1e-5)
    np.testing.assert_allclose(np.linalg.norm(sophia_state.mu["w"]), (1 - cfg.sophia_betas[0]) * 1.0, rtol=1e-5)


def test_table_and_plot(tmp_path):
    runs = []
    for fw in ("jax", "torch"):
        for opt, final in (("adamw", 2.0), ("soap", 1.8)):
            runs.append(common.RunResult(fw, opt, 1e-3, 50, [0, 25, 50], [4.6, 2.5, final],
                                         [4.0] * 50, wall_s=1.0))
    rows = compare.summarize(runs, eval_every=25)
    soap = [r for r in rows if r["optimizer"] == "soap"][0]
    assert soap["steps_to_adamw_eval"] == 50 and soap["final_eval"] == 1.8
    assert "soap" in compare.markdown_table(rows)
    compare.plot(runs, rows, 25, tmp_path / "p.png", "test")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_command_line(tmp_path, setup):
    pytest.importorskip("torch")
    rc = compare.main(["--frameworks", "torch", "--optimizers", "adamw", "--lr-grid", "1,2",
                       "--steps", "8", "--eval-every", "4", "--eval-batches", "1", "--d-model", "16",
                       "--n-layer", "1", "--n-head", "2", "--context", "8", "--batch-size", "4",
                       "--workers", "1", "--no-progress", "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / f"charlm_t{suffix}").exists()
    assert "| torch | adamw |" in (tmp_path / "charlm_t.md").read_text()


def test_study_cells_record_and_report(tmp_path):
    """A study cell round-trips through its JSON record; the report lists every run and draws the heatmap."""
    from examples.charlm import study, study_plan
    cell = study_plan.Cell.make("sophia-g", 3e-4, sophia_gamma=0.05, sophia_betas=[0.965, 0.99], warmup_frac=0.3)
    assert study_plan.Cell.from_dict(json.loads(json.dumps(cell.to_dict()))) == cell
    assert cell.with_(lr=6e-4).key() != cell.key() and cell.with_(lr=3e-4) == cell
    assert study.train_config(cell).sophia_betas == (0.965, 0.99) and study.train_config(cell).warmup_frac == 0.3
    assert study_plan.Cell.make("adamw", 1e-3, sophia_gamma=0.1) == study_plan.Cell.make("adamw", 1e-3)
    assert study_plan.Cell.make("adamw", 1e-3, warmup_frac=0.1) == study_plan.Cell.make("adamw", 1e-3)  # a default
    assert cell.get("sophia_betas") == (0.965, 0.99) and cell.get("clip_grad_norm") == 0.0
    with pytest.raises(ValueError, match="settings"):
        study_plan.Cell.make("adamw", 1e-3, gama=0.1)
    runs = []
    for i, c in enumerate(study_plan.grid("sophia-g")([])):
        res = common.RunResult("jax", c.optimizer, c.lr, 600, [0, 600], [4.6, 1.5 + 0.01 * i], [4.0] * 50,
                               win_rate=[0.1, 0.2])
        runs.append(dict(key=c.key(), phase="grid-g", cell=c.to_dict(), result=study.slim(res)))
    doc = dict(runs=runs)
    assert study_plan.best(runs, ("grid-g",), "sophia-g") == [study_plan.Cell.from_dict(runs[0]["cell"])]
    md = study.markdown(doc)
    assert md.count("| jax | sophia-g |") == len(study_plan.LRS) * len(study_plan.GAMMAS) and "1.5000" in md
    study.heatmap(doc, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert [opt for opt, _ in study.heatmap_panels(doc)] == ["sophia-g"]


def test_study_second_grid_takes_the_best_beta1_cell(tmp_path):
    """The beta1 0.9 grids vary lr and gamma around each estimator's best beta1-g cell, and the report draws a panel
    for each (with only that grid's cells in it)."""
    from examples.charlm import study, study_plan

    def record(c, phase, final):
        res = common.RunResult("jax", c.optimizer, c.lr, c.steps, [0, c.steps], [4.6, final], [4.0] * 25,
                               win_rate=[0.1, 0.3])
        return dict(key=c.key(), phase=phase, cell=c.to_dict(), result=study.slim(res))

    cells = study_plan.beta1_g([])
    finals = {c: 1.5 + 0.01 * i for i, c in enumerate(cells)}
    (g_best,) = [c for c in cells if c.optimizer == "sophia-g" and c.lr == 2.4e-3]
    (h_best,) = [c for c in cells if c.optimizer == "sophia-h" and c.lr == 1.2e-3]
    finals[g_best], finals[h_best] = 1.30, 1.31
    runs = [record(c, "beta1-g", f) for c, f in finals.items()]
    assert study_plan.grid_2_base(runs, "sophia-g") == g_best
    grid = study_plan.grid_2("sophia-h")(runs)
    assert len(grid) == 12
    assert {c.with_(lr=h_best.lr, sophia_gamma=h_best.get("sophia_gamma")) for c in grid} == {h_best}
    runs += [record(c, "grid-h-2", 1.4) for c in grid]
    doc = dict(runs=runs)
    panels = study.heatmap_panels(doc)
    assert [opt for opt, _ in panels] == ["sophia-g", "sophia-g", "sophia-h"]
    assert len(study.grid_cells(doc, "sophia-h", panels[2][1])) == 12
    assert study.grid_cells(doc, "sophia-g", panels[1][1]) == {}  # g_best's lr 2.4e-3 is off the heatmap's lrs
    study.heatmap(doc, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_study_combines_the_improving_factors():
    from examples.charlm import study, study_plan
    base = study_plan.Cell.make("sophia-g", 3e-4, sophia_hessian_bias_correction=True)
    finals = {base: 1.70}
    for v in study_plan.variations(base):
        finals[v] = 1.80
    b1, b2, warm, clip, hbc, early, wd, eps5, eps4, gamma2, gamma4 = study_plan.variations(base)
    finals.update({b1: 1.69, b2: 1.68, hbc: 1.65, eps5: 1.66, eps4: 1.64})
    runs = [dict(phase="grid-g" if c == base else "one-factor-g", cell=c.to_dict(),
                 result=study.slim(common.RunResult("jax", c.optimizer, c.lr, 600, [0, 600], [4.6, f], [4.0] * 25)))
            for c, f in finals.items()]
    combo, lower, higher = study_plan.combined("sophia-g", ("grid-g", "one-factor-g"))(runs)
    assert (lower.lr, higher.lr) == (2.4e-4, 3.75e-4) and lower.with_(lr=3e-4) == combo
    assert combo.get("sophia_betas") == (0.9, 0.95) and combo.get("sophia_eps") == 1e-4
    assert combo.get("sophia_hessian_bias_correction") is False and combo.get("warmup_frac") == 0.1


def test_the_default_recipes_are_the_studys_best_cells():
    """The judged command (``--full --frameworks jax --optimizers adamw,sophia-g,sophia-h --lr-grid 1 --base-lr
    adamw=6e-3``) trains Sophia-G / Sophia-H with exactly the settings of the recorded study cells the READMEs
    quote, and those are the best seed-0, 600-step JAX cells of their estimator in the study's runs.json."""
    from examples.charlm import study, study_plan
    doc = json.loads((Path(study.__file__).parent / "results" / "study" / "runs.json").read_text())
    args = compare.parse_args(["--full", "--frameworks", "jax", "--optimizers", "adamw,sophia-g,sophia-h",
                               "--lr-grid", "1", "--base-lr", "adamw=6e-3"])
    corpus = data.load_corpus()
    _, _, per_optimizer, _ = compare.build_configs(args, corpus)
    for opt in ("sophia-g", "sophia-h"):
        runs = [r for r in doc["runs"] if r["cell"]["optimizer"] == opt and r["cell"]["seed"] == 0
                and r["cell"]["steps"] == 600 and r["cell"]["framework"] == "jax"]
        best = study_plan.Cell.from_dict(min(runs, key=lambda r: r["result"]["final_eval"])["cell"])
        assert (best.lr, study.train_config(best)) == (args.base_lrs[opt] * args.lr_grid[0], per_optimizer[opt]), opt
    assert study.train_config(study_plan.Cell.make("adamw", 6e-3)) == per_optimizer["adamw"]
