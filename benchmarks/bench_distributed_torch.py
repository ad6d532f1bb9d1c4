"""SOAP's optimizer step on the benchmark GPT: one process against 2 ranks under FSDP2 and DDP.

Runs ``torch_bridge.SOAP`` and ``heavyball.SOAP`` on the GPT of ``bench_step.py`` (its parameter shapes are
``bench_step.gpt_shapes(D=256, L=4, V=96, F=1024, T=128)``, 3.2 M parameters, fp32) on a batch of 8 × 128
tokens: in one process on the whole batch, and on 2 gloo ranks on 127.0.0.1 (4 × 128 tokens each) with the
model under ``fully_shard`` (FSDP2: every block and the root) or under ``DistributedDataParallel``. Every
process runs one thread. Per optimizer and layout it reports, per rank:

* the optimizer step's time (forward and backward are not timed), the median of the regular steps and of
  the refresh steps (every ``precondition_frequency = 10``-th step; the first call, which only builds the
  preconditioner, is not counted), and the mean over whole refresh cycles;
* the bytes the optimizer sent and received per step (``torch_bridge``: its own counters,
  ``SOAP.communication``; heavyball's SOAP communicates nothing: under FSDP2 it preconditions each rank's
  shard, a different optimizer, and under DDP every rank repeats the whole step), and the bytes of the
  training step's own collectives (FSDP2's all-gathers and reduce-scatters, counted by wrapping
  ``torch.distributed.all_gather_single`` / ``reduce_scatter_single``; DDP's all-reduce of the gradients,
  ``2 (W-1)/W · 4 N`` by the ring model);
* the optimizer state's bytes on the rank (tensor storages).

Contenders run round-robin for ``--rounds`` rounds in the same processes; each keeps its best round (lowest
mean). Usage::

    python benchmarks/bench_distributed_torch.py            # ~10 min on a quiet 2-core CPU
    python benchmarks/bench_distributed_torch.py --quick    # a tiny GPT, a few steps (the smoke test)

Results: ``results/distributed-torch-<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as Fn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_step import GPT, _torch_state_bytes, device_tag, gpt_shapes  # noqa: E402
from tests.torch_bridge.spawn import run_ranks  # noqa: E402

TINY = dict(D=32, L=1, V=16, F=64, T=16)
FREQUENCY = 10


class Block(torch.nn.Module):
    """One transformer block of bench_step's GPT (the same math as ``bench_step.torch_gpt``)."""

    def __init__(self, D: int, F: int, gen: torch.Generator):
        super().__init__()
        self.D, self.H = D, max(1, D // 64)
        shapes = [(D,), (D,), (D, 3 * D), (3 * D,), (D, D), (D,), (D,), (D,), (D, F), (F,), (F, D), (D,)]
        self.p = torch.nn.ParameterList([torch.nn.Parameter(0.02 * torch.randn(s, generator=gen) if len(s) == 2
                                                            else torch.zeros(s)) for s in shapes])
        with torch.no_grad():
            self.p[0].fill_(1.0)
            self.p[6].fill_(1.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g1, b1, wqkv, bqkv, wo, bo, g2, b2, w1, c1, w2, c2 = self.p
        B, t, D = h.shape
        a = Fn.layer_norm(h, (D,), g1, b1) @ wqkv + bqkv
        q, k, v = (z.transpose(1, 2) for z in a.view(B, t, 3, self.H, D // self.H).unbind(2))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D // self.H)
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        h = h + (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, t, D) @ wo + bo
        return h + Fn.gelu(Fn.layer_norm(h, (D,), g2, b2) @ w1 + c1, approximate="tanh") @ w2 + c2


class Model(torch.nn.Module):
    """The GPT as modules, so that FSDP2 can shard it block by block (the root holds the tied embedding)."""

    def __init__(self, cfg: dict[str, int], seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        D = cfg["D"]
        self.wte = torch.nn.Parameter(0.02 * torch.randn(cfg["V"], D, generator=gen))
        self.wpe = torch.nn.Parameter(0.02 * torch.randn(cfg["T"], D, generator=gen))
        self.blocks = torch.nn.ModuleList(Block(D, cfg["F"], gen) for _ in range(cfg["L"]))
        self.ln = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(D)), torch.nn.Parameter(torch.zeros(D))])
        assert sorted(tuple(p.shape) for p in self.parameters()) == sorted(gpt_shapes(**cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wte[x] + self.wpe[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return Fn.layer_norm(h, (h.shape[-1],), self.ln[0], self.ln[1]) @ self.wte.T


def make_optimizer(name: str, params, process_group=None):
    if name.startswith("torch_bridge"):
        from torch_bridge import SOAP

        return SOAP(params, lr=3e-3, precondition_frequency=FREQUENCY, process_group=process_group)
    import heavyball
    import heavyball.utils as hbu

    hbu.compile_mode = None
    return heavyball.SOAP(params, lr=3e-3, precondition_frequency=FREQUENCY, use_precond_schedule=False,
                          warmup_steps=0, max_precond_dim=10000, merge_dims=False)


class Bytes:
    """Counts the bytes this rank sends in FSDP2's collectives (ring model, as ``torch_bridge`` counts its own)."""

    def __init__(self):
        self.sent = 0
        self._saved = {}

    def __enter__(self):
        for name in ("all_gather_single", "reduce_scatter_single"):
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(*args, _original=original, _name=name, **kwargs):
                world = dist.get_world_size(kwargs.get("group"))
                tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
                if _name == "all_gather_single":
                    self.sent += tensor.numel() * tensor.element_size() * (world - 1)
                else:
                    self.sent += tensor.numel() * tensor.element_size() * (world - 1) // world
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def bases_sum(opt) -> float:
    """The sum of every eigenbasis in the optimizer's state (keys holding ``Q``): it changes only when the
    optimizer refreshes its bases, which tells the refresh steps apart whatever the optimizer's schedule."""
    total = 0.0

    def walk(x, inside: bool) -> None:
        nonlocal total
        if torch.is_tensor(x):
            total += float(x.sum(dtype=torch.float64)) if inside and x.numel() else 0.0
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, inside or "Q" in str(k))
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, inside)

    for state in opt.state.values():
        walk(state, False)
    return total


def batch(cfg: dict[str, int], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg["V"], (n, cfg["T"]), generator=gen)
    return x, torch.roll(x, -1, dims=1)


def measure(cfg: dict[str, int], layout: str, name: str, steps: int, rank: int = 0, world: int = 1) -> dict:
    """Optimizer-step times and bytes of ``name`` under ``layout`` ('one', 'fsdp', 'ddp', 'ddp-redundant')."""
    model = Model(cfg)
    group = None
    if layout == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout.startswith("ddp"):
        model = torch.nn.parallel.DistributedDataParallel(model)
        group = dist.group.WORLD if layout == "ddp" and name.startswith("torch_bridge") else None
    opt = make_optimizer(name, model.parameters(), process_group=group)
    times, sent, received, train_bytes, refresh = [], [], [], [], []
    for i in range(steps + 1):
        x, y = batch(cfg, 8, seed=i)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        with Bytes() as counted:
            Fn.cross_entropy(model(x).reshape(-1, cfg["V"]), y.reshape(-1)).backward()
        before = opt.communication if hasattr(opt, "communication") else {"bytes_sent": 0, "bytes_received": 0}
        bases = bases_sum(opt)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        opt.step()
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - start)
        refresh.append(bases_sum(opt) != bases)
        after = opt.communication if hasattr(opt, "communication") else before
        sent.append(after["bytes_sent"] - before["bytes_sent"])
        received.append(after["bytes_received"] - before["bytes_received"])
        n = sum(p.numel() for p in model.parameters()) * 4
        train_bytes.append(counted.sent if layout == "fsdp" else 2 * (world - 1) * n // world)
        opt.zero_grad(set_to_none=True)
    # Call 1 builds the preconditioner (torch_bridge: only that); a refresh is a step whose bases changed.
    times, sent, received, refresh = times[1:], sent[1:], received[1:], refresh[1:]
    if world > 1:  # a rank that owns no bases of a refreshing step sees none change: ask the others
        flags = torch.tensor(refresh, dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        refresh = [bool(f) for f in flags.tolist()]
    regular = [t for t, r in zip(times, refresh) if not r]
    refreshing = [t for t, r in zip(times, refresh) if r]
    return {"regular_ms": 1e3 * statistics.median(regular),
            "refresh_ms": 1e3 * statistics.median(refreshing) if refreshing else float("nan"),
            "refresh_steps": sum(refresh),
            "mean_ms": 1e3 * statistics.fmean(times), "bytes_sent_per_step": statistics.fmean(sent),
            "bytes_received_per_step": statistics.fmean(received),
            "refresh_bytes_sent": statistics.fmean([s for s, r in zip(sent, refresh) if r] or [0.0]),
            "regular_bytes_sent": statistics.fmean(s for s, r in zip(sent, refresh) if not r),
            "train_bytes_sent_per_step": statistics.fmean(train_bytes[1:]),
            "state_bytes": _torch_state_bytes(opt), "times_ms": [1e3 * t for t in times]}


CONTENDERS = [("fsdp", "torch_bridge.SOAP"), ("fsdp", "heavyball.SOAP"), ("ddp", "torch_bridge.SOAP"),
              ("ddp-redundant", "torch_bridge.SOAP"), ("ddp", "heavyball.SOAP")]


def ranks(rank: int, world: int, cfg: dict[str, int], steps: int, rounds: int) -> list[dict]:
    torch.set_num_threads(1)
    out = []
    for r in range(rounds):
        for layout, name in CONTENDERS:
            result = measure(cfg, layout, name, steps, rank, world)
            out.append(dict(result, layout=layout, optimizer=name, round=r, rank=rank))
    return out


def best(rows: list[dict]) -> dict:
    return min(rows, key=lambda row: row["mean_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny GPT and a few steps")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per contender and round (whole cycles)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    args = parser.parse_args()
    cfg = TINY if args.quick else GPT
    steps = FREQUENCY * max(1, math.ceil((4 if args.quick else args.steps) / FREQUENCY))
    rounds = 1 if args.quick else args.rounds
    torch.set_num_threads(1)
    one = []
    for r in range(rounds):
        for name in ("torch_bridge.SOAP", "heavyball.SOAP"):
            one.append(dict(measure(cfg, "one", name, steps), layout="one", optimizer=name, round=r, rank=0))
    two = [row for rank_rows in run_ranks(ranks, 2, cfg, steps, rounds, timeout=3600) for row in rank_rows]
    table = []
    for name in ("torch_bridge.SOAP", "heavyball.SOAP"):
        table.append(dict(best([x for x in one if x["optimizer"] == name]), ranks=1))
    for layout, name in CONTENDERS:
        for rank in range(2):
            rows = [x for x in two if x["layout"] == layout and x["optimizer"] == name and x["rank"] == rank]
            table.append(dict(best(rows), ranks=2))
    write(table, one + two, cfg, steps, rounds, Path(args.out_dir), quick=args.quick)


def write(table: list[dict], raw: list[dict], cfg: dict, steps: int, rounds: int, out: Path, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tag = ("quick-" if quick else "") + device_tag()
    n = sum(math.prod(s) for s in gpt_shapes(**cfg))
    lines = [f"# Distributed SOAP on the benchmark GPT ({n / 1e6:.2f} M parameters, fp32), {device_tag()}", "",
             f"{steps} timed optimizer steps per contender and round, best of {rounds} round(s); one thread per "
             f"process; batch 8 × {cfg['T']} tokens (4 × {cfg['T']} per rank). Times in ms per optimizer step; "
             "bytes per step sent by the rank (the optimizer's; the training step's FSDP2/DDP collectives "
             "beside); state in MB per rank. See bench_distributed_torch.py and benchmarks/README.md.", "",
             "| layout | optimizer | rank | regular step | refresh step (how many) | mean | optimizer bytes sent "
             "/ step (regular, refresh) | training-step bytes sent / step | state MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        layout = {"one": "1 process", "fsdp": "FSDP2, 2 ranks", "ddp": "DDP, 2 ranks, process_group",
                  "ddp-redundant": "DDP, 2 ranks, redundant"}[row["layout"]]
        if row["layout"] == "ddp" and row["optimizer"].startswith("heavyball"):
            layout = "DDP, 2 ranks (redundant)"
        lines.append(
            f"| {layout} | {row['optimizer']} | {row['rank']} | {row['regular_ms']:.1f} | {row['refresh_ms']:.1f} "
            f"({row['refresh_steps']}) | "
            f"{row['mean_ms']:.1f} | {row['bytes_sent_per_step'] / 1e6:.2f} MB ({row['regular_bytes_sent'] / 1e6:.2f}, "
            f"{row['refresh_bytes_sent'] / 1e6:.2f}) | {row['train_bytes_sent_per_step'] / 1e6:.2f} MB | "
            f"{row['state_bytes'] / 1e6:.1f} |")
    (out / f"distributed-torch-{tag}.md").write_text("\n".join(lines) + "\n")
    (out / f"distributed-torch-{tag}.json").write_text(json.dumps(
        {"cfg": cfg, "steps": steps, "rounds": rounds, "table": table, "raw": raw, "torch": torch.__version__,
         "cpus": os.cpu_count()}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
