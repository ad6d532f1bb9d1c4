"""The Sophia study: sweeps on the full char-LM configuration, one JSON of every run, a report.

Run from the repository root::

    python -m examples.charlm.study run --phase grid-g --out examples/charlm/results/study --resume
    python -m examples.charlm.study report --out examples/charlm/results/study

A *cell* is one training run: framework, optimizer, peak lr, steps, seed and the TrainConfig fields it
sets (everything else is the TrainConfig default, the official / paper settings; ``common.RECIPES``
are *not* applied, so a cell means the same thing before and after the recipe changes). ``run``
trains the cells of a phase that are not in ``<out>/runs.json`` yet (in parallel worker processes,
one thread each), adding each run to the file as it finishes; phases after the grids pick their
cells from the results so far (:mod:`examples.charlm.study_plan`). ``report`` writes
``<out>/study.md`` (every run, by phase) and ``<out>/heatmap.png`` (final held-out loss over
lr × gamma, per estimator).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from . import common, compare, data, study_plan

MODEL = dict(context=64, d_model=128, n_layer=2, n_head=4)
BATCH, EVAL_EVERY, EVAL_BATCHES = 32, 25, 8


def model_config(corpus: data.Corpus) -> common.ModelConfig:
    return common.ModelConfig(vocab_size=corpus.vocab_size, **MODEL)


def train_config(cell: study_plan.Cell) -> common.TrainConfig:
    cfg = common.TrainConfig(steps=cell.steps, batch_size=BATCH, eval_every=EVAL_EVERY, eval_batches=EVAL_BATCHES,
                             data_seed=cell.seed, init_seed=cell.seed, opt_seed=cell.seed)
    return dataclasses.replace(cfg, **cell.settings_dict())


# --- The record ------------------------------------------------------------------------------------

def load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return dict(model=MODEL, batch=BATCH, eval_every=EVAL_EVERY, eval_batches=EVAL_BATCHES, runs=[])


def save(doc: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=0))
    tmp.replace(path)


def slim(run: common.RunResult) -> dict:
    """The run without its per-step training losses (kept as means over each evaluation interval)."""
    d = run.to_dict()
    xs, ys = compare.windowed_train_loss(run, EVAL_EVERY)
    d.pop("train_loss")
    d["train_loss_mean"] = dict(steps=xs, loss=ys)
    return d


# --- Running -----------------------------------------------------------------------------------------

def run_phase(phase: str, out: Path, workers: int, progress: bool, dry_run: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.json"
    doc = load(path)
    done = {study_plan.Cell.from_dict(r["cell"]).key() for r in doc["runs"]}
    cells = study_plan.PHASES[phase](doc["runs"])
    todo = [c for c in dict.fromkeys(cells) if c.key() not in done]
    print(f"phase {phase}: {len(cells)} cells, {len(cells) - len(todo)} already in {path}, {len(todo)} to run",
          file=sys.stderr)
    for c in todo:
        print("  ", c.label(), file=sys.stderr)
    if dry_run or not todo:
        return 0
    corpus = data.load_corpus()
    model_cfg = model_config(corpus)

    def finished(cell: study_plan.Cell, run: common.RunResult) -> None:
        doc["runs"].append(dict(key=cell.key(), phase=phase, cell=cell.to_dict(), result=slim(run)))
        save(doc, path)
        wins = f", win rate {run.win_rate[-1]:.2f}" if run.win_rate else ""
        print(f"done {cell.label()}: final held-out loss {run.final_eval:.4f}{wins}, {run.wall_s:.0f} s",
              file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if workers <= 1:
        compare._WORKER["corpus"] = corpus
        for c in todo:
            finished(c, compare._run_one(c.framework, c.optimizer, c.lr, model_cfg, train_config(c), progress,
                                         c.label()))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        ctx = multiprocessing.get_context("spawn")
        slots = ctx.Queue()
        for s in range(workers):
            slots.put(s)
        todo.sort(key=lambda c: -c.cost())  # longest first
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=compare._worker_init,
                                 initargs=(slots,)) as pool:
            futures = {pool.submit(compare._run_one, c.framework, c.optimizer, c.lr, model_cfg, train_config(c),
                                   progress, c.label(), True): c for c in todo}
            for fut in as_completed(futures):
                finished(futures[fut], fut.result())
    print(f"phase {phase}: {len(todo)} runs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


# --- Reporting ---------------------------------------------------------------------------------------

def _final(r: dict) -> float:
    v = r["result"]["final_eval"]
    return v if v is not None and math.isfinite(v) else float("inf")


def markdown(doc: dict) -> str:
    lines = []
    for phase in dict.fromkeys(r["phase"] for r in doc["runs"]):
        runs = sorted((r for r in doc["runs"] if r["phase"] == phase), key=_final)
        lines += [f"### {phase}", "", "| framework | optimizer | lr | steps | seed | settings | final held-out "
                  "| win rate (end) | s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            c, res = study_plan.Cell.from_dict(r["cell"]), r["result"]
            win = f"{res['win_rate'][-1]:.2f}" if res.get("win_rate") else ""
            final = f"{_final(r):.4f}" if math.isfinite(_final(r)) else "diverged"
            lines.append(f"| {c.framework} | {c.optimizer} | {c.lr:.3g} | {c.steps} | {c.seed} | {c.settings_text()} "
                         f"| {final} | {win} | {res['wall_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def heatmap_panels(doc: dict) -> list[tuple[str, study_plan.Cell]]:
    """(optimizer, a cell with the panel's settings) of each lr × gamma panel: Sophia-G's first grid (warm-up 10 %,
    official betas, Hessian bias-corrected), then each estimator's grid at beta1 0.9 where it has been run."""
    panels = [("sophia-g", study_plan.Cell.make("sophia-g", 1.0, **study_plan.GRID_BASE))]
    for opt in ("sophia-g", "sophia-h"):
        if any(r["phase"] == "beta1-g" and r["cell"]["optimizer"] == opt for r in doc["runs"]):
            panels.append((opt, study_plan.grid_2_base(doc["runs"], opt)))
    return panels


def grid_cells(doc: dict, optimizer: str, ref: study_plan.Cell) -> dict:
    """{(gamma, lr): run} of the seed-0, 600-step JAX cells of ``optimizer`` (any phase) on the heatmap's axes
    whose other settings are ``ref``'s."""
    found = {}
    for r in doc["runs"]:
        c = study_plan.Cell.from_dict(r["cell"])
        on_axes = c.lr in study_plan.HEATMAP_LRS and c.get("sophia_gamma") in study_plan.HEATMAP_GAMMAS
        if (c.optimizer, c.steps, c.seed, c.framework) == (optimizer, 600, 0, "jax") and on_axes and \
                c.with_(sophia_gamma=ref.get("sophia_gamma"), lr=ref.lr).settings == ref.settings:
            found[(c.get("sophia_gamma"), c.lr)] = r
    return found


def heatmap(doc: dict, path: Path) -> None:
    """Final held-out loss over lr × gamma per :func:`heatmap_panels` entry (blank where no run was made), and the
    warm-up panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(opt, ref, found) for opt, ref in heatmap_panels(doc) if (found := grid_cells(doc, opt, ref))]
    if not panels:
        return
    adamw = [_final(r) for r in doc["runs"] if r["cell"]["optimizer"] == "adamw" and r["cell"]["steps"] == 600
             and r["cell"]["seed"] == 0 and not r["cell"]["settings"] and r["cell"]["framework"] == "jax"]
    adamw = min(adamw) if adamw else None
    cols = 2
    rows = (len(panels) + 1 + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 5.0 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (opt, ref, found) in zip(flat, panels):
        grid_panel(fig, ax, opt, ref, found, adamw)
    warmup_panel(doc, flat[len(panels)], adamw)
    for ax in flat[len(panels) + 1:]:
        ax.axis("off")
    fig.suptitle("JAX, 600 steps, seed 0, no clipping; colour scale capped at 2.2", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid_panel(fig, ax, opt: str, ref: study_plan.Cell, found: dict, adamw: float | None) -> None:
    import numpy as np

    gammas, lrs = sorted({g for g, _ in found}), sorted({lr for _, lr in found})
    grid = np.full((len(gammas), len(lrs)), np.nan)
    wins = np.full_like(grid, np.nan)
    for (g, lr), r in found.items():
        i, j = gammas.index(g), lrs.index(lr)
        grid[i, j] = min(_final(r), 3.0)
        wins[i, j] = r["result"]["win_rate"][-1] if r["result"].get("win_rate") else np.nan
    top = min(np.nanmax(grid), 2.2)
    im = ax.imshow(grid, origin="lower", cmap="viridis_r", vmin=np.nanmin(grid), vmax=top, aspect="auto")
    for i in range(len(gammas)):
        for j in range(len(lrs)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}\nwin {wins[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] > (np.nanmin(grid) + top) / 2 else "black")
    ax.set_xticks(range(len(lrs)), [f"{x:.3g}" for x in lrs])
    ax.set_yticks(range(len(gammas)), [f"{g:g}" for g in gammas])
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("gamma")
    name = {"sophia-g": "Sophia-G", "sophia-h": "Sophia-H"}[opt]
    hbc = ", Hessian bias-corrected" if ref.get("sophia_hessian_bias_correction") else ""
    b1, b2 = ref.get("sophia_betas")
    against = f"; AdamW (lr 6e-3, warm-up 10 %) {adamw:.3f}" if adamw is not None else ""
    ax.set_title(f"{name}, betas ({b1}, {b2}), warm-up {ref.get('warmup_frac'):.0%}{hbc}\nfinal held-out loss, "
                 f"win rate at the end{against}", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)


def warmup_panel(doc: dict, ax, adamw: float | None) -> None:
    """Final held-out loss over lr, a line per (optimizer, warm-up, beta1, gamma, Hessian bias correction) with at
    least two lrs: Sophia-G, Sophia-H and the Signum control; seed 0, 600 steps, JAX, no clipping, beta2 0.99."""
    styles = {"sophia-g": ("tab:orange", "^"), "sophia-h": ("tab:green", "v"), "signum": ("tab:purple", "D")}
    default = study_plan.Cell.make("sophia-g", 1.0)
    lines: dict = {}
    for r in doc["runs"]:
        c = study_plan.Cell.from_dict(r["cell"])
        if (c.steps, c.seed, c.framework) != (600, 0, "jax") or c.optimizer not in styles:
            continue
        b1 = c.get("sophia_betas")[0]
        rest = c.with_(warmup_frac=0.1, sophia_hessian_bias_correction=False, lr=1.0,
                       sophia_gamma=default.get("sophia_gamma"), sophia_betas=(0.965, 0.99))
        if rest.settings != ():
            continue
        sign = c.optimizer == "signum"
        key = (c.optimizer, c.get("warmup_frac"), b1, None if sign else c.get("sophia_gamma"),
               bool(c.get("sophia_hessian_bias_correction")) and not sign)
        lines.setdefault(key, []).append((c.lr, _final(r)))
    for (opt, warm, b1, gamma, hbc), pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
        if len(pts) < 2:
            continue
        pts.sort()
        color, marker = styles[opt]
        ax.plot([x for x, _ in pts], [min(y, 3.0) for _, y in pts], color=color, marker=marker,
                ms=4 if b1 != 0.9 else 7, ls={0.1: "--", 0.3: "-", 0.5: "-."}.get(warm, ":"),
                alpha=1.0 if b1 == 0.9 else 0.45, mfc="none" if hbc else color,
                label=f"{opt}, warm-up {warm:.0%}, β1 {b1}" + (f", γ {gamma}" if gamma else "")
                + (", hbc" if hbc else ""))
    if adamw is not None:
        ax.axhline(adamw, color="black", lw=0.9, ls=":", label=f"AdamW lr 6e-3, warm-up 10 %: {adamw:.3f}")
    own = [_final(r) for r in doc["runs"] if r["cell"]["optimizer"] == "adamw" and r["cell"]["seed"] == 0
           and r["cell"]["steps"] == 600 and r["cell"]["framework"] == "jax"]
    if own and adamw is not None and min(own) < adamw:
        ax.axhline(min(own), color="gray", lw=0.9, ls=":", label=f"AdamW, its best warm-up / clipping: {min(own):.3f}")
    ax.set_xscale("log")
    ax.set_ylim(None, 2.3)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final held-out loss")
    ax.set_title("the warm-up moves the lr optimum; beta1 0.9 (bold) moves the loss (capped at 2.3)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5.5, ncol=2)


def diagnose(cell: study_plan.Cell, at: int, window: int = 50) -> dict:
    """Where Sophia clips: train ``cell`` (JAX) for ``at`` steps and report, per parameter, the clipped
    fraction, the medians of |m| and of gamma·h (as the step uses it) and the gradient's signal-to-noise
    ratio |mean g| / std g over the last ``window`` steps; and per block the attention-logit scale
    ``‖W_qᵀ W_k‖₂ / √d_head`` (the largest logit is this times ‖x‖² = d after the LayerNorm)."""
    import jax
    import numpy as np
    import optax

    from . import model_flax, train_jax
    corpus = data.load_corpus()
    model_cfg, cfg = model_config(corpus), train_config(cell)
    apply, params = model_flax.build_model(model_cfg, common.init_params(model_cfg, cfg.init_seed))
    tx = train_jax.make_optimizer(cell.optimizer, cell.lr, cfg)
    state = tx.init(params)

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(lambda q: train_jax.cross_entropy(apply(q, x), y))(p)
        u, s = tx.update(g, s, p, logits_fn=lambda q: apply(q, x), obj_fn=lambda q: train_jax.cross_entropy(
            apply(q, x), y))
        return optax.apply_updates(p, u), s, g

    sampler = data.BatchSampler(corpus.train, cfg.batch_size, model_cfg.context, cfg.data_seed)
    recent = []
    for t in range(at):
        params, state, g = step(params, state, *next(sampler))
        if t >= at - window:
            recent.append([np.asarray(x) for x in jax.tree.leaves(g)])
    def is_sophia(x) -> bool:
        return hasattr(x, "clip_rule")

    (sophia,) = [x for x in jax.tree.leaves(state, is_leaf=is_sophia) if is_sophia(x)]
    rule = sophia.clip_rule
    rows = []
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(sophia.mu)]
    for i, (path, m, h) in enumerate(zip(paths, jax.tree.leaves(sophia.mu), jax.tree.leaves(sophia.nu))):
        m, gh = np.asarray(m), float(rule.gamma * rule.hessian_scale) * np.asarray(h)
        ratio = np.abs(m) / np.maximum(gh, float(rule.floor))
        grads = np.stack([r[i] for r in recent])
        snr = np.abs(grads.mean(0)) / np.maximum(grads.std(0), 1e-30)
        rows.append(dict(param=path, size=int(m.size), clipped=float(np.mean(ratio >= 1.0)),
                         m_median=float(np.median(np.abs(m))), gamma_h_median=float(np.median(gh)),
                         grad_snr_median=float(np.median(snr))))
    d, d_head = model_cfg.d_model, model_cfg.d_model // model_cfg.n_head
    qk = [float(np.linalg.norm(np.asarray(b["attn"]["qkv"]["kernel"])[:, :d].T
                               @ np.asarray(b["attn"]["qkv"]["kernel"])[:, d:2 * d], 2) / d_head ** 0.5)
          for b in (params["blocks"][i] for i in range(model_cfg.n_layer))]
    return dict(params=rows, qk_logit_scale=qk)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.charlm.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train a phase's cells that are not recorded yet")
    r.add_argument("--phase", required=True, choices=sorted(study_plan.PHASES))
    r.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--dry-run", action="store_true", help="list the cells only")
    r.add_argument("--resume", action="store_true", help="(always on: recorded cells are never rerun)")
    rep = sub.add_parser("report", help="write study.md and heatmap.png")
    d = sub.add_parser("diagnose", help="where Sophia clips, per parameter, after --at steps of one cell")
    d.add_argument("--optimizer", default="sophia-g", choices=("sophia-g", "sophia-h"))
    d.add_argument("--lr", type=float, default=3e-4)
    d.add_argument("--at", type=int, default=200)
    d.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="a TrainConfig field of the cell, e.g. --set sophia_gamma=0.05 (repeatable)")
    for q in (r, rep, d):
        q.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "run":
        return run_phase(args.phase, args.out, args.workers, not args.no_progress, args.dry_run)
    if args.command == "diagnose":
        cell = study_plan.Cell.make(args.optimizer, args.lr, **{k: json.loads(v) for k, v in
                                                                (item.split("=", 1) for item in args.set)})
        found = diagnose(cell, args.at)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"diagnose_{args.optimizer}_lr{args.lr:g}_at{args.at}.json"
        path.write_text(json.dumps(dict(cell=cell.to_dict(), at=args.at, **found), indent=1))
        print("attention-logit scale per block:", ", ".join(f"{x:.2f}" for x in found["qk_logit_scale"]))
        for row in found["params"]:
            print(f"{row['param']:42s} {row['size']:6d} clipped {row['clipped']:5.2f}  |m| {row['m_median']:.1e}  "
                  f"gamma·h {row['gamma_h_median']:.1e}  grad SNR {row['grad_snr_median']:.2f}")
        return 0
    doc = load(args.out / "runs.json")
    (args.out / "study.md").write_text(markdown(doc) + "\n")
    heatmap(doc, args.out / "heatmap.png")
    print(f"{len(doc['runs'])} runs: {args.out / 'study.md'}, {args.out / 'heatmap.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
