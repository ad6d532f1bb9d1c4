#!/usr/bin/env python3
r"""The QR decompositions of one SOAP refresh, against their flop count at the matmul rate.

A SOAP refresh orthogonalizes one ``d × d`` power-iteration product per preconditioned dimension
(``so_optax`` and ``torch_bridge`` use the LAPACK Householder QR of their framework). The flop floor
of ``bench_step.py`` counts each QR as ``(8/3)·d³`` flops at the measured matmul rate; this script
measures how far the QRs themselves are from that, on the benchmark workload::

    python benchmarks/bench_qr.py            # ~30 s on a 2-core CPU
    python benchmarks/bench_qr.py --reps 3

For every framework it times (i) all the workload's QRs issued together (one jitted function in
JAX; a Python loop in torch), and (ii) one ``d × d`` QR for each distinct ``d``, and measures the
``d × d × d`` matmul rates with ``bench_step``'s matmul-rate timer. In JAX, (i) is timed twice:
independent, as XLA:CPU runs them (concurrently), and in the lanes a SOAP refresh runs them in
(``so_optax._linalg.Lanes``: one at a time while LAPACK is multi-threaded). JAX runs twice: as
installed, and with its LAPACK (scipy's OpenBLAS) limited to one thread with ``threadpoolctl``.
The report is printed and written to ``benchmarks/results/qr-<device>.md``.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step as B  # noqa: E402


def qr_flops(d: int) -> float:
    """Householder QR of a ``d × d`` matrix with Q formed (geqrf + orgqr): ``2 × (4/3)·d³``."""
    return 8.0 / 3.0 * d**3


def refresh_qr_dims(shapes) -> list[int]:
    """The sizes of the factors a SOAP refresh orthogonalizes, one entry per factor."""
    return [d for s in shapes for d in B.soap_preconditioned_dims(s)[0]]


def median_ms(fn: Callable[[], None], reps: int) -> float:
    """Median of ``reps`` timed calls after one warm-up call, in ms."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def jax_timers(dims: list[int]) -> dict[str, Callable[[], None]]:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from so_optax import _lapack_lanes, _linalg  # noqa: PLC0415

    rng = jax.random.split(jax.random.PRNGKey(0), len(dims))
    mats = [jax.random.normal(k, (d, d), jnp.float32) for k, d in zip(rng, dims)]
    lanes = _lapack_lanes.lane_count()  # read now: the caller may have limited LAPACK's threads

    def all_qr(ms, count):
        in_lanes = _linalg.Lanes(count)
        return [in_lanes.run(lambda m: jnp.linalg.qr(m)[0], m) for m in ms]

    independent = jax.jit(lambda ms: all_qr(ms, None))
    in_lanes = jax.jit(lambda ms: all_qr(ms, lanes))
    one_qr = jax.jit(lambda m: jnp.linalg.qr(m)[0])
    timers = {"all": lambda: jax.block_until_ready(independent(mats)),
              f"lanes:{lanes or 'unbounded'}": lambda: jax.block_until_ready(in_lanes(mats))}
    for d in sorted(set(dims)):
        m = mats[dims.index(d)]
        timers[f"qr{d}"] = lambda m=m: jax.block_until_ready(one_qr(m))
    return timers


def torch_timers(dims: list[int]) -> dict[str, Callable[[], None]]:
    import torch  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(d, d, generator=gen) for d in dims]

    def qr(m):
        return torch.linalg.householder_product(*torch.geqrf(m))  # as torch_bridge does

    timers = {"all": lambda: [qr(m) for m in mats]}
    for d in sorted(set(dims)):
        m = mats[dims.index(d)]
        timers[f"qr{d}"] = lambda m=m: qr(m)
    return timers


def measure(timers: dict[str, Callable[[], None]], matmul_rate: Callable, dims: list[int], reps: int) -> dict:
    """QR timings, and each size's QR flops at the d×d×d matmul rate ``matmul_rate`` measures
    (``bench_step.jax_matmul_rate`` or ``torch_matmul_rate``)."""
    ms = {name: median_ms(fn, reps) for name, fn in timers.items()}
    lanes = next((name for name in ms if name.startswith("lanes:")), None)
    counts = sorted(collections.Counter(dims).items())
    rates = matmul_rate({(d, d, d): count for d, count in counts}, reps)["per_shape"]
    per_dim = []
    for (d, count), rate in zip(counts, rates):
        per_dim.append(dict(d=d, count=count, qr_ms=ms[f"qr{d}"], matmul_gflops=rate["gflops"],
                            qr_at_matmul_rate_ms=qr_flops(d) / (rate["gflops"] * 1e9) * 1e3))
    floor = sum(p["count"] * p["qr_at_matmul_rate_ms"] for p in per_dim)
    return dict(all_ms=ms["all"], floor_ms=floor, per_dim=per_dim,
                lanes=lanes and lanes.split(":")[1], lanes_ms=lanes and ms[lanes])


def render(results: dict[str, dict], dims: list[int]) -> str:
    total_gflop = sum(qr_flops(d) for d in dims) / 1e9
    lines = [
        f"# SOAP refresh QRs — {B._machine()}",
        "",
        f"- command: `python benchmarks/bench_qr.py` ({time.strftime('%Y-%m-%d %H:%M:%S')})",
        f"- {len(dims)} QRs per refresh "
        f"(d = {', '.join(f'{d}×{c}' for d, c in sorted(collections.Counter(dims).items()))}), "
        f"{total_gflop:.1f} GFLOP counted as (8/3)·d³ each",
        "- *at matmul rate*: each QR's flops at the rate of a d×d×d matmul measured in the same framework",
        "",
        "- *in so_optax's lanes*: the same QRs run as a SOAP refresh runs them (`so_optax._linalg.Lanes`);",
        "  *lanes* is how many run at once (unbounded: as XLA schedules them)",
        "",
        "| framework | all QRs of a refresh, ms | at matmul rate, ms | × | in so_optax's lanes, ms | lanes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        in_lanes = (f"{r['lanes_ms']:.1f} | {r['lanes']}" if r["lanes_ms"] is not None else "— | —")
        ratio = r["all_ms"] / r["floor_ms"]
        lines.append(f"| {name} | {r['all_ms']:.1f} | {r['floor_ms']:.1f} | {ratio:.2f} | {in_lanes} |")
    lines += ["", "One QR of each size, ms (× its flops at the d×d×d matmul rate):", "",
              "| d | count | " + " | ".join(results) + " |", "|---:|---:|" + "---:|" * len(results)]
    for i, p in enumerate(next(iter(results.values()))["per_dim"]):
        per_dim = [r["per_dim"][i] for r in results.values()]
        cells = [f"{q['qr_ms']:.1f} ({q['qr_ms'] / q['qr_at_matmul_rate_ms']:.1f}×)" for q in per_dim]
        lines.append(f"| {p['d']} | {p['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed calls per measurement (median)")
    p.add_argument("--workload", choices=("gpt", "tiny"), default="gpt")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    dims = refresh_qr_dims(B.make_workload(args.workload)["shapes"])
    results = {}
    B._status("JAX QRs (LAPACK as installed)")
    results["JAX, LAPACK as installed"] = measure(jax_timers(dims), B.jax_matmul_rate, dims, args.reps)
    threadpool_limits, why = B._import("threadpoolctl.threadpool_limits")
    if threadpool_limits is None:
        B._status(f"threadpoolctl unavailable ({why}): the one-thread JAX row is skipped")
    else:
        B._status("JAX QRs (LAPACK at one thread)")
        with threadpool_limits(1, user_api="blas"):  # jaxlib's LAPACK is loaded by the first row's QRs
            results["JAX, LAPACK at 1 thread"] = measure(jax_timers(dims), B.jax_matmul_rate, dims, args.reps)
    B._status("torch QRs")
    results["torch"] = measure(torch_timers(dims), B.torch_matmul_rate, dims, args.reps)

    B.publish_diagnostic(render(results, dims), args.out_dir, "qr", args.workload)


if __name__ == "__main__":
    main()
