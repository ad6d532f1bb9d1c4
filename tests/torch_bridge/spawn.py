"""Runs a function on ``world`` spawned processes joined in a gloo process group on 127.0.0.1.

The parent holds the rendezvous store (a ``TCPStore`` on a port the OS picks, so there is no race for a
free port); each child initialises ``torch.distributed`` on it, runs ``fn(rank, world, *args)`` and
returns its result through a file. Every run is bounded by ``timeout`` seconds and always ends with no
child left: on a timeout, a failure or an interrupt the children are terminated, then killed.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

PG_TIMEOUT_S = 60


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 150.0) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world-1, world, *args)]``, each on its own process."""
    ctx = multiprocessing.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    with tempfile.TemporaryDirectory(prefix="tb-dist-") as tmp:
        out = [Path(tmp) / f"rank{r}.pkl" for r in range(world)]
        procs = [ctx.Process(target=_child, args=(fn, r, world, store.port, args, str(out[r])), daemon=True)
                 for r in range(world)]
        try:
            for proc in procs:
                proc.start()
            deadline = time.monotonic() + timeout
            while any(proc.is_alive() for proc in procs):
                if any(proc.exitcode not in (None, 0) for proc in procs):
                    break  # a rank failed: the others may wait for it in a collective, so stop them now
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish within {timeout:.0f} s")
                time.sleep(0.05)
            results = [_read(path) for path in out]
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs:
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    failures = [(r, res[1]) for r, res in enumerate(results) if res[0] != "ok"]
    if failures:
        # The rank that failed first is the one whose error is not a lost connection to another rank.
        failures.sort(key=lambda item: "Connection closed by peer" in item[1])
        raise AssertionError("\n".join(f"{fn.__name__}: rank {rank} failed:\n{text}" for rank, text in failures))
    return [res[1] for res in results]


def _read(path: Path) -> tuple[str, Any]:
    if not path.is_file():
        return "error", "the process exited without a result"
    with open(path, "rb") as f:
        return pickle.load(f)


def _child(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    result: tuple[str, Any]
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        result = ("ok", fn(rank, world, *args))
        dist.barrier()  # no rank leaves (closing its connections) while another still needs it
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = ("error", traceback.format_exc())
    with open(out, "wb") as f:
        pickle.dump(result, f)
    if result[0] != "ok":
        os._exit(1)
