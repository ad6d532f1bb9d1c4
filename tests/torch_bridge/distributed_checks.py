"""What the spawned ranks of ``test_distributed.py`` run (importable, so that ``spawn`` can pickle it).

Each check builds the same float64 model on every rank (same seed), trains it distributed for a few dozen
steps and, beside it on the same rank, one process's optimizer on the whole batch (a plain copy of the
model), and returns the largest relative difference per parameter ``max|Δ| / max|reference|`` over the
steps. Gradients of a mean loss over equal local batches average to the whole batch's (FSDP2's
reduce-scatter and DDP's all-reduce average), so the two runs differ only by the rounding of that sum.

SOAP's eigenbases of a rank-deficient factor are a free choice of LAPACK, and a rounding-level change of
the gradient changes that choice (measured: a 1e-15 relative perturbation of the gradients of a
non-square MLP moves one process's parameters by 4e-2 after 30 steps, a square one's by 2e-15). So the
whole-batch comparisons use layers whose factors are full rank (square ones, and non-square ones whose
larger side is left unpreconditioned by ``max_precond_dim``); every other shape is checked by feeding one
process the distributed run's own (all-gathered) gradients, where the two must agree exactly.
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
SOAP_WHOLE_BATCH = {
    "default": dict(lr=0.02, precondition_frequency=3),
    "wd-normalize": dict(lr=0.01, precondition_frequency=4, weight_decay=0.1, normalize_grads=True, betas=(0.9, 0.99)),
    "no-bias-correction": dict(lr=0.01, precondition_frequency=2, correct_bias=False, shampoo_beta=0.8),
    # Non-square layers, every factor full rank: the larger side of each weight (7 and 9) exceeds max_precond_dim.
    "non-square": dict(lr=0.02, precondition_frequency=4, max_precond_dim=6),
}
WHOLE_BATCH_DIMS = {"non-square": [7, 5, 9]}


def soap_whole_batch(rank: int, world: int, labels: list[str]) -> dict[str, dict[str, float]]:
    """FSDP2 SOAP against one process on the whole batch (full-rank factors), per option set."""
    results = {}
    for label in labels:
        dims = WHOLE_BATCH_DIMS.get(label, [5, 5, 5])
        batches = data(STEPS, dims[0], dims[-1])
        reference = Net(dims)
        model = shard(copy.deepcopy(reference), world)

        def make_opt(m, local=False, options=SOAP_WHOLE_BATCH[label]):
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


SOAP_ANY_SHAPE = {
    "plain": dict(lr=0.02, precondition_frequency=3),
    "merge-1d-normalize": dict(lr=0.01, precondition_frequency=4, merge_dims=True, max_precond_dim=8,
                               precondition_1d=True, normalize_grads=True, weight_decay=0.05,
                               data_format="channels_last"),
}


def soap_ddp_split(rank: int, world: int, labels: list[str], steps: int = 13) -> dict:
    """SOAP with ``process_group`` against the redundant run on the same (identical) gradients: the parameters
    must be bit-identical; each rank's eigh / QR calls per step are counted beside the redundant run's."""
    out = {}
    for label in labels:
        init = random_grads(SHAPES, -1)
        ours = {k: v.clone().requires_grad_() for k, v in init.items()}
        redundant = {k: v.clone().requires_grad_() for k, v in init.items()}
        opt = SOAP(list(ours.values()), process_group=dist.group.WORLD, **SOAP_ANY_SHAPE[label])
        ref = SOAP(list(redundant.values()), **SOAP_ANY_SHAPE[label])
        counts, totals, diff = [], [], 0.0
        for t in range(steps):
            grads = random_grads(SHAPES, t)
            for p, q, g in zip(ours.values(), redundant.values(), grads.values()):
                p.grad, q.grad = g.clone(), g.clone()
            with Counter() as mine:
                opt.step()
            with Counter() as everything:
                ref.step()
            counts.append(sum(mine.counts.values()))
            totals.append(sum(everything.counts.values()))
            diff = max(diff, max(float((p - q).abs().max()) for p, q in zip(ours.values(), redundant.values())))
        out[label] = {"max_abs_diff": diff, "counts": counts, "totals": totals, "bytes": opt.communication}
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
# Large clipping thresholds: most coordinates' updates are not clipped, so that they depend on the estimate.
SOPHIA_OPTIONS = {
    "seed": dict(lr=0.005, rho=2.0, k=3, weight_decay=0.01, betas=(0.9, 0.9)),
    "paper": dict(lr=0.02, k=3, form="paper", gamma=5.0, eps=1e-10, weight_decay=0.1, bias_correction=True,
                  betas=(0.9, 0.9)),
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


ESTIMATOR = {"logits": "gnb", "closure": "hutchinson", "manual": "manual"}


def sophia_patterns(rank: int, world: int, layout: str, runs: list[str], steps: int = 18) -> dict:
    """Sophia patterns distributed (``layout`` 'fsdp' or 'ddp') against one process on the whole batch, with
    the same injected labels and probes; ``runs``: '<pattern>-<form>' (patterns 'logits', 'closure',
    'manual'; forms 'seed', 'paper')."""
    from torch.nn.parallel import DistributedDataParallel

    dims = [5, 7, CLASSES]
    results = {}
    for run in runs:
        pattern, form = run.split("-")
        estimator, options = ESTIMATOR[pattern], SOPHIA_OPTIONS[form]
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
        moved = max(rel(p.detach(), q.detach()) for p, q in zip(reference.parameters(), Net(dims).parameters()))
        results[run] = {"worst": max(total.values()), "moved": moved, "bytes": opt.communication,
                        "unclipped": ref.win_rate}
    return results


def sophia_default_randomness(rank: int, world: int) -> dict:
    """Sophia's own labels and probes under FSDP2: the ranks' labels together, and every rank's probes, are
    those one process draws for the whole batch from rank 0's generator state (``sample_labels``,
    ``draw_probes``); rank 0's generator then continues as that process's would."""
    from torch_bridge._hessian_estimators import draw_probes, sample_labels

    model = shard(Net([5, 7, CLASSES]), world)
    opt = Sophia(model.parameters())
    logits = torch.randn(BATCH, 4, CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(100 + rank)  # the ranks' own streams differ; rank 0's decides
    labels = opt._sample_labels(rows(rank, world, logits))
    probes = opt._draw_probes(list(model.parameters()))
    after = torch.rand(3)
    gathered = [None] * world
    dist.all_gather_object(gathered, labels)
    torch.manual_seed(100)
    expected_labels = sample_labels(logits)  # what one process draws for the whole batch
    expected_probes = [draw_probes([p])[0] for p in model.parameters()]
    expected_after = torch.rand(3)
    return {"labels": torch.equal(torch.cat(gathered), expected_labels),
            "probes": all(torch.equal(a, b) for a, b in zip(probes, expected_probes)),
            "probe_shapes": [tuple(v.shape) for v in probes],
            "continues": torch.equal(after, expected_after) if rank == 0 else None,
            "label_counts": torch.bincount(torch.cat(gathered).reshape(-1), minlength=CLASSES).tolist()}


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

    def __init__(self, name: str, steps: int = 24):
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


# ------------------------------------------------------------------------------------------------ any shape
FSDP_SHAPES = {"square": (6, 6), "wide": (3, 8), "tall": (9, 2), "one_row": (1, 5), "vector": (7,), "single": (1,),
               "cube": (3, 4, 5), "kernel": (4, 2, 2, 3)}


class Holder(torch.nn.Module):
    """The parameters of ``FSDP_SHAPES`` as a module (DCP's helpers name parameters through a module)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_parameter(name, torch.nn.Parameter(t))


def soap_same_gradients(rank: int, world: int, labels: list[str], steps: int = 13) -> dict:
    """FSDP2-sharded SOAP fed the same whole gradients as one process's SOAP: every shape (dim 0 not divisible
    by the world size, 1-D, a rank with no rows, 3-D and 4-D with merged dims) must match bit for bit. The
    sharded run also asks DCP for a state dict before its first step, which must change nothing."""
    from torch.distributed.tensor import Shard, distribute_tensor

    _, helpers = _dcp_api()
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for label in labels:
        options = SOAP_ANY_SHAPE[label]
        init = random_grads(FSDP_SHAPES, -1)
        sharded = Holder({k: distribute_tensor(v.clone(), mesh, [Shard(0)]) for k, v in init.items()})
        plain = {k: v.clone().requires_grad_() for k, v in init.items()}
        opt = SOAP(sharded.parameters(), **options)
        helpers.get_optimizer_state_dict(sharded, opt)  # before any step: a blank template, no first step
        ref = SOAP(list(plain.values()), **options)
        worst_abs = 0.0
        for t in range(steps):
            grads = random_grads(FSDP_SHAPES, t)
            for p, g in zip(sharded.parameters(), grads.values()):
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            for p, g in zip(plain.values(), grads.values()):
                p.grad = g.clone()
            opt.step()
            ref.step()
            for p, q in zip(sharded.parameters(), plain.values()):
                worst_abs = max(worst_abs, rel(p.to_local().detach(), local_rows(q.detach(), p)))
        held = sum(t.numel() for s in opt.state.values() for v in s.values() if isinstance(v, (list, torch.Tensor))
                   for t in (v if isinstance(v, list) else [v]) if t.dim() > 0)
        whole = sum(t.numel() for s in ref.state.values() for v in s.values() if isinstance(v, (list, torch.Tensor))
                    for t in (v if isinstance(v, list) else [v]) if t.dim() > 0)
        out[label] = {"max_rel_diff": worst_abs, "state_share": held / whole, "bytes": opt.communication}
    return out


# ------------------------------------------------------------------------------------------------ bad input
def _error_of(fn: Callable[[], object]) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _manual_sophia(params, **kwargs):
    return Sophia(params, hessian_computation_type="manual", **kwargs)


def bad_inputs(rank: int, world: int) -> dict[str, str]:
    """Every rank runs each misuse; returns the error each raised (all ranks must raise, none may hang)."""
    import datetime

    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    mesh = init_device_mesh("cpu", (world,))
    for name, cls in (("soap", SOAP), ("sophia", _manual_sophia)):
        two = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "single"))
        model = Net([4, 4, 4], scale=False)
        fully_shard(model.layers[0], mesh=mesh)
        fully_shard(model.layers[1], mesh=two["single"])
        mixed = [distribute_tensor(torch.randn(4, 4, dtype=torch.float64), mesh).requires_grad_(),
                 torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
        replicated = [torch.nn.Parameter(distribute_tensor(torch.randn(4, 4, dtype=torch.float64), mesh,
                                                           [Replicate()]))]
        subgroup = dist.new_group([0])
        sharded = shard(Net([4, 4, 4]), world)
        for misuse, args, kwargs in (("two-meshes", model.parameters(), {}), ("mixed", mixed, {}),
                                     ("replicate-placement", replicated, {}),
                                     ("fsdp-other-group", sharded.parameters(), {"process_group": subgroup}),
                                     ("not-a-group", Net([4, 4]).parameters(), {"process_group": "world"})):
            out[f"{name}-{misuse}"] = _error_of(lambda c=cls, a=args, k=kwargs: c(a, **k))

    # A rank without one of the parameters: the step's check fails on every rank.
    sharded = shard(Net([4, 4, 4]), world)
    params = list(sharded.parameters())
    for name, cls in (("soap", SOAP), ("sophia", _manual_sophia)):
        opt = cls(params[:-1] if rank == world - 1 else params)
        sharded.zero_grad()
        mse(sharded, torch.ones(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)).backward()
        out[f"{name}-fsdp-missing-param"] = _error_of(opt.step)

    # DDP with process_group: a rank with another model, and ranks whose gradients differ (no DDP).
    other = Net([4, 5, 4] if rank == world - 1 else [4, 4, 4])
    opt = SOAP(other.parameters(), process_group=dist.group.WORLD)
    mse(other, torch.ones(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)).backward()
    out["soap-ddp-other-model"] = _error_of(opt.step)
    alone = Net([4, 4, 4])
    opt = SOAP(alone.parameters(), process_group=dist.group.WORLD)
    mse(alone, torch.full((2, 4), float(rank + 1), dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
        ).backward()
    out["soap-ddp-unreduced-gradients"] = _error_of(opt.step)
    ddp = DistributedDataParallel(Net([4, 4, 4]))
    opt = Sophia(ddp.parameters(), k=1, process_group=dist.group.WORLD, hessian_computation_type="hutchinson")
    if rank == world - 1:
        opt.param_groups[0]["k"] = 2
    out["sophia-ddp-other-schedule"] = _error_of(
        lambda: opt.step(closure=lambda: mse(ddp, torch.ones(2, 4, dtype=torch.float64),
                                             torch.zeros(2, 4, dtype=torch.float64))))

    # A rank that never steps: the others report it after the process group's timeout, instead of hanging.
    quick = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=3))
    lonely = Net([4, 4])
    opt = SOAP(lonely.parameters(), process_group=quick)
    mse(lonely, torch.ones(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)).backward()
    out["soap-rank-never-steps"] = _error_of(opt.step) if rank == 0 else "skipped on purpose"
    dist.barrier()
    return out


# ------------------------------------------------------------------------------------------------ suites
def _timed(out: dict, name: str, fn: Callable, *args) -> None:
    import time

    start = time.perf_counter()
    out[name] = fn(*args)
    out.setdefault("seconds", {})[name] = time.perf_counter() - start


def two_ranks(rank: int, world: int, directory: str) -> dict:
    """Everything checked on 2 ranks, in one process group (the processes start once)."""
    out: dict = {}
    _timed(out, "soap_whole_batch", soap_whole_batch, rank, world, ["default", "wd-normalize", "non-square"])
    _timed(out, "soap_same_gradients", soap_same_gradients, rank, world, list(SOAP_ANY_SHAPE))
    _timed(out, "soap_ddp_split", soap_ddp_split, rank, world, list(SOAP_ANY_SHAPE))
    _timed(out, "sophia_fsdp", sophia_patterns, rank, world, "fsdp", ["logits-paper", "closure-seed", "manual-paper"])
    _timed(out, "sophia_ddp", sophia_patterns, rank, world, "ddp", ["logits-seed", "closure-paper", "manual-seed"])
    _timed(out, "sophia_randomness", sophia_default_randomness, rank, world)
    for case in CHECKPOINT_CASES:
        _timed(out, f"dcp_{case}", dcp_save_and_resume, rank, world, case, f"{directory}/{case}")
    _timed(out, "bad_inputs", bad_inputs, rank, world)
    return out


def four_ranks(rank: int, world: int, directory: str) -> dict:
    """Everything checked on 4 ranks (a rank with no rows of some parameters), and the 2 → 4 resumes."""
    out: dict = {}
    _timed(out, "soap_whole_batch", soap_whole_batch, rank, world, ["no-bias-correction"])
    _timed(out, "soap_same_gradients", soap_same_gradients, rank, world, ["merge-1d-normalize"])
    _timed(out, "soap_ddp_split", soap_ddp_split, rank, world, ["plain"])
    _timed(out, "sophia_fsdp", sophia_patterns, rank, world, "fsdp", ["closure-paper", "logits-seed"])
    _timed(out, "sophia_randomness", sophia_default_randomness, rank, world)
    for case in CHECKPOINT_CASES:
        _timed(out, f"dcp_{case}", dcp_resume_elsewhere, rank, world, case, f"{directory}/{case}")
    return out


CHECKPOINT_CASES = ("soap", "sophia-closure")
