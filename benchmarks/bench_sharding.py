#!/usr/bin/env python3
r"""so_optax on a device mesh: per-device state, decompositions per device, bytes communicated, compile time.

One command (from the repository root; ~5 min on a 2-core CPU)::

    python benchmarks/bench_sharding.py            # the GPT workload on 1, 2, 4 and 8 simulated devices
    python benchmarks/bench_sharding.py --quick    # a small GPT, 1 and 8 devices (smoke run)

It prints a markdown report and writes it to ``benchmarks/results/sharding-<name>.md`` with every number in
``sharding-<name>.json`` (``<name>`` defaults to e.g. ``cpu-2core``). The process simulates 8 CPU devices
(``--xla_force_host_platform_device_count``, set before JAX starts) and holds LAPACK to one thread.

What is measured, for N devices, the GPT's parameters split FSDP-style (dim 0 over a 1-D ``'fsdp'`` mesh)
------------------------------------------------------------------------------------------------------
Nothing here is timed except compilation: simulated devices share this machine's cores, so their step
times say nothing about a speed-up. Everything else is read from the arrays and from the compiled program.

* *State bytes per device*: the bytes of the shards each device holds of ``jax.jit(tx.init)(params)``
  (the largest over devices), against the bound ``1.25 · total/N + the largest factor``.
* *Decompositions per device*: the LAPACK eigh (``syevd``) and QR (``geqrf``) calls in the compiled SPMD
  program, which every device runs (each call counted times its batch), against ``⌈F/N⌉ + 2`` for the F
  factor matrices; and the balance of the owners' real work: the largest per-device ``Σ d³`` of the
  matrices it owns (:func:`so_optax._mesh_linalg.balance`) over the mean.
* *Bytes communicated per device*, from the collectives in the compiled program: a SOAP step is three
  ``while`` loops of zero or one trip (first call: the eighs; refresh: the QRs; regular), so a collective
  inside one of them belongs to that kind of step, and one outside all three (XLA hoists loop-invariant
  work out of them) to every step. Bytes a device receives: an all-gather ``(n−1)/n`` of its result, a
  reduce-scatter ``(n−1)`` times its result, an all-to-all ``(n−1)/n`` of its operand, an all-reduce
  ``2 (n−1)/n`` of its operand (a ring's reduce-scatter and all-gather), a collective-permute its
  result; ``n`` is the collective's group size. Given against the parameters' bytes. XLA:CPU emits
  all-reduces where XLA:GPU/TPU form reduce-scatters from an all-reduce and a slice, so on those backends
  the all-reduce share would be about half.
* *Compile time*: ``jax.jit(step).lower(...).compile()``, wall seconds (this machine, not quiet).

The step is ``optax.chain(so_optax.soap(...), optax.scale(-lr))`` (the benchmark GPT's SOAP settings of
``bench_step.py``) plus ``optax.apply_updates``; Sophia-G and Sophia-H are measured for their state only.
N = 1 is the program without a mesh (the one-device path). Explicit and Auto meshes give the same
placement; the tables use an Explicit mesh and the JSON has both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

DEVICES = 8
if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE), str(HERE.parent)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from bench_step import SOAP_LR, SOAP_OPTIONS, gpt_shapes  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import so_optax  # noqa: E402
from so_optax import _mesh_linalg  # noqa: E402
from tests.so_optax.hlo_text import computations as _computations  # noqa: E402  (the tests' HLO reader)

GPT = dict(D=256, L=4, V=96, F=1024, T=128)
SMALL = dict(D=64, L=1, V=24, F=256, T=32)
_ITEMSIZE = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
             "pred": 1}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# ------------------------------------------------------------------------------------- HLO reading


def _bytes_of(type_text: str) -> int:
    return sum(_ITEMSIZE[m.group(1)] * math.prod(int(d) for d in m.group(2).split(",") if d)
               for m in re.finditer(r"\b(\w+)\[([\d,]*)\]", type_text) if m.group(1) in _ITEMSIZE)


def _group_size(line: str, devices: int) -> int:
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line):
        sizes = {k.strip("'"): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(","))}
        return math.prod(sizes[a.strip().strip("'")] for a in m.group(2).split(",") if a.strip())
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]", line):
        return int(m.group(2))
    return devices


def collective_bytes(line: str, devices: int) -> tuple[str, float] | None:
    """``(op, bytes one device receives)`` of an HLO collective instruction line, else ``None``."""
    m = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(_COLLECTIVES) + r")(?:-start)?\(", line)
    if not m:
        return None
    result, op = _bytes_of(m.group(1)), m.group(2)
    n = _group_size(line, devices)
    factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-to-all": (n - 1) / n,
              "all-reduce": 2 * (n - 1) / n, "collective-permute": 1}[op]
    return op, result * factor


def _reached(comps: dict[str, list[str]], root: str) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            for m in re.finditer(r"(?:calls|to_apply|body|condition|branch_computations)=\{?([%\w.\-, ]+)\}?", line):
                todo.extend(n.strip().lstrip("%") for n in m.group(1).split(","))
    return seen


def step_profile(hlo: str, devices: int) -> dict:
    """Per kind of SOAP step (first call, refresh, regular): bytes each device receives (by collective)
    and the eigh/QR calls the program holds."""
    comps, entry = _computations(hlo)
    loops = {}
    for line in comps[entry]:
        if m := re.search(r" while\(.*body=%?([\w.\-]+)", line):
            inside = _reached(comps, m.group(1))
            text = "\n".join(x for c in inside for x in comps[c])
            loops["first" if "syevd" in text else "refresh" if "geqrf" in text else "regular"] = inside
    every_step = _reached(comps, entry) - set().union(*loops.values())
    out = {}
    for kind in ("first", "refresh", "regular"):
        by_op: dict[str, float] = {}
        for name in every_step | loops.get(kind, set()):
            for line in comps[name]:
                if found := collective_bytes(line, devices):
                    by_op[found[0]] = by_op.get(found[0], 0.0) + found[1]
        text = "\n".join(x for c in loops.get(kind, ()) for x in comps[c])
        out[kind] = dict(bytes=sum(by_op.values()), by_op=by_op,
                         eigh=len(re.findall(r'custom_call_target="\w*syevd', text)),
                         qr=len(re.findall(r'custom_call_target="\w*geqrf', text)))
    return out


# ------------------------------------------------------------------------------------- measuring


def _held(tree) -> dict[int, int]:
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def _params(shapes, mesh):
    def place(shape):
        x = jnp.zeros(shape, jnp.float32)
        if mesh is None:
            return x
        spec = P("fsdp", *([None] * (len(shape) - 1))) if shape[0] % mesh.shape["fsdp"] == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return {f"p{i:02d}": place(s) for i, s in enumerate(shapes)}


def _soap_tx():
    return optax.chain(so_optax.soap(**SOAP_OPTIONS), optax.scale(-SOAP_LR))


def measure(shapes, devices: int, kind: str) -> dict:
    """Every figure of one mesh (``devices`` = 1: no mesh)."""
    mesh = None if devices == 1 else jax.make_mesh((devices,), ("fsdp",), axis_types=(getattr(AxisType, kind),),
                                                   devices=jax.devices()[:devices])
    tx = _soap_tx()

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    def run():
        params = _params(shapes, mesh)
        state = jax.jit(tx.init)(params)
        t0 = time.perf_counter()
        hlo = jax.jit(step).lower(params, state, params).compile().as_text()
        compile_s = time.perf_counter() - t0
        sophia = {est: jax.jit(so_optax.sophia(estimator=est).init)(params) for est in ("gnb", "hutchinson")}
        return params, state, hlo, compile_s, sophia

    if mesh is None:
        params, state, hlo, compile_s, sophia = run()
    else:
        with jax.set_mesh(mesh):
            params, state, hlo, compile_s, sophia = run()
    sizes = [d for leaf in jax.tree.leaves(state[0].factors) for d in leaf.shape[:1]]
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    largest = max(x.nbytes for x in jax.tree.leaves(state[0].factors))
    held = _held(state)
    loads = [0] * devices
    for cls in _mesh_linalg.balance(sizes, devices):
        for dev, row in enumerate(cls.owners):
            loads[dev] += sum(sizes[k] ** 3 for k in row if k is not None)
    profile = step_profile(hlo, devices)
    return dict(
        devices=devices, kind=kind if mesh is not None else "none", factors=len(sizes),
        param_bytes=sum(x.nbytes for x in params.values()),
        state=dict(total=total, per_device_max=max(held.values()), per_device_min=min(held.values()),
                   bound=1.25 * total / devices + largest, largest_factor=largest),
        sophia={est: dict(total=sum(x.nbytes for x in jax.tree.leaves(s)), per_device_max=max(_held(s).values()))
                for est, s in sophia.items()},
        decompositions=dict(eigh=profile["first"]["eigh"], qr=profile["refresh"]["qr"],
                            bound=math.ceil(len(sizes) / devices) + 2,
                            loads=loads, load_max_over_mean=max(loads) / (sum(loads) / devices),
                            load_max_over_best=max(loads) / max(sum(loads) / devices, max(d**3 for d in sizes)),
                            classes=[(c.size, c.slots) for c in _mesh_linalg.balance(sizes, devices)]),
        communication={k: dict(bytes=v["bytes"], by_op=v["by_op"]) for k, v in profile.items()},
        compile_s=compile_s,
    )


# ------------------------------------------------------------------------------------- report


def report(results: list[dict], workload: dict, name: str) -> str:
    rows = [r for r in results if r["kind"] in ("none", "Explicit")]
    mb = 1e6
    pb = rows[0]["param_bytes"]
    lines = [
        f"# so_optax on a device mesh ({name})",
        "",
        f"Workload: the benchmark GPT's {len(gpt_shapes(**workload))} parameter tensors ({workload}), float32, "
        f"{pb / mb:.1f} MB; parameters split FSDP-style (dim 0 over `'fsdp'`). SOAP as in `bench_step.py`; "
        f"N = 1 is the one-device program (no mesh). Method: `benchmarks/README.md`, *Sharding*.",
        "",
        "| devices | SOAP state per device (MB) | bound 1.25·total/N + largest (MB) | Sophia-G state per device (MB) "
        "| eigh / QR per device | ⌈F/N⌉+2 | owners' Σd³: max / mean, max / max(mean, largest d³) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, d = r["state"], r["decompositions"]
        g = r["sophia"]["gnb"]
        lines.append(f"| {r['devices']} | {s['per_device_max'] / mb:.1f} of {s['total'] / mb:.1f} "
                     f"| {s['bound'] / mb:.1f} | {g['per_device_max'] / mb:.2f} of {g['total'] / mb:.2f} "
                     f"| {d['eigh']} / {d['qr']} | {d['bound']} | {d['load_max_over_mean']:.2f}, "
                     f"{d['load_max_over_best']:.2f} |")
    lines += ["", f"Bytes each device receives per step, × the parameters' {pb / mb:.1f} MB (SOAP; by collective "
              "in the JSON):", "", "| devices | regular step | refresh step | first call | compile (s) |",
              "|---|---|---|---|---|"]
    for r in rows:
        c = r["communication"]
        lines.append(f"| {r['devices']} | {c['regular']['bytes'] / pb:.2f}× ({c['regular']['bytes'] / mb:.1f} MB) "
                     f"| {c['refresh']['bytes'] / pb:.2f}× | {c['first']['bytes'] / pb:.2f}× | {r['compile_s']:.1f} |")
    auto = [r for r in results if r["kind"] == "Auto"]
    if auto:
        lines += ["", "Auto meshes, same figures: " + "; ".join(
            f"N={r['devices']}: state {r['state']['per_device_max'] / mb:.1f} MB/device, eigh/QR "
            f"{r['decompositions']['eigh']}/{r['decompositions']['qr']}, "
            f"regular {r['communication']['regular']['bytes'] / pb:.2f}×, "
            f"refresh {r['communication']['refresh']['bytes'] / pb:.2f}×" for r in auto) + "."]
    lines += ["", "Simulated devices share this machine's cores: no step times are reported, only compile times."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small GPT on 1 and 8 devices")
    parser.add_argument("--devices", default=None, help="comma-separated device counts (default 1,2,4,8)")
    parser.add_argument("--kinds", default="Explicit,Auto", help="mesh axis types to measure")
    parser.add_argument("--name", default=f"{jax.default_backend()}-{os.cpu_count()}core")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    workload = SMALL if args.quick else GPT
    counts = [int(n) for n in (args.devices or ("1,8" if args.quick else "1,2,4,8")).split(",")]
    shapes = gpt_shapes(**workload)
    results = []
    for n in counts:
        for kind in (["none"] if n == 1 else args.kinds.split(",")):
            print(f"[bench_sharding] {n} device(s), {kind}", file=sys.stderr, flush=True)
            results.append(measure(shapes, n, kind))
    text = report(results, workload, args.name)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sharding-{args.name}.md").write_text(text)
    meta = dict(workload=workload, jax=jax.__version__, python=platform.python_version(), machine=platform.machine(),
                cpus=os.cpu_count(), results=results)
    (out / f"sharding-{args.name}.json").write_text(json.dumps(meta, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
