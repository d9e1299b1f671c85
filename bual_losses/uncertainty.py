r"""Uncertainty maps: entropy of a class distribution, MC-dropout and ensemble estimators.

Everything here measures how unsure a segmentation model is, per voxel, for any number of
spatial dims (2D slices and 3D volumes alike):

* [`entropy_map`][bual_losses.uncertainty.entropy_map]: entropy of one prediction;
* [`mc_dropout_uncertainty`][bual_losses.uncertainty.mc_dropout_uncertainty]: `T` stochastic
  forward passes (dropout and/or input noise, as in UA-MT);
* [`ensemble_uncertainty`][bual_losses.uncertainty.ensemble_uncertainty]: the same estimators
  from predictions you already have (an ensemble, teacher and student, test-time augmentation).

Both estimators return an [`UncertaintyEstimate`][bual_losses.uncertainty.UncertaintyEstimate]
and share one streaming accumulator, so memory stays constant in the number of passes `T`.

Binary models with a single output channel (`C == 1`) are read as a sigmoid and treated as two
classes `[1 - p, p]` everywhere, so their entropies live on the same `ln 2` scale as a two-class
softmax model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from ._arrays import ArrayLike, as_tensor, numpy_compatible
from ._validation import (
    compiling,
    require_dim,
    require_floating,
    require_logits,
    require_nonnegative_number,
    require_positive_int,
    require_same_device,
    shape_str,
)

__all__ = [
    "UncertaintyEstimate",
    "ensemble_uncertainty",
    "entropy_map",
    "mc_dropout_uncertainty",
]

# Clamp inside the log for probability inputs; the estimators use the same value as
# `entropy_map`'s default so both paths agree on saturated predictions.
_EPS = 1e-12


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half precision loses too much in log / sum; float64 callers asked for float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _class_log_probs(
    x: torch.Tensor, *, from_logits: bool, dim: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, log p)`` with ``C' = max(C, 2)`` classes along ``dim`` (``C == 1`` -> ``[1-p, p]``)."""
    if x.shape[dim] == 1:
        if from_logits:
            # logsigmoid(-z) = log(1 - sigmoid(z)) without cancellation for large |z|.
            log_probs = torch.cat([F.logsigmoid(-x), F.logsigmoid(x)], dim=dim)
            return log_probs.exp(), log_probs
        probs = torch.cat([1 - x, x], dim=dim)
    elif from_logits:
        log_probs = F.log_softmax(x, dim=dim)
        return log_probs.exp(), log_probs
    else:
        probs = x
    # p * log(max(p, eps)) is exactly 0 at p = 0, and its gradient stays finite there.
    return probs, probs.clamp_min(eps).log()


def _entropy(probs: torch.Tensor, log_probs: torch.Tensor, dim: int) -> torch.Tensor:
    # p * (-log p), not -(p * log p): a certain voxel then gives +0, not -0.
    # where(): a class with p = 0 (e.g. a -inf logit, log p = -inf) contributes 0, not NaN
    return torch.where(probs != 0, probs * log_probs.neg(), 0.0).sum(dim=dim)


# CPU entropy from logits without autograd is computed in chunks of about this many input
# elements (a module constant so tests can make it small). Smaller inputs take the plain path.
_CHUNK_ELEMENTS = 1 << 19


def _stream_entropy_from_logits(
    x: torch.Tensor, *, dim: int, normalize: bool
) -> Optional[torch.Tensor]:
    r"""``entropy_map(x, from_logits=True)`` in chunks of ~``_CHUNK_ELEMENTS`` (CPU, no grad).

    The output is allocated once and each chunk is computed into it through a few
    chunk-sized buffers (``out=`` ops), so no full-size temporary exists. ``None`` when ``x``
    cannot be viewed as ``(P, C, N)`` (classes along ``dim``) without a copy.

    ``C >= 3``, with ``m = max_c z_c``, ``y_c = z_c - m``, ``e_c = exp(y_c)``, ``S = sum_c e_c``:
    ``H = log S - (sum_c e_c y_c) / S`` (``y_c`` clamped at ``-finfo.max`` so a ``-inf`` logit
    contributes ``0 * -finfo.max = 0``). Two classes use the logit difference ``d``
    (``z_1 - z_0``, or the binary logit itself), ``a = |d|``:
    ``H = softplus(-a) + a sigmoid(-a) = log1p(e) + a e / (1 + e)``, ``e = exp(-a)``, with
    ``a`` clamped at ``finfo.max`` so that ``|d| = inf`` gives ``0``.

    NaN and Inf follow the plain path (``log_softmax``): a NaN logit, a ``+inf`` softmax logit
    or all-``-inf`` softmax logits give NaN; a ``-inf`` softmax logit among finite ones
    contributes 0; a binary logit of ``+-inf`` gives 0.

    Measured on 2 threads, float32, fresh inputs, median of 11 (the plain path's time swings
    with page faults of its fresh temporaries), peak extra memory from ``torch.profiler``
    allocation events, output included:
    ``(24, 4, 256, 256)``: 22-45 ms -> 8-13 ms, 102 MB -> 11.5 MB (output 6 MB);
    ``(4, 2, 112, 112, 80)``: 25-59 ms -> 7-12 ms, 130 MB -> 18 MB (output 15 MB).
    """
    shape = x.shape
    num_classes = shape[dim]
    outer = math.prod(shape[:dim])
    inner = math.prod(shape[dim + 1 :])
    try:
        x3 = x.view(outer, num_classes, inner)
    except RuntimeError:  # not viewable: the plain path (its temporaries are no worse than a copy)
        return None
    work = _compute_dtype(x.dtype)
    finfo = torch.finfo(work)
    out = torch.empty((outer, inner), dtype=x.dtype)
    # chunks of k rows x n voxels: blocks of one row when a row is long, else several rows
    voxels = max(1, _CHUNK_ELEMENTS // num_classes)
    n = min(inner, voxels)
    k = max(1, min(outer, voxels // max(inner, 1)))
    if inner == 0 or outer == 0:
        return out.view(*shape[:dim], *shape[dim + 1 :])

    def buffer(classes: int) -> torch.Tensor:
        return torch.empty(k * classes * n, dtype=work)

    upcast = buffer(num_classes) if x.dtype != work else None
    h32 = buffer(1) if x.dtype != work else None
    two_class = num_classes <= 2
    if two_class:
        a_buf, e_buf, t_buf = buffer(1), buffer(1), buffer(1)
    else:
        m_buf, s_buf, t_buf = buffer(1), buffer(1), buffer(1)
        y_buf, e_buf = buffer(num_classes), buffer(num_classes)
    log_c = math.log(max(num_classes, 2))

    with torch.no_grad():
        for r0 in range(0, outer, k):
            r1 = min(outer, r0 + k)
            for c0 in range(0, inner, n):
                c1 = min(inner, c0 + n)
                rows, cols = r1 - r0, c1 - c0
                size = rows * cols
                chunk = x3[r0:r1, :, c0:c1]
                if upcast is not None:
                    chunk = upcast[: size * num_classes].view(rows, num_classes, cols).copy_(chunk)
                target = out[r0:r1, c0:c1]
                h = target if h32 is None else h32[:size].view(rows, cols)
                if two_class:
                    a = a_buf[:size].view(rows, cols)
                    e = e_buf[:size].view(rows, cols)
                    t = t_buf[:size].view(rows, cols)
                    if num_classes == 1:
                        torch.abs(chunk[:, 0], out=a)
                    else:
                        z0, z1 = chunk[:, 0], chunk[:, 1]
                        torch.sub(z1, z0, out=a).abs_()
                    a.clamp_(max=finfo.max)  # |d| = inf -> 0 entropy (NaN stays NaN)
                    if num_classes == 2:
                        # log_softmax gives NaN when a logit is +inf: max * 0 is NaN exactly
                        # then (and when both are -inf, where d is NaN already), else 0
                        torch.maximum(z0, z1, out=t).mul_(0.0)
                        a.add_(t)
                    torch.neg(a, out=e).exp_()  # e = exp(-a) in [0, 1]
                    torch.log1p(e, out=h)  # softplus(-a)
                    torch.add(e, 1.0, out=t)
                    torch.div(e, t, out=t)  # sigmoid(-a)
                    h.addcmul_(a, t)
                else:
                    m = m_buf[:size].view(rows, 1, cols)
                    y = y_buf[: size * num_classes].view(rows, num_classes, cols)
                    e = e_buf[: size * num_classes].view(rows, num_classes, cols)
                    total = s_buf[:size].view(rows, cols)
                    weighted = t_buf[:size].view(rows, cols)
                    torch.amax(chunk, dim=1, keepdim=True, out=m)
                    # +inf max or NaN: y is NaN (as log_softmax); -inf logit: y = -finfo.max
                    torch.sub(chunk, m, out=y).clamp_(min=-finfo.max)
                    torch.exp(y, out=e)
                    torch.sum(e, dim=1, out=total)
                    e.mul_(y)
                    torch.sum(e, dim=1, out=weighted)
                    torch.log(total, out=h)
                    h.sub_(weighted.div_(total))
                if normalize:
                    # rounding can leave a uniform distribution at 1 + ulp; the bound is exact
                    h.div_(log_c).clamp_(max=1.0)
                if h is not target:
                    target.copy_(h)
    return out.view(*shape[:dim], *shape[dim + 1 :])


@numpy_compatible("x")
def entropy_map(
    x: ArrayLike,
    *,
    from_logits: bool = False,
    normalize: bool = True,
    dim: int = 1,
    eps: float = 1e-12,
) -> ArrayLike:
    r"""Entropy of the class distribution along ``dim``, per voxel.

    $$
    H(p) = -\sum_{c=1}^{C} p_c \log p_c \quad \text{(nats)}, \qquad
    \tilde H(p) = \frac{H(p)}{\ln C} \in [0, 1] \quad \text{(normalize=True)}.
    $$

    ``C == 1`` is a sigmoid output: ``x`` is the foreground probability (or its logit when
    ``from_logits``) and the distribution is the two classes ``[1 - p, p]``, normalised by
    ``ln 2``.

    From logits the log-probabilities come from ``log_softmax`` / ``logsigmoid``, so the result
    is finite for logits as large as ``1e4`` in magnitude. From probabilities the log is taken
    of ``max(p, eps)``: a class with ``p = 0`` then contributes exactly ``0`` (never NaN) and the
    gradient stays finite at one-hot inputs. Probabilities are not checked to lie in ``[0, 1]``
    or to sum to one.

    float16 / bfloat16 inputs are computed in float32 and the result is cast back to the input
    dtype. Torch inputs stay differentiable.

    Logits on the CPU that need no gradient (``requires_grad=False`` or under
    ``torch.no_grad()``) with at least 2^19 elements are streamed: computed in chunks of about
    2^19 elements into the preallocated output, with no full-size temporary (3-5x faster, peak
    extra memory about the output's size); two classes use the logit difference ``d``,
    ``H = softplus(-|d|) + |d| sigmoid(-|d|)``. The values agree with the differentiable path
    to rounding (float32: 1e-6 on the normalised map), NaN and Inf alike.

    Args:
        x: probabilities (or logits with ``from_logits=True``), shape ``(B, C, *S)`` for the
            default ``dim=1``; any rank >= 2 and any class dim work. A ``numpy.ndarray`` gives a
            ``numpy.ndarray`` back.
        from_logits: ``x`` holds logits (softmax over ``dim``; sigmoid when ``C == 1``).
        normalize: divide by ``ln C`` (``ln 2`` for ``C == 1``) so the map lies in ``[0, 1]``.
        dim: the class dim; it is removed from the output.
        eps: lower clamp inside the log for probability inputs (ignored for logits).

    Returns:
        The entropy, shape of ``x`` without ``dim`` (``(B, *S)`` for ``(B, C, *S)``), same
        type, device and dtype as ``x``.

    Raises:
        TypeError: ``x`` is not a floating tensor / array, or ``dim`` is not an int.
        ValueError: ``x`` has fewer than 2 dims or no class along ``dim``, ``dim`` is out of
            range, or ``eps`` is not > 0.

    Examples:
        >>> import torch
        >>> from bual_losses.uncertainty import entropy_map
        >>> probs = torch.tensor([[0.25, 1.0], [0.25, 0.0], [0.5, 0.0]]).reshape(1, 3, 2)
        >>> entropy_map(probs, normalize=False)  # 1.5 ln 2 and 0 nats
        tensor([[1.0397, 0.0000]])
        >>> entropy_map(torch.zeros(2, 1, 4, 4), from_logits=True).unique()  # p = 0.5
        tensor([1.])
    """
    # A no-op for tensors (numpy was converted by the decorator); names the accepted types
    # for anything else, which require_floating alone would not.
    x = require_floating(as_tensor(x, "x")[0], "x")
    if x.ndim < 2:
        raise ValueError(
            "`x` must have at least 2 dims, (B, C, *S) with the classes along `dim`, "
            f"got shape {shape_str(x.shape)}."
        )
    dim = require_dim(dim, x, "x")
    if x.shape[dim] < 1:
        raise ValueError(
            f"`x` must have at least one class along dim={dim}, got shape {shape_str(x.shape)}."
        )
    eps = require_nonnegative_number(eps, "eps", positive=True)

    num_classes = max(x.shape[dim], 2)
    if (
        from_logits
        and x.device.type == "cpu"
        and x.numel() >= _CHUNK_ELEMENTS
        and not (x.requires_grad and torch.is_grad_enabled())
        and not compiling()
    ):
        streamed = _stream_entropy_from_logits(x, dim=dim, normalize=normalize)
        if streamed is not None:
            return streamed
    probs, log_probs = _class_log_probs(
        x.to(_compute_dtype(x.dtype)), from_logits=from_logits, dim=dim, eps=eps
    )
    entropy = _entropy(probs, log_probs, dim=dim)
    if normalize:
        # rounding can leave a uniform distribution at 1 + ulp; the bound is exact
        entropy = (entropy / math.log(num_classes)).clamp_(max=1.0)
    return entropy.to(x.dtype)


class UncertaintyEstimate(NamedTuple):
    r"""Uncertainty from ``T`` predictions ``p_1 .. p_T`` of the same batch.

    $$
    \bar p = \frac{1}{T} \sum_t p_t, \quad
    H_\text{pred} = H(\bar p), \quad
    H_\text{exp} = \frac{1}{T} \sum_t H(p_t), \quad
    I = \max(H_\text{pred} - H_\text{exp}, 0), \quad
    \sigma^2_c = \frac{1}{T} \sum_t (p_{t,c} - \bar p_c)^2 .
    $$

    ``C'`` is the number of classes ``C``, or 2 for a binary model with one output channel:
    its sigmoid ``p`` is expanded to ``[1 - p, p]`` so that every field has the same meaning
    (channel 1 is the foreground) and the entropies share the two-class ``ln 2`` scale.

    Entropies are in nats, or divided by ``ln C'`` (in ``[0, 1]``) when the estimator was
    called with ``normalize=True``. All fields are float32 (float64 for float64 predictions)
    and carry no autograd history.

    Attributes:
        mean_probs: ``(B, C', *S)`` mean class probabilities ``p_bar`` over the passes.
        predictive_entropy: ``(B, *S)`` entropy of the mean, ``H(p_bar)``: total uncertainty.
        expected_entropy: ``(B, *S)`` mean entropy of each pass, ``mean_t H(p_t)``: the
            aleatoric part.
        mutual_information: ``(B, *S)`` ``H(p_bar) - mean_t H(p_t)`` (BALD): disagreement
            between passes, the epistemic part. It is >= 0 in exact arithmetic (Jensen) and is
            clamped at 0 because rounding can make it slightly negative where passes agree.
        variance: ``(B, C', *S)`` per-class population variance of the probabilities over the
            passes (divided by ``T``, not ``T - 1``; 0 for a single pass).

    Examples:
        >>> import torch
        >>> from bual_losses import ensemble_uncertainty
        >>> est = ensemble_uncertainty([torch.randn(2, 3, 8, 8) for _ in range(4)])
        >>> est.mean_probs.shape, est.predictive_entropy.shape, est.variance.shape
        (torch.Size([2, 3, 8, 8]), torch.Size([2, 8, 8]), torch.Size([2, 3, 8, 8]))
        >>> h, h_exp, mi = est.predictive_entropy, est.expected_entropy, est.mutual_information
        >>> bool(torch.allclose(h, h_exp + mi, atol=1e-6))  # total = aleatoric + epistemic
        True
    """

    mean_probs: torch.Tensor
    predictive_entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor
    variance: torch.Tensor


class _StreamingMoments:
    """Running statistics of ``T`` predictions with memory independent of ``T``.

    Welford's update keeps the running mean and the sum of squared deviations (``M2``) of the
    class probabilities; the per-pass entropy is summed. State is float32 (float64 when the
    first prediction is float64) whatever the prediction dtype, so fp16 model outputs do not
    lose the small variances. Callers run it under ``torch.no_grad()``.
    """

    def __init__(self, *, from_logits: bool) -> None:
        self.from_logits = from_logits
        self.count = 0
        self._ref_name = ""
        self._shape = torch.Size()
        self._mean: Optional[torch.Tensor] = None
        self._m2: Optional[torch.Tensor] = None
        self._entropy_sum: Optional[torch.Tensor] = None

    def update(self, prediction: Any, name: str) -> None:
        """Fold in one prediction ``(B, C, *S)``; ``name`` is used in error messages."""
        prediction = require_logits(prediction, name)
        if self._mean is None or self._m2 is None or self._entropy_sum is None:
            x = prediction.to(_compute_dtype(prediction.dtype))
            probs, log_probs = _class_log_probs(x, from_logits=self.from_logits, dim=1, eps=_EPS)
            self._ref_name, self._shape = name, prediction.shape
            # The running mean is updated in place: never let it be the caller's tensor.
            self._mean = probs.clone() if probs is prediction else probs
            self._m2 = torch.zeros_like(probs)
            self._entropy_sum = _entropy(probs, log_probs, dim=1)
            self.count = 1
            return

        if prediction.shape != self._shape:
            raise ValueError(
                f"`{name}` must have the shape of `{self._ref_name}` {shape_str(self._shape)}, "
                f"got {shape_str(prediction.shape)}."
            )
        require_same_device(prediction, name, self._mean, self._ref_name)

        x = prediction.to(self._mean.dtype)
        probs, log_probs = _class_log_probs(x, from_logits=self.from_logits, dim=1, eps=_EPS)
        self.count += 1
        delta = probs - self._mean
        self._mean.add_(delta, alpha=1.0 / self.count)
        self._m2.addcmul_(delta, probs - self._mean)
        self._entropy_sum.add_(_entropy(probs, log_probs, dim=1))

    def result(self, *, normalize: bool) -> UncertaintyEstimate:
        if self._mean is None or self._m2 is None or self._entropy_sum is None:
            raise RuntimeError("no prediction was accumulated")  # callers check count first
        mean = self._mean
        predictive = _entropy(mean, mean.clamp_min(_EPS).log(), dim=1)
        expected = self._entropy_sum / self.count
        # Jensen makes this >= 0; rounding (and the eps clamp) can push agreeing passes below.
        mutual = (predictive - expected).clamp_min(0)
        if normalize:
            scale = 1.0 / math.log(mean.shape[1])
            predictive, expected, mutual = predictive * scale, expected * scale, mutual * scale
        return UncertaintyEstimate(
            mean_probs=mean,
            predictive_entropy=predictive,
            expected_entropy=expected,
            mutual_information=mutual,
            variance=self._m2 / self.count,
        )


@numpy_compatible("predictions")
def ensemble_uncertainty(
    predictions: Union[torch.Tensor, Iterable[torch.Tensor]],
    *,
    from_logits: bool = True,
    normalize: bool = False,
) -> UncertaintyEstimate:
    r"""Predictive entropy, expected entropy, mutual information and variance of ``T`` predictions.

    $$
    \bar p = \frac{1}{T} \sum_t p_t, \quad
    H_\text{pred} = H(\bar p), \quad
    H_\text{exp} = \frac{1}{T} \sum_t H(p_t), \quad
    I = \max(H_\text{pred} - H_\text{exp}, 0), \quad
    \sigma^2_c = \frac{1}{T} \sum_t (p_{t,c} - \bar p_c)^2 .
    $$

    For deep ensembles, teacher + student pairs or test-time augmentation: any set of
    predictions of the same batch. The members are folded into running statistics one at a
    time (Welford), so memory does not grow with ``T``: a generator that produces each
    prediction on demand never holds more than one of them. No gradients flow (the result is
    meant for weights and masks); see
    [`UncertaintyEstimate`][bual_losses.uncertainty.UncertaintyEstimate] for the fields.

    Args:
        predictions: ``T >= 1`` tensors of shape ``(B, C, *S)`` (a sequence or any iterable),
            or one stacked tensor ``(T, B, C, *S)`` (a stacked ``numpy.ndarray`` gives numpy
            fields back). All members must share shape and device. ``C == 1`` is a sigmoid
            output, expanded to the two classes ``[1 - p, p]``.
        from_logits: the members are logits (softmax over dim 1; sigmoid when ``C == 1``);
            ``False`` for probabilities, whose log is taken of ``max(p, 1e-12)``.
        normalize: divide the three entropies by ``ln C'`` so they lie in ``[0, 1]``.

    Returns:
        An ``UncertaintyEstimate`` with ``mean_probs`` and ``variance`` of shape
        ``(B, C', *S)`` (``C' = max(C, 2)``) and the entropies of shape ``(B, *S)``.

    Raises:
        TypeError: ``predictions`` is neither a tensor nor an iterable of tensors, or a member
            is not a floating tensor.
        ValueError: no member, a member that is not ``(B, C, *S)``, or a member whose shape or
            device differs from the first one (the message names its index).

    Examples:
        >>> import torch
        >>> from bual_losses.uncertainty import ensemble_uncertainty
        >>> agree = torch.tensor([0.9, 0.1]).reshape(1, 2, 1)
        >>> flip = torch.tensor([0.1, 0.9]).reshape(1, 2, 1)
        >>> est = ensemble_uncertainty([agree, flip], from_logits=False, normalize=True)
        >>> est.mean_probs.flatten(), est.predictive_entropy, est.mutual_information
        (tensor([0.5000, 0.5000]), tensor([[1.]]), tensor([[0.5310]]))
        >>> ensemble_uncertainty([agree, agree], from_logits=False).variance.flatten()
        tensor([0., 0.])
    """
    if isinstance(predictions, torch.Tensor):
        stacked = require_floating(predictions, "predictions")
        if stacked.ndim < 4:
            raise ValueError(
                "`predictions` as one stacked tensor must have shape (T, B, C, *S) with at "
                f"least one spatial dim, got {shape_str(stacked.shape)}."
            )
        members: Iterable[torch.Tensor] = stacked.unbind(0)
    elif isinstance(predictions, Iterable) and not isinstance(predictions, (str, bytes)):
        members = predictions
    else:
        raise TypeError(
            "`predictions` must be a sequence of tensors (B, C, *S) or a stacked tensor "
            f"(T, B, C, *S), got {type(predictions).__name__}."
        )

    moments = _StreamingMoments(from_logits=from_logits)
    with torch.no_grad():
        for index, prediction in enumerate(members):
            moments.update(prediction, f"predictions[{index}]")
    if moments.count == 0:
        raise ValueError("`predictions` must hold at least one prediction, got none.")
    return moments.result(normalize=normalize)


@contextlib.contextmanager
def _only_dropout_in_train_mode(model: Any) -> Iterator[None]:
    """Dropout layers in train mode, every other module as it was; all flags restored."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    try:
        for module, _ in modes:
            if isinstance(module, _DropoutNd):
                # The flag itself, not .train(): that would recurse into a custom dropout's
                # children, and BatchNorm must keep its running statistics frozen.
                module.training = True
        yield
    finally:
        for module, training in modes:
            module.training = training


def mc_dropout_uncertainty(
    model: Union[nn.Module, Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    *,
    passes: int = 8,
    noise_std: float = 0.0,
    noise_clip: Optional[float] = None,
    batch_repeats: int = 1,
    normalize: bool = False,
) -> UncertaintyEstimate:
    r"""Monte Carlo dropout (and input-noise) uncertainty from ``T = passes`` stochastic passes.

    $$
    p_t = \operatorname{softmax}\big(f_{\theta, m_t}(x + \epsilon_t)\big), \quad
    \epsilon_t = \operatorname{clip}(\mathcal N(0, \sigma^2), -k, k), \quad t = 1 \dots T,
    $$

    with ``sigma = noise_std``, ``k = noise_clip`` (no clip when ``None``) and ``m_t`` a fresh
    dropout mask per pass; then the estimators of
    [`ensemble_uncertainty`][bual_losses.uncertainty.ensemble_uncertainty] over the ``p_t``
    (the same streaming accumulator: memory is independent of ``T``).

    The passes run under ``torch.no_grad()``. Only dropout layers (every subclass of
    ``torch.nn.modules.dropout._DropoutNd``: ``Dropout``, ``Dropout1d/2d/3d``,
    ``AlphaDropout``, ``FeatureAlphaDropout``) are switched to train mode; BatchNorm and every
    other module keep their current mode, so an ``eval()`` model does not touch its running
    statistics. Every module's ``training`` flag is restored afterwards, also when the forward
    raises.

    ``passes=8`` follows UA-MT (Yu et al., 2019) as implemented in SSL4MIS; its full recipe is
    ``noise_std=0.1, noise_clip=0.2, batch_repeats=2`` (two passes per forward by repeating the
    batch). These are literature defaults, not tuned values. UA-MT's uncertainty map is
    ``predictive_entropy`` (it adds ``1e-6`` inside the log where this clamps at ``1e-12``).

    Args:
        model: an ``nn.Module`` (or any callable) mapping ``x`` to logits ``(B', C, *S)``;
            softmax over dim 1, sigmoid when ``C == 1``. A plain callable gets no dropout
            switching, so its passes differ only by the input noise.
        x: floating input batch ``(B, ...)``, as the model takes it.
        passes: number of stochastic passes ``T >= 1``.
        noise_std: standard deviation ``sigma`` of Gaussian noise added to ``x`` in each pass;
            0 disables it.
        noise_clip: clamp each noise value to ``[-noise_clip, noise_clip]`` (``> 0``), or
            ``None`` for no clamp.
        batch_repeats: passes per forward: the batch is repeated this many times along dim 0
            (``B' = batch_repeats * B``), trading memory for fewer calls. Must divide
            ``passes``.
        normalize: divide the entropies by ``ln C'`` so they lie in ``[0, 1]``.

    Returns:
        An [`UncertaintyEstimate`][bual_losses.uncertainty.UncertaintyEstimate]: ``mean_probs``
        and ``variance`` ``(B, C', *S)`` with ``C' = max(C, 2)``, entropies ``(B, *S)``.

    Raises:
        TypeError: ``model`` is not callable, ``x`` is not a floating tensor, or an option has
            the wrong type.
        ValueError: ``passes`` or ``batch_repeats`` < 1, ``passes`` not divisible by
            ``batch_repeats``, ``noise_std`` < 0, ``noise_clip`` <= 0, or a model output that
            is not ``(batch_repeats * B, C, *S)`` or changes shape between passes.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from bual_losses.uncertainty import mc_dropout_uncertainty
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(
        ...     nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        ...     nn.Dropout2d(0.5), nn.Conv2d(8, 3, 1),
        ... ).eval()
        >>> est = mc_dropout_uncertainty(model, torch.randn(2, 1, 16, 16), passes=8)
        >>> est.mutual_information.shape, est.variance.shape
        (torch.Size([2, 16, 16]), torch.Size([2, 3, 16, 16]))
        >>> bool((est.mutual_information <= est.predictive_entropy).all()), model.training
        (True, False)
    """
    if not callable(model):
        raise TypeError(
            "`model` must be a torch.nn.Module or a callable returning logits, "
            f"got {type(model).__name__}."
        )
    x = require_floating(x, "x")
    if x.ndim < 1:
        raise ValueError(f"`x` must have a batch dim (B, ...), got shape {shape_str(x.shape)}.")
    passes = require_positive_int(passes, "passes")
    batch_repeats = require_positive_int(batch_repeats, "batch_repeats")
    if passes % batch_repeats != 0:
        raise ValueError(
            f"`passes` must be divisible by `batch_repeats` ({batch_repeats}), since each "
            f"forward runs `batch_repeats` passes, got passes={passes}."
        )
    noise_std = require_nonnegative_number(noise_std, "noise_std")
    if noise_clip is not None:
        noise_clip = require_nonnegative_number(noise_clip, "noise_clip", positive=True)

    batch = x.shape[0]
    moments = _StreamingMoments(from_logits=True)
    with torch.no_grad(), _only_dropout_in_train_mode(model):
        # One repeated copy for all forwards (as UA-MT does), not one per pass.
        inputs = x.repeat(batch_repeats, *([1] * (x.ndim - 1))) if batch_repeats > 1 else x
        for call in range(passes // batch_repeats):
            if noise_std > 0:
                noise = torch.randn_like(inputs).mul_(noise_std)
                if noise_clip is not None:
                    noise.clamp_(-noise_clip, noise_clip)
                logits = model(inputs + noise)
                del noise
            else:
                logits = model(inputs)
            logits = require_logits(logits, "model(x)")
            if logits.shape[0] != batch * batch_repeats:
                raise ValueError(
                    f"`model(x)` must return batch_repeats * B = {batch_repeats} * {batch} rows "
                    f"along dim 0 for `x` of shape {shape_str(x.shape)}, "
                    f"got {shape_str(logits.shape)}."
                )
            # x.repeat lays the copies out contiguously: rows [k B, (k + 1) B) are pass k.
            for k, chunk in enumerate(logits.split(batch, dim=0)):
                moments.update(chunk, f"model(x) at pass {call * batch_repeats + k + 1}")
            del logits
    return moments.result(normalize=normalize)
