r"""The fused region CE + Dice statistics: one autograd node, chunked, memory-light.

:func:`fused_stats` returns the same :class:`~bual_losses.losses.RegionStats` as
:func:`~bual_losses.losses.reference_stats`, so the loss is finished by the same code on both
paths. What differs is how the per-voxel work is done:

* **forward** walks the voxels in chunks of about :data:`CHUNK_ELEMENTS` logits. Per chunk: one
  softmax (binary logits use ``softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]``), the log-sum-exp
  recovered from the softmax as ``lse = max_c z_c - log max_c p_c`` (exact and finite for logits
  of any size, since ``max_c p_c >= 1/C``), and the sums of :class:`RegionStats` accumulated in
  float32 (float64 for float64 logits). Nothing of size ``(B, C, *S)`` is kept: autograd saves
  only the inputs (logits, target, weight) and per-sample scalars.
* **backward** recomputes the softmax per chunk and writes the closed-form gradient straight into
  one preallocated tensor. With ``h_c = dL/dp_c`` per unit weight,

  .. math::

      \frac{\partial L}{\partial z_j} = w\Big[\bar g_{ce}\,(A\,p_j - a_j)
          + p_j\big(h_j - \textstyle\sum_c p_c h_c\big)\Big],\qquad
      h_c = \bar g_{I,c}\, g_c + k\,\bar g_{P,c}\, p_c^{k-1},

  where ``a_c = \omega_c g_c`` (class-weighted target), ``A = \sum_c a_c`` and the bars are the
  incoming gradients of ``ce_num``, ``inter`` and ``pred``.

Uncertainty weights can be derived inside the node from the same softmax (normalised entropy
``u = (lse - sum_c p_c z_c) / ln K``, then :class:`UncertaintyWeight`), so the labeled branch of
:func:`~bual_losses.bidirectional_loss` needs no separate entropy map.

No ``.item()``, no host synchronisation and no data-dependent Python branches: chunk bounds come
from shapes only, so the same code runs on CPU and CUDA.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch

from .losses import RegionStats, _Options, accumulation_dtype

__all__ = ["ACCELERATOR_CHUNKS", "CHUNK_ELEMENTS", "UncertaintyWeight", "fused_stats"]

#: Logits per chunk on the CPU (about 1 MiB of float32): small enough to stay in a core's L2
#: cache with its temporaries, large enough that per-op overhead stays below the arithmetic
#: (measured best of 2**14..2**19 on the 2D and 3D benchmark shapes).
CHUNK_ELEMENTS = 1 << 18

#: On accelerators the cost is the number of kernel launches, not cache misses: the voxels are
#: cut into about this many chunks (each at least CHUNK_ELEMENTS), which bounds the temporaries
#: to a fraction of the logits' size while keeping launches few. A first H200 run with CPU-sized
#: chunks was launch-bound (benchmarks/results/cuda-2026-11-27.md).
ACCELERATOR_CHUNKS = 4


class UncertaintyWeight(NamedTuple):
    r"""A region weight derived from the normalised entropy ``u`` of the logits themselves.

    ``w = base + scale * s`` with ``s = [u > threshold]`` (``temperature=None``) or
    ``sigmoid((u - threshold) / temperature)`` for ``side="high"``; for ``side="low"`` the
    complement ``[u <= threshold]`` or ``sigmoid((threshold - u) / temperature)`` (ties
    ``u == threshold`` go to the low side, as in :mod:`bual_losses.regions`). The weight carries
    no gradient.

    ``threshold`` is a 0-d tensor or one value per sample, shape ``(B,)``.
    """

    threshold: torch.Tensor
    side: str = "high"
    base: float = 1.0
    scale: float = 1.0
    temperature: Optional[float] = None

    def indicator(self, u: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """Region membership ``s`` in [0, 1]; ``threshold`` shaped to broadcast against ``u``."""
        if self.temperature is None:
            high = u > threshold
            return (high if self.side == "high" else ~high).to(u.dtype)
        z = (u - threshold) / self.temperature
        return torch.sigmoid(z if self.side == "high" else -z)

    def __call__(self, u: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """The weight ``base + scale * s``."""
        return self.base + self.scale * self.indicator(u, threshold)


_NO_TENSOR = torch.empty(0)


class _Chunk(NamedTuple):
    b0: int
    b1: int
    s0: int
    s1: int


def _chunks(batch: int, voxels: int, channels: int, device: torch.device) -> list[_Chunk]:
    """Chunks of whole samples when samples are small, of voxel ranges inside one sample else."""
    elements = CHUNK_ELEMENTS
    if device.type != "cpu":
        elements = max(elements, -(-batch * voxels * channels // ACCELERATOR_CHUNKS))
    per_chunk = max(1, elements // max(channels, 1))
    if voxels <= per_chunk:
        step = max(1, per_chunk // voxels)
        return [_Chunk(b, min(b + step, batch), 0, voxels) for b in range(0, batch, step)]
    return [
        _Chunk(b, b + 1, s, min(s + per_chunk, voxels))
        for b in range(batch)
        for s in range(0, voxels, per_chunk)
    ]


class _Prepared(NamedTuple):
    """Everything one pass over a chunk needs, viewed as (B, C, N) / (B, N)."""

    logits: torch.Tensor  # (B, C, N)
    labels: Optional[torch.Tensor]  # (B, N) as given (any integer/float dtype)
    ignore_index: Optional[int]
    probs: Optional[torch.Tensor]  # (B, C, N) soft targets
    weight: Optional[torch.Tensor]  # (B or 1, N)
    binary: bool
    num_classes: int  # K
    dtype: torch.dtype  # accumulation dtype


def _softmax(
    z: torch.Tensor, binary: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_K, p)`` for a chunk ``z`` of shape (nb, C, n); binary logits become [0, z]."""
    # A chunk inside a sample is strided across classes; ATen's softmax over dim 1 is several
    # times slower on such a view than a copy plus the contiguous kernel.
    z = z.to(dtype).contiguous()
    if binary:
        z = torch.cat([torch.zeros_like(z), z], dim=1)
    return z, torch.softmax(z, dim=1)


def _shifted(z: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m - z, -log max_c p_c)`` with ``m = max_c z_c``: then ``lse - z_c`` is their sum.

    ``lse = m - log max_c p_c`` is exact since ``max_c p_c >= 1/K``; keeping the two non-negative
    parts apart (instead of forming ``lse - z_c`` from large logits) avoids cancellation, so the
    CE keeps its relative precision in float32 whatever the logits' magnitude.
    """
    shifted = z.amax(dim=1, keepdim=True) - z  # (nb, K, n) >= 0
    return shifted, torch.log(p.amax(dim=1)).neg_()  # (nb, n) >= 0


class _ChunkTarget(NamedTuple):
    probs: torch.Tensor  # (nb, K, n) target probabilities g (one-hot for labels)
    weight: torch.Tensor  # (nb, n): region weight x validity


def _one_hot(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot ``(nb, K, n)`` from labels ``(nb, n)`` as ``relu(1 - |y - c|)``.

    Elementwise float arithmetic vectorises far better than an integer compare or a scatter,
    and any label outside ``[0, K)`` (e.g. an ignore index) gets an all-zero row for free.
    """
    classes = torch.arange(k, dtype=dtype, device=labels.device).view(1, k, 1)
    return (labels.to(dtype).unsqueeze(1) - classes).abs_().neg_().add_(1).clamp_(min=0)


def _chunk_target(prep: _Prepared, ch: _Chunk) -> _ChunkTarget:
    b, s = slice(ch.b0, ch.b1), slice(ch.s0, ch.s1)
    nb, n = ch.b1 - ch.b0, ch.s1 - ch.s0
    if prep.weight is None:
        w = prep.logits.new_ones((nb, n), dtype=prep.dtype)
    else:
        wb = prep.weight[b] if prep.weight.shape[0] > 1 else prep.weight
        w = wb[:, s].to(prep.dtype).expand(nb, n)
    if prep.labels is None:
        assert prep.probs is not None
        g = prep.probs[b, :, s].to(prep.dtype)
        if prep.binary:
            g = torch.cat([1 - g, g], dim=1)
        return _ChunkTarget(g, w)
    y = prep.labels[b, s]
    if prep.ignore_index is not None:
        w = w * (y != prep.ignore_index)
    return _ChunkTarget(_one_hot(y, prep.num_classes, prep.dtype), w)


def _indicator(
    spec: UncertaintyWeight, z: torch.Tensor, p: torch.Tensor, ch: _Chunk
) -> torch.Tensor:
    """Region indicator ``s`` (nb, n) from the normalised entropy of the chunk."""
    # H = sum_c p_c (lse - z_c) = sum_c p_c (m - z_c) - log max_c p_c, all terms >= 0; where():
    # a class with p_c = 0 (a -inf logit) contributes 0, not 0 * inf
    shifted, neg_log_pmax = _shifted(z, p)
    entropy = torch.where(p != 0, p * shifted, 0.0).sum(dim=1) + neg_log_pmax
    u = (entropy / math.log(p.shape[1])).clamp_(max=1.0)
    thr = spec.threshold.to(u.dtype)
    thr = thr[ch.b0 : ch.b1, None] if thr.ndim == 1 else thr
    return spec.indicator(u, thr)


def _chunk_inputs(
    prep: _Prepared, ch: _Chunk, spec: Optional[UncertaintyWeight]
) -> tuple[torch.Tensor, torch.Tensor, _ChunkTarget, Optional[torch.Tensor]]:
    """``(z, p, target, s)`` of one chunk; a derived weight ``base + scale * s`` is folded into
    the target's weight (``s`` is None without a derived weight)."""
    z, p = _softmax(prep.logits[ch.b0 : ch.b1, :, ch.s0 : ch.s1], prep.binary, prep.dtype)
    tgt = _chunk_target(prep, ch)
    if spec is None:
        return z, p, tgt, None
    s = _indicator(spec, z, p, ch)
    return z, p, tgt._replace(weight=tgt.weight * (spec.base + spec.scale * s)), s


class _FusedRegionStats(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        region_weight: Optional[torch.Tensor],
        threshold: Optional[torch.Tensor],
        class_weight: Optional[torch.Tensor],
        opts: _Options,
        spec: Optional[UncertaintyWeight],
    ) -> tuple[torch.Tensor, ...]:
        # Every tensor goes through save_for_backward (autograd's in-place checks apply) and
        # the (B, C, N) views are rebuilt in backward, so no copy outlives the forward.
        ctx.save_for_backward(logits, target, region_weight, threshold, class_weight)
        ctx.opts, ctx.spec = opts, spec
        prep = _prepare(logits, target, region_weight, opts)
        spec = None if spec is None or threshold is None else spec._replace(threshold=threshold)
        squared = opts.squared_pred
        dtype, k = prep.dtype, prep.num_classes
        bsz, channels, voxels = prep.logits.shape
        ce_num, ce_den = logits.new_zeros(bsz, dtype=dtype), logits.new_zeros(bsz, dtype=dtype)
        inter, pred, ground = (logits.new_zeros(bsz, k, dtype=dtype) for _ in range(3))
        mass = logits.new_zeros(bsz, dtype=dtype)
        cw = None if class_weight is None else class_weight.to(dtype)
        for ch in _chunks(bsz, voxels, channels, logits.device):
            b = slice(ch.b0, ch.b1)
            z, p, tgt, ind = _chunk_inputs(prep, ch, spec)
            g, w = tgt.probs, tgt.weight
            if ind is not None:
                mass[b] += ind.sum(-1)
            w_col = w.unsqueeze(-1)  # (nb, n, 1): sums over voxels as batched mat-vec products
            wg = g * w.unsqueeze(1)  # (nb, K, n)
            wg_sum = wg.sum(-1)
            pred[b] += torch.bmm(p * p if squared else p, w_col).squeeze(-1)
            inter[b] += torch.linalg.vecdot(p, wg)
            ground[b] += torch.linalg.vecdot(g, wg) if squared else wg_sum
            # sum_v w g_c (lse - z_c) per class, then class-weighted: the CE numerator
            # lse - z_c = (m - z_c) - log max p; where(): a -inf logit at a class the target
            # does not hold contributes 0, not 0 * inf
            shifted, neg_log_pmax = _shifted(z, p)
            shifted = torch.where(wg != 0, shifted, 0.0)
            ce_c = (
                torch.linalg.vecdot(wg, shifted) + torch.bmm(wg, neg_log_pmax.unsqueeze(-1))[..., 0]
            )
            ce_num[b] += (ce_c if cw is None else ce_c * cw).sum(-1)
            ce_den[b] += (wg_sum if cw is None else wg_sum * cw).sum(-1)
        ctx.mark_non_differentiable(ce_den, ground, mass)
        return ce_num, ce_den, inter, pred, ground, mass

    @staticmethod
    def backward(
        ctx: Any,
        g_ce: torch.Tensor,
        _g_den: Any,
        g_inter: torch.Tensor,
        g_pred: torch.Tensor,
        _g_ground: Any,
        _g_mass: Any,
    ) -> tuple[Optional[torch.Tensor], ...]:
        logits, target, region_weight, threshold, class_weight = ctx.saved_tensors
        prep = _prepare(logits, target, region_weight, ctx.opts)
        spec = (
            None
            if ctx.spec is None or threshold is None
            else ctx.spec._replace(threshold=threshold)
        )
        squared = ctx.opts.squared_pred
        dtype = prep.dtype
        bsz, channels, voxels = prep.logits.shape
        g_ce, g_inter, g_pred = (t.to(dtype) for t in (g_ce, g_inter, g_pred))
        if squared:
            g_pred = 2 * g_pred  # d(p^2)/dp = 2p
        cw = None if class_weight is None else class_weight.to(dtype)
        grad = torch.empty_like(prep.logits)
        for ch in _chunks(bsz, voxels, channels, logits.device):
            b = slice(ch.b0, ch.b1)
            _, p, tgt, _ = _chunk_inputs(prep, ch, spec)
            g, w = tgt.probs, tgt.weight
            gce = g_ce[b].view(-1, 1, 1)
            gi, gp = g_inter[b].unsqueeze(-1), g_pred[b].unsqueeze(-1)  # (nb, K, 1)
            # With h_c = dL/dp_c per unit weight = gi_c g_c + gp_c p_c^(k-1), a = class-weighted
            # target and A = sum_c a_c, the softmax chain rule gives
            #   dz = w [p (h - sum_c p_c h_c + gce A) - gce a]
            #      = w [p t + gp p^k + gi (p g) - gce a],   t = gce A - sum_c p_c h_c.
            # Built from in-place multiply-adds on (nb, K, n) and mat-vec products for the
            # class sums: no (K, n) temporaries beyond p, g and p g.
            pk = p * p if squared else p
            pg = p * g
            gi_t, gp_t = gi.transpose(1, 2), gp.transpose(1, 2)  # (nb, 1, K)
            weights = torch.ones_like(gi_t) if cw is None else cw.view(1, 1, -1).expand_as(gi_t)
            t = gce * torch.bmm(weights, g) - torch.bmm(gi_t, pg) - torch.bmm(gp_t, pk)
            dz = p * t
            dz.addcmul_(pk, gp).addcmul_(pg, gi)
            dz.addcmul_(g, gce if cw is None else gce * cw.view(1, -1, 1), value=-1)
            out = grad[b, :, ch.s0 : ch.s1]
            torch.mul(dz[:, 1:] if prep.binary else dz, w.unsqueeze(1), out=out)
        return grad.view_as(logits), None, None, None, None, None, None


def _prepare(
    logits: torch.Tensor,
    target: torch.Tensor,
    region_weight: Optional[torch.Tensor],
    opts: _Options,
) -> _Prepared:
    from . import _validation as V

    bsz, channels = logits.shape[:2]
    logits3 = logits.reshape(bsz, channels, -1)
    if not logits3.is_contiguous():
        logits3 = logits3.contiguous()
    binary = opts.activation == "sigmoid"
    labels = probs = None
    if opts.kind == "labels":
        labels = V.labels_view(target, logits).reshape(bsz, -1)
    else:
        probs = target.reshape(bsz, target.shape[1], -1)
    weight = None
    if region_weight is not None:
        wv = V.weight_view(region_weight, logits)
        weight = wv.reshape(wv.shape[0], -1)
    return _Prepared(
        logits=logits3,
        labels=labels,
        ignore_index=opts.ignore_index,
        probs=probs,
        weight=weight,
        binary=binary,
        num_classes=2 if binary else channels,
        dtype=accumulation_dtype(logits.dtype),
    )


def fused_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    region_weight: Optional[torch.Tensor],
    opts: _Options,
    derived_weight: Optional[UncertaintyWeight] = None,
) -> tuple[RegionStats, torch.Tensor]:
    """The statistics of :func:`~bual_losses.losses.reference_stats` in one autograd node.

    ``derived_weight`` multiplies the region weight by a weight computed from the normalised
    entropy of ``logits`` inside the node (no separate uncertainty map, no gradient through it).
    Inputs are validated by the public functions; this is the internal engine.

    Returns:
        ``(stats, mass)``: the statistics and, per sample ``(B,)``, the sum of the derived
        region indicator ``s`` over the voxels (zeros without ``derived_weight``).
    """
    threshold = None if derived_weight is None else derived_weight.threshold
    *stats, mass = _FusedRegionStats.apply(
        logits,
        target,
        region_weight,
        threshold,
        opts.class_weight,
        opts._replace(class_weight=None),
        # the threshold travels as a tensor argument (saved for backward), not inside the spec
        None if derived_weight is None else derived_weight._replace(threshold=_NO_TENSOR),
    )
    return RegionStats(*stats), mass
