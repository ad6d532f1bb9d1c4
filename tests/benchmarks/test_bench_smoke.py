"""Smoke test of the benchmark harness (benchmarks/bench_step.py): it runs end to end and writes its
report. No timing assertions; the timed figures come from a full run on a quiet machine."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "bench_step.py"


def _load_script(name: str):
    """``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def _bench_module():
    """``bench_step`` loaded once: the tests only call its pure helpers."""
    return _load_script("bench_step")


def test_soap_flop_formula():
    b = _bench_module()
    m, n = 256, 768
    f = b.soap_flops([(m, n), (n,)], precondition_frequency=10)
    assert f["step_flops"] == 6 * m * n * (m + n)  # 1-D parameters are not preconditioned
    assert f["refresh_flops"] == pytest.approx((2 + 8 / 3) * (m**3 + n**3) + 4 * m * n * (m + n))
    assert f["amortized_flops"] == pytest.approx(f["step_flops"] + f["refresh_flops"] / 10)
    assert b.mix_flops(b.soap_matmul_mix([(m, n), (n,)])) == f["step_flops"]


def test_workload_is_the_benchmark_gpt_s_parameters():
    """The optimizer-only benchmarks' shapes are the parameters the training-step GPT trains, in both
    frameworks: 52 tensors, 3.2 M parameters (the workload README and benchmarks/README.md describe)."""
    pytest.importorskip("torch")
    b = _bench_module()
    wl = b.make_workload("gpt")
    torch_params = b.torch_gpt(wl["cfg"])[0]()
    assert [tuple(p.shape) for p in torch_params] == wl["shapes"]
    assert len(wl["shapes"]) == 52 and round(sum(math.prod(s) for s in wl["shapes"]) / 1e6, 1) == 3.2
    jax = pytest.importorskip("jax")
    jax_params = jax.eval_shape(b.jax_gpt(wl["cfg"])[0])
    assert [tuple(p.shape) for p in jax_params] == wl["shapes"]


def test_rounds_are_round_robin_and_keep_the_best():
    """Suite.flush: the benchmarks run round-robin, each keeps its lowest amortized round (with that round's
    floor), and every round's figures are recorded."""
    from types import SimpleNamespace

    b = _bench_module()
    S = b.Suite(SimpleNamespace(rounds=3, filter=None, timeout=60))
    log, times = [], {"A": iter([5.0, 3.0, 4.0]), "B": iter([2.0, 2.5, 1.0])}

    def bench(name):
        def fn():
            log.append(name)
            t = next(times[name])
            return dict(median_ms=t, amortized_ms=t, floor_ms=t / 2)
        return fn

    S.run("sec", "A", "jax", "ours", bench("A"))
    S.run("sec", "B", "torch", "peer", bench("B"))
    S.flush()
    assert log == ["A", "B"] * 3
    best = {e["name"]: (e["amortized_ms"], e["floor_ms"]) for e in S.results["sec"]}
    assert best == {"A": (3.0, 1.5), "B": (1.0, 0.5)}
    assert [r["floor_ms"] for r in S.results["sec"][0]["rounds"]] == [2.5, 1.5, 2.0]


def _rate(b, gflop, ms_small, ms_big):
    """A matmul-rate report of the two-shape mix below, from its per-shape times in ms."""
    per = [dict(shape=[2, 2, 2], count=1, ms=ms_small, gflops=0.0),
           dict(shape=[4, 4, 4], count=1, ms=ms_big, gflops=0.0)]
    return b._rate_report(per, gflop)


def test_each_row_is_floored_by_the_rates_around_its_window_and_the_run_by_its_fastest():
    """A SOAP row's floor comes from the matmul rates measured right before and right after its timed window
    (the faster of the two, shape by shape); the run floor from the fastest of all measurements, shape by
    shape; every measurement's mix rate is recorded."""
    from types import SimpleNamespace

    b = _bench_module()
    mix = {(2, 2, 2): 1, (4, 4, 4): 1}
    gflop = b.mix_flops(mix) / 1e9
    flops = dict(amortized_flops=gflop * 1e9)  # the floor's flops are exactly the mix's: floor = mix time

    window = [_rate(b, gflop, 2.0, 5.0), _rate(b, gflop, 3.0, 4.0)]  # before and after the steps
    res = dict(median_ms=9.0, amortized_ms=12.0, **b._window_floor(flops, window))
    assert res["floor_ms"] == pytest.approx(2.0 + 4.0)
    assert res["window_gflops"] == pytest.approx([gflop / 7e-3, gflop / 7e-3])

    runs = [_rate(b, gflop, 1.0, 8.0), *window, _rate(b, gflop, 8.0, 8.0)]
    info = b._soap_info(flops, mix, {"jax": runs, "torch": runs[-1:]})
    assert info["floors_ms"]["jax"] == pytest.approx(1.0 + 4.0) and info["floors_ms"]["torch"] == pytest.approx(16.0)
    assert info["measured_gflops"]["jax"] == pytest.approx([gflop / t for t in (9e-3, 7e-3, 7e-3, 16e-3)])
    S = b.Suite(SimpleNamespace(rounds=1, filter=None, timeout=60))
    S.soap_info = info
    S.results["soap"] = [dict(name="ours", framework="jax", algo="soap", status="ok", **res)]
    b._soap_floors(S)
    row = S.results["soap"][0]
    assert row["x_floor"] == pytest.approx(12.0 / 6.0) and row["x_run_floor"] == pytest.approx(12.0 / 5.0)


def test_ratios_to_adamw_pair_each_round_with_adamws():
    """× AdamW is the median of the within-round ratios; the best-round ratio is kept beside it; a row whose
    rounds do not pair up with AdamW's falls back to the best-round ratio."""
    b = _bench_module()

    def row(name, algo, amortized, fw="torch"):
        return dict(name=name, framework=fw, algo=algo, status="ok", amortized_ms=min(amortized),
                    rounds=[dict(amortized_ms=t) for t in amortized])

    entries = [row("AdamW", "adamw", [100.0, 130.0, 160.0]), row("Sophia-G", "sophia-g", [105.0, 156.0, 160.0]),
               row("short", "sophia-h", [120.0, 90.0]), row("grad", "grad", [50.0, 50.0, 50.0])]
    b._ratio_to_adamw(entries, "amortized_ms")
    g, short, grad = entries[1], entries[2], entries[3]
    assert g["x_adamw"] == pytest.approx(1.05) and g["x_adamw_best"] == pytest.approx(1.05)
    entries[1] = g = row("Sophia-G", "sophia-g", [160.0, 136.5, 120.0])  # its best round met AdamW's worst
    b._ratio_to_adamw(entries, "amortized_ms")
    assert g["x_adamw"] == pytest.approx(1.05) and g["x_adamw_best"] == pytest.approx(1.2)
    assert short["x_adamw"] == short["x_adamw_best"] == pytest.approx(0.9) and "x_adamw" not in grad


def test_timed_loop_measures_around_the_window_only():
    """``around_window`` runs after the warm-up, right before the first measured step, and after the last."""
    b = _bench_module()
    log = []
    times = b.timed_loop("t", 2, 3, lambda i: log.append(i), around_window=lambda: log.append("|"))
    assert log == [0, 1, "|", 2, 3, 4, "|"] and len(times) == 3


def test_harness_runs_quick(tmp_path):
    cmd = [sys.executable, str(BENCH), "--quick", "--workload", "tiny", "--steps", "2", "--batch", "1",
           "--threads", "1", "--filter", "adamw,grad eval", "--name", "smoke", "--out-dir", str(tmp_path)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    md = (tmp_path / "smoke.md").read_text()
    data = json.loads((tmp_path / "smoke.json").read_text())
    for heading in ("## SOAP", "## Sophia", "## Training step", "## Targets"):
        assert heading in md
    assert data["soap"]["rates"]["jax"]["rate_gflops"] > 0 and data["soap"]["rates"]["torch"]["rate_gflops"] > 0
    ok = {(e["name"], e["framework"]) for sec in data["results"].values() for e in sec if e["status"] == "ok"}
    assert {("optax.adamw (jit)", "jax"), ("torch.optim.AdamW", "torch"), ("grad eval (backward)", "torch"),
            ("grad eval (value_and_grad)", "jax"), ("optax.adamw", "jax")} <= ok
    for sec in data["results"].values():
        for e in sec:
            if e["status"] == "ok":
                assert e["median_ms"] > 0 and e["n"] >= 10 and e["n"] % e["cycle"] == 0


def test_qr_report_counts_the_refresh_qrs(tmp_path):
    """bench_qr.py times exactly the QRs that the flop floor's refresh term counts, and writes its report."""
    qr = _load_script("bench_qr")
    shapes = _bench_module().make_workload("tiny")["shapes"]
    dims = qr.refresh_qr_dims(shapes)
    assert dims and all(d > 0 for d in dims)
    # the refresh term of the floor = power iteration (2 d³) + QR ((8/3) d³) per factor + the rotation
    rotation = sum(4 * math.prod(s) * sum(_bench_module().soap_preconditioned_dims(s)[0]) for s in shapes)
    refresh = _bench_module().soap_flops(shapes)["refresh_flops"]
    assert sum(qr.qr_flops(d) + 2 * d**3 for d in dims) + rotation == pytest.approx(refresh)

    qr.main(["--workload", "tiny", "--reps", "1", "--out-dir", str(tmp_path)])
    (report,) = tmp_path.glob("qr-*-tiny.md")
    rows = [line for line in report.read_text().splitlines() if line.startswith("| JAX") or line.startswith("| torch")]
    assert len(rows) >= 2 and all(float(row.split("|")[2]) > 0 for row in rows)


def test_profile_shows_decompositions_only_in_the_refresh_step(tmp_path):
    """profile_soap.py: in both frameworks the refresh step runs one QR per preconditioned dimension and the
    regular step none (and no eigh); the report is written."""
    prof = _load_script("profile_soap")
    shapes = _bench_module().make_workload("tiny")["shapes"]
    n_factors = sum(len(_bench_module().soap_preconditioned_dims(s)[0]) for s in shapes)

    results = prof.main(["--workload", "tiny", "--out-dir", str(tmp_path)])
    (jax_refresh, jax_regular), (torch_refresh, torch_regular) = results.values()
    assert jax_refresh["count"].get("geqrf") == jax_refresh["count"].get("householder_product") == n_factors
    assert torch_refresh["count"].get("geqrf", 0) >= n_factors
    assert torch_refresh["count"].get("linalg_householder_product", 0) >= n_factors
    for regular in (jax_regular, torch_regular):
        assert regular["wall_ms"] > 0 and sum(regular["ms"].values()) > 0
        assert not {"geqrf", "householder_product", "linalg_householder_product", "eigh", "linalg_eigh"} & {
            k for k, c in regular["count"].items() if c}
    (report,) = tmp_path.glob("profile-*-tiny.md")
    assert report.read_text().count("| **all** |") == 2


@pytest.mark.xdist_group("distributed")  # with the other spawned-rank tests, on one xdist worker
def test_distributed_benchmark_runs_and_counts(tmp_path):
    """benchmarks/bench_distributed_torch.py --quick: every contender runs on 1 and 2 ranks, the owner layout
    halves torch_bridge.SOAP's state per rank under FSDP2, and only torch_bridge's optimizer communicates."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_distributed_torch.py"), "--quick",
                    "--out-dir", str(tmp_path)], check=True, env=env, timeout=600, capture_output=True)
    (report,) = tmp_path.glob("distributed-torch-quick-*.json")
    table = json.loads(report.read_text())["table"]
    rows = {(r["layout"], r["optimizer"], r["rank"]): r for r in table}
    assert len(rows) == 12
    one = rows["one", "torch_bridge.SOAP", 0]["state_bytes"]
    owned = [rows["fsdp", "torch_bridge.SOAP", rank]["state_bytes"] for rank in (0, 1)]
    assert sum(owned) == pytest.approx(one, abs=8 * 64) and max(owned) < one  # ranks not owning keep an int64 step
    assert rows["fsdp", "torch_bridge.SOAP", 0]["bytes_sent_per_step"] > 0
    assert rows["ddp", "torch_bridge.SOAP", 0]["refresh_bytes_sent"] > 0 == rows["ddp", "torch_bridge.SOAP", 0][
        "regular_bytes_sent"]
    assert all(r["bytes_sent_per_step"] == 0 for r in table if r["optimizer"] == "heavyball.SOAP")
    assert all(r["refresh_steps"] >= 1 for r in table)
