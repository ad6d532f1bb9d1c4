"""Diagonal Hessian estimators used by :class:`torch_bridge.Sophia`.

Sophia (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", arXiv:2305.14342) preconditions with an exponential moving average of a cheap, noisy
estimate ``ĥ`` of the Hessian diagonal. Two estimators are provided here as small functions so that tests
(and users) can call them directly:

* **Gauss-Newton-Bartlett (GNB, Sophia-G).** For a loss ``ℓ(softmax(f(θ)), y)`` with logits ``f(θ)``,
  sample labels ``ŷ ~ softmax(f(θ))`` once for the whole batch and take the gradient of the mean
  cross-entropy of the sampled labels, ``ĝ = ∇θ (1/N) Σ_n CE(f_n(θ), ŷ_n)``. By Bartlett's identity
  ``E[N · ĝ ⊙ ĝ]`` is the diagonal of the Gauss-Newton matrix of the mean loss, so ``ĥ = ĝ ⊙ ĝ`` (or
  ``N · ĝ ⊙ ĝ``, the paper's form with ``N`` the number of label positions).
* **Hutchinson (Sophia-H).** For probes ``v`` with ``E[v vᵀ] = I`` (Gaussian or Rademacher),
  ``E[v ⊙ (H v)] = diag(H)``. ``H v`` is one double backward pass (reverse-over-reverse) through a
  gradient computed with ``create_graph=True``.

All functions handle every parameter in ONE autograd call. At the end: what one step of Sophia needs of
them (its arguments, checked at every step, and its estimates of the refreshed parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from torch_bridge._distributed import local

__all__ = [
    "sample_labels",
    "labels_from_uniforms",
    "sampled_label_loss",
    "sampled_label_gradients",
    "backward_sampled_label_loss",
    "gnb_hessian_diagonal",
    "draw_probes",
    "hessian_vector_product",
    "hutchinson_hessian_diagonal",
]

_FREED_GRAPH_MARKERS = ("second time", "already been freed")


def _is_freed_graph_error(err: RuntimeError) -> bool:
    message = str(err)
    return any(marker in message for marker in _FREED_GRAPH_MARKERS)


def sample_labels(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples one label per position from ``softmax(logits)``.

    Inverse-CDF sampling: one float64 uniform ``u_n`` per position, in position order, from ``generator``
    (the global generator when ``None``), and ``ŷ_n`` the first class whose cumulative probability exceeds
    ``u_n``. Distributed Sophia draws the whole batch's uniforms the same way and keeps its ranks' positions
    (:func:`labels_from_uniforms`), so one process and any split of the batch over ranks draw the same
    labels from the same generator state.

    Args:
      logits: ``(..., C)`` tensor of unnormalised log-probabilities; leading dims are positions
        (``(B, C)`` for classification, ``(B, T, C)`` for a language model).
      generator: optional ``torch.Generator`` for reproducible sampling.

    Returns:
      An ``int64`` tensor of shape ``logits.shape[:-1]`` with ``ŷ_n ~ Categorical(softmax(logits_n))``.
    """
    positions = logits[..., 0].numel()
    uniforms = torch.rand(positions, generator=generator, dtype=torch.float64, device=logits.device)
    return labels_from_uniforms(logits, uniforms)


_CDF_CHUNK_ELEMENTS = 1 << 24  # float64 cumulative probabilities held at once (128 MiB)


def labels_from_uniforms(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Labels where each position's uniform ``u_n`` falls in its cumulative ``softmax(logits_n)``.

    Rows are taken in chunks so that the float64 CDF never holds more than ``_CDF_CHUNK_ELEMENTS``
    entries; each row's label depends only on that row and its uniform.
    """
    flat = logits.detach().reshape(-1, logits.shape[-1])
    labels = torch.empty(flat.shape[0], dtype=torch.int64, device=flat.device)
    rows = max(1, _CDF_CHUNK_ELEMENTS // max(1, flat.shape[-1]))
    for start in range(0, flat.shape[0], rows):
        cdf = torch.softmax(flat[start:start + rows].to(torch.float64), dim=-1).cumsum(dim=-1)
        u = uniforms[start:start + rows].unsqueeze(-1) * cdf[:, -1:]
        labels[start:start + rows] = torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=flat.shape[-1] - 1)
    return labels.reshape(logits.shape[:-1])


def sampled_label_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``labels`` under ``logits`` over the positions kept by ``mask``.

    Args:
      logits: ``(..., C)`` logits carrying their autograd graph.
      labels: integer labels of shape ``logits.shape[:-1]``.
      mask: optional boolean (or 0/1) tensor of shape ``logits.shape[:-1]``; ``True`` marks a real
        position, ``False`` a padding position that is left out of the mean.

    Returns:
      ``(loss, num_positions)``: the scalar mean loss and the number ``N`` of positions averaged over
      (a 0-d tensor).
    """
    num_classes = logits.shape[-1]
    flat_logits = logits.reshape(-1, num_classes)
    flat_labels = labels.reshape(-1).to(device=logits.device, dtype=torch.long)
    if mask is None:
        loss = F.cross_entropy(flat_logits, flat_labels, reduction="mean")
        count = torch.tensor(float(flat_labels.numel()), dtype=loss.dtype, device=loss.device)
        return loss, count
    if mask.shape != logits.shape[:-1]:
        raise ValueError(
            f"Invalid logits_mask: shape {tuple(mask.shape)} does not match the positions of logits "
            f"{tuple(logits.shape[:-1])} (logits.shape[:-1])"
        )
    keep = mask.reshape(-1).to(device=logits.device, dtype=torch.bool)
    per_position = F.cross_entropy(flat_logits, flat_labels, reduction="none")
    count = keep.sum().to(per_position.dtype)
    loss = torch.where(keep, per_position, torch.zeros_like(per_position)).sum() / count.clamp_min(1.0)
    return loss, count


def sampled_label_gradients(
    logits: torch.Tensor,
    params: Sequence[torch.Tensor],
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    weight: float = 1.0,
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """``ĝ = ∇ weight · mean CE(logits, labels)`` for all ``params`` in one autograd call (``None`` where the
    loss does not reach a parameter), and the number ``N`` of positions averaged over (a 0-d tensor).

    The graph behind ``logits`` is released by the call (no ``retain_graph``).
    """
    if not isinstance(logits, torch.Tensor) or not logits.requires_grad:
        raise ValueError(
            "Invalid logits: the Gauss-Newton-Bartlett estimate needs the model's logits with their "
            "autograd graph (computed with grad enabled, not detached)"
        )
    with torch.enable_grad():
        loss, count = sampled_label_loss(logits, labels, mask)
        if weight != 1.0:
            loss = loss * weight
        try:
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        except RuntimeError as err:
            raise _explained(err) from err
    return list(grads), count


def backward_sampled_label_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, *,
                                weight: float = 1.0) -> None:
    """``(weight · mean CE(logits, labels)).backward()``: the gradient accumulates in the leaves' ``.grad``
    (for FSDP2, whose reduce-scatter happens in its backward hooks)."""
    with torch.enable_grad():
        loss, _ = sampled_label_loss(logits, labels, mask)
        try:
            (loss * weight).backward()
        except RuntimeError as err:
            raise _explained(err) from err


def _explained(err: RuntimeError) -> RuntimeError:
    if not _is_freed_graph_error(err):
        return err
    return RuntimeError(
        "Sophia (gnb): the autograd graph behind `logits` was already freed. Call "
        "loss.backward(retain_graph=True) before optimizer.step(logits=logits) (or "
        "retain_graph=optimizer.refreshes_next_step(), True before this step) so that the "
        "Gauss-Newton-Bartlett estimate can backpropagate through the logits a second time."
    )


def gnb_hessian_diagonal(
    logits: torch.Tensor,
    params: Sequence[torch.Tensor],
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale_by_positions: bool = False,
) -> list[torch.Tensor]:
    """Gauss-Newton-Bartlett estimate ``ĥ = ĝ ⊙ ĝ`` (or ``N · ĝ ⊙ ĝ``) for all ``params`` at once.

    ``ĝ`` is the gradient of :func:`sampled_label_loss` with respect to every parameter, taken with a
    single ``torch.autograd.grad`` call (:func:`sampled_label_gradients`). The graph behind ``logits`` is
    released by that call (no ``retain_graph``), so nothing stays alive after the estimate.

    Args:
      logits: ``(..., C)`` model output with its autograd graph.
      params: the parameters to estimate for.
      labels: sampled labels, shape ``logits.shape[:-1]`` (see :func:`sample_labels`).
      mask: optional position mask (``True`` = real position), see :func:`sampled_label_loss`.
      scale_by_positions: multiply by the number ``N`` of label positions (the paper's ``B·ĝ⊙ĝ``).

    Returns:
      One tensor per parameter; parameters that do not influence ``logits`` get zeros.
    """
    params = list(params)
    grads, count = sampled_label_gradients(logits, params, labels, mask)
    out = []
    for p, g in zip(params, grads):
        if g is None:
            out.append(torch.zeros_like(p))
            continue
        est = g * g
        if scale_by_positions:
            est.mul_(count.to(est.dtype))
        out.append(est)
    return out


def draw_probes(
    params: Sequence[torch.Tensor],
    distribution: str = "gaussian",
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Draws Hutchinson probes ``v`` with ``E[v vᵀ] = I``, one per parameter.

    Args:
      params: tensors giving the shape, dtype and device of each probe.
      distribution: ``'gaussian'`` (``v ~ N(0, I)``, the seed's choice) or ``'rademacher'``
        (``v ∈ {-1, +1}`` uniformly, lower variance).
      generator: optional ``torch.Generator``.
    """
    probes = []
    for p in params:
        if distribution == "gaussian":
            v = torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=generator)
        elif distribution == "rademacher":
            v = torch.randint(0, 2, p.shape, device=p.device, generator=generator).to(p.dtype)
            v.mul_(2).sub_(1)
        else:
            raise ValueError(f"Invalid probe: {distribution!r} (must be 'gaussian' or 'rademacher')")
        probes.append(v)
    return probes


def hessian_vector_product(
    loss: torch.Tensor | None,
    params: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    *,
    grads: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Computes ``H v`` for the Hessian ``H = ∇²θ loss`` by a double backward pass.

    ``H v = ∇θ ⟨∇θ loss, v⟩``: one ``torch.autograd.grad`` call with ``grad_outputs=vectors`` through the
    gradient ``∇θ loss`` (computed here with ``create_graph=True`` unless ``grads`` already holds it).

    Args:
      loss: scalar loss with its autograd graph (ignored when ``grads`` is given).
      params: parameters ``θ`` (leaves requiring grad).
      vectors: ``v``, one tensor per parameter with the parameter's shape.
      grads: optional precomputed ``∇θ loss`` (one per parameter) made with ``create_graph=True``.

    Returns:
      ``H v`` as a list of tensors shaped like ``params`` (zeros where the Hessian block is zero).
    """
    params = list(params)
    vectors = list(vectors)
    if len(vectors) != len(params):
        raise ValueError(f"Invalid vectors: got {len(vectors)} for {len(params)} params")
    with torch.enable_grad():
        if grads is None:
            if loss is None:
                raise ValueError("Invalid loss: pass the scalar loss or its gradients `grads`")
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        outputs, grad_outputs = [], []
        for g, v in zip(grads, vectors):
            if g is not None and g.requires_grad:
                outputs.append(g)
                grad_outputs.append(v.to(g.dtype))
        if not outputs:  # the loss is (at most) linear in params: H = 0
            return [torch.zeros_like(p) for p in params]
        hv = torch.autograd.grad(outputs, params, grad_outputs=grad_outputs, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def hutchinson_hessian_diagonal(
    probes: Sequence[torch.Tensor], hvps: Sequence[torch.Tensor], *, absolute: bool = False
) -> list[torch.Tensor]:
    """Hutchinson's estimate ``ĥ = v ⊙ (H v)`` (``|v ⊙ (H v)|`` when ``absolute``, the seed's choice)."""
    out = []
    for v, hv in zip(probes, hvps):
        est = v * hv
        if absolute:
            est.abs_()
        out.append(est)
    return out


_MISSING_LOGITS = (
    "Sophia (gnb) needs `logits` at every step (the estimate uses them on refresh steps, every k-th): call "
    "loss.backward(retain_graph=optimizer.refreshes_next_step()) then optimizer.step(logits=logits); for "
    "estimates made by hand use hessian_computation_type='manual' and update_hessian()"
)
_MISSING_CLOSURE = (
    "Sophia (hutchinson) needs `closure` at every step, a callable returning the loss (without calling "
    "backward()): call optimizer.step(closure=closure)"
)


def check_step_arguments(groups: Sequence[dict[str, Any]], closure: Callable | None,
                         logits: torch.Tensor | None) -> None:
    """A ``'gnb'`` group needs ``logits`` and a ``'hutchinson'`` group ``closure`` at every step that has a
    parameter to train, as the JAX side needs ``logits_fn`` / ``obj_fn`` at every ``update``."""
    for group in groups:
        if not any(p.requires_grad for p in group["params"]):
            continue
        kind = group["hessian_computation_type"]
        if kind == "gnb" and logits is None:
            raise ValueError(_MISSING_LOGITS)
        if kind == "hutchinson" and closure is None:
            raise ValueError(_MISSING_CLOSURE)


def num_positions(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | float:
    """``N``, the number of label positions of the GNB estimate (the mask's ``True`` entries)."""
    if mask is None:
        return float(logits.reshape(-1, logits.shape[-1]).shape[0])
    return mask.to(torch.bool).sum().to(logits.dtype)


def sophia_gnb_estimates(
    logits: torch.Tensor | None,
    logits_mask: torch.Tensor | None,
    refresh: list[tuple[torch.Tensor, dict[str, Any]]],
    everything: Sequence[torch.Tensor],
    sample: Callable[[torch.Tensor], torch.Tensor],
    distributor: Any,
) -> dict[torch.Tensor, torch.Tensor]:
    """Sophia-G's estimates of the ``(parameter, group)`` pairs in ``refresh``: one label sample (``sample``,
    the optimizer's hook) and one backward through the ``distributor`` (``everything``: all parameters);
    ``ĝ ⊙ ĝ``, times ``N`` in the paper form."""
    if not torch.is_tensor(logits) or logits.dim() < 1:
        raise ValueError("Invalid logits: expected a (..., num_classes) tensor")
    labels = sample(logits.detach())
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"Invalid labels from _sample_labels: shape {tuple(labels.shape)}, expected "
            f"logits.shape[:-1] = {tuple(logits.shape[:-1])}"
        )
    grads, positions = distributor.gnb_gradients(logits, [p for p, _ in refresh], everything, labels, logits_mask)
    if not distributor.distributed:
        positions = num_positions(logits, logits_mask)
    estimates = {}
    for (p, group), g in zip(refresh, grads):
        est = g * g if g is not None else torch.zeros_like(local(p))
        if group["form"] == "paper":  # the paper's B * g_hat^2 (B: the whole batch's label positions)
            est.mul_(positions)
        estimates[p] = est
    return estimates


def sophia_closure_estimates(
    closure: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    refresh_group: dict[torch.Tensor, dict[str, Any]],
    distributor: Any,
    draw: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]],
) -> tuple[torch.Tensor, dict[torch.Tensor, torch.Tensor], dict[torch.Tensor, torch.Tensor]]:
    """Evaluates Sophia-H's loss-returning closure: ``(loss, gradients of params, Hutchinson estimates of the
    parameters in refresh_group, by the probes of draw)``, the seed form taking ``|v ⊙ Hv|``."""
    with torch.enable_grad():
        loss = closure()
        if not torch.is_tensor(loss) or not loss.requires_grad:
            raise ValueError(
                "Invalid closure: for 'hutchinson' it must return the loss as a tensor with its "
                "autograd graph (computed with grad enabled, backward() not called)"
            )
        grad_map, triples = distributor.closure_gradients(loss, params, list(refresh_group), draw)
    estimates = {p: hutchinson_hessian_diagonal([v], [hv], absolute=refresh_group[p]["form"] == "seed")[0]
                 for p, v, hv in triples}  # the seed takes |v * Hv|
    return loss.detach(), grad_map, estimates
