r"""The fused region CE + Dice statistics: one autograd node, chunked, memory-light.

[`fused_stats`][bual_losses.fused.fused_stats] returns the same
[`RegionStats`][bual_losses.losses.RegionStats] as ``reference_stats``, the reference
implementation in [`bual_losses.losses`][], so the loss is finished by the same code on both
paths. What differs is how the per-voxel work is done:

*   **forward** walks the voxels in chunks of about
    [`CHUNK_ELEMENTS`][bual_losses.fused.CHUNK_ELEMENTS] logits. Per chunk: one softmax (binary
    logits use ``softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]``), the log-sum-exp recovered
    from the softmax as ``lse = max_c z_c - log max_c p_c`` (exact and finite for logits of any
    size, since ``max_c p_c >= 1/C``), and the sums of
    [`RegionStats`][bual_losses.losses.RegionStats] accumulated in float32 (float64 for float64
    logits). Nothing of size ``(B, C, *S)`` is kept: autograd saves only the inputs (logits,
    target, weight) and per-sample scalars.

*   **backward** recomputes the softmax per chunk and writes the closed-form gradient straight
    into one preallocated tensor. With $h_c = \partial L / \partial p_c$ per unit weight,

    $$
    \frac{\partial L}{\partial z_j} = w\Big[\bar g_{ce}\,(A\,p_j - a_j)
        + p_j\big(h_j - \textstyle\sum_c p_c h_c\big)\Big],\qquad
    h_c = \bar g_{I,c}\, g_c + k\,\bar g_{P,c}\, p_c^{k-1},
    $$

    where $a_c = \omega_c g_c$ (class-weighted target), $A = \sum_c a_c$ and the bars are the
    incoming gradients of ``ce_num``, ``inter`` and ``pred``.

Uncertainty weights can be derived inside the node from the same softmax (normalised entropy
``u = (lse - sum_c p_c z_c) / ln K``, then
[`UncertaintyWeight`][bual_losses.fused.UncertaintyWeight]), so the labeled branch of
[`bidirectional_loss`][bual_losses.bidirectional.bidirectional_loss] needs no separate entropy
map.

No ``.item()``, no host synchronisation and no data-dependent Python branches: chunk bounds come
from shapes only, so the same code runs on CPU and CUDA.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch

from .losses import RegionStats, _Options, accumulation_dtype

__all__ = ["ACCELERATOR_CHUNKS", "CHUNK_ELEMENTS", "UncertaintyWeight", "fused_stats"]

CHUNK_ELEMENTS = 1 << 18
"""Logits per chunk on the CPU (about 1 MiB of float32).

Small enough to stay in a core's L2 cache with its temporaries, large enough that per-op
overhead stays below the arithmetic (measured best of $2^{14}$ to $2^{19}$ on the 2D and 3D
benchmark shapes).
"""

ACCELERATOR_CHUNKS = 4
"""About how many chunks the voxels are cut into on accelerators.

On accelerators the cost is the number of kernel launches, not cache misses: each chunk holds
at least [`CHUNK_ELEMENTS`][bual_losses.fused.CHUNK_ELEMENTS] logits, which bounds the
temporaries to a fraction of the logits' size while keeping launches few. A first H200 run with
CPU-sized chunks was launch-bound (``benchmarks/results/cuda-2026-11-27.md``).
"""


class UncertaintyWeight(NamedTuple):
    r"""A region weight derived from the normalised entropy ``u`` of the logits themselves.

    ``w = base + scale * s`` with ``s = [u > threshold]`` (``temperature=None``) or
    ``sigmoid((u - threshold) / temperature)`` for ``side="high"``; for ``side="low"`` the
    complement ``[u <= threshold]`` or ``sigmoid((threshold - u) / temperature)`` (ties
    ``u == threshold`` go to the low side, as in [`bual_losses.regions`][]). The weight carries
    no gradient.

    Attributes:
        threshold: the threshold of ``u``: a 0-d tensor or one value per sample, shape ``(B,)``.
        side: ``"high"`` (the region ``u > threshold`` gets the extra weight) or ``"low"``
            (``u <= threshold`` does).
        base: the weight outside the region (``s = 0``).
        scale: the weight added inside the region (``w = base + scale`` where ``s = 1``).
        temperature: ``None`` for the hard indicator, else the temperature of the sigmoid.

    Examples:
        >>> import torch
        >>> from bual_losses import UncertaintyWeight
        >>> u, tau = torch.tensor([0.2, 0.5, 0.9]), torch.tensor(0.5)
        >>> UncertaintyWeight(tau, side="high", base=1.0, scale=1.0)(u, tau)  # 1 + [u > tau]
        tensor([1., 1., 2.])
        >>> UncertaintyWeight(tau, side="low", base=0.0, scale=1.0)(u, tau)  # [u <= tau]
        tensor([1., 1., 0.])
        >>> UncertaintyWeight(tau, temperature=0.1).indicator(u, tau)  # sigmoid((u - tau) / T)
        tensor([0.0474, 0.5000, 0.9820])
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


class _Workspace:
    """Scratch buffers reused by every chunk of one pass, handed out as shaped views.

    A fresh chunk-sized tensor is a fresh allocation that the C allocator often takes from (and
    returns to) the system, paying a page fault per 4 KiB on first touch; measured, that cost
    more than the arithmetic. With a few reused buffers every temporary is an ``out=`` or
    in-place write. ``big`` slots hold (nb, K, n) tensors, ``small`` slots (nb, n) ones.
    """

    def __init__(self, like: torch.Tensor, dtype: torch.dtype, chunks: list[_Chunk], k: int):
        voxels = max((c.b1 - c.b0) * (c.s1 - c.s0) for c in chunks)
        self._big = like.new_empty((_BIG_SLOTS, voxels * k), dtype=dtype)
        self._small = like.new_empty((_SMALL_SLOTS, voxels), dtype=dtype)

    def big(self, slot: int, nb: int, k: int, n: int) -> torch.Tensor:
        return self._big[slot, : nb * k * n].view(nb, k, n)

    def small(self, slot: int, nb: int, n: int) -> torch.Tensor:
        return self._small[slot, : nb * n].view(nb, n)


# big slots: logits copy, probabilities, target, and three for products; small: see their use
_Z, _P, _G, _A, _B, _C = range(6)
_BIG_SLOTS = 6
_YF, _W, _M, _NLP, _T, _U, _H = range(7)
_SMALL_SLOTS = 7


class _ChunkData(NamedTuple):
    """One chunk's inputs: logits ``z``, probabilities ``p``, target ``g`` (nb, K, n) and the
    region weight ``w`` (nb, n), a derived uncertainty weight folded in."""

    z: torch.Tensor
    p: torch.Tensor
    g: torch.Tensor
    w: torch.Tensor
    indicator: Optional[torch.Tensor]


def _load_chunk(
    prep: _Prepared, ch: _Chunk, ws: _Workspace, spec: Optional[UncertaintyWeight]
) -> _ChunkData:
    b, s = slice(ch.b0, ch.b1), slice(ch.s0, ch.s1)
    nb, n, k = ch.b1 - ch.b0, ch.s1 - ch.s0, prep.num_classes
    raw = prep.logits[b, :, s]
    if prep.binary:  # softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]
        z = ws.big(_Z, nb, 2, n)
        z[:, :1].zero_()
        z[:, 1:].copy_(raw)
    elif raw.is_contiguous() and raw.dtype == prep.dtype:
        z = raw
    else:
        # a chunk inside a sample is strided across classes: ATen's softmax over dim 1 is
        # several times slower on such a view than a copy plus the contiguous kernel
        z = ws.big(_Z, nb, k, n).copy_(raw)
    p = torch.ops.aten._softmax.out(z, 1, False, out=ws.big(_P, nb, k, n))

    if prep.weight is None:
        w = ws.small(_W, nb, n).fill_(1.0)
    else:
        wb = prep.weight[b] if prep.weight.shape[0] > 1 else prep.weight
        w = wb[:, s].expand(nb, n)
        if w.dtype != prep.dtype:
            w = ws.small(_W, nb, n).copy_(w)
    if prep.labels is None:
        assert prep.probs is not None
        g = prep.probs[b, :, s]
        if prep.binary:
            g2 = ws.big(_G, nb, 2, n)
            g2[:, 1:].copy_(g)
            torch.neg(g2[:, 1:], out=g2[:, :1]).add_(1.0)
            g = g2
        elif g.dtype != prep.dtype:
            g = ws.big(_G, nb, k, n).copy_(g)
    else:
        y = prep.labels[b, s]
        if prep.ignore_index is not None:
            w = torch.mul(w, y != prep.ignore_index, out=ws.small(_W, nb, n))
        # one-hot as relu(1 - |y - c|): float arithmetic vectorises far better than an integer
        # compare or a scatter, and a label outside [0, K) (an ignore index) gets a zero row
        yf = ws.small(_YF, nb, n).copy_(y).unsqueeze(1)
        classes = torch.arange(k, dtype=prep.dtype, device=yf.device).view(1, k, 1)
        g = torch.sub(yf, classes, out=ws.big(_G, nb, k, n)).abs_().neg_().add_(1).clamp_(min=0)

    indicator = None
    if spec is not None:
        indicator = _indicator(spec, z, p, ch, ws)
        derived = torch.mul(indicator, spec.scale, out=ws.small(_U, nb, n)).add_(spec.base)
        w = torch.mul(w, derived, out=ws.small(_W, nb, n))
    return _ChunkData(z, p, g, w, indicator)


def _shifted(
    z: torch.Tensor, p: torch.Tensor, ws: _Workspace, slot: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m - z, -log max_c p_c)`` with ``m = max_c z_c``: then ``lse - z_c`` is their sum.

    ``lse = m - log max_c p_c`` is exact since ``max_c p_c >= 1/K``; keeping the two non-negative
    parts apart (instead of forming ``lse - z_c`` from large logits) avoids cancellation, so the
    CE keeps its relative precision in float32 whatever the logits' magnitude.
    """
    nb, k, n = z.shape
    m = torch.amax(z, dim=1, keepdim=True, out=ws.small(_M, nb, n).unsqueeze(1))
    shifted = torch.sub(m, z, out=ws.big(slot, nb, k, n))  # >= 0
    neg_log_pmax = torch.amax(p, dim=1, out=ws.small(_NLP, nb, n))
    return shifted, neg_log_pmax.log_().neg_()  # >= 0


def _finite_products(x: torch.Tensor) -> torch.Tensor:
    """Zero the NaN of ``0 * inf`` (a -inf logit at a class with no mass) in place.

    A data-dependent ``where`` would cost branch mispredictions on one-hot patterns, measured at
    several times the rest of the chunk's work.
    """
    return torch.nan_to_num_(x, nan=0.0, posinf=math.inf, neginf=-math.inf)


def _indicator(
    spec: UncertaintyWeight, z: torch.Tensor, p: torch.Tensor, ch: _Chunk, ws: _Workspace
) -> torch.Tensor:
    """Region indicator ``s`` (nb, n) from the normalised entropy of the chunk."""
    # H = sum_c p_c (lse - z_c) = sum_c p_c (m - z_c) - log max_c p_c, all terms >= 0
    shifted, neg_log_pmax = _shifted(z, p, ws, _C)
    plogp = _finite_products(shifted.mul_(p))
    entropy = torch.sum(plogp, dim=1, out=ws.small(_H, *neg_log_pmax.shape))
    u = entropy.add_(neg_log_pmax).div_(math.log(p.shape[1])).clamp_(max=1.0)
    thr = spec.threshold.to(u.dtype)
    thr = thr[ch.b0 : ch.b1, None] if thr.ndim == 1 else thr
    return spec.indicator(u, thr)


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
        chunks = _chunks(bsz, voxels, channels, logits.device)
        ws = _Workspace(logits, dtype, chunks, k)
        for ch in chunks:
            b = slice(ch.b0, ch.b1)
            z, p, g, w, ind = _load_chunk(prep, ch, ws, spec)
            if ind is not None:
                mass[b] += ind.sum(-1)
            wg = torch.mul(g, w.unsqueeze(1), out=ws.big(_A, *g.shape))
            wg_sum = wg.sum(-1)
            pk = torch.mul(p, p, out=ws.big(_B, *p.shape)) if squared else p
            pred[b] += torch.bmm(pk, w.unsqueeze(-1))[..., 0]
            inter[b] += torch.mul(p, wg, out=ws.big(_B, *p.shape)).sum(-1)
            ground[b] += torch.mul(g, wg, out=ws.big(_B, *p.shape)).sum(-1) if squared else wg_sum
            # the CE numerator per class, sum_v w g_c (lse - z_c) with lse - z_c split into
            # (m - z_c) + (-log max p), then class-weighted
            shifted, neg_log_pmax = _shifted(z, p, ws, _B)
            ce_c = _finite_products(shifted.mul_(wg)).sum(-1)
            ce_c += torch.bmm(wg, neg_log_pmax.unsqueeze(-1))[..., 0]
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
        dtype, k = prep.dtype, prep.num_classes
        bsz, channels, voxels = prep.logits.shape
        g_ce, g_inter, g_pred = (t.to(dtype) for t in (g_ce, g_inter, g_pred))
        if squared:
            g_pred = 2 * g_pred  # d(p^2)/dp = 2p
        cw = None if class_weight is None else class_weight.to(dtype)
        grad = torch.empty_like(prep.logits)
        chunks = _chunks(bsz, voxels, channels, logits.device)
        ws = _Workspace(logits, dtype, chunks, k)
        for ch in chunks:
            b = slice(ch.b0, ch.b1)
            _, p, g, w, _ = _load_chunk(prep, ch, ws, spec)
            nb, _, n = p.shape
            gce = g_ce[b].view(-1, 1, 1)
            gi, gp = g_inter[b].unsqueeze(-1), g_pred[b].unsqueeze(-1)  # (nb, K, 1)
            # With h_c = dL/dp_c per unit weight = gi_c g_c + gp_c p_c^(k-1), a = class-weighted
            # target and A = sum_c a_c, the softmax chain rule gives
            #   dz = w [p (h - sum_c p_c h_c + gce A) - gce a]
            #      = w [p t + gp p^k + gi (p g) - gce a],   t = gce A - sum_c p_c h_c,
            # built from in-place multiply-adds and mat-vec products for the class sums.
            pk = torch.mul(p, p, out=ws.big(_B, nb, k, n)) if squared else p
            pg = torch.mul(p, g, out=ws.big(_A, nb, k, n))
            gi_t, gp_t = gi.transpose(1, 2), gp.transpose(1, 2)  # (nb, 1, K)
            weights = torch.ones_like(gi_t) if cw is None else cw.view(1, 1, -1).expand_as(gi_t)
            t = torch.bmm(weights, g, out=ws.small(_T, nb, n).unsqueeze(1)).mul_(gce)
            u = ws.small(_U, nb, n).unsqueeze(1)
            t.sub_(torch.bmm(gi_t, pg, out=u)).sub_(torch.bmm(gp_t, pk, out=u))
            dz = torch.mul(p, t, out=ws.big(_C, nb, k, n))
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
    """The statistics of ``reference_stats`` (the reference path) in one autograd node.

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
