#!/usr/bin/env python3
r"""Where a SOAP step's time goes: the operations of one regular step and one refresh step.

    python benchmarks/profile_soap.py                  # ~40 s on a 2-core CPU
    python benchmarks/profile_soap.py --workload tiny  # a few seconds

It runs the optimizer-only steps of ``bench_step.py`` on the benchmark workload, warms them up through
the first call and one refresh, then profiles the next refresh step and the regular step after it:

* JAX: the jitted, donated ``so_optax.soap`` step under ``jax.profiler`` (a Perfetto trace). The operations
  XLA:CPU ran are grouped by kind, their HLO name without its number: ``geqrf`` + ``householder_product``
  are LAPACK's QR (Q formed), ``eigh`` its eigendecomposition, ``ynn_fusion`` / ``dot`` / ``fusion``
  XLA's matmuls, ``copy`` / ``transpose`` / ``*_fusion`` elementwise and layout work.
* torch: ``torch_bridge.SOAP`` under ``torch.profiler``, grouped by aten operator (self CPU time).

Each kind's time is summed over its executions on every thread, so a step's total can exceed its wall time
where operations overlap (XLA:CPU runs independent operations concurrently; LAPACK and the matmul kernels
may run several threads inside one operation, which counts once). The report is printed and written to
``benchmarks/results/profile-<device>.md``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step as B  # noqa: E402

# Calls before the profiled refresh: the first call builds the bases; call c refreshes when c is a positive
# multiple of the refresh frequency (in both frameworks), so call WARM_CALLS is a refresh.
WARM_CALLS = 2 * B.SOAP_FREQUENCY

# Trace events of XLA:CPU's operations are named after their HLO instruction ("geqrf.354"); control-flow
# instructions enclose other operations and are not counted.
_HLO_OP = re.compile(r"^([A-Za-z_][\w-]*)\.\d+$")
_CONTAINERS = {"while", "conditional", "call"}


def _profile(label: str, kinds: collections.Counter, counts: collections.Counter, wall_ms: float) -> dict[str, Any]:
    return dict(label=label, wall_ms=wall_ms, ms=dict(kinds), count=dict(counts))


def hlo_kinds(
    events: list[dict[str, Any]], start_us: float, end_us: float
) -> tuple[collections.Counter, collections.Counter]:
    """Time (ms) and count per HLO operation kind among the complete trace events in ``[start, end]``."""
    ms, count = collections.Counter(), collections.Counter()
    for e in events:
        match = _HLO_OP.match(e.get("name", ""))
        if e.get("ph") != "X" or not match or not start_us <= e["ts"] <= end_us:
            continue
        kind = match.group(1)
        if kind in _CONTAINERS:
            continue
        ms[kind] += e.get("dur", 0) / 1e3
        count[kind] += 1
    return ms, count


def _read_trace(trace_dir: str) -> list[dict[str, Any]]:
    files = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[0]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def profile_jax(shapes) -> list[dict[str, Any]]:
    """One refresh step and the regular step after it, of the jitted so_optax.soap step of bench_step."""
    import jax  # noqa: PLC0415
    import optax  # noqa: PLC0415

    import so_optax  # noqa: PLC0415

    params, grad_sets = B._jax_init(shapes)
    tx = optax.chain(so_optax.soap(**B.SOAP_OPTIONS), optax.scale(-B.SOAP_LR))
    state = jax.jit(tx.init)(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled, _ = B._compile(step, params, state, grad_sets[0])
    box = [params, state]

    def call(i):
        box[0], box[1] = compiled(box[0], box[1], grad_sets[i % B.GRAD_SETS])
        jax.block_until_ready(box)

    for i in range(WARM_CALLS):
        call(i)
    labels = ("refresh step", "regular step")
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for i, label in enumerate(labels):
            with jax.profiler.TraceAnnotation(f"so-optax profile: {label}"):
                t0 = time.perf_counter()
                call(WARM_CALLS + i)
                walls.append((time.perf_counter() - t0) * 1e3)
        jax.profiler.stop_trace()
        events = _read_trace(trace_dir)
    out = []
    for label, wall in zip(labels, walls):
        window = next(e for e in events if e.get("name") == f"so-optax profile: {label}" and e.get("ph") == "X")
        out.append(_profile(label, *hlo_kinds(events, window["ts"], window["ts"] + window["dur"]), wall))
    return out


def profile_torch(shapes) -> list[dict[str, Any]]:
    """One refresh step and the regular step after it, of torch_bridge.SOAP on bench_step's gradients."""
    import torch  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    from torch_bridge import SOAP  # noqa: PLC0415

    params, grad_sets = B._torch_init(shapes)
    opt = SOAP(params, lr=B.SOAP_LR, **B.SOAP_OPTIONS)

    @torch.no_grad()
    def call(i):
        for p, g in zip(params, grad_sets[i % B.GRAD_SETS]):
            p.grad = g
        opt.step()

    for i in range(WARM_CALLS):
        call(i)
    out = []
    for i, label in enumerate(("refresh step", "regular step")):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            call(WARM_CALLS + i)
            wall = (time.perf_counter() - t0) * 1e3
        ms, count = collections.Counter(), collections.Counter()
        for avg in prof.key_averages():
            if avg.key.startswith("aten::"):
                op = avg.key[len("aten::"):]
                ms[op] += avg.self_cpu_time_total / 1e3
                count[op] += avg.count
        out.append(_profile(label, ms, count, wall))
    return out


def render(results: dict[str, list[dict[str, Any]]], workload: str, top: int) -> str:
    lines = [
        f"# Where a SOAP step's time goes — {B._machine()}",
        "",
        f"- command: `python benchmarks/profile_soap.py` ({time.strftime('%Y-%m-%d %H:%M:%S')}), workload {workload}",
        "- ms per operation kind, summed over its executions on every thread (count in parentheses); the",
        "  wall time of the step is in the header. See the script's docstring for the kinds.",
    ]
    for framework, steps in results.items():
        refresh, regular = steps
        kinds = sorted(set(refresh["ms"]) | set(regular["ms"]), key=lambda k: -refresh["ms"].get(k, 0.0))
        shown, rest = kinds[:top], kinds[top:]
        lines += ["", f"## {framework}", "",
                  f"| operation | refresh step ({refresh['wall_ms']:.0f} ms wall) "
                  f"| regular step ({regular['wall_ms']:.0f} ms wall) |",
                  "|---|---:|---:|"]

        def cell(step, names):
            return f"{sum(step['ms'].get(k, 0.0) for k in names):.1f} ({sum(step['count'].get(k, 0) for k in names)})"

        for k in shown:
            lines.append(f"| {k} | {cell(refresh, [k])} | {cell(regular, [k])} |")
        if rest:
            lines.append(f"| {len(rest)} other kinds | {cell(refresh, rest)} | {cell(regular, rest)} |")
        lines.append(f"| **all** | {cell(refresh, kinds)} | {cell(regular, kinds)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, list[dict[str, Any]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("gpt", "tiny"), default="gpt")
    p.add_argument("--only", choices=("jax", "torch"), help="profile one framework")
    p.add_argument("--top", type=int, default=12, help="operation kinds listed per framework (the rest summed)")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    shapes = B.make_workload(args.workload)["shapes"]
    runners: dict[str, Callable[[Any], list[dict[str, Any]]]] = {
        "JAX (so_optax.soap, jit)": profile_jax, "torch (torch_bridge.SOAP)": profile_torch}
    results = {}
    for name, run in runners.items():
        if args.only and not name.lower().startswith(args.only):
            continue
        B._status(f"profiling {name} ...")
        results[name] = run(shapes)
    B.publish_diagnostic(render(results, args.workload, args.top), args.out_dir, "profile", args.workload)
    return results


if __name__ == "__main__":
    main()
