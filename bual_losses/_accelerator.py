r"""The accelerator engine of ``impl="fused"``: one closed-form autograd node, few kernels.

On a GPU a loss of this size costs kernel launches and host-side dispatch, not memory traffic,
so this engine works on the whole ``(B, C, N)`` tensor at once (no chunks) and gets the
statistics of [`RegionStats`][bual_losses.losses.RegionStats] from **batched matrix
products**. The loss is finished by the shared code of ``bual_losses._core`` (``finish_grad``:
the value and, in closed form, the gradients of the statistics), and the gradient of the logits
is computed in the node's forward (when a gradient is needed), so the backward is one product
with the incoming gradient.

**Label targets** (the default; without ``squared_pred``, ``sync_dist`` or per-class Dice terms)
live in two full-size buffers, and the second one becomes the gradient: the probabilities $p$
(``log p`` first, from which $-\log p_y$ is read per voxel by ``nll_loss``, then exponentiated
in place) and the weighted one-hot $R = w\,g$ (B, K, N). With $M = p\,R^\top$ (per sample
$K \times K$), $I_c = M_{cc}$, $P_c = \sum_j M_{cj}$ (as $\sum_j w\,g_j = w$) and
$G_c = \sum_j M_{jc}$ (as $\sum_j p_j = 1$, up to rounding; $G$ carries no gradient); the
cross-entropy is $-\log p_y$ summed against $w$. The gradient, with
$h = g_I\, w g + g_P\, w$ (the gradients of $I$ and $P$ from the finishing),

$$
\frac{\partial L}{\partial z} = p \odot \Big(h - \sum_c p_c h_c\Big)
    + g_{ce}\, \omega_y\, w\, (p - g),
$$

is written over $R$ in place: $h$ by two in-place updates, the softmax backward (one kernel),
and the one-hot subtracted from $p$ at the label for the cross-entropy. Two classes (and binary
logits) depend on $z_1 - z_0$ only: their gradient is $[-g, g]$, built from one row.

**Other targets and options** (probability targets, ``squared_pred``, ``sync_dist``, the
per-class terms of ``region_dice_loss(reduction="none")``) take every statistic from **one**
product, with the target $g$ as rows:

$$
L = \begin{bmatrix} p \\ \ell \\ \mathbf 1 \end{bmatrix},\qquad
R = \begin{bmatrix} w\,g \\ w \end{bmatrix},\qquad
M = L\,R^\top \quad (\text{per sample: } (K + 2) \times (K + 1)),
$$

where $\ell_v = \log p_{y_v, v}$ is the log-probability of each voxel's label (one row per
class for probability targets, zero where the target has no mass): $I_c = M_{c,c}$,
$P_c = M_{c, K}$, $G_c = M_{\mathbf 1, c}$, the CE numerator $-M_{\ell, K}$ (or
$-\sum_c \omega_c M_{\ell, c}$ with class weights) and its normaliser $M_{\mathbf 1, K}$ (with
``squared_pred``: rows $p^2$, and columns $w\,g^2$ for probability targets). The gradient with
respect to $M$ gives the gradient of the logits: the rows of $\partial M$ times $R$ are
$\partial L/\partial p$ and $\partial L/\partial \ell$, and the softmax chain rule gives

$$
\frac{\partial L}{\partial z} = p \odot \Big(\frac{\partial L}{\partial p}
    - \sum_c p_c \frac{\partial L}{\partial p_c}\Big)
  + \frac{\partial L}{\partial \log p} - p \sum_c \frac{\partial L}{\partial \log p_c}.
$$

The per-sample uncertainty weight of
[`bidirectional_loss`][bual_losses.bidirectional.bidirectional_loss] is derived inside from the
same probabilities (or from the teacher's, with its ``argmax`` as the pseudo-label; their
entropy terms overwrite the teacher's probabilities).

No host synchronisation, no data-dependent Python branch, and it runs on any device: the test
suite runs it on CPU tensors through [`use_engine`][bual_losses.engines.use_engine]. The price
of few kernels is memory. Peak extra memory, the gradient included, over the logits' bytes
(``benchmarks/launches.py``, counted on ``meta``): label targets 2.25x for four classes, 2.5x
for two (at most 3x for softmax logits; ``ignore_index`` adds a copy of the labels: 3.1x and
4.1x; binary logits, whose two-class buffers are twice their size, 5x); the single-product
layout about 9x; the CPU engine stays near 1.3x. One difference from the reference,
documented: a ``-inf`` logit at a voxel's target class makes the loss NaN even where the region
weight is 0 (the reference drops such a voxel); validation then reports it (``-inf`` at a
target class is rejected with validation on, on every engine).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union, cast

import torch
import torch.nn.functional as F

from . import _validation as V
from ._core import (
    Finish,
    FinishGrad,
    Options,
    RegionStats,
    accumulation_dtype,
    finish,
    finish_grad,
    refuse_higher_order,
    write_into,
)
from .pseudo import pseudo_labels
from .regions import UncertaintyWeight


class _Layout(NamedTuple):
    """Where each statistic sits in ``M`` (row / column indices)."""

    k: int  # classes K
    ce_rows: int  # 1 for labels, K for probability targets
    sq_rows: int  # K with squared_pred, else 0
    sq_cols: int  # K with squared_pred and probability targets, else 0

    @property
    def ones_row(self) -> int:
        return self.k + self.ce_rows + self.sq_rows

    @property
    def rows(self) -> int:
        return self.ones_row + 1

    @property
    def cols(self) -> int:
        return self.k + 1 + self.sq_cols


def _stats_from(m: torch.Tensor, lay: _Layout, opts: Options, cw: Optional[torch.Tensor]) -> Any:
    """The statistics as views (and a few small sums) of ``M`` (B, rows, cols)."""
    k = lay.k
    inter = m[:, :k, :k].diagonal(dim1=1, dim2=2)
    pred = m[:, :k, k] if not lay.sq_rows else m[:, k + lay.ce_rows : k + lay.ce_rows + k, k]
    ones = m[:, lay.ones_row]
    ground = ones[:, :k] if not lay.sq_cols else ones[:, k + 1 :]
    if lay.ce_rows == 1:  # labels: the row holds log p_y
        ce_row = m[:, k]
        if cw is None:
            ce_num, ce_den = -ce_row[:, k], ones[:, k]
        else:
            ce_num, ce_den = -(ce_row[:, :k] @ cw), ones[:, :k] @ cw
    else:  # probabilities: one log p_c row per class
        ce_c = m[:, k : 2 * k, :k].diagonal(dim1=1, dim2=2)
        mass = ones[:, :k]
        ce_num, ce_den = (ce_c.sum(-1), mass.sum(-1)) if cw is None else (ce_c @ cw, mass @ cw)
        ce_num = -ce_num
    return RegionStats(ce_num, ce_den, inter, pred, ground)


def _log_probs(z: torch.Tensor, binary: bool) -> torch.Tensor:
    """``log p`` (B, K, N): log-softmax, or ``[log sigmoid(-z), log sigmoid(z)]`` for binary
    logits (exact for large ``|z|``; their softmax pair ``(0, z)`` has the same gradient)."""
    if binary:
        return torch.cat([F.logsigmoid(-z), F.logsigmoid(z)], dim=1)
    return torch.log_softmax(z, dim=1)


def _teacher_probs(teacher: torch.Tensor, binary: bool, dtype: torch.dtype) -> torch.Tensor:
    zt = teacher.to(dtype)
    if binary:
        p1 = torch.sigmoid(zt)
        return torch.cat([1 - p1, p1], dim=1)
    return torch.softmax(zt, dim=1)


def _derived_weight(
    spec: UncertaintyWeight,
    p: torch.Tensor,
    threshold: Union[float, torch.Tensor],
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The derived weight ``base + scale * s`` (B, 1, N) and the indicator's total mass (0-d).

    ``s`` compares the normalised entropy ``u = min(H / ln K, 1)`` of ``p`` with the threshold.
    A hard region compares the entropy ``H`` (nats) itself with ``tau ln K``: no ``(B, N)`` map
    of ``u`` (``tau >= 1`` selects nothing, as ``u <= 1``). A relative threshold (a factor of
    each sample's mean ``u``) costs one more reduction, of the entropy at hand. ``overwrite``:
    ``p`` is a scratch copy, its entropy terms are written over it.
    """
    ln_k = math.log(p.shape[1])
    # entr(0) = 0: -inf logits are fine
    terms = torch.special.entr(p, out=p) if overwrite else torch.special.entr(p)
    h = terms.sum(1, keepdim=True)
    thr: Any = threshold
    if isinstance(thr, torch.Tensor):
        thr = thr.to(h.dtype)
        thr = thr.view(-1, 1, 1) if thr.ndim else thr
    if spec.temperature is None:
        if spec.relative:  # tau ln K = f * mean(H); H above ln K by rounding compares alike
            mean = h.mean(2, keepdim=True)
            thr = mean if isinstance(thr, float) and thr == 1 else mean.mul_(thr)
        elif isinstance(thr, torch.Tensor):
            h, thr = h.clamp_(max=ln_k), thr * ln_k
        else:
            thr = thr * ln_k if thr < 1 else math.inf
        s = h > thr if spec.side == "high" else h <= thr
        if spec.scale == 1 and h.dtype == torch.get_default_dtype():
            weight = torch.add(s, spec.base) if spec.base else s.to(h.dtype)
        else:
            weight = s.to(h.dtype).mul_(spec.scale).add_(spec.base)
        return weight, s.sum(dtype=h.dtype)
    u = h.mul_(1.0 / ln_k).clamp_(max=1.0)
    if spec.relative:
        thr = u.mean(2, keepdim=True).mul_(thr)
    soft = spec.indicator(u, thr)
    return soft * spec.scale + spec.base, soft.sum()


class _Forward(NamedTuple):
    loss: torch.Tensor
    stats: RegionStats
    mass: Optional[torch.Tensor]  # None without a derived weight
    grad: Optional[torch.Tensor]  # dL/dz for a unit incoming gradient (per sample)
    deferred: Optional[tuple[torch.Tensor, ...]]  # (M, L, R, logp) when it depends on more
    layout: _Layout


def _labels(
    target: Optional[torch.Tensor],
    teacher: Optional[torch.Tensor],
    logits: torch.Tensor,
    opts: Options,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Labels as an int64 (B, 1, N) index, and their validity (ignore_index) if any."""
    bsz, channels = logits.shape[:2]
    if target is None:
        assert teacher is not None
        y = cast(torch.Tensor, pseudo_labels(teacher.detach().reshape(bsz, channels, -1)))
    else:
        y = V.labels_view(target, logits).reshape(bsz, -1)
    y = y.unsqueeze(1)
    if y.dtype != torch.int64:
        y = y.long()
    if opts.ignore_index is None:
        return y, None
    valid = y != opts.ignore_index
    return torch.where(valid, y, 0), valid


def _run(
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    teacher: Optional[torch.Tensor],
    region_weight: Optional[torch.Tensor],
    threshold: Optional[torch.Tensor],
    cw: Optional[torch.Tensor],
    opts: Options,
    spec: Finish,
    derived: Optional[UncertaintyWeight],
    want_grad: bool,
) -> _Forward:
    dt = accumulation_dtype(logits.dtype)
    bsz, channels = logits.shape[:2]
    binary = opts.activation == "sigmoid"
    labels = opts.kind == "labels"
    k = 2 if binary else channels
    z = logits.detach().reshape(bsz, channels, -1)
    n = z.shape[-1]
    cw = None if cw is None else cw.to(dt)
    opts = opts._replace(class_weight=cw)
    deferred = spec.dice_terms and spec.reduction == "none"
    if labels and not opts.squared_pred and spec.group is None and not deferred:
        return _run_labels(
            z, logits, target, teacher, region_weight, threshold, opts, spec, derived, want_grad
        )
    lay = _Layout(
        k=k,
        ce_rows=1 if labels else k,
        sq_rows=k if opts.squared_pred else 0,
        sq_cols=k if opts.squared_pred and not labels else 0,
    )
    logp = _log_probs(z if z.dtype == dt else z.to(dt), binary)

    # left factor L (B, rows, N): p, log p of the target, [p^2], 1
    left = logp.new_empty(bsz, lay.rows, n)
    p = write_into(left[:, :k], torch.exp, logp)
    ce = left[:, k : k + lay.ce_rows]
    if labels:
        y, valid = _labels(target, teacher, logits, opts)
        write_into(ce, torch.gather, logp, 1, y)
    if lay.sq_rows:
        write_into(left[:, k + lay.ce_rows : lay.ones_row], torch.mul, p, p)
    left[:, lay.ones_row].fill_(1.0)

    # the voxel weight w (B or 1, 1, N): region weight, valid labels, derived uncertainty weight
    w: Optional[torch.Tensor] = None
    if region_weight is not None:
        wv = V.weight_view(region_weight, logits)
        w = wv.reshape(wv.shape[0], 1, n).to(dt)
    if labels and valid is not None:
        w = valid.to(dt) if w is None else w * valid
    mass: Optional[torch.Tensor] = None
    if derived is not None:
        if teacher is None:
            source = p
        else:
            source = _teacher_probs(teacher.detach().reshape(bsz, channels, n), binary, dt)
        thr = derived.threshold if threshold is None else threshold
        dw, mass = _derived_weight(derived, source, thr)
        w = dw if w is None else w * dw

    # right factor R (B, cols, N): w g, w [, w g^2]
    right = logp.new_empty(bsz, lay.cols, n)
    wg = right[:, :k]
    if labels:
        wg.zero_().scatter_(1, y, 1.0 if w is None else w.expand(bsz, 1, n))
    else:
        assert target is not None
        g = target.reshape(bsz, target.shape[1], n).to(dt)
        if binary:
            g = torch.cat([1 - g, g], dim=1)
        write_into(wg, torch.mul, g, 1.0 if w is None else w)
        # a -inf logit at a class the target does not hold gives 0, not 0 * inf
        write_into(ce, torch.where, wg != 0, logp, logp.new_zeros(()))
        if lay.sq_cols:
            write_into(right[:, k + 1 :], torch.mul, wg, g)
    if w is None:
        right[:, k].fill_(1.0)
    else:
        right[:, k : k + 1].copy_(w.expand(bsz, 1, n))

    m = torch.bmm(left, right.mT)
    if not want_grad:
        stats = _stats_from(m, lay, opts, cw)
        return _Forward(finish(stats, opts, spec), stats, mass, None, None, lay)
    if spec.dice_terms and spec.reduction == "none":
        # one loss per sample and class: the gradient needs the incoming one (see backward)
        stats = _stats_from(m, lay, opts, cw)
        loss = finish(stats, opts, spec)
        return _Forward(loss, stats, mass, None, (m, left, right, logp), lay)
    if spec.group is not None:  # the sums over ranks: autograd through the finishing
        loss, stats, gm = _finish_and_grad(m, lay, opts, cw, spec, None)
        return _Forward(loss, stats, mass, _grad(gm, left, right, logp, lay, opts), None, lay)
    # one process: the finishing's gradient in closed form
    stats = _stats_from(m, lay, opts, cw)
    fg = finish_grad(stats, opts, spec)
    dz = _grad(_grad_matrix(fg, m, lay, cw), left, right, logp, lay, opts)
    return _Forward(fg.loss, stats, mass, dz, None, lay)


def _voxel_weight(
    region_weight: Optional[torch.Tensor],
    valid: Optional[torch.Tensor],
    logits: torch.Tensor,
    dt: torch.dtype,
) -> Optional[torch.Tensor]:
    """The voxel weight before any derived weight: region weight times the valid labels,
    ``(B or 1, 1, N)`` (None: every voxel counts 1)."""
    w: Optional[torch.Tensor] = None
    if region_weight is not None:
        wv = V.weight_view(region_weight, logits)
        w = wv.reshape(wv.shape[0], 1, -1).to(dt)
    if valid is not None:
        w = valid.to(dt) if w is None else w * valid
    return w


def _run_labels(
    z: torch.Tensor,
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    teacher: Optional[torch.Tensor],
    region_weight: Optional[torch.Tensor],
    threshold: Optional[torch.Tensor],
    opts: Options,
    spec: Finish,
    derived: Optional[UncertaintyWeight],
    want_grad: bool,
) -> _Forward:
    """Label targets (see the module docs): the statistics from ``p`` and the weighted one-hot
    ``R``, then the gradient written over ``R``."""
    dt = accumulation_dtype(logits.dtype)
    binary = opts.activation == "sigmoid"
    cw = opts.class_weight
    bsz, _, n = z.shape
    probs = _log_probs(z if z.dtype == dt else z.to(dt), binary)  # log p for now
    k = probs.shape[1]
    y, valid = _labels(target, teacher, logits, opts)
    # -log p_y (B, N): one element of log p per voxel (the label's), like a gather
    nll = F.nll_loss(probs, y.view(bsz, n), reduction="none")
    p = probs.exp_()
    w = _voxel_weight(region_weight, valid, logits, dt)
    mass: Optional[torch.Tensor] = None
    if derived is not None:
        thr = derived.threshold if threshold is None else threshold
        if teacher is None:
            dw, mass = _derived_weight(derived, p, thr)
        else:
            source = _teacher_probs(teacher.detach().reshape(bsz, -1, n), binary, dt)
            dw, mass = _derived_weight(derived, source, thr, overwrite=True)
            del source  # (B, K, N): not kept while R is alive
        w = dw if w is None else w * dw
    wb = None if w is None else w.expand(bsz, 1, n)
    if cw is None:  # the cross-entropy's sums first: -log p_y is freed before R exists
        ce_num = nll.sum(-1) if wb is None else torch.bmm(nll.view(bsz, 1, n), wb.mT).view(bsz)
        del nll
    right = torch.zeros((bsz, k, n), dtype=dt, device=p.device)
    right.scatter_(1, y, 1.0 if wb is None else wb)
    m = torch.bmm(p, right.mT)  # (B, K, K)
    ground = m.sum(-2)
    if cw is None:
        ce_den = ground.sum(-1)
    else:
        ce_num = torch.bmm(nll.view(bsz, 1, n), right.mT).view(bsz, k) @ cw
        ce_den = ground @ cw
        del nll
    stats = RegionStats(ce_num, ce_den, m.diagonal(dim1=1, dim2=2), m.sum(-1), ground)
    if not want_grad:
        return _Forward(finish(stats, opts, spec), stats, mass, None, None, _NO_LAYOUT)
    fg = finish_grad(stats, opts, spec)
    if k == 2 and cw is None and fg.inter is not None and fg.pred is not None:
        dz = _two_class_grad(fg, p, right, wb, negate=not binary)
        return _Forward(fg.loss, stats, mass, dz[:, 1:] if binary else dz, None, _NO_LAYOUT)
    coef: Any = fg.ce_num
    if isinstance(coef, torch.Tensor) and coef.ndim:
        coef = coef.view(-1, 1, 1)
    if coef is not None and cw is not None:  # omega_y w, before R is overwritten
        coef = torch.bmm(cw.expand(bsz, 1, k), right).mul_(coef)
    elif coef is not None and wb is not None:
        coef = wb * coef
    if fg.inter is not None and fg.pred is not None:
        right.mul_(fg.inter.view(-1, k, 1))
        if wb is None:
            right.add_(fg.pred.view(-1, k, 1))
        else:
            right.addcmul_(fg.pred.view(-1, k, 1), wb)
        dz = _softmax_grad(right, p)
        if isinstance(coef, torch.Tensor):
            dz.addcmul_(p.scatter_(1, y, -1.0, reduce="add"), coef)  # p - g, in place
        elif coef is not None:
            dz.add_(p.scatter_(1, y, -1.0, reduce="add"), alpha=coef)
    elif coef is not None:
        p.scatter_(1, y, -1.0, reduce="add")
        dz = p.mul_(coef)
    else:  # lambda_ce = lambda_dice = 0: a constant loss
        dz = right.zero_()
    return _Forward(fg.loss, stats, mass, dz[:, 1:] if binary else dz, None, _NO_LAYOUT)


def _two_class_grad(
    fg: FinishGrad,
    p: torch.Tensor,
    right: torch.Tensor,
    wb: Optional[torch.Tensor],
    negate: bool,
) -> torch.Tensor:
    r"""dL/dz (B, 2, N) for two classes, written over ``R``: its rows are ``-g`` and ``g``
    (row 0 left as it is without ``negate``: binary logits need ``g`` only).

    Two probabilities depend on the logits only through ``z_1 - z_0``, so the gradient is
    ``[-g, g]`` with ``g = p_0 p_1 (h_1 - h_0) + g_{ce} (w p_1 - w g_1)``. The softmax backward
    gives the first part from any ``h`` with the same ``h_1 - h_0`` (it ignores what is added to
    every class of a voxel), and as ``w = w g_0 + w g_1`` the Dice's
    ``h = g_I\, w g + g_P\, w`` has the same difference as ``s \odot w g`` with
    ``s_c = g_{I,c} + g_{P,c} - g_{P,1-c}``: one in-place update of ``R``. The cross-entropy's
    ``w g_1 - w p_1`` is taken out of ``R`` before.
    """
    gi, gp = fg.inter, fg.pred
    assert gi is not None and gp is not None
    r1, p1 = right[:, 1:], p[:, 1:]
    coef = fg.ce_num
    ce: Optional[torch.Tensor] = None
    if coef is not None:  # the cross-entropy's w g_1 - w p_1 (B, 1, N), before R changes
        ce = torch.sub(r1, p1) if wb is None else torch.addcmul(r1, wb, p1, value=-1.0)
    # h = s (w g) with s_c = g_I,c + g_P,c - g_P,1-c = g_I + 2 g_P - sum(g_P): one update of R
    s = torch.add(gi, gp, alpha=2.0).sub_(gp.sum(-1, keepdim=True))
    right.mul_(s.view(-1, 2, 1))
    dz = _softmax_grad(right, p)  # [-p_0 p_1 (h_1 - h_0), p_0 p_1 (h_1 - h_0)]
    g = dz[:, 1:]
    if ce is not None:
        if isinstance(coef, torch.Tensor):
            g.addcmul_(ce, coef.view(-1, 1, 1) if coef.ndim else coef, value=-1.0)
        else:
            g.add_(ce, alpha=-float(cast(float, coef)))
    if negate:
        write_into(dz[:, :1], torch.neg, g)
    return dz


def _softmax_grad(h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``p * (h - sum_c p_c h_c)`` written over ``h`` (each element needs ``h`` and ``p`` at
    its own index and a per-voxel sum only: safe in place)."""
    backward = torch.ops.aten._softmax_backward_data
    if V.compiling():  # torch.compile traces the functional form
        return cast(torch.Tensor, backward(h, p, 1, p.dtype))
    return cast(torch.Tensor, backward.out(h, p, 1, p.dtype, grad_input=h))


def _grad_matrix(
    fg: FinishGrad, m: torch.Tensor, lay: _Layout, cw: Optional[torch.Tensor]
) -> torch.Tensor:
    """dL/dM from the closed-form gradients of the statistics (the entries ``_stats_from``
    reads; ``ground`` and ``ce_den`` carry none)."""
    k = lay.k
    gm = torch.zeros_like(m)
    if fg.inter is not None and fg.pred is not None:
        gm[:, :k, :k].diagonal(dim1=1, dim2=2).copy_(fg.inter)
        first = k + lay.ce_rows if lay.sq_rows else 0
        gm[:, first : first + k, k] = fg.pred
    if fg.ce_num is not None:  # ce_num = -(the CE entries), class-weighted
        g_ce = torch.as_tensor(fg.ce_num, dtype=m.dtype, device=m.device)
        g_ce = g_ce.reshape(-1, 1).expand(m.shape[0], 1)
        per_class = -g_ce if cw is None else -g_ce * cw
        if lay.ce_rows == 1 and cw is None:
            gm[:, k, k] = per_class[:, 0]
        elif lay.ce_rows == 1:
            gm[:, k, :k] = per_class
        else:
            gm[:, k : 2 * k, :k].diagonal(dim1=1, dim2=2).copy_(per_class.expand(-1, k))
    return gm


def _finish_and_grad(
    m: torch.Tensor,
    lay: _Layout,
    opts: Options,
    cw: Optional[torch.Tensor],
    spec: Finish,
    grad_loss: Optional[torch.Tensor],
) -> tuple[torch.Tensor, RegionStats, torch.Tensor]:
    """The loss (by the shared finishing step) and its gradient with respect to ``M``, by
    autograd through the few small ops of the finishing."""
    leaf = m.detach().requires_grad_(True)
    with torch.enable_grad():
        stats = _stats_from(leaf, lay, opts, cw)
        loss = finish(stats, opts, spec)
        grad_out = torch.ones_like(loss) if grad_loss is None else grad_loss
        (gm,) = torch.autograd.grad(loss, leaf, grad_out)
    return loss.detach(), RegionStats(*(s.detach() for s in stats)), gm


def _grad(
    gm: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    logp: torch.Tensor,
    lay: _Layout,
    opts: Options,
) -> torch.Tensor:
    """dL/dz (B, C, N) from dL/dM: the rows of ``gM R`` are dL/d(rows of L)."""
    k, dt = lay.k, left.dtype
    p, wg = left[:, :k], right[:, :k]
    d = torch.bmm(gm[:, : lay.ones_row], right)
    dp = d[:, :k]
    if lay.sq_rows:
        dp = dp.addcmul(p, d[:, k + lay.ce_rows : lay.ones_row], value=2.0)
    dz = torch.ops.aten._softmax_backward_data(dp, p, 1, dt)
    dce = d[:, k : k + lay.ce_rows]  # dL/d(log p of the target)
    if opts.kind == "labels":
        # d(log p_y)/dz = onehot(y) - p, and onehot(y) dce = w g (gM[ce, y] + gM[ce, K])
        dz.addcmul_(p, dce, value=-1.0)
        coef = gm[:, k, :k] + gm[:, k, k : k + 1]
        dz.addcmul_(wg, coef.unsqueeze(-1))
    else:
        dl = dce * (wg != 0)
        dz.addcmul_(p, dl.sum(1, keepdim=True), value=-1.0).add_(dl)
    return (
        dz[:, 1:] if opts.activation == "sigmoid" else dz
    )  # binary: the pair (0, z), the gradient of z


class _AcceleratorLoss(torch.autograd.Function):
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
        spec: Finish,
        derived: Optional[UncertaintyWeight],
    ) -> tuple[torch.Tensor, ...]:
        out = _run(
            logits, target, teacher, region_weight, threshold, class_weight,
            opts, spec, derived, ctx.needs_input_grad[0],
        )  # fmt: skip
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        if out.deferred is not None:
            ctx.save_for_backward(*out.deferred, class_weight)
            ctx.opts, ctx.spec, ctx.layout = opts, spec, out.layout
        elif out.grad is not None:
            ctx.save_for_backward(out.grad)
        ctx.deferred = out.deferred is not None
        # the outputs besides the loss carry no gradient: no zeros for them in backward
        ctx.set_materialize_grads(False)
        extra = out.stats if out.mass is None else (out.mass, *out.stats)
        ctx.mark_non_differentiable(*extra)
        return (out.loss, *extra)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_unused: Any) -> tuple[Any, ...]:
        refuse_higher_order()
        if grad_loss is None:  # nothing flows back through the loss
            return (None,) * 9
        if ctx.deferred:
            m, left, right, logp, cw = ctx.saved_tensors
            cw = None if cw is None else cw.to(m.dtype)
            opts = ctx.opts._replace(class_weight=cw)
            gm = _finish_and_grad(m, ctx.layout, opts, cw, ctx.spec, grad_loss.to(m.dtype))[2]
            dz = _grad(gm, left, right, logp, ctx.layout, opts)
            return dz.to(ctx.dtype).reshape(ctx.shape), *([None] * 8)
        (dz,) = ctx.saved_tensors
        if grad_loss.ndim:  # reduction="none": one loss per sample
            grad_loss = grad_loss.reshape(grad_loss.shape[0], 1, 1)
        # not in place: backward may run again on the same graph (retain_graph=True)
        grad = (dz * grad_loss).to(ctx.dtype).reshape(ctx.shape)
        return grad, None, None, None, None, None, None, None, None


def accelerator_loss(
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    region_weight: Optional[torch.Tensor],
    opts: Options,
    spec: Finish,
    derived: Optional[UncertaintyWeight] = None,
    teacher: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, RegionStats, Optional[torch.Tensor]]:
    """The engine entry (see [`bual_losses.engines`][]): ``(loss, stats, mass)``."""
    # a tensor threshold travels as an argument of the node, a number inside the spec
    threshold = None
    if derived is not None and isinstance(derived.threshold, torch.Tensor):
        threshold, derived = derived.threshold, derived._replace(threshold=_NO_TENSOR)
    loss, *outputs = _AcceleratorLoss.apply(
        logits,
        target,
        teacher,
        region_weight,
        threshold,
        opts.class_weight,
        opts._replace(class_weight=None),
        spec,
        derived,
    )
    mass = None if derived is None else outputs.pop(0)
    return loss, RegionStats(*outputs), mass


_NO_TENSOR = torch.empty(0)
_NO_LAYOUT = _Layout(k=0, ce_rows=0, sq_rows=0, sq_cols=0)
