"""torch_bridge.SOAP and torch_bridge.Sophia under FSDP2 and DDP, on 2 and 4 spawned gloo ranks (127.0.0.1).

The ranks start twice (the processes are the slow part): once 2 and once 4, each running every check of
``distributed_checks`` in one process group; the tests below read their results. All runs are float64.
What is compared with what, and why SOAP's whole-batch comparisons use full-rank factors, is in the
docstring of ``distributed_checks``. Every spawn is bounded in time and leaves no process behind
(``spawn.run_ranks``).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.torch_bridge import distributed_checks as checks
from tests.torch_bridge.spawn import run_ranks

pytestmark = pytest.mark.xdist_group("distributed")  # one worker runs them all (the spawns are shared)

REPO = Path(__file__).resolve().parents[2]
EXACT = 1e-9  # the bound for "equal to one process" in float64; the runs reach ~1e-13 or better


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dcp")
    for case in checks.CHECKPOINT_CASES:
        os.makedirs(directory / case)
    two = run_ranks(checks.two_ranks, 2, str(directory), timeout=300)
    four = run_ranks(checks.four_ranks, 4, str(directory), timeout=300)
    one = {case: checks.resume_one_process(case, str(directory / case)) for case in checks.CHECKPOINT_CASES}
    return {2: two, 4: four, 1: one}


def _all(runs, world, key):
    return [rank_result[key] for rank_result in runs[world]]


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_soap_equals_one_process_on_the_whole_batch(runs, world):
    for rank, result in enumerate(_all(runs, world, "soap_whole_batch")):
        for options, per_param in result.items():
            assert max(per_param.values()) <= EXACT, (world, rank, options, per_param)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_soap_is_bit_identical_to_one_process_on_the_same_gradients(runs, world):
    """Shapes whose dim 0 does not divide the world size, 1-D, a (1, 5) and a (1,) parameter (no rows on
    ranks > 0), 3-D and 4-D (merged, channels_last); a DCP state-dict request before the first step."""
    shares = []
    for result in _all(runs, world, "soap_same_gradients"):
        for options, found in result.items():
            assert found["max_rel_diff"] == 0.0, (world, options, found)
        shares.append([found["state_share"] for found in result.values()])
    for column in zip(*shares):  # each rank holds part of the whole state, and together all of it
        assert math.isclose(sum(column), 1.0) and max(column) < 1.0


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_refresh_is_split_over_the_ranks_and_bit_identical(runs, world):
    per_rank = _all(runs, world, "soap_ddp_split")
    for options in per_rank[0]:
        totals = per_rank[0][options]["totals"]
        assert sum(totals) > 0 and all(r[options]["totals"] == totals for r in per_rank)
        for step, total in enumerate(totals):
            counts = [r[options]["counts"][step] for r in per_rank]
            assert sum(counts) == total, (options, step, counts, total)  # each decomposition exactly once
            assert max(counts) <= math.ceil(total / world), (options, step, counts, total)
        for result in per_rank:
            assert result[options]["max_abs_diff"] == 0.0, (options, result[options])
            assert result[options]["bytes"]["bytes_received"] > 0


@pytest.mark.parametrize("layout", ["sophia_fsdp", "sophia_ddp"])
def test_sophia_patterns_equal_one_process(runs, layout):
    worlds = [2, 4] if layout == "sophia_fsdp" else [2]
    for world in worlds:
        for rank, result in enumerate(_all(runs, world, layout)):
            for run, found in result.items():
                assert found["worst"] <= EXACT, (layout, world, rank, run, found)
                assert found["unclipped"] > 0.05 and found["moved"] > 0.1, (run, found)  # the estimates matter


@pytest.mark.parametrize("world", [2, 4])
def test_sophia_draws_the_whole_batch_sample_from_rank_0s_generator(runs, world):
    """Without injection, the labels and probes do not depend on the number of ranks: they are what one
    process with rank 0's generator state draws for the whole batch and the whole parameters."""
    for rank, found in enumerate(_all(runs, world, "sophia_randomness")):
        assert found["labels"] and found["probes"], found
        assert found["probe_shapes"] == [(1,), (7, 5), (7,), (3, 7), (3,)]
        assert min(found["label_counts"]) > 0
        if rank == 0:
            assert found["continues"]


@pytest.mark.parametrize("case", checks.CHECKPOINT_CASES)
def test_dcp_resume_same_world_size_is_bit_identical(runs, case):
    for result in _all(runs, 2, f"dcp_{case}"):
        assert result["bitwise"], result["max_abs"]


@pytest.mark.parametrize("case", checks.CHECKPOINT_CASES)
def test_dcp_resume_on_four_ranks_and_on_one_process(runs, case):
    uninterrupted = runs[2][0][f"dcp_{case}"]["final"]
    for resumed in [r[f"dcp_{case}"] for r in runs[4]] + [runs[1][case]]:
        for a, b in zip(resumed, uninterrupted):
            assert float((a - b).abs().max() / b.abs().max()) <= EXACT


ERRORS = {
    "two-meshes": ("ValueError", "one device mesh"),
    "mixed": ("ValueError", "both DTensor (FSDP2) and regular parameters"),
    "replicate-placement": ("ValueError", "sharded along dim 0"),
    "fsdp-other-group": ("ValueError", "Invalid process_group"),
    "not-a-group": ("ValueError", "Invalid process_group"),
    "fsdp-missing-param": ("ValueError", "only rank 0 has 'param group 0, parameter 4"),
}


@pytest.mark.parametrize("name", ["soap", "sophia"])
@pytest.mark.parametrize("misuse", list(ERRORS))
def test_bad_input_is_a_clear_error_on_every_rank(runs, name, misuse):
    kind, text = ERRORS[misuse]
    for message in _all(runs, 2, "bad_inputs"):
        assert message[f"{name}-{misuse}"].startswith(kind) and text in message[f"{name}-{misuse}"], message


def test_ddp_mismatches_are_clear_errors_and_nothing_hangs(runs):
    for rank, message in enumerate(_all(runs, 2, "bad_inputs")):
        assert "param group 0, parameter 1: shape (4, 4)" in message["soap-ddp-other-model"], message
        assert "gradient sums" in message["soap-ddp-unreduced-gradients"], message
        assert "k=1" in message["sophia-ddp-other-schedule"], message
        if rank == 0:
            assert "reached this step within 0:00:03" in message["soap-rank-never-steps"], message


def test_spawned_ranks_are_gone(runs):
    children = torch.multiprocessing.active_children()
    assert not children, children


def test_readme_example_runs_under_torchrun(tmp_path):
    """The README's distributed example, as its comment says to run it: torchrun, 2 processes (gloo, CPU)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Distributed training (PyTorch)"):]
    start = section.index("```python\n") + len("```python\n")
    (tmp_path / "train.py").write_text(section[start:section.index("\n```", start)])
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "train.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # torchrun and its workers share the new session's process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert (tmp_path / "checkpoint").is_dir()
