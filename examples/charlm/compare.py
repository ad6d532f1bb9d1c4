"""Training comparison: SOAP and Sophia (G / H) against AdamW on a character-level GPT.

Run from the repository root::

    python -m examples.charlm.compare            # the small default (a few minutes on 2 CPU cores)
    python -m examples.charlm.compare --full     # the issue's scale: d=128, 2 layers, context 64,
                                                 # batch 32, 600 steps, lr grid x{0.5, 1, 2, 4}, both frameworks

For every (framework, optimizer) pair the peak learning rate is swept over the same relative grid
around a per-optimizer base (``common.BASE_LR``), every run with the same warm-up + cosine schedule,
weight decay, initial weights and batches. The best learning rate is the one with the lowest final
held-out loss. The table reports, per framework, that loss and the number of steps each optimizer
needed to reach AdamW's final held-out loss (first periodic evaluation at or below it). Results go to
``<out>/charlm_<tag>.{json,md,png}``, by default in ``examples/charlm/runs/`` (git-ignored; the measured
full comparison that the READMEs show is committed in ``examples/charlm/results/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from . import common, data, options

FRAMEWORKS = ("jax", "torch")

# The small default: the full model and data, fewer steps, the base learning rate only.
DEFAULT = dict(steps=200, lr_grid=(1.0,), frameworks=("jax", "torch"), optimizers=common.OPTIMIZERS,
               d_model=128, n_layer=2, context=64, batch_size=32, eval_every=25)
# Final held-out losses of the small default run, measured on a 2-core x86 CPU (README, Quickstart). Another
# machine's kernels round differently; expect these to within about 0.02.
# Sophia: at its recipe (lr 3e-3, beta1 0.9, gamma 0.2, warm-up 70 %), measured in the study (phase default-200-2).
DEFAULT_EXPECTED = {"jax": {"adamw": 2.180, "soap": 1.913, "sophia-g": 2.077, "sophia-h": 2.031},
                    "torch": {"adamw": 2.180, "soap": 1.924, "sophia-g": 2.213, "sophia-h": 2.191}}
# The scale.
FULL = dict(steps=600, lr_grid=(0.5, 1.0, 2.0, 4.0), frameworks=("jax", "torch"),
            optimizers=common.OPTIMIZERS, d_model=128, n_layer=2, context=64, batch_size=32,
            eval_every=25)


def _csv(kind):
    def parse(s: str):
        return tuple(kind(x) for x in s.split(",") if x.strip())
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.charlm.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the issue's scale (see above)")
    p.add_argument("--frameworks", type=_csv(str), help="comma list of: jax, torch")
    p.add_argument("--optimizers", type=_csv(str), help=f"comma list of: {', '.join(common.ALL_OPTIMIZERS)}")
    p.add_argument("--lr-grid", type=_csv(float), help="multipliers of each optimizer's base lr, e.g. 0.5,1,2")
    p.add_argument("--base-lr", action="append", default=[], metavar="OPT=LR",
                   help="override a base learning rate, e.g. --base-lr soap=2e-3 (repeatable)")
    p.add_argument("--steps", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--context", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="data, init and Sophia sampling seed")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "runs",
                   help="output folder (default examples/charlm/runs, git-ignored)")
    p.add_argument("--tag", help="output file stem suffix (default: 'full' or 'default')")
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs already in <out>/charlm_<tag>.json when the configuration matches")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="runs in parallel, in as many processes, each single-threaded (default: the "
                        "number of CPUs, at most 8); 1 = one after the other, with the frameworks' "
                        "default threading")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    options.add_arguments(p)
    args = p.parse_args(argv)

    preset = FULL if args.full else DEFAULT
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tag = args.tag or ("full" if args.full else "default")
    for fw in args.frameworks:
        if fw not in FRAMEWORKS:
            p.error(f"--frameworks: unknown {fw!r}; expected {FRAMEWORKS}")
    for opt in args.optimizers:
        if opt not in common.ALL_OPTIMIZERS:
            p.error(f"--optimizers: unknown {opt!r}; expected {common.ALL_OPTIMIZERS}")
    args.base_lrs = dict(common.BASE_LR)
    for item in args.base_lr:
        name, _, value = item.partition("=")
        if name not in common.ALL_OPTIMIZERS or not value:
            p.error(f"--base-lr: expected OPT=LR with OPT in {common.ALL_OPTIMIZERS}, got {item!r}")
        args.base_lrs[name] = float(value)
    return args


def expected_line(args: argparse.Namespace, config: dict, corpus: data.Corpus, rows: list[dict]) -> str | None:
    """For the default run (no arguments that change a result), the measured figures beside these."""
    default = parse_args([])
    if build_configs(default, corpus)[2] != config or any(
            getattr(args, key) != getattr(default, key) for key in ("lr_grid", "frameworks", "optimizers", "base_lrs")):
        return None
    pairs = [f"{r['framework']} {r['optimizer']} {r['final_eval']:.3f} "
             f"({DEFAULT_EXPECTED[r['framework']][r['optimizer']]:.3f})" for r in rows]
    return ("final held-out loss, this run (expected on a 2-core CPU, to about 0.02): " + ", ".join(pairs))


def available(framework: str, optimizer: str) -> str | None:
    """None if the optimizer can be built, else why not (our packages may be absent)."""
    if optimizer == "adamw":
        return None
    if optimizer in common.CONTROLS:
        return None if framework == "jax" else "a control, JAX only"
    try:
        if framework == "jax":
            import so_optax
            attr = "soap" if optimizer == "soap" else "sophia"
            getattr(so_optax, attr)
        else:
            import torch_bridge
            attr = "SOAP" if optimizer == "soap" else "Sophia"
            getattr(torch_bridge, attr)
    except (ImportError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# --- Analysis -----------------------------------------------------------------------------------

def steps_to_reach(steps: list[int], losses: list[float], target: float) -> int | None:
    """First step at which ``losses`` is at or below ``target`` (None if never)."""
    for s, loss in zip(steps, losses):
        if s > 0 and math.isfinite(loss) and loss <= target:
            return s
    return None


def windowed_train_loss(run: common.RunResult, every: int) -> tuple[list[int], list[float]]:
    """Mean training loss over each evaluation interval, keyed by the interval's last step."""
    xs, ys = [], []
    for end in range(every, len(run.train_loss) + 1, every):
        xs.append(end)
        ys.append(sum(run.train_loss[end - every:end]) / every)
    return xs, ys


def best_runs(runs: list[common.RunResult]) -> dict[tuple[str, str], common.RunResult]:
    best: dict[tuple[str, str], common.RunResult] = {}
    for r in runs:
        key = (r.framework, r.optimizer)
        if key not in best or r.final_eval < best[key].final_eval:
            best[key] = r
    return best


def summarize(runs: list[common.RunResult], eval_every: int) -> list[dict]:
    best = best_runs(runs)
    rows = []
    for fw in FRAMEWORKS:
        ref = best.get((fw, "adamw"))
        ref_eval = ref.final_eval if ref else None
        ref_train = windowed_train_loss(ref, eval_every)[1][-1] if ref and ref.train_loss else None
        for opt in common.ALL_OPTIMIZERS:
            r = best.get((fw, opt))
            if r is None:
                continue
            sweep = sorted((x for x in runs if (x.framework, x.optimizer) == (fw, opt)), key=lambda x: x.lr)
            row = dict(framework=fw, optimizer=opt, lr=r.lr, final_eval=r.final_eval,
                       sweep={f"{x.lr:.3g}": x.final_eval for x in sweep},
                       ms_per_step=r.ms_per_step, steps=r.steps,
                       steps_to_adamw_eval=None, steps_to_adamw_train=None,
                       win_rate=r.win_rate[-1] if r.win_rate else None)
            if ref_eval is not None and math.isfinite(ref_eval):
                row["steps_to_adamw_eval"] = steps_to_reach(r.eval_steps, r.eval_loss, ref_eval)
            if ref_train is not None and r.train_loss:
                xs, ys = windowed_train_loss(r, eval_every)
                row["steps_to_adamw_train"] = steps_to_reach(xs, ys, ref_train)
            rows.append(row)
    return rows


def _fmt_steps(s: int | None, total: int) -> str:
    return "not reached" if s is None else f"{s} ({s / total:.2f}×)"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| framework | optimizer | best peak lr | final eval loss | steps to AdamW's final eval loss "
        "| steps to AdamW's final train loss | sweep: lr → final eval | ms / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sweep = ", ".join(f"{lr}: {v:.3f}" if math.isfinite(v) else f"{lr}: diverged"
                          for lr, v in r["sweep"].items())
        lines.append(
            f"| {r['framework']} | {r['optimizer']} | {r['lr']:.3g} | {r['final_eval']:.4f} "
            f"| {_fmt_steps(r['steps_to_adamw_eval'], r['steps'])} "
            f"| {_fmt_steps(r['steps_to_adamw_train'], r['steps'])} | {sweep} | {r['ms_per_step']:.0f} |")
    wins = [f"{r['framework']} {r['optimizer']} {r['win_rate']:.2f}" for r in rows
            if r.get("win_rate") is not None]
    if wins:
        lines += ["", "Sophia win rate (fraction of coordinates not clipped) at the last step: "
                  + ", ".join(wins) + "."]
    return "\n".join(lines)


# Per optimizer: color, marker and line style, so that curves on top of each other stay apart.
STYLE = {"adamw": ("black", "o", "-"), "soap": ("tab:blue", "s", "-"),
         "sophia-g": ("tab:orange", "^", "-"), "sophia-h": ("tab:green", "v", "-."),
         "signum": ("tab:purple", "D", ":"), "lion": ("tab:brown", "x", ":")}


def plot(runs: list[common.RunResult], rows: list[dict], eval_every: int, path: Path, title: str):
    """Per framework: held-out loss (markers) and windowed training loss (dashed) of each optimizer's best
    run, with AdamW's final held-out loss as the target line; a learning-rate sweep panel when some
    optimizer was run at more than one learning rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    best = best_runs(runs)
    frameworks = [fw for fw in FRAMEWORKS if any(k[0] == fw for k in best)]
    swept = any(len({r.lr for r in runs if (r.framework, r.optimizer) == key}) > 1 for key in best)
    panels = len(frameworks) + swept
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.8), squeeze=False)
    axes = axes[0]
    finite = [x for r in best.values() for x in r.eval_loss if math.isfinite(x)]
    finite_train = [x for r in best.values() for x in windowed_train_loss(r, eval_every)[1]
                    if math.isfinite(x)]
    lo = min(finite + finite_train) - 0.05 if finite else 0.0
    for ax, fw in zip(axes, frameworks):
        optimizers = []
        for opt in common.ALL_OPTIMIZERS:
            r = best.get((fw, opt))
            if r is None:
                continue
            color, marker, ls = STYLE[opt]
            optimizers += ax.plot(r.eval_steps, r.eval_loss, ls=ls, marker=marker, ms=4, lw=1.4, color=color,
                                  mfc="none" if opt == "sophia-h" else color, label=f"{opt} (lr {r.lr:.2g})")
            xs, ys = windowed_train_loss(r, eval_every)
            ax.plot(xs, ys, ls="--", color=color, alpha=0.55, lw=1)
        kinds = [Line2D([], [], color="gray", marker="o", ms=4, lw=1.4, label="held-out loss"),
                 Line2D([], [], color="gray", ls="--", alpha=0.7, lw=1, label=f"train loss ({eval_every}-step mean)")]
        ref = best.get((fw, "adamw"))
        if ref is not None and math.isfinite(ref.final_eval):
            kinds.append(ax.axhline(ref.final_eval, color="gray", lw=0.9, ls=":",
                                    label=f"target: AdamW's final held-out loss {ref.final_eval:.3f}"))
        ax.set_title(f"{fw}: held-out and train loss of each optimizer's best run", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / char)")
        ax.set_ylim(lo, min(3.5, max(finite) + 0.05) if finite else None)
        ax.grid(alpha=0.3)
        ax.add_artist(ax.legend(handles=kinds, fontsize=7, loc="lower left"))
        ax.legend(handles=optimizers, fontsize=7, loc="upper right")
    if swept:
        ax = axes[-1]
        for fw, ls in (("jax", "-"), ("torch", "--")):
            for opt in common.ALL_OPTIMIZERS:
                sweep = sorted((r for r in runs if (r.framework, r.optimizer) == (fw, opt)), key=lambda r: r.lr)
                if not sweep:
                    continue
                ys = [r.final_eval if math.isfinite(r.final_eval) else float("nan") for r in sweep]
                color, marker, _ = STYLE[opt]
                ax.plot([r.lr for r in sweep], ys, marker=marker, ls=ls, color=color, label=f"{fw} {opt}")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final held-out loss")
        ax.set_title("learning-rate sweep", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- Driver -------------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(slots) -> None:
    """In a worker process, before JAX or torch is imported: one intra-op thread each."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    _WORKER["slot"] = slots.get()


def _run_one(fw: str, opt: str, lr: float, model_cfg, train_cfg, progress: bool, desc: str,
             in_worker: bool = False) -> common.RunResult:
    if "corpus" not in _WORKER:
        _WORKER["corpus"] = data.load_corpus()
    if fw == "jax":
        from . import train_jax as trainer
    else:
        import torch
        if in_worker:
            torch.set_num_threads(1)
        from . import train_torch as trainer
    return trainer.train(opt, lr, model_cfg, train_cfg, _WORKER["corpus"], progress=progress,
                         desc=desc, position=_WORKER.get("slot") if in_worker else None)


def _cost(fw: str, opt: str) -> float:
    """Rough relative cost of a run, to start the longest first when running in parallel."""
    return {"soap": 1.6, "sophia-g": 1.3, "sophia-h": 1.6}.get(opt, 1.0) * (1.5 if fw == "torch" else 1.0)


def build_configs(args: argparse.Namespace, corpus: data.Corpus):
    """The model configuration, the shared and the per-optimizer training configurations (shared, then
    ``common.RECIPES``, then the command line), and their JSON record (what ``--resume`` matches)."""
    model_cfg = common.ModelConfig(vocab_size=corpus.vocab_size, context=args.context,
                                   d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                                   tie_embeddings=args.tie_embeddings)
    train_cfg = common.TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                                   eval_batches=args.eval_batches, data_seed=args.seed,
                                   init_seed=args.seed, opt_seed=args.seed)
    train_cfg = common.recipe_config("", train_cfg, options.explicit(args))
    per_optimizer = options.train_configs(args, train_cfg, args.optimizers)
    config = dict(model=dataclasses.asdict(model_cfg), train=dataclasses.asdict(train_cfg),
                  per_optimizer={opt: common.settings(c) for opt, c in per_optimizer.items()},
                  hyper=dict(adamw=common.ADAMW, soap=common.SOAP, sophia=common.SOPHIA,
                             lion=common.LION))
    config = json.loads(json.dumps(config))  # tuples -> lists, for comparison with a loaded file
    return model_cfg, train_cfg, per_optimizer, config


def main(argv=None) -> int:
    args = parse_args(argv)
    corpus = data.load_corpus()
    model_cfg, train_cfg, per_optimizer, config = build_configs(args, corpus)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"charlm_{args.tag}"

    runs: list[common.RunResult] = []
    if args.resume and stem.with_suffix(".json").exists():
        old = json.loads(stem.with_suffix(".json").read_text())
        if old.get("config") == config:
            runs = [common.RunResult.from_dict(d) for d in old["runs"]]
            print(f"resuming: {len(runs)} runs from {stem.with_suffix('.json')}", file=sys.stderr)
        else:
            print("--resume: configuration differs, starting over", file=sys.stderr)

    reused = len(runs)
    plan = []
    for fw in args.frameworks:
        for opt in args.optimizers:
            why = available(fw, opt)
            if why is not None:
                print(f"skipping {fw} {opt}: not importable ({why})", file=sys.stderr)
                continue
            for mult in args.lr_grid:
                plan.append((fw, opt, args.base_lrs[opt] * mult))
    print(f"charlm: {corpus.n_chars:,} characters of pydoc_data.topics (Python {platform.python_version()}), "
          f"vocab {corpus.vocab_size}, {len(corpus.train):,} train / {len(corpus.val):,} held-out; "
          f"{len(plan)} runs of {train_cfg.steps} steps", file=sys.stderr)

    def save():
        doc = dict(config=config, corpus=dict(n_chars=corpus.n_chars, sha256=corpus.sha256,
                                               python=platform.python_version()),
                   machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
                   runs=[r.to_dict() for r in runs])
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))

    todo = [(i, fw, opt, lr) for i, (fw, opt, lr) in enumerate(plan)
            if not any((r.framework, r.optimizer) == (fw, opt) and math.isclose(r.lr, lr) for r in runs)]
    progress = not args.no_progress

    def finished(i, run: common.RunResult):
        runs.append(run)
        save()
        print(f"done [{i + 1}/{len(plan)}] {run.framework} {run.optimizer} lr={run.lr:.2g}: final held-out "
              f"loss {run.final_eval:.4f}, {run.ms_per_step:.0f} ms/step", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    workers = max(1, min(args.workers, len(todo)))
    if workers == 1:
        _WORKER["corpus"] = corpus
        for i, fw, opt, lr in todo:
            desc = f"[{i + 1}/{len(plan)}] {fw:5s} {opt:8s} lr={lr:.1e}"
            finished(i, _run_one(fw, opt, lr, model_cfg, per_optimizer[opt], progress, desc))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: thread settings apply
        slots = ctx.Queue()
        for s in range(workers):
            slots.put(s)
        todo.sort(key=lambda t: -_cost(t[1], t[2]))  # longest first
        print(f"{len(todo)} runs on {workers} worker processes, one thread each", file=sys.stderr)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(slots,)) as pool:
            futures = {pool.submit(_run_one, fw, opt, lr, model_cfg, per_optimizer[opt], progress,
                                   f"[{i + 1}/{len(plan)}] {fw:5s} {opt:8s} lr={lr:.1e}", True): i
                       for i, fw, opt, lr in todo}
            for fut in as_completed(futures):
                finished(futures[fut], fut.result())
    wall = time.perf_counter() - t0
    save()

    timing = (f"Wall-clock of this invocation: {wall:.0f} s for {len(todo)} runs ({workers} worker "
              f"process{'es' if workers > 1 else ''}, {os.cpu_count()} CPUs)")
    if reused:
        timing += (f"; {reused} runs reused from an earlier invocation (--resume); the training time "
                   f"of all runs adds up to {sum(r.wall_s + r.first_step_s for r in runs):.0f} s")
    timing += "."
    rows = summarize(runs, train_cfg.eval_every)
    table = markdown_table(rows)
    header = (f"Character-level GPT on pydoc_data.topics (d={model_cfg.d_model}, {model_cfg.n_layer} layers, "
              f"context {model_cfg.context}, batch {train_cfg.batch_size}, {train_cfg.steps} steps, "
              f"warm-up {train_cfg.warmup_steps} + cosine to {train_cfg.final_lr_frac:g}×, "
              f"weight decay {train_cfg.weight_decay:g}, lr grid ×{'/'.join(f'{m:g}' for m in args.lr_grid)}).")
    own = options.differences(per_optimizer, train_cfg)
    if own:
        header += f" Each optimizer's own settings: {own}."
    plot(runs, rows, train_cfg.eval_every, stem.with_suffix(".png"), header.split(" (")[0])
    md = "\n\n".join([header, table, f"Held-out loss: mean over {train_cfg.eval_batches} fixed batches of "
                      f"the last 10% of the text, every {train_cfg.eval_every} steps. Steps to AdamW: first "
                      f"evaluation at or below the best AdamW run's final value (same framework); train: "
                      f"{train_cfg.eval_every}-step mean training loss. " + timing,
                      f"![loss curves]({stem.with_suffix('.png').name})"])
    stem.with_suffix(".md").write_text(md + "\n")
    print(table)
    expected = expected_line(args, config, corpus, rows)
    if expected:
        print(f"\n{expected}")
    print(f"\nwall-clock {wall:.0f} s; table: {stem.with_suffix('.md')}; plot: {stem.with_suffix('.png')}; "
          f"runs: {stem.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
