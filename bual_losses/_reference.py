"""The reference engine: every statistic from plain eager ops, the oracle for the other two.

It materialises what the maths names (probabilities, one-hot targets, weights) and sums it, so
it is easy to check against MONAI and against hand-computed cases; the fused engines
(``bual_losses.fused`` on CPU, ``bual_losses._accelerator`` elsewhere) must return the same
numbers.
"""

from __future__ import annotations

from typing import Optional, cast

import torch
import torch.nn.functional as F

from . import _validation as V
from ._core import (
    Finish,
    Options,
    RegionStats,
    accumulation_dtype,
    finish,
    normalized_entropy,
)
from .pseudo import pseudo_labels
from .regions import UncertaintyWeight


def target_probs(
    target: torch.Tensor, logits: torch.Tensor, opts: Options, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target as class probabilities ``g`` (B, K, *S) and a validity mask (B, *S).

    Ignored voxels get ``g = 0`` and validity 0.
    """
    if opts.kind == "labels":
        labels = V.labels_view(target, logits)
        valid = torch.ones_like(labels, dtype=torch.bool)
        if opts.ignore_index is not None:
            valid = labels != opts.ignore_index
        num = max(logits.shape[1], 2)
        safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
        g = F.one_hot(safe, num).movedim(-1, 1).to(dtype) * valid.unsqueeze(1).to(dtype)
        return g, valid
    g = target.to(dtype)
    if opts.activation == "sigmoid":
        g = torch.cat([1 - g, g], dim=1)
    return g, torch.ones_like(g[:, 0], dtype=torch.bool)


def class_log_probs(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """``log p`` over K classes: log-softmax, or ``[log(1-sigmoid), log(sigmoid)]`` for binary."""
    if activation == "sigmoid":
        return torch.cat([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=1)
    return F.log_softmax(logits, dim=1)


def voxel_weight(
    region_weight: Optional[torch.Tensor],
    valid: torch.Tensor,
    logits: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Region weight times validity, ``(B, *S)`` in the accumulation dtype."""
    w = valid.to(dtype)
    if region_weight is not None:
        w = w * V.weight_view(region_weight, logits).to(dtype)
    return w


def reference_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    region_weight: Optional[torch.Tensor],
    opts: Options,
) -> RegionStats:
    """Stage 1 with plain eager ops; the oracle for the fused engines."""
    dtype = accumulation_dtype(logits.dtype)
    logp = class_log_probs(logits.to(dtype), opts.activation)
    p = logp.exp()
    g, valid = target_probs(target, logits, opts, dtype)
    w = voxel_weight(region_weight, valid, logits, dtype).unsqueeze(1)
    wg = w * g
    if opts.class_weight is not None:
        shape = (1, -1) + (1,) * (logits.ndim - 2)
        wg_ce = wg * opts.class_weight.to(dtype).view(shape)
    else:
        wg_ce = wg
    spatial = tuple(range(2, logits.ndim))
    power = 2 if opts.squared_pred else 1
    return RegionStats(
        # where(): a -inf logit at a class the target does not hold must give 0, not 0 * -inf
        ce_num=-torch.where(wg_ce != 0, wg_ce * logp, 0.0).sum(dim=(1, *spatial)),
        ce_den=wg_ce.sum(dim=(1, *spatial)),
        inter=(wg * p).sum(dim=spatial),
        pred=(w * p.pow(power)).sum(dim=spatial),
        ground=(w * g.pow(power)).sum(dim=spatial),
    )


def reference_loss(
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    region_weight: Optional[torch.Tensor],
    opts: Options,
    spec: Finish,
    derived: Optional[UncertaintyWeight] = None,
    teacher: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, RegionStats, Optional[torch.Tensor]]:
    """The engine entry (see ``bual_losses.engines``): ``(loss, stats, mass)``.

    ``teacher`` logits give the target (their ``pseudo_labels``) when ``target`` is None, and
    the uncertainty of ``derived`` (else the detached ``logits`` do); ``mass`` is the sum of the
    derived region indicator over the batch (None without one).
    """
    source = logits if teacher is None else teacher.detach()
    if target is None:
        with torch.no_grad():
            target = cast(torch.Tensor, pseudo_labels(source))
    mass = None
    if derived is not None:
        u = normalized_entropy(source)
        derived = derived.absolute(u)
        thr = torch.as_tensor(derived.threshold, dtype=u.dtype, device=u.device)
        s = derived.indicator(u, thr.view(-1, *([1] * (u.ndim - 1))) if thr.ndim else thr)
        weight = derived.base + derived.scale * s
        if region_weight is not None:
            weight = weight * V.weight_view(region_weight, logits).to(weight.dtype)
        region_weight = weight
        mass = s.to(accumulation_dtype(logits.dtype)).sum()
    stats = reference_stats(logits, target, region_weight, opts)
    return finish(stats, opts, spec), stats, mass
