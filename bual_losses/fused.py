r"""The CPU engine of ``impl="fused"``: one autograd node, chunked, memory-light.

[`fused_stats`][bual_losses.fused.fused_stats] returns the same
[`RegionStats`][bual_losses.losses.RegionStats] as the reference engine, so the loss is
finished by the same code (``bual_losses._core``) on every engine; on other devices
[`bual_losses.engines`][] runs the launch-lean accelerator engine instead. What differs is how
the per-voxel work is done:

*   **forward** walks the voxels in chunks of about
    [`CHUNK_ELEMENTS`][bual_losses.fused.CHUNK_ELEMENTS] logits. Per chunk: one softmax, the
    cross-entropy from ``lse - z_c = (max_c z_c - z_c) - log max_c p_c`` (both parts
    non-negative: exact and finite for logits of any size, since ``max_c p_c >= 1/K``), and the
    sums of [`RegionStats`][bual_losses.losses.RegionStats] accumulated in float32 (float64 for
    float64 logits). Label targets become a one-hot chunk by one compare of the labels with the
    class values; sums over voxels are mat-vec products. Nothing of size ``(B, C, *S)`` is
    kept: autograd saves only the inputs (logits, target, weight) and per-sample scalars.

*   **two classes** (binary logits, or ``C = 2``) depend on the logits only through
    ``d = z_1 - z_0`` (``d = z`` for binary logits), so they run on ``(B, N)`` arrays:
    ``p = [sigmoid(-d), sigmoid(d)]``, ``-log p = [softplus(d), softplus(-d)]`` (once per voxel
    for labels: ``softplus(d (1 - 2y))``), and the backward computes $\partial L/\partial d$,
    written as $\pm$ to the two logits. This halves the passes of the LA-style binary case.

*   **backward** recomputes the softmax per chunk and writes the closed-form gradient straight
    into one preallocated tensor. With $h_c = \partial L / \partial p_c$ per unit weight,

    $$
    \frac{\partial L}{\partial z_j} = w\Big[\bar g_{ce}\,(A\,p_j - a_j)
        + p_j\big(h_j - \textstyle\sum_c p_c h_c\big)\Big],\qquad
    h_c = \bar g_{I,c}\, g_c + k\,\bar g_{P,c}\, p_c^{k-1},
    $$

    where $a_c = \omega_c g_c$ (class-weighted target), $A = \sum_c a_c$ and the bars are the
    incoming gradients of ``ce_num``, ``inter`` and ``pred``.

Uncertainty weights can be derived inside the node from the same softmax: the normalised
entropy ``u = sum_c p_c (lse - z_c) / ln K`` (for two classes the entropy is
``softplus(-|d|) + |d| sigmoid(-|d|)`` nats), then
[`UncertaintyWeight`][bual_losses.regions.UncertaintyWeight]; so the labeled branch of
[`bidirectional_loss`][bual_losses.bidirectional.bidirectional_loss] needs no separate entropy
map. For the unlabeled branch the node also takes the teacher's logits: per chunk, their
[`pseudo_labels`][bual_losses.pseudo.pseudo_labels] are the target and their entropy the
uncertainty, so the teacher is read in the same pass and no ``(B, *S)`` label or uncertainty
map is ever allocated.

No ``.item()``, no host synchronisation and no data-dependent Python branches: chunk bounds come
from shapes only. The engine is shaped for CPU caches; it runs on any device, but on
accelerators (where every small op is a kernel launch) the accelerator engine is used.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, cast

import torch

from . import _validation as V
from ._core import (
    Finish,
    Options,
    RegionStats,
    accumulation_dtype,
    finish,
    normalized_entropy,
    refuse_higher_order,
    write_into,
)
from .pseudo import pseudo_labels
from .regions import UncertaintyWeight

__all__ = ["CHUNK_ELEMENTS", "UncertaintyWeight", "fused_stats"]

CHUNK_ELEMENTS = 1 << 19
"""Logits per chunk on the CPU (2 MiB of float32).

Each chunk costs a few dozen eager ops, so per-op overhead falls with the chunk size while the
temporaries (a few chunk-sized buffers) must stay cache-resident: measured best of $2^{15}$ to
$2^{21}$ on both benchmark shapes (2D: 2^18 1.3x slower, 2^20 1.1x; 3D: 1.15x and 1.1x).
"""

_NO_TENSOR = torch.empty(0)


class _Chunk(NamedTuple):
    b0: int
    b1: int
    s0: int
    s1: int


def _chunks(batch: int, voxels: int, channels: int) -> list[_Chunk]:
    """Chunks of whole samples when samples are small, of voxel ranges inside one sample else."""
    per_chunk = max(1, CHUNK_ELEMENTS // max(channels, 1))
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
    teacher: Optional[torch.Tensor]  # (B, C, N): pseudo-labels (labels None) and uncertainty
    ignore_index: Optional[int]
    probs: Optional[torch.Tensor]  # (B, C, N) soft targets
    weight: Optional[torch.Tensor]  # (B or 1, N)
    binary: bool
    num_classes: int  # K
    dtype: torch.dtype  # accumulation dtype
    classes: torch.Tensor  # (1, K, 1): the class values, for the one-hot compare of labels
    check_labels: bool  # the label range was not checked up front: check it chunk by chunk


class _Workspace:
    """Scratch buffers reused by every chunk of one pass, handed out as shaped views.

    A fresh chunk-sized tensor is a fresh allocation that the C allocator often takes from (and
    returns to) the system, paying a page fault per 4 KiB on first touch; measured, that cost
    more than the arithmetic. With a few reused buffers every temporary is an ``out=`` or
    in-place write. ``big`` slots hold (nb, K, n) tensors, ``small`` slots (nb, n) ones. A slot
    is allocated on first use, so a pass holds only the buffers its options need.
    """

    def __init__(self, like: torch.Tensor, dtype: torch.dtype, chunks: list[_Chunk], k: int):
        self._like, self._dtype, self._k = like, dtype, k
        self._voxels = max((c.b1 - c.b0) * (c.s1 - c.s0) for c in chunks)
        self._buffers: dict[tuple[bool, int], torch.Tensor] = {}

    def _buffer(self, big: bool, slot: int) -> torch.Tensor:
        buf = self._buffers.get((big, slot))
        if buf is None:
            size = self._voxels * self._k if big else self._voxels
            buf = self._buffers[big, slot] = self._like.new_empty(size, dtype=self._dtype)
        return buf

    def big(self, slot: int, nb: int, k: int, n: int) -> torch.Tensor:
        return self._buffer(True, slot)[: nb * k * n].view(nb, k, n)

    def small(self, slot: int, nb: int, n: int) -> torch.Tensor:
        return self._buffer(False, slot)[: nb * n].view(nb, n)


# big slots: logits copy, probabilities, target, two for products (each reused once its value
# has been reduced), a K > 2 gradient chunk that cannot be written in place (a cast to half
# logits, or a strided chunk under torch.compile)
_Z, _P, _G, _A, _B, _D = range(6)
# small slots: see their use
_YF, _W, _M, _NLP, _T, _U, _H, _D2 = range(8)


class _ChunkData(NamedTuple):
    """One chunk's inputs: probabilities ``p`` and target probabilities ``g`` (nb, K, n; ``g``
    one-hot for label targets), the voxel weight ``w`` (nb, n; region weight, ignored voxels
    and a derived uncertainty weight folded in), and the logits: ``z`` (nb, K, n) for K > 2,
    the difference ``diff = z_1 - z_0`` (nb, n) for two classes (see ``_two_class_probs``)."""

    z: Optional[torch.Tensor]
    diff: Optional[torch.Tensor]
    p: torch.Tensor
    g: torch.Tensor
    w: torch.Tensor
    indicator: Optional[torch.Tensor]


def _probs(prep: _Prepared, ch: _Chunk, ws: _Workspace) -> tuple[Any, ...]:
    """``(z, d, p)``: the chunk's logits (K > 2) or logit difference (two classes), and ``p``."""
    if prep.num_classes == 2:
        d, p = _two_class_probs(prep, ch, ws)
        return None, d, p
    z, p = _softmax_probs(prep, ch, ws)
    return z, None, p


def _normalized_entropy(z: Any, d: Any, p: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    u = _two_class_entropy(d, p, ws) if d is not None else _entropy(z, p, ws)
    return u.div_(math.log(p.shape[1])).clamp_(max=1.0)


def _load_chunk(
    prep: _Prepared,
    ch: _Chunk,
    ws: _Workspace,
    spec: Optional[UncertaintyWeight],
    teacher_ws: Optional[_Workspace] = None,
) -> _ChunkData:
    nb, n = ch.b1 - ch.b0, ch.s1 - ch.s0
    z, d, p = _probs(prep, ch, ws)
    g, w = _target_and_weight(prep, ch, ws)
    indicator = None
    if spec is not None:
        if prep.teacher is None:
            u = _normalized_entropy(z, d, p, ws)
        else:  # the teacher's chunk, in buffers of its own
            assert teacher_ws is not None
            tz, td, tp = _probs(prep._replace(logits=prep.teacher), ch, teacher_ws)
            u = _normalized_entropy(tz, td, tp, teacher_ws)
        thr = torch.as_tensor(spec.threshold).to(u.dtype)
        indicator = spec.indicator(u, thr[ch.b0 : ch.b1, None] if thr.ndim == 1 else thr)
        derived = torch.mul(indicator, spec.scale, out=ws.small(_U, nb, n)).add_(spec.base)
        w = torch.mul(w, derived, out=ws.small(_W, nb, n))
    return _ChunkData(z, d, p, g, w, indicator)


def _softmax_probs(prep: _Prepared, ch: _Chunk, ws: _Workspace) -> tuple[torch.Tensor, ...]:
    """Logits ``z`` and their softmax ``p`` (nb, K, n)."""
    nb, n, k = ch.b1 - ch.b0, ch.s1 - ch.s0, prep.num_classes
    z = prep.logits[ch.b0 : ch.b1, :, ch.s0 : ch.s1]
    if not z.is_contiguous() or z.dtype != prep.dtype:
        # a chunk inside a sample is strided across classes: ATen's softmax over dim 1 is
        # several times slower on such a view than a copy plus the contiguous kernel
        z = ws.big(_Z, nb, k, n).copy_(z)
    return z, torch.ops.aten._softmax.out(z, 1, False, out=ws.big(_P, nb, k, n))


def _two_class_probs(prep: _Prepared, ch: _Chunk, ws: _Workspace) -> tuple[torch.Tensor, ...]:
    """The logit difference ``d = z_1 - z_0`` (nb, n) and ``p = [sigmoid(-d), sigmoid(d)]``.

    Two classes depend on the logits only through ``d`` (binary logits: ``d = z``), so the
    whole chunk is handled as (nb, n) arrays: elementwise on any layout, and about twice as
    fast as ATen's softmax over a class dimension of size 2.
    """
    nb, n = ch.b1 - ch.b0, ch.s1 - ch.s0
    raw = prep.logits[ch.b0 : ch.b1, :, ch.s0 : ch.s1]
    if raw.dtype != prep.dtype:
        raw = ws.big(_Z, nb, 2, n)[:, : raw.shape[1]].copy_(raw)
    if prep.binary:
        d = raw[:, 0]
    else:
        d = torch.sub(raw[:, 1], raw[:, 0], out=ws.small(_D2, nb, n))
        # softmax([z0, z1]) is NaN where max(z0, z1) is +inf or NaN, sigmoid(d) is not: adding
        # 0 * max keeps the reference's NaN there (and with it the finiteness check)
        d.add_(torch.maximum(raw[:, 0], raw[:, 1], out=ws.small(_M, nb, n)).mul_(0.0))
    p = ws.big(_P, nb, 2, n)
    write_into(p[:, 1], torch.sigmoid, d)
    write_into(p[:, 0], torch.sigmoid, torch.neg(d, out=ws.small(_T, nb, n)))
    return d, p


def _target_and_weight(prep: _Prepared, ch: _Chunk, ws: _Workspace) -> tuple[torch.Tensor, ...]:
    """Target probabilities ``g`` (nb, K, n) and the voxel weight ``w`` (nb, n), 0 at ignored
    voxels."""
    b, s = slice(ch.b0, ch.b1), slice(ch.s0, ch.s1)
    nb, n, k = ch.b1 - ch.b0, ch.s1 - ch.s0, prep.num_classes
    if prep.weight is None:
        w = ws.small(_W, nb, n).fill_(1.0)
    else:
        wb = prep.weight[b] if prep.weight.shape[0] > 1 else prep.weight
        w = wb[:, s].expand(nb, n)
        if w.dtype != prep.dtype:
            w = ws.small(_W, nb, n).copy_(w)
    if prep.labels is None and prep.teacher is not None:
        # the teacher's pseudo-labels, chunk by chunk: no (B, *S) label map is kept
        y = cast(torch.Tensor, pseudo_labels(prep.teacher[b, :, s]))
        return torch.eq(y.unsqueeze(1), prep.classes, out=ws.big(_G, nb, k, n)), w
    if prep.labels is None:
        assert prep.probs is not None
        g = prep.probs[b, :, s]
        if prep.binary:
            g2 = ws.big(_G, nb, 2, n)
            g2[:, 1:].copy_(g)
            g2[:, :1].copy_(g).neg_().add_(1.0)
            g = g2
        elif g.dtype != prep.dtype:
            g = ws.big(_G, nb, k, n).copy_(g)
        return g, w
    y = prep.labels[b, s]
    if prep.check_labels:
        _check_label_chunk(y, k, prep.ignore_index)
    if prep.ignore_index is not None:
        w = torch.mul(w, y != prep.ignore_index, out=ws.small(_W, nb, n))
    if y.dtype != prep.dtype:
        y = ws.small(_YF, nb, n).copy_(y)
    # one-hot by a float compare against the class values: one vectorised pass, and a label
    # outside [0, K) (an ignore index) gets a zero row
    return torch.eq(y.unsqueeze(1), prep.classes, out=ws.big(_G, nb, k, n)), w


def _check_label_chunk(y: torch.Tensor, k: int, ignore_index: Optional[int]) -> None:
    """Out-of-range labels fail here too with ``validate=False``: the compare one-hot would read
    them as "no class" and give a finite, wrong loss, where the other engines' indexing fails.
    One min/max of a chunk already in cache; the exact test only when it finds a value outside
    ``[0, K)`` (an ignore index) or the labels are floats (which must be integral)."""
    message = (
        f"`target` labels must be {V.allowed_labels(k, ignore_index)}; found other values "
        "(validate=False skips the up-front checks, not this one)."
    )
    cpu = y.device.type == "cpu"
    if cpu and not y.is_floating_point():
        lo, hi = torch.aminmax(y)
        if bool(lo >= 0) and bool(hi < k):
            return
    ok = (y >= 0) & (y < k)
    if y.is_floating_point():
        ok &= y == torch.round(y)
    if ignore_index is not None:
        ok |= y == ignore_index
    V.check_values(ok.all(), message)  # off the CPU: queued, no host synchronisation


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
    return shifted, _neg_log_pmax(p, ws)


def _neg_log_pmax(p: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """``-log max_c p_c`` (nb, n), in [0, log K]."""
    nb, _, n = p.shape
    return torch.amax(p, dim=1, out=ws.small(_NLP, nb, n)).log_().neg_()


def _finite_products(x: torch.Tensor) -> torch.Tensor:
    """Zero the NaN of ``0 * inf`` (a -inf logit at a class with no mass) in place.

    It zeroes every NaN, also one from a NaN logit: the forward adds ``0 * pred`` to ``ce_num``
    so that NaN probabilities still reach it.

    A data-dependent ``where`` would cost branch mispredictions on one-hot patterns, measured at
    several times the rest of the chunk's work.
    """
    return torch.nan_to_num_(x, nan=0.0, posinf=math.inf, neginf=-math.inf)


def _entropy(z: torch.Tensor, p: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """Entropy (nats, nb x n) of the softmax of ``z``."""
    # H = sum_c p_c (lse - z_c) = sum_c p_c (m - z_c) - log max_c p_c, all terms >= 0
    shifted, neg_log_pmax = _shifted(z, p, ws, _A)
    plogp = _finite_products(shifted.mul_(p))
    return torch.sum(plogp, dim=1, out=ws.small(_H, *neg_log_pmax.shape)).add_(neg_log_pmax)


_SOFTPLUS_THRESHOLD = 40.0
"""``softplus(x) = x`` above it: exact to ``exp(-40) / 40``, below float64's precision."""


def _softplus(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    if out is None:
        return torch.nn.functional.softplus(x, 1.0, _SOFTPLUS_THRESHOLD)
    return torch.ops.aten.softplus.out(x, 1.0, _SOFTPLUS_THRESHOLD, out=out)


def _two_class_neg_log_probs(d: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """``-log p = [softplus(d), softplus(-d)]`` (nb, 2, n): exact, finite for finite ``d``."""
    nb, n = d.shape
    out = ws.big(_A, nb, 2, n)
    write_into(out[:, 0], _softplus, d)
    write_into(out[:, 1], _softplus, torch.neg(d, out=ws.small(_T, nb, n)))
    return out


def _two_class_entropy(d: torch.Tensor, p: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """Entropy (nats, nb x n) of ``[sigmoid(-d), sigmoid(d)]``.

    ``H = softplus(-|d|) + |d| sigmoid(-|d|)``: symmetric in ``d``, both terms non-negative (no
    cancellation), one softplus per voxel. ``sigmoid(-|d|) = min(p_0, p_1)``.
    """
    a = torch.abs(d, out=ws.small(_H, *d.shape))
    h = _softplus(torch.neg(a, out=ws.small(_T, *d.shape)), out=ws.small(_U, *d.shape))
    tail = torch.minimum(p[:, 0], p[:, 1], out=ws.small(_M, *d.shape)).mul_(a)
    return a.copy_(h).add_(_finite_products(tail))  # |d| = inf: 0 * inf -> 0


def _class_sum(
    row: Optional[torch.Tensor], x: torch.Tensor, ws: _Workspace, slot: int
) -> torch.Tensor:
    """``sum_c row_c x_c`` per voxel (nb, 1, n) for ``row`` (nb, K) or (K,); ``row=None`` sums
    ``x`` over the classes. A mat-vec product: one pass over ``x``, no (nb, K, n) temporary."""
    nb, k, n = x.shape
    out = ws.small(slot, nb, n).unsqueeze(1)
    if row is None:
        return torch.sum(x, dim=1, keepdim=True, out=out)
    return torch.bmm(row.expand(nb, k).unsqueeze(1), x, out=out)


class _ChunkSums(NamedTuple):
    """One chunk's contribution to the target-dependent sums (see ``RegionStats``)."""

    ce_num: torch.Tensor  # (nb,)
    ce_den: torch.Tensor  # (nb,)
    inter: torch.Tensor  # (nb, K)
    ground: torch.Tensor  # (nb, K)


def _weighted_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_v w_v x_{c,v}`` (nb, K) as a mat-vec product (one pass over ``x``).

    Written as ``w^T x^T``: the form ``x w`` takes a slow path in ATen's CPU ``bmm`` for more
    than one sample per chunk (measured 35x slower).
    """
    return torch.bmm(w.unsqueeze(1), x.mT)[:, 0]


def _class_weighted(
    ce_c: torch.Tensor, g_sum: torch.Tensor, cw: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce_num, ce_den)`` (nb,) from the per-class CE numerators and weighted target masses
    (nb, K): their class-weighted sums."""
    if cw is not None:
        ce_c, g_sum = ce_c * cw, g_sum * cw
    return ce_c.sum(-1), g_sum.sum(-1)


def _onehot_sums(chunk: _ChunkData, cw: Optional[torch.Tensor], ws: _Workspace) -> _ChunkSums:
    """Sums for label targets (``g`` one-hot): the CE is needed only at the voxel's class, so
    it is formed per voxel, ``-log p_y = (m - z_y) + (-log max_c p_c)``, with ``z_y`` exact
    (a sum of one logit and zeros) and both parts non-negative (see ``_shifted``)."""
    z, p, g, w = chunk.z, chunk.p, chunk.g, chunk.w
    assert z is not None
    nb, k, n = p.shape
    m = torch.amax(z, dim=1, out=ws.small(_M, nb, n))
    z_y = _class_sum(None, _finite_products(torch.mul(g, z, out=ws.big(_A, nb, k, n))), ws, _T)
    ce = torch.sub(m, z_y.squeeze(1), out=m).add_(_neg_log_pmax(p, ws))
    wy = w if cw is None else _class_sum(cw, g, ws, _U).squeeze(1).mul_(w)  # w * omega_y
    return _ChunkSums(
        ce_num=_finite_products(ce.mul_(wy)).sum(-1),
        ce_den=wy.sum(-1),
        inter=_weighted_sum(torch.mul(p, g, out=ws.big(_A, nb, k, n)), w),
        ground=_weighted_sum(g, w),  # g^2 = g
    )


def _dense_sums(
    chunk: _ChunkData, cw: Optional[torch.Tensor], squared: bool, ws: _Workspace
) -> _ChunkSums:
    """Sums for probability targets ``g``: the CE per class."""
    z, p, g, w = chunk.z, chunk.p, chunk.g, chunk.w
    assert z is not None
    wg = torch.mul(g, w.unsqueeze(1), out=ws.big(_A, *g.shape))
    wg_sum = wg.sum(-1)
    inter = torch.mul(p, wg, out=ws.big(_B, *p.shape)).sum(-1)
    ground = torch.mul(g, wg, out=ws.big(_B, *p.shape)).sum(-1) if squared else wg_sum
    # the CE numerator per class, sum_v w g_c (lse - z_c) with lse - z_c split into
    # (m - z_c) + (-log max p), then class-weighted
    shifted, neg_log_pmax = _shifted(z, p, ws, _B)
    ce_c = _finite_products(shifted.mul_(wg)).sum(-1)
    ce_c += _weighted_sum(wg, neg_log_pmax)
    return _ChunkSums(*_class_weighted(ce_c, wg_sum, cw), inter=inter, ground=ground)


def _chunk_grad(
    chunk: _ChunkData,
    up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cw: Optional[torch.Tensor],
    squared: bool,
    onehot: bool,
    ws: _Workspace,
    out: torch.Tensor,
) -> None:
    r"""dL/dz (nb, K, n) into ``out``.

    ``up = (gce, gi, gp)``: the incoming gradients of ``ce_num`` (nb,), ``inter`` and ``pred``
    (nb, K; ``gp`` already times the power ``k``). With the class sums (per voxel)
    $U = \sum_c gi_c p_c g_c$, $S = \sum_c gp_c p_c^k$ and $A = \sum_c \omega_c g_c$, the
    gradient of the module docs is

    $$
    dz_j = w\,p_j\,(gp_j\,p_j^{k-1} + t) + w\,g_j\,(gi_j\,p_j - gce\,\omega_j),
    \qquad t = gce\,A - U - S.
    $$

    For a one-hot ``g`` the last term is $g_j\,c$ with the per-voxel $c = w\,(U - gce\,A)$, so
    that ``w t = -c - w S`` and the whole gradient takes three passes over (nb, K, n) after the
    softmax: ``p g``, the outer product ``gp w + w t``, and its product with ``p`` plus ``g c``
    (``squared_pred`` adds ``p p`` and ``p w gp``).
    """
    p, g, w = chunk.p, chunk.g, chunk.w
    nb, k, n = p.shape
    gce, gi, gp = up
    pk = torch.mul(p, p, out=ws.big(_B, nb, k, n)) if squared else p
    s_sum = _class_sum(gp, pk, ws, _T)
    u_sum = _class_sum(gi, torch.mul(p, g, out=ws.big(_A, nb, k, n)), ws, _U)
    w1 = w.unsqueeze(1)
    gce1 = gce.view(nb, 1, 1)
    a_sum = None if (cw is None and onehot) else _class_sum(cw, g, ws, _H)  # A (1 if one-hot)
    gce_a = gce1 if a_sum is None else a_sum.mul_(gce1)
    if onehot:
        c = u_sum.sub_(gce_a).mul_(w1)
        wt = s_sum.mul_(w1).add_(c).neg_()
    else:
        wt = gce_a.sub_(u_sum).sub_(s_sum).mul_(w1)  # gce_a is a_sum: a buffer
    gp3 = gp.unsqueeze(-1)
    if squared:
        x = torch.mul(p, w1, out=ws.big(_A, nb, k, n)).mul_(gp3).add_(wt)
    else:
        x = torch.addcmul(wt, gp3, w1, out=ws.big(_A, nb, k, n))
    torch.mul(p, x, out=out)
    if onehot:
        out.addcmul_(g, c)
        return
    # w g (gi p - gce omega), the target term of probability targets
    omega = gce1 if cw is None else cw.view(1, -1, 1) * gce1
    y = torch.mul(p, gi.unsqueeze(-1), out=ws.big(_A, nb, k, n)).sub_(omega).mul_(g)
    out.addcmul_(y, w1)


def _two_class_sums(
    chunk: _ChunkData, cw: Optional[torch.Tensor], squared: bool, onehot: bool, ws: _Workspace
) -> _ChunkSums:
    """Sums for two classes from ``-log p = [softplus(d), softplus(-d)]``; for label targets
    only the voxel's class is needed, ``-log p_y = softplus(d (1 - 2 y))`` (softplus is the
    costliest op of the chunk, so once per voxel, not twice)."""
    x, p, g, w = chunk.diff, chunk.p, chunk.g, chunk.w
    assert x is not None
    g_sum = _weighted_sum(g, w)
    if onehot:
        # the sign 1 - 2 y first: d - 2 d y would turn an infinite d into inf - inf = NaN
        signed = torch.mul(g[:, 1], -2.0, out=ws.small(_T, *x.shape)).add_(1.0).mul_(x)
        ce_v = _softplus(signed, out=signed)
        wy = w if cw is None else _class_sum(cw, g, ws, _U).squeeze(1).mul_(w)  # w * omega_y
        ce_num, ce_den = _finite_products(ce_v.mul_(wy)).sum(-1), wy.sum(-1)
        ground = g_sum  # g^2 = g
    else:
        ce_c = _weighted_sum(_finite_products(_two_class_neg_log_probs(x, ws).mul_(g)), w)
        ce_num, ce_den = _class_weighted(ce_c, g_sum, cw)
        ground = _weighted_sum(torch.mul(g, g, out=ws.big(_B, *g.shape)), w) if squared else g_sum
    return _ChunkSums(
        ce_num=ce_num,
        ce_den=ce_den,
        inter=_weighted_sum(torch.mul(p, g, out=ws.big(_A, *p.shape)), w),
        ground=ground,
    )


def _two_class_grad(
    chunk: _ChunkData,
    up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cw: Optional[torch.Tensor],
    squared: bool,
    ws: _Workspace,
) -> torch.Tensor:
    r"""dL/dd (nb, n) for two classes; then ``dz_1 = dd``, ``dz_0 = -dd``.

    With ``p_1 = sigmoid(d)``: ``dp_1/dd = p_0 p_1 = -dp_0/dd`` and
    ``d(-log p_c)/dd = p_1 - [c = 1]``, so, with $h_c$ and $A$ as in ``_chunk_grad``
    (``up`` holds ``gi`` and ``gp`` with class 0 negated: ``[-x_0, x_1]``, set once per pass),

    $$
    \frac{\partial L}{\partial d} = w\,\big[p_0 p_1 (h_1 - h_0)
        + gce\,(A\,p_1 - \omega_1 g_1)\big],\qquad
    h_1 - h_0 = gi_1 g_1 - gi_0 g_0 + gp_1 p_1^{k-1} - gp_0 p_0^{k-1}.
    $$
    """
    p, g, w = chunk.p, chunk.g, chunk.w
    gce, gi, gp = up
    dh = _class_sum(gi, g, ws, _T).squeeze(1)
    if squared:
        dh.add_(_class_sum(gp, p, ws, _U).squeeze(1))
    else:
        dh.add_(gp.sum(-1, keepdim=True))
    dd = dh.mul_(p[:, 0]).mul_(p[:, 1])
    a_sum = _class_sum(cw, g, ws, _U).squeeze(1)  # A
    ce = a_sum.mul_(p[:, 1])
    ce = ce.sub_(g[:, 1]) if cw is None else ce.addcmul_(g[:, 1], cw[1], value=-1)
    return dd.addcmul_(ce, gce.unsqueeze(-1)).mul_(w)


class _FusedRegionStats(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: Optional[torch.Tensor],
        teacher: Optional[torch.Tensor],
        region_weight: Optional[torch.Tensor],
        threshold: Optional[torch.Tensor],
        class_weight: Optional[torch.Tensor],
        opts: Options,
        spec: Optional[UncertaintyWeight],
    ) -> tuple[torch.Tensor, ...]:
        # Every tensor goes through save_for_backward (autograd's in-place checks apply) and
        # the (B, C, N) views are rebuilt in backward, so no copy outlives the forward.
        ctx.save_for_backward(logits, target, teacher, region_weight, threshold, class_weight)
        ctx.opts, ctx.spec = opts, spec
        prep = _prepare(logits, target, teacher, region_weight, opts)
        spec = None if spec is None or threshold is None else spec._replace(threshold=threshold)
        squared, onehot = opts.squared_pred, prep.probs is None
        dtype, k = prep.dtype, prep.num_classes
        bsz, channels, voxels = prep.logits.shape
        ce_num, ce_den = logits.new_zeros(bsz, dtype=dtype), logits.new_zeros(bsz, dtype=dtype)
        inter, pred, ground = (logits.new_zeros(bsz, k, dtype=dtype) for _ in range(3))
        mass = logits.new_zeros(bsz, dtype=dtype)
        cw = None if class_weight is None else class_weight.to(dtype)
        chunks = _chunks(bsz, voxels, channels)
        ws, teacher_ws = _workspaces(prep, spec, chunks)
        for ch in chunks:
            b = slice(ch.b0, ch.b1)
            chunk = _load_chunk(prep, ch, ws, spec, teacher_ws)
            if chunk.indicator is not None:
                mass[b] += chunk.indicator.sum(-1)
            p = chunk.p
            pred_c = _weighted_sum(
                torch.mul(p, p, out=ws.big(_B, *p.shape)) if squared else p, chunk.w
            )
            pred[b] += pred_c
            if chunk.diff is not None:
                sums = _two_class_sums(chunk, cw, squared, onehot, ws)
            elif onehot:
                sums = _onehot_sums(chunk, cw, ws)
            else:
                sums = _dense_sums(chunk, cw, squared, ws)
            # + 0 * pred: a NaN probability (NaN or +Inf logits) makes ce_num NaN too, as in
            # the reference, although _finite_products zeroed the NaN of its CE terms
            ce_num[b] += sums.ce_num + 0.0 * pred_c.sum(-1)
            ce_den[b] += sums.ce_den
            inter[b] += sums.inter
            ground[b] += sums.ground
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
        refuse_higher_order()
        logits, target, teacher, region_weight, threshold, class_weight = ctx.saved_tensors
        prep = _prepare(logits, target, teacher, region_weight, ctx.opts)
        spec = (
            None
            if ctx.spec is None or threshold is None
            else ctx.spec._replace(threshold=threshold)
        )
        squared, onehot = ctx.opts.squared_pred, prep.probs is None
        dtype, k = prep.dtype, prep.num_classes
        bsz, channels, voxels = prep.logits.shape
        g_ce, g_inter, g_pred = (t.to(dtype) for t in (g_ce, g_inter, g_pred))
        if squared:
            g_pred = 2 * g_pred  # d(p^2)/dp = 2p
        cw = None if class_weight is None else class_weight.to(dtype)
        if k == 2:  # the two-class gradient takes the differences gi_1 - gi_0, gp_1 - gp_0
            sign = torch.ones_like(g_inter[:1])
            sign[:, 0] = -1.0
            g_inter, g_pred = g_inter * sign, g_pred * sign
        grad = torch.empty_like(prep.logits)
        chunks = _chunks(bsz, voxels, channels)
        ws, teacher_ws = _workspaces(prep, spec, chunks)
        for ch in chunks:
            b = slice(ch.b0, ch.b1)
            chunk = _load_chunk(prep, ch, ws, spec, teacher_ws)
            out = grad[b, :, ch.s0 : ch.s1]
            up = (g_ce[b], g_inter[b], g_pred[b])
            if chunk.diff is not None:  # two classes: the gradient of d, +- per logit
                dd = _two_class_grad(chunk, up, cw, squared, ws)
                if prep.binary:
                    out[:, 0].copy_(dd)
                else:
                    out[:, 1].copy_(dd)
                    out[:, 0].copy_(dd).neg_()  # copy_ casts (half logits), neg is exact
                continue
            # dz goes straight into the gradient unless it needs a cast (half logits) or, under
            # torch.compile (which refuses a non-contiguous out=), is a strided chunk of it
            direct = grad.dtype == dtype and (out.is_contiguous() or not V.compiling())
            dz = out if direct else ws.big(_D, *chunk.p.shape)
            _chunk_grad(chunk, up, cw, squared, onehot, ws, dz)
            if not direct:
                out.copy_(dz)
        return grad.view_as(logits), None, None, None, None, None, None, None


def _workspaces(
    prep: _Prepared, spec: Optional[UncertaintyWeight], chunks: list[_Chunk]
) -> tuple[_Workspace, Optional[_Workspace]]:
    """The chunk buffers of the logits, and of the teacher's when its uncertainty is derived."""
    ws = _Workspace(prep.logits, prep.dtype, chunks, prep.num_classes)
    if spec is None or prep.teacher is None:
        return ws, None
    return ws, _Workspace(prep.logits, prep.dtype, chunks, prep.num_classes)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) as a contiguous (B, C, N)."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    return x3 if x3.is_contiguous() else x3.contiguous()


def _prepare(
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    teacher: Optional[torch.Tensor],
    region_weight: Optional[torch.Tensor],
    opts: Options,
) -> _Prepared:
    bsz, channels = logits.shape[:2]
    logits3 = _flat(logits)
    binary = opts.activation == "sigmoid"
    labels = probs = None
    if target is None:
        pass  # the teacher's pseudo-labels
    elif opts.kind == "labels":
        labels = V.labels_view(target, logits).reshape(bsz, -1)
    else:
        probs = target.reshape(bsz, target.shape[1], -1)
    weight = None
    if region_weight is not None:
        wv = V.weight_view(region_weight, logits)
        weight = wv.reshape(wv.shape[0], -1)
    k = 2 if binary else channels
    dtype = accumulation_dtype(logits.dtype)
    return _Prepared(
        logits=logits3,
        labels=labels,
        teacher=None if teacher is None else _flat(teacher),
        ignore_index=opts.ignore_index,
        probs=probs,
        weight=weight,
        binary=binary,
        num_classes=k,
        dtype=dtype,
        classes=torch.arange(k, dtype=dtype, device=logits.device).view(1, k, 1),
        check_labels=labels is not None and not opts.labels_checked,
    )


def fused_stats(
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    region_weight: Optional[torch.Tensor],
    opts: Options,
    derived_weight: Optional[UncertaintyWeight] = None,
    teacher: Optional[torch.Tensor] = None,
) -> tuple[RegionStats, torch.Tensor]:
    """The statistics of the reference engine in one autograd node, chunk by chunk.

    ``derived_weight`` multiplies the region weight by a weight computed from the normalised
    entropy of ``teacher`` (if given, else of ``logits``) inside the node (no separate
    uncertainty map, no gradient through it). With ``target=None`` the target is the teacher's
    [`pseudo_labels`][bual_losses.pseudo.pseudo_labels], taken chunk by chunk in the same
    pass. Inputs are validated by the public functions; this is the internal engine.

    Returns:
        ``(stats, mass)``: the statistics and, per sample ``(B,)``, the sum of the derived
        region indicator ``s`` over the voxels (zeros without ``derived_weight``).
    """
    threshold = None if derived_weight is None else derived_weight.threshold
    *stats, mass = _FusedRegionStats.apply(
        logits,
        target,
        None if teacher is None else teacher.detach(),
        region_weight,
        threshold,
        opts.class_weight,
        opts._replace(class_weight=None),
        # the threshold travels as a tensor argument (saved for backward), not inside the spec
        None if derived_weight is None else derived_weight._replace(threshold=_NO_TENSOR),
    )
    return RegionStats(*stats), mass


def fused_loss(
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    region_weight: Optional[torch.Tensor],
    opts: Options,
    spec: Finish,
    derived: Optional[UncertaintyWeight] = None,
    teacher: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, RegionStats, Optional[torch.Tensor]]:
    """The engine entry (see [`bual_losses.engines`][]): ``(loss, stats, mass)``, the mass of
    the derived indicator summed over the batch (None without a derived weight)."""
    if derived is not None and derived.relative:
        # the chunks need the threshold before the pass: the map's mean, from a streamed map
        # that is dropped before the pass allocates its buffers
        u = normalized_entropy(logits if teacher is None else teacher)
        derived = derived.absolute(u)
        del u
    if derived is not None and not isinstance(derived.threshold, torch.Tensor):
        thr = torch.tensor(derived.threshold, dtype=accumulation_dtype(logits.dtype))
        derived = derived._replace(threshold=thr.to(logits.device))
    stats, mass = fused_stats(logits, target, region_weight, opts, derived, teacher)
    return finish(stats, opts, spec), stats, None if derived is None else mass.sum()
