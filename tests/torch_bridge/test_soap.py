"""Tests of torch_bridge.SOAP.

The parity tests run torch_bridge.SOAP and the reference implementation's SOAP class (loaded at run time
from ``$SO_OPTAX_REFERENCE_DIR``, never copied into the repository; skipped without it, see
``tests/reference_impl.py``) step for step in float64 on the same gradient sequences.

Bases: the reference casts its factors to float32 before ``eigh`` and runs the power-iteration + QR
refresh in float32 even for float64 parameters, so its bases carry float32 rounding (~1e-7, more for
ill-conditioned factors). As the reference also rotates exp_avg back and forth through its basis on
every step, the basis's float32 non-orthogonality compounds in its exp_avg, and the update difference
grows to ~1e-5 over 30 steps for factors whose eigenvalues are close. The first factors of a non-square
gradient are also rank-deficient, so their eigenvectors are not unique. The lockstep therefore checks
that both sides found the same basis (up to column signs, to float32 accuracy) and then feeds our basis
into the reference (rotating its ``exp_avg`` into it) every time the reference computes a new one: step 1
and every refresh. Everything else (moments, sorting and permutation of the second moment, projections,
bias correction, weight decay, factor updates) is compared at 1e-6.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from itertools import chain
from pathlib import Path

import pytest
import torch

from so_common.soap_layout import soap_layout
from tests.reference_impl import SOAP_DOC, reference_document
from torch_bridge import SOAP
from torch_bridge._linalg import eigh_descending, project, refresh_basis

TOL = 1e-6
STEPS = 30


@pytest.fixture(scope="module")
def seed_soap():
    """The reference SOAP class, exec'd from the first listing of its API page."""
    doc = reference_document(SOAP_DOC, "that torch_bridge.SOAP steps as the reference SOAP class does, and "
                                       "loads and continues its checkpoints")
    lines = doc.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("class SOAP("))
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i][0].isspace()),
        len(lines),
    )
    namespace = {"torch": torch, "optim": torch.optim, "chain": chain}
    exec(compile("\n".join(lines[start:end]), str(doc), "exec"), namespace)
    return namespace["SOAP"]


@pytest.fixture
def float64_default():
    # The reference allocates its factors with the default dtype.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _layout(shape, options):
    return soap_layout(
        tuple(shape),
        max_precond_dim=options.get("max_precond_dim", 10000),
        merge_dims=options.get("merge_dims", False),
        precondition_1d=options.get("precondition_1d", False),
        data_format=options.get("data_format", "channels_first"),
    )


def _to_work(x, layout):
    if layout.permutation is not None:
        x = x.permute(layout.permutation)
    return x.reshape(layout.work_shape)


def _basis_mismatch(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest entry difference between two bases after aligning column signs."""
    signs = torch.sign((ours * ref).sum(0))
    signs[signs == 0] = 1
    return (ours * signs - ref).abs().max().item()


def _from_work(x, layout):
    if layout.permutation is None:
        return x.reshape(layout.shape)
    return x.reshape(layout.permuted_shape).permute(layout.inverse_permutation)


def _feed_our_basis(ours: dict, ref: dict, layout) -> None:
    """Gives the reference our bases, rotating its exp_avg (param shape, its basis) into them.

    The reference's refreshed basis is orthogonal only to float32 accuracy, so its exp_avg is mapped
    back to the parameter space with the exact inverse (``x ×_i Q_i⁻ᵀ``), not with ``Q_i``.
    """
    inverses = [torch.linalg.inv(q) if len(q) else torch.empty(0) for q in ref["Q"]]
    exp_avg = project(_to_work(ref["exp_avg"], layout), inverses)
    ref["exp_avg"] = _from_work(project(exp_avg, ours["Q"]), layout).contiguous()
    ref["Q"] = [q.clone() if q.numel() else [] for q in ours["Q"]]


def _lockstep(seed_cls, shapes, steps=STEPS, check_first_basis=True, **options):
    """Runs both optimizers on the same gradients; returns the worst relative differences."""
    gen = torch.Generator().manual_seed(1234)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ours_p = [x.clone().requires_grad_() for x in init]
    ref_p = [x.clone().requires_grad_() for x in init]
    ours_opt, ref_opt = SOAP(ours_p, **options), seed_cls(ref_p, **options)
    frequency = options.get("precondition_frequency", 10)
    worst = {"update": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "GG": 0.0, "basis": 0.0}
    for t in range(steps):
        for a, b in zip(ours_p, ref_p):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64) * (1.0 + 0.05 * t)
            a.grad, b.grad = g.clone(), g.clone()
        before = [a.detach().clone() for a in ours_p]
        ours_opt.step()
        ref_opt.step()
        for a, b, a0 in zip(ours_p, ref_p, before):
            sa, sb = ours_opt.state[a], ref_opt.state[b]
            layout = _layout(a.shape, options)
            assert int(sa["step"]) == sb["step"]
            if t > 0:
                worst["update"] = max(worst["update"], _rel(a.detach() - a0, b.detach() - a0))
            for i, (gg_a, gg_b) in enumerate(zip(sa["GG"], sb["GG"])):
                assert (gg_a.numel() > 0) == (len(gg_b) > 0), f"dim {i}: preconditioned on one side only"
                if gg_a.numel():
                    worst["GG"] = max(worst["GG"], _rel(gg_a, gg_b))
            new_basis = sb["step"] == 0 or sb["step"] % frequency == 0
            if new_basis:
                if sb["step"] > 0 or check_first_basis:
                    for qa, qb in zip(sa["Q"], sb["Q"]):
                        if qa.numel():
                            worst["basis"] = max(worst["basis"], _basis_mismatch(qa, qb))
                _feed_our_basis(sa, sb, layout)
            if t > 0:
                worst["exp_avg"] = max(worst["exp_avg"], _rel(sa["exp_avg"], _to_work(sb["exp_avg"], layout)))
                worst["exp_avg_sq"] = max(
                    worst["exp_avg_sq"], _rel(sa["exp_avg_sq"], _to_work(sb["exp_avg_sq"], layout))
                )
    return worst


PARITY_CASES = {
    "square_2d": ([(6, 6)], {}),
    "rectangular_2d": ([(4, 7), (7, 3)], {"precondition_frequency": 4}),
    "1d": ([(5,)], {}),
    "1d_precondition_1d": ([(5,)], {"precondition_1d": True, "precondition_frequency": 4}),
    "0d": ([()], {}),
    "0d_merge_dims": ([()], {"merge_dims": True}),
    "3d": ([(3, 4, 5)], {"precondition_frequency": 5}),
    "4d_no_merge": ([(4, 3, 2, 2)], {"precondition_frequency": 5}),
    "4d_channels_last_no_merge": ([(4, 3, 2, 2)], {"data_format": "channels_last", "precondition_frequency": 5}),
    "4d_channels_first_merge": ([(4, 3, 2, 2)], {"merge_dims": True, "max_precond_dim": 6}),
    "4d_channels_last_merge": (
        [(4, 3, 2, 2)],
        {"merge_dims": True, "max_precond_dim": 6, "data_format": "channels_last", "precondition_frequency": 5},
    ),
    "dim_above_max_precond_dim": ([(6, 20), (20, 6)], {"max_precond_dim": 10, "precondition_frequency": 5}),
    "merge_dims_3d": ([(2, 3, 8), (5, 6)], {"merge_dims": True, "max_precond_dim": 6}),
    "normalize_grads": ([(6, 6), (5,)], {"normalize_grads": True}),
    "no_bias_correction": ([(6, 6)], {"correct_bias": False}),
    "shampoo_beta": ([(6, 6), (3, 4, 5)], {"shampoo_beta": 0.8, "precondition_frequency": 3}),
    "weight_decay": ([(6, 6)], {"weight_decay": 0.1, "lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-6}),
    "no_weight_decay": ([(6, 6), (4,)], {"weight_decay": 0.0}),
}
# Factors that are rank-deficient after the first gradient (their first basis is not unique).
RANK_DEFICIENT_FIRST = {"rectangular_2d", "1d_precondition_1d", "dim_above_max_precond_dim", "merge_dims_3d",
                        "normalize_grads"}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_with_reference(case, seed_soap, float64_default):
    shapes, options = PARITY_CASES[case]
    worst = _lockstep(seed_soap, shapes, check_first_basis=case not in RANK_DEFICIENT_FIRST, **options)
    print(case, {k: f"{v:.1e}" for k, v in worst.items()})
    for key in ("update", "exp_avg", "exp_avg_sq", "GG"):
        assert worst[key] <= TOL, (key, worst)
    # Same basis up to column signs; the reference rounds its factors and QR to float32.
    assert worst["basis"] <= 1e-4, worst


def test_parity_without_feeding_bases(seed_soap, float64_default):
    """Unassisted lockstep on full-rank factors: only the reference's float32 basis rounding differs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = SOAP([a]), seed_soap([b])
    worst_param = 0.0
    for _ in range(STEPS):
        g = torch.randn(6, 6, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        worst_param = max(worst_param, _rel(a.detach(), b.detach()))
    print("unassisted parameter rel diff", f"{worst_param:.1e}")
    assert worst_param <= TOL


# ------------------------------------------------------------------------------------------------
def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(6, 8, dtype=dtype)),
        torch.nn.Parameter(torch.randn(6, dtype=dtype)),
        torch.nn.Parameter(torch.randn(4, 3, 2, 2, dtype=dtype)),
        torch.nn.Parameter(torch.randn((), dtype=dtype)),
    ]


def _grads(params, gen):
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def _check_plain(value):
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), k
            _check_plain(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v)
    else:
        assert value is None or isinstance(value, (torch.Tensor, bool, int, float, str)), type(value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_identically(dtype):
    options = dict(precondition_frequency=3, merge_dims=True, max_precond_dim=6, precondition_1d=True,
                   data_format="channels_last", normalize_grads=True)
    params = _model(dtype)
    opt = SOAP(params, **options)
    gen = torch.Generator().manual_seed(0)
    for _ in range(7):
        for p, g in zip(params, _grads(params, gen)):
            p.grad = g
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    _check_plain(opt.state_dict())
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = SOAP(params2, **options)
    opt2.load_state_dict(loaded)
    for p, p2 in zip(params, params2):
        s, s2 = opt.state[p], opt2.state[p2]
        assert s2["exp_avg"].dtype == s2["exp_avg_sq"].dtype == torch.promote_types(dtype, torch.float32)
        assert all(q.dtype == s2["exp_avg"].dtype for q in s2["Q"] + s2["GG"])
        assert torch.equal(s["exp_avg"], s2["exp_avg"]) and torch.equal(s["step"], s2["step"])
    for _ in range(8):  # crosses more refreshes
        for p, p2, g in zip(params, params2, _grads(params, gen)):
            p.grad, p2.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
        for p, p2 in zip(params, params2):
            assert p.dtype == dtype and torch.equal(p, p2)
    for p, p2 in zip(params, params2):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])
        for a, b in zip(opt.state[p]["Q"] + opt.state[p]["GG"], opt2.state[p2]["Q"] + opt2.state[p2]["GG"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("split", [2, 7])
@pytest.mark.parametrize("shapes,options", [
    ([(6, 4), (4,), (3, 5)], {}),
    ([(4, 3, 2, 2), (5,)], {"merge_dims": True, "max_precond_dim": 6, "data_format": "channels_last",
                            "precondition_1d": True}),
], ids=["plain", "merge_channels_last"])
def test_seed_checkpoint_loads_and_continues(seed_soap, float64_default, split, shapes, options):
    """A state_dict saved by the seed's SOAP (int step, [] for identity dimensions, moments in the
    parameter's shape) loads with weights_only=True and continues as the seed itself does, through refreshes
    (precondition_frequency=3; split before the first refresh and after two)."""
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(12)]
    options = dict(options, lr=1e-2, precondition_frequency=3)

    def run(resume_as):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = seed_soap(params, **options)
        for t, gs in enumerate(grads):
            if t == split and resume_as is not None:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                buffer.seek(0)
                opt = resume_as(params, **options)
                opt.load_state_dict(torch.load(buffer, weights_only=True))
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return [p.detach() - x for p, x in zip(params, init)], opt

    reference, _ = run(None)
    resumed, ours = run(SOAP)
    assert isinstance(ours, SOAP) and all(torch.is_tensor(s["step"]) for s in ours.state.values())
    for a, b in zip(resumed, reference):
        assert _rel(a, b) < 1e-6


def test_load_state_dict_copies_the_state():
    params = _model()
    opt = SOAP(params)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, g in zip(params, _grads(params, gen)):
            p.grad = g
        opt.step()
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = SOAP(params2)
    opt2.load_state_dict(opt.state_dict())  # no serialisation: must not share tensors
    before = copy.deepcopy(opt.state_dict()["state"])
    for p2, g in zip(params2, _grads(params2, gen)):
        p2.grad = g
    opt2.step()
    for pid, state in opt.state_dict()["state"].items():
        assert torch.equal(state["step"], before[pid]["step"])
        assert torch.equal(state["exp_avg"], before[pid]["exp_avg"])


def test_bf16_params_keep_float32_state():
    params = _model(torch.bfloat16)
    opt = SOAP(params, precondition_frequency=2, precondition_1d=True)
    gen = torch.Generator().manual_seed(0)
    start = [p.detach().clone() for p in params]
    for _ in range(6):
        for p, g in zip(params, _grads(params, gen)):
            p.grad = g
        opt.step()
    for p, p0 in zip(params, start):
        state = opt.state[p]
        assert p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all()
        assert not torch.equal(p, p0)
        for t in [state["exp_avg"], state["exp_avg_sq"], *state["Q"], *state["GG"]]:
            assert t.dtype == torch.float32


def test_first_step_builds_bases_without_moving():
    p = torch.nn.Parameter(torch.randn(5, 7))
    p0 = p.detach().clone()
    opt = SOAP([p], weight_decay=0.5)
    p.grad = torch.randn(5, 7)
    opt.step()
    assert torch.equal(p, p0)
    state = opt.state[p]
    assert int(state["step"]) == 0 and state["exp_avg"].abs().sum() == 0
    for q, gg in zip(state["Q"], state["GG"]):
        assert torch.allclose(q.T @ q, torch.eye(q.shape[0]), atol=1e-5)
        eig = (q.T @ gg @ q).diagonal()
        assert torch.all(eig[:-1] >= eig[1:] - 1e-5)  # descending
    p.grad = torch.randn(5, 7)
    opt.step()
    assert int(state["step"]) == 1 and not torch.equal(p, p0)


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3, 3))
    b0 = b.detach().clone()
    opt = SOAP([a, b])
    for _ in range(3):
        a.grad = torch.randn(3, 3)
        opt.step()
    assert torch.equal(b, b0) and len(opt.state[b]) == 0
    assert int(opt.state[a]["step"]) == 2


def test_empty_params_change_nothing_else():
    """Parameters without elements step (to empty results) and leave the others bit for bit as they
    are without them, through refreshes (as so_optax.soap)."""
    runs = []
    for with_empty in (False, True):
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.ones(6, 4))
        empty = [torch.nn.Parameter(torch.ones(0, 5)), torch.nn.Parameter(torch.ones(2, 0, 3))]
        params = [w] + (empty if with_empty else [])
        opt = SOAP(params, lr=1e-2, precondition_frequency=2)
        for _ in range(5):
            w.grad = torch.randn(6, 4, generator=gen)
            for e in empty:
                e.grad = torch.zeros_like(e)
            opt.step()
        runs.append(w.detach().clone())
        assert all(e.shape == e.grad.shape for e in empty)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], torch.ones(6, 4))


def test_step_without_grads_is_a_noop():
    params = _model()
    opt = SOAP(params)
    start = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p, p0) for p, p0 in zip(params, start)) and len(opt.state) == 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p, g in zip(params, _grads(params, gen)):
            p.grad = g
        opt.step()
    snapshot = copy.deepcopy(opt.state_dict())
    start = [p.detach().clone() for p in params]
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert all(torch.equal(p, p0) for p, p0 in zip(params, start))
    after = opt.state_dict()
    for pid, state in snapshot["state"].items():
        assert torch.equal(state["step"], after["state"][pid]["step"])
        assert torch.equal(state["exp_avg"], after["state"][pid]["exp_avg"])


def test_sparse_gradient_raises():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SOAP([p])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), r"Invalid learning rate: lr=-1.0"),
        (dict(betas=(1.0, 0.9)), r"Invalid betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"Invalid betas\[1\]"),
        (dict(betas=0.9), r"Invalid betas"),
        (dict(shampoo_beta=1.0), r"Invalid shampoo_beta"),
        (dict(shampoo_beta="x"), r"Invalid shampoo_beta"),
        (dict(eps=-1e-8), r"Invalid eps"),
        (dict(weight_decay=-0.1), r"Invalid weight_decay"),
        (dict(precondition_frequency=0), r"Invalid precondition_frequency"),
        (dict(precondition_frequency=2.5), r"Invalid precondition_frequency"),
        (dict(max_precond_dim=0), r"Invalid max_precond_dim"),
        (dict(merge_dims="yes"), r"Invalid merge_dims"),
        (dict(precondition_1d=None), r"Invalid precondition_1d"),
        (dict(normalize_grads=1), r"Invalid normalize_grads"),
        (dict(correct_bias="no"), r"Invalid correct_bias"),
        (dict(data_format="NHWC"), r"Invalid data_format"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, match):
    p = torch.nn.Parameter(torch.randn(2, 2))
    with pytest.raises(ValueError, match=match):
        SOAP([p], **kwargs)
    with pytest.raises(ValueError, match=match):  # per-group values are validated too
        SOAP([{"params": [p], **kwargs}])


def test_complex_params_and_invalid_groups_are_rejected_whole():
    w = torch.nn.Parameter(torch.randn(2, 2))
    z = torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="Invalid params: torch_bridge.SOAP .*parameter 1 of param group 0 has "
                                         "dtype torch.complex64"):
        SOAP([w, z])
    opt = SOAP([w])
    with pytest.raises(ValueError, match="param group 1 has dtype torch.complex64"):
        opt.add_param_group({"params": [z]})
    with pytest.raises(ValueError, match="Invalid learning rate: lr="):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr": -1.0})
    assert len(opt.param_groups) == 1  # a rejected group is not left behind
    w.grad = torch.randn(2, 2)
    opt.step()


def test_shampoo_beta_negative_means_betas1():
    p = torch.nn.Parameter(torch.randn(3, 3))
    SOAP([p], shampoo_beta=-0.5)  # any negative value is accepted


def test_closure_runs_with_grad_enabled():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    opt = SOAP(model.parameters())
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True] and isinstance(loss, torch.Tensor)
    losses = [opt.step(closure).item() for _ in range(20)]
    assert losses[-1] < losses[0]


def test_per_group_hyperparameters_match_separate_optimizers():
    torch.manual_seed(0)
    group_a = dict(lr=1e-2, betas=(0.9, 0.99), precondition_frequency=2, weight_decay=0.0)
    group_b = dict(lr=3e-3, merge_dims=True, max_precond_dim=6, data_format="channels_last", correct_bias=False)
    pa, pb = _model()[:2], _model()[2:]
    ca = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    cb = [torch.nn.Parameter(p.detach().clone()) for p in pb]
    joint = SOAP([{"params": pa, **group_a}, {"params": pb, **group_b}])
    assert joint.param_groups[1]["data_format"] == "channels_last"
    sep_a, sep_b = SOAP(ca, **group_a), SOAP(cb, **group_b)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        for p, c, g in zip(pa + pb, ca + cb, _grads(pa + pb, gen)):
            p.grad, c.grad = g.clone(), g.clone()
        joint.step()
        sep_a.step()
        sep_b.step()
    for p, c in zip(pa + pb, ca + cb):
        assert torch.equal(p, c)


def test_setstate_fills_defaults_for_old_checkpoints():
    p = torch.nn.Parameter(torch.randn(2, 2))
    opt = SOAP([p])
    state = opt.__getstate__()
    for key in ("data_format", "correct_bias", "normalize_grads"):
        del state["param_groups"][0][key]
    fresh = SOAP.__new__(SOAP)
    fresh.__setstate__(state)
    group = fresh.param_groups[0]
    assert group["data_format"] == "channels_first" and group["correct_bias"] is True
    assert group["normalize_grads"] is False


def test_failed_eigh_falls_back(monkeypatch):
    gg = torch.eye(3) * 2.0
    fallback = torch.linalg.qr(torch.randn(3, 3))[0]

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("no convergence")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    assert torch.equal(eigh_descending(gg), torch.eye(3))
    assert torch.equal(eigh_descending(gg, fallback), fallback)


def test_nonfinite_refresh_keeps_sorted_basis():
    q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    gg = torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0], dtype=torch.float64))
    gg_q = q @ gg @ q.T
    new_q, order = refresh_basis(gg_q, q)
    assert order.tolist() == [1, 3, 2, 0]
    bad = gg_q.clone()
    bad[0, 0] = float("nan")
    kept, order = refresh_basis(bad, q)
    assert torch.isfinite(kept).all()
    assert torch.equal(kept, q.index_select(1, order))


def test_torch_bridge_does_not_import_jax():
    code = "import sys, torch_bridge; assert 'jax' not in sys.modules, 'jax imported'"
    src = str(Path(__file__).resolve().parents[2] / "src")
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r}); {code}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
