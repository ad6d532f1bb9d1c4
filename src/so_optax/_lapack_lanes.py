"""How many LAPACK decompositions an XLA:CPU computation should run at once.

XLA:CPU runs the independent operations of a computation concurrently on its thread pool, one
thread per core. jaxlib's CPU ``eigh`` and ``qr`` call the LAPACK that scipy ships, OpenBLAS,
which by default runs one thread per core as well. Two decompositions in flight then keep twice as
many threads busy as there are cores, and OpenBLAS's threads, which wait for one another inside
each call, lose their turns on the cores. So while LAPACK is multi-threaded, SOAP runs its
decompositions in ``cores // lapack_threads`` sequences (``_linalg.Lanes``): one at a time on a
machine whose OpenBLAS uses every core, as installed. With LAPACK limited to one thread
(``OPENBLAS_NUM_THREADS=1``, or ``threadpoolctl.threadpool_limits(1, "blas")``) XLA schedules them
freely, which is fastest then. While LAPACK is multi-threaded, a SOAP refresh also keeps its QRs
apart from its matmuls (``Lanes.start_after``, ``Lanes.finished``): XLA's matmuls next to a LAPACK
call that uses every core slow both down.

Measured on a 2-core CPU (``benchmarks/bench_qr.py``, the 36 QRs of one refresh of the benchmark
workload): as installed, 0.60 s one at a time against 1.42 s as XLA schedules them; with OpenBLAS
at one thread, 0.47–0.57 s as XLA schedules them, and slower in two fixed sequences once the
power-iteration matmuls are in the same computation (0.78–0.82 s against 0.64–0.78 s). In a
refresh step as installed, the 36 QRs took 1.0 s with XLA's matmuls running beside them and 0.59–0.76 s
with the matmuls done first (a refresh step 1.61 s against 1.44 s, medians of 14 refresh steps
interleaved in one process); at one thread, holding the QRs back until the matmuls are done was
slower (1.39 s against 1.32 s). The in-between case (more cores than LAPACK threads, LAPACK
threads above one) follows the same arithmetic but was not measured here.

The count is read when the step is traced: a step traced before LAPACK's thread count changes keeps
the old count (its results do not depend on it, only its speed).

Several CPU devices in one process (simulated ones, ``--xla_force_host_platform_device_count``) run their
programs at once, and a SOAP step spread over them (``_distribution``) makes each call LAPACK at the same
time as the others: with OpenBLAS at two threads on a 2-core machine, 8 simulated devices took 100-340 s
for the GPT workload's first call and 100-180 s for a refresh, against 4-10 s and 8-13 s at one thread
(the same compiled program, in one process, on a loaded machine). :func:`one_thread_on_simulated_devices`
therefore limits that LAPACK to one thread, with a warning, when a step is spread over such devices.
"""

from __future__ import annotations

import os
import warnings

import jax


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def lapack_threads(default: int) -> int:
    """The thread count of the BLAS behind scipy's LAPACK, or ``default`` if it cannot be read.

    Read with threadpoolctl: the largest count among the loaded OpenBLAS libraries, or among all
    BLAS libraries if none is OpenBLAS.
    """
    import scipy.linalg.cython_lapack  # noqa: F401, PLC0415  (loads the LAPACK jaxlib calls)

    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415
    except ImportError:
        return default
    blas = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    openblas = [info for info in blas if info.get("internal_api") == "openblas"]
    return max((info["num_threads"] for info in openblas or blas), default=default)


def lane_count() -> int | None:
    """How many decompositions to run at once: no bound (``None``) off CPU or with a one-thread
    LAPACK, else ``cores // lapack_threads``."""
    if jax.default_backend() != "cpu":
        return None
    cores = _cores()
    threads = lapack_threads(default=cores)
    return None if threads <= 1 else max(1, cores // threads)


_limit = None  # the threadpoolctl limit set by one_thread_on_simulated_devices, kept for the process


def one_thread_on_simulated_devices() -> None:
    """Limits LAPACK's BLAS to one thread (once per process, with a warning) if this process holds several
    CPU devices and that BLAS runs more than one thread: their programs call it at once (see above)."""
    global _limit
    if _limit is not None or jax.default_backend() != "cpu" or jax.local_device_count() < 2:
        return
    threads = lapack_threads(default=1)
    if threads <= 1:
        return
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    _limit = threadpool_limits(limits=1, user_api="blas")
    warnings.warn(
        f"so_optax: {jax.local_device_count()} CPU devices in this process decompose their factors at the same "
        f"time, and LAPACK's BLAS ran {threads} threads per call, which makes those calls 10-30x slower; it "
        "now runs one thread for the rest of the process. Set OPENBLAS_NUM_THREADS=1 before the process "
        "starts to avoid this warning.",
        RuntimeWarning,
        stacklevel=3,
    )
