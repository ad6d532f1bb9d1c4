"""The multi-device tests: 8 simulated CPU devices, in a process of their own.

XLA reads ``--xla_force_host_platform_device_count`` when JAX initialises, so these tests cannot share a
process with tests that use JAX first: ``scripts/test.sh`` runs them in a second pytest invocation
(``pytest tests/mesh``), and the main invocation ignores this folder. If JAX is not initialised yet when
this file is imported, it sets the flag itself (``pytest tests/mesh`` works on its own). LAPACK is held to
one thread: eight simulated devices calling a multi-threaded OpenBLAS at once on a small machine run ten to
thirty times slower (measured in benchmarks/README.md).
"""

from __future__ import annotations

import os
import sys

DEVICES = 8

if "jax" not in sys.modules:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _eight_devices():
    if jax.device_count() < DEVICES:
        pytest.fail(
            f"tests/mesh needs {DEVICES} devices, JAX has {jax.device_count()} (it started before this folder's "
            f"conftest could set the flag): run it in its own process, `pytest tests/mesh`, as scripts/test.sh does"
        )
