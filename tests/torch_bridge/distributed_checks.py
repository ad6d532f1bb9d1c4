"""What the spawned ranks of ``test_distributed.py`` run (importable, so that ``spawn`` can pickle it).

Each check builds the same float64 model on every rank (same seed), trains it distributed for a few dozen
steps and, beside it on the same rank, one process's optimizer on the whole batch (a plain copy of the
model), and returns the largest relative difference per parameter ``max|Δ| / max|reference|`` over the
steps. Gradients of a mean loss over equal local batches average to the whole batch's (FSDP2's
reduce-scatter and DDP's all-reduce average), so the two runs differ only by the rounding of that sum.

SOAP's eigenbases of a rank-deficient factor are a free choice of LAPACK, and a rounding-level change of
the gradient changes that choice (measured: a 1e-15 relative perturbation of the gradients of a
non-square MLP moves one process's parameters by 4e-2 after 30 steps, a square one's by 2e-15). So the
whole-batch comparisons use square layers whose factors are full rank; every other shape is checked by
feeding one process the distributed run's own (all-gathered) gradients, where the two must agree exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from torch_bridge import SOAP, Sophia

STEPS = 30
BATCH = 16


class Net(torch.nn.Module):
    """A small float64 model with explicit parameter shapes (``shapes``: name -> shape of each layer)."""

    def __init__(self, dims: list[int], scale: bool = True, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layer = torch.nn.Linear(d_in, d_out, dtype=torch.float64)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in))
                layer.bias.copy_(0.1 * torch.randn(d_out, generator=gen, dtype=torch.float64))
            self.layers.append(layer)
        self.scale = torch.nn.Parameter(torch.ones(1, dtype=torch.float64)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x * self.scale if self.scale is not None else x


def shard(model: torch.nn.Module, world: int, mesh=None) -> torch.nn.Module:
    mesh = mesh if mesh is not None else init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def data(steps: int, d_in: int, d_out: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, d_in, generator=gen, dtype=torch.float64),
             torch.randn(BATCH, d_out, generator=gen, dtype=torch.float64)) for _ in range(steps)]


def mse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean()


def rows(rank: int, world: int, batch: torch.Tensor) -> torch.Tensor:
    return batch.chunk(world)[rank]


def local_rows(reference: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The rows of the whole ``reference`` that the (possibly sharded) ``p`` holds on this rank."""
    if not isinstance(p, DTensor):
        return reference
    mesh = p.device_mesh
    chunks = list(reference.chunk(mesh.size()))
    rank = mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else reference[:0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def worst(model: torch.nn.Module, reference: torch.nn.Module) -> dict[str, float]:
    out = {}
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        mine = p.to_local() if isinstance(p, DTensor) else p
        out[name] = rel(mine.detach(), local_rows(q.detach(), p))
    return out


def merge_worst(total: dict[str, float], step: dict[str, float]) -> None:
    for key, value in step.items():
        total[key] = max(total.get(key, 0.0), value)


def run_pair(model, reference, make_opt: Callable, batches, rank, world, train_step=None) -> dict[str, float]:
    """Trains the distributed ``model`` on this rank's rows and ``reference`` on the whole batch in lockstep."""
    opt, ref_opt = make_opt(model), make_opt(reference, local=True)
    total: dict[str, float] = {}
    for x, y in batches:
        for m, o, xs, ys in ((model, opt, rows(rank, world, x), rows(rank, world, y)), (reference, ref_opt, x, y)):
            o.zero_grad()
            mse(m, xs, ys).backward()
            o.step()
        merge_worst(total, worst(model, reference))
    return total


# ------------------------------------------------------------------------------------------------ SOAP
def fsdp_soap_whole_batch(rank: int, world: int) -> dict[str, dict[str, float]]:
    """FSDP2 SOAP against one process on the whole batch, square (full-rank) layers; three option sets."""
    results = {}
    dims = [5, 5, 5]
    batches = data(STEPS, dims[0], dims[-1])
    for label, options in {
        "default": dict(lr=0.02, precondition_frequency=3),
        "wd-normalize": dict(lr=0.01, precondition_frequency=4, weight_decay=0.1, normalize_grads=True,
                             betas=(0.9, 0.99)),
        "no-bias-correction": dict(lr=0.01, precondition_frequency=2, correct_bias=False, shampoo_beta=0.8),
    }.items():
        reference = Net(dims)
        model = shard(copy.deepcopy(reference), world)

        def make_opt(m, local=False, options=options):
            return SOAP(m.parameters(), **options)

        results[label] = run_pair(model, reference, make_opt, batches, rank, world)
    return results


class Counter:
    """Counts calls of ``torch.linalg.eigh`` and ``torch.geqrf`` (one per eigh / QR of a factor)."""

    def __init__(self):
        self.counts = {"eigh": 0, "qr": 0}
        self._saved = (torch.linalg.eigh, torch.geqrf)

    def __enter__(self):
        eigh, geqrf = self._saved

        def counted_eigh(*a, **k):
            self.counts["eigh"] += 1
            return eigh(*a, **k)

        def counted_geqrf(*a, **k):
            self.counts["qr"] += 1
            return geqrf(*a, **k)

        torch.linalg.eigh, torch.geqrf = counted_eigh, counted_geqrf
        return self

    def __exit__(self, *exc):
        torch.linalg.eigh, torch.geqrf = self._saved


SHAPES = {"square": (6, 6), "wide": (3, 8), "tall": (9, 2), "vector": (7,), "cube": (3, 4, 5), "scalar": ()}


def random_grads(shapes: dict, step: int, seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}


def ddp_soap_refresh_split(rank: int, world: int) -> dict:
    """SOAP with ``process_group`` against the redundant run on the same (all-reduced) gradients: the
    parameters must be bit-identical; the eigh / QR calls of each rank per step are counted."""
    out = {}
    for label, options in {
        "plain": dict(lr=0.02, precondition_frequency=3),
        "merge-1d": dict(lr=0.01, precondition_frequency=4, merge_dims=True, max_precond_dim=12,
                         precondition_1d=True, weight_decay=0.05),
    }.items():
        init = random_grads(SHAPES, -1)
        ours = {k: v.clone().requires_grad_() for k, v in init.items()}
        redundant = {k: v.clone().requires_grad_() for k, v in init.items()}
        opt = SOAP(list(ours.values()), process_group=dist.group.WORLD, **options)
        ref = SOAP(list(redundant.values()), **options)
        counts, factors, diff = [], [], 0.0
        for t in range(13):
            grads = random_grads(SHAPES, t)
            for p, q, g in zip(ours.values(), redundant.values(), grads.values()):
                p.grad, q.grad = g.clone(), g.clone()
            with Counter() as c:
                opt.step()
            counts.append(c.counts["eigh"] + c.counts["qr"])
            ref.step()
            diff = max(diff, max(float((p - q).abs().max()) for p, q in zip(ours.values(), redundant.values())))
            factors.append(sum(gg.numel() > 0 for s in ref.state.values() for gg in s["GG"])
                           if (t == 0 or int(next(iter(ref.state.values()))["step"]) % options["precondition_frequency"] == 0)
                           else 0)
        out[label] = {"max_abs_diff": diff, "counts": counts, "factors": factors,
                      "bytes": opt.communication}
    return out


# ------------------------------------------------------------------------------------------------ Sophia
class InjectedSophia(Sophia):
    """Sophia whose labels (this rank's positions) and probes (whole parameters, by name) come from the test."""

    labels: torch.Tensor | None = None
    probes: dict[str, torch.Tensor] | None = None
    names: dict[int, str] = {}

    def _sample_labels(self, logits):
        return self.labels

    def _draw_probes(self, params):
        return [self.probes[self.names[id(p)]].clone() for p in params]


CLASSES = 3
SOPHIA_OPTIONS = {
    "seed": dict(lr=0.05, rho=0.03, k=3, weight_decay=0.01),
    "paper": dict(lr=0.02, k=3, form="paper", gamma=0.05, eps=1e-10, weight_decay=0.1, bias_correction=True),
}


def sophia_data(steps: int, d_in: int, shapes: dict[str, tuple], seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append(dict(x=torch.randn(BATCH, d_in, generator=gen, dtype=torch.float64),
                        y=torch.randint(0, CLASSES, (BATCH,), generator=gen),
                        labels=torch.randint(0, CLASSES, (BATCH,), generator=gen),
                        probes={k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}))
    return out


def cross_entropy(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def sophia_step(pattern: str, model, opt, batch, rank: int, world: int, k: int) -> None:
    """One training step of ``pattern`` on this rank's rows (``world = 1``: the whole batch)."""
    x, y = rows(rank, world, batch["x"]), rows(rank, world, batch["y"])
    opt.labels, opt.probes = rows(rank, world, batch["labels"]), batch["probes"]
    if pattern == "logits":
        opt.zero_grad()
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, y).backward(retain_graph=True)
        opt.step(logits=logits)
    elif pattern == "closure":
        opt.step(closure=lambda: cross_entropy(model, x, y))
    else:  # the official SophiaG loop: a plain step, every k-th step a sampled-label backward and update_hessian
        opt.zero_grad()
        cross_entropy(model, x, y).backward()
        opt.step()
        if int(next(iter(opt.state.values()))["step"]) % k == k - 1:
            opt.zero_grad()
            cross_entropy(model, x, opt.labels).backward()
            opt.update_hessian(batch_size=BATCH)
        opt.zero_grad()


def sophia_patterns(rank: int, world: int, layout: str, steps: int = 24) -> dict:
    """Every Sophia pattern (and form) distributed (``layout`` 'fsdp' or 'ddp') against one process on the
    whole batch, with the same injected labels and probes."""
    from torch.nn.parallel import DistributedDataParallel

    dims = [5, 7, CLASSES]
    results = {}
    for pattern, estimator in (("logits", "gnb"), ("closure", "hutchinson"), ("manual", "manual")):
        for form, options in SOPHIA_OPTIONS.items():
            reference = Net(dims)
            names = {name: p.shape for name, p in reference.named_parameters()}
            batches = sophia_data(steps, dims[0], names)
            if layout == "fsdp":
                model = shard(copy.deepcopy(reference), world)
                extra = {}
            else:
                model = DistributedDataParallel(copy.deepcopy(reference))
                extra = {"process_group": dist.group.WORLD}
            opt = InjectedSophia(model.parameters(), hessian_computation_type=estimator, **options, **extra)
            ref = InjectedSophia(reference.parameters(), hessian_computation_type=estimator, **options)
            opt.names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
            ref.names = {id(p): n for n, p in reference.named_parameters()}
            total: dict[str, float] = {}
            for batch in batches:
                sophia_step(pattern, model, opt, batch, rank, world, options["k"])
                sophia_step(pattern, reference, ref, batch, 0, 1, options["k"])
                merge_worst(total, worst(model.module if layout == "ddp" else model, reference))
            moved = max(rel(p.detach(), q) for p, q in zip(reference.parameters(), Net(dims).parameters()))
            results[f"{pattern}-{form}"] = {"worst": max(total.values()), "moved": moved,
                                            "bytes": opt.communication}
    return results


# ------------------------------------------------------------------------------------------ checkpoints
def _dcp_api():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as helpers

    return dcp, helpers


def full_params(model) -> list[torch.Tensor]:
    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]


class Case:
    """A model, an optimizer and their training step, for the checkpoint checks (``name``: 'soap', or
    'sophia-<pattern>' with pattern 'logits', 'closure' or 'manual')."""

    def __init__(self, name: str, steps: int = STEPS):
        self.name = name
        if name == "soap":
            self.dims = [5, 5, 5]
            self.batches = data(steps, 5, 5)
        else:
            self.pattern = name.split("-")[1]
            self.dims = [5, 7, CLASSES]
            shapes = {n: p.shape for n, p in Net(self.dims).named_parameters()}
            self.batches = sophia_data(steps, 5, shapes)

    def build(self, world: int, seed: int = 0):
        model = Net(self.dims, seed=seed)
        if world > 0:
            model = shard(model, world)
        if self.name == "soap":
            return model, SOAP(model.parameters(), lr=0.02, precondition_frequency=3, weight_decay=0.01)
        estimator = {"logits": "gnb", "closure": "hutchinson", "manual": "manual"}[self.pattern]
        opt = InjectedSophia(model.parameters(), hessian_computation_type=estimator, **SOPHIA_OPTIONS["paper"])
        opt.names = {id(p): n for n, p in model.named_parameters()}
        return model, opt

    def train(self, model, opt, batches, rank: int, world: int) -> None:
        for batch in batches:
            if self.name == "soap":
                x, y = batch
                opt.zero_grad()
                mse(model, rows(rank, world, x), rows(rank, world, y)).backward()
                opt.step()
            else:
                sophia_step(self.pattern, model, opt, batch, rank, world, SOPHIA_OPTIONS["paper"]["k"])


def _load_fresh(case: Case, world: int, directory: str):
    dcp, helpers = _dcp_api()
    fresh, fresh_opt = case.build(world, seed=123)
    state = {"model": helpers.get_model_state_dict(fresh),
             "optim": helpers.get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(state, checkpoint_id=f"{directory}/dcp")
    helpers.set_model_state_dict(fresh, state["model"])
    helpers.set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    return fresh, fresh_opt


def dcp_save_and_resume(rank: int, world: int, case_name: str, directory: str, save_at: int = 12) -> dict:
    """Trains uninterrupted, saving at ``save_at`` (DCP, and a full state dict from rank 0), then resumes a
    fresh model and optimizer from the DCP checkpoint. Returns whether the resumed run ended bit-identical,
    and the uninterrupted run's final whole parameters."""
    dcp, helpers = _dcp_api()
    case = Case(case_name)
    model, opt = case.build(world)
    case.train(model, opt, case.batches[:save_at], rank, world)
    dcp.save({"model": helpers.get_model_state_dict(model), "optim": helpers.get_optimizer_state_dict(model, opt)},
             checkpoint_id=f"{directory}/dcp")
    full = helpers.StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model = helpers.get_model_state_dict(model, options=full)
    full_optim = helpers.get_optimizer_state_dict(model, opt, options=full)
    if rank == 0:
        torch.save({"model": full_model, "optim": full_optim}, f"{directory}/full.pt")
    case.train(model, opt, case.batches[save_at:], rank, world)
    uninterrupted = full_params(model)
    fresh, fresh_opt = _load_fresh(case, world, directory)
    case.train(fresh, fresh_opt, case.batches[save_at:], rank, world)
    resumed = full_params(fresh)
    return {"bitwise": all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed)),
            "max_abs": max(float((a - b).abs().max()) for a, b in zip(uninterrupted, resumed)),
            "final": uninterrupted}


def dcp_resume_elsewhere(rank: int, world: int, case_name: str, directory: str, save_at: int = 12) -> list:
    """Resumes the DCP checkpoint of :func:`dcp_save_and_resume` on ``world`` ranks; the final whole parameters."""
    case = Case(case_name)
    fresh, fresh_opt = _load_fresh(case, world, directory)
    case.train(fresh, fresh_opt, case.batches[save_at:], rank, world)
    return full_params(fresh)


def resume_one_process(case_name: str, directory: str, save_at: int = 12) -> list:
    """Loads the full state dict of :func:`dcp_save_and_resume` into one process's plain model and finishes."""
    case = Case(case_name)
    saved = torch.load(f"{directory}/full.pt", weights_only=True)
    model, opt = case.build(0, seed=123)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    case.train(model, opt, case.batches[save_at:], 0, 1)
    return full_params(model)
