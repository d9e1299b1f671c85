"""Tests for bual_losses.uncertainty: entropy maps and the MC-dropout / ensemble estimators."""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bual_losses.uncertainty as U
from bual_losses.uncertainty import (
    UncertaintyEstimate,
    ensemble_uncertainty,
    entropy_map,
    mc_dropout_uncertainty,
)
from tests.strategies import class_logits, seeds

PROPERTY = settings(max_examples=60, deadline=None)
FIELDS = UncertaintyEstimate._fields


def probs_of(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Independent reference: softmax, or [1 - p, p] from a sigmoid when C == 1."""
    if logits.shape[dim] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=dim)
    return torch.softmax(logits, dim=dim)


def as_prediction(logits: torch.Tensor, from_logits: bool) -> torch.Tensor:
    """The logits themselves, or the probabilities a model would output (p for C == 1)."""
    if from_logits:
        return logits
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


def reference_entropy(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim)


def reference_estimate(stack: torch.Tensor, *, from_logits: bool) -> UncertaintyEstimate:
    """The estimators computed directly on all T passes at once (T, B, C, *S)."""
    if from_logits:
        p = probs_of(stack, dim=2)
    elif stack.shape[2] == 1:
        p = torch.cat([1 - stack, stack], dim=2)
    else:
        p = stack
    mean = p.mean(0)
    predictive = reference_entropy(mean)
    expected = reference_entropy(p, dim=2).mean(0)
    return UncertaintyEstimate(
        mean_probs=mean,
        predictive_entropy=predictive,
        expected_entropy=expected,
        mutual_information=(predictive - expected).clamp_min(0),
        variance=p.var(0, unbiased=False),
    )


def assert_estimates_close(a: UncertaintyEstimate, b: UncertaintyEstimate, **tol: Any) -> None:
    for name in FIELDS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **tol, msg=name)


# --------------------------------------------------------------------------------------------
# entropy_map: hand-computed cases


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_uniform_distribution_has_entropy_log_c(num_classes: int) -> None:
    probs = torch.full((2, num_classes, 3, 4), 1.0 / num_classes, dtype=torch.float64)
    raw = entropy_map(probs, normalize=False)
    assert raw.shape == (2, 3, 4)
    torch.testing.assert_close(raw, torch.full_like(raw, math.log(num_classes)))
    torch.testing.assert_close(entropy_map(probs), torch.ones_like(raw))


@pytest.mark.parametrize("normalize", [False, True])
def test_one_hot_has_zero_entropy_not_nan(normalize: bool) -> None:
    labels = torch.tensor([[0, 2, 1, 2]])
    probs = torch.nn.functional.one_hot(labels, 3).permute(0, 2, 1).float()  # (1, 3, 4)
    h = entropy_map(probs, normalize=normalize)
    assert torch.equal(h, torch.zeros(1, 4))
    assert not torch.signbit(h).any()  # +0, so thresholds like u <= 0 behave


def test_binary_single_channel_half_is_log_2() -> None:
    p = torch.full((2, 1, 3, 3), 0.5)
    torch.testing.assert_close(entropy_map(p, normalize=False), torch.full((2, 3, 3), math.log(2)))
    torch.testing.assert_close(entropy_map(p), torch.ones(2, 3, 3))
    logits = torch.zeros(2, 1, 3, 3)
    torch.testing.assert_close(entropy_map(logits, from_logits=True), torch.ones(2, 3, 3))


def test_binary_single_channel_by_hand() -> None:
    p = torch.tensor([0.2, 0.0, 1.0], dtype=torch.float64).reshape(1, 1, 3)
    expected = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    h = entropy_map(p, normalize=False)
    torch.testing.assert_close(h, torch.tensor([[expected, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(entropy_map(p), h / math.log(2))


def test_three_class_distribution_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.5], [0.2, 0.25], [0.1, 0.25]], dtype=torch.float64)[None]
    first = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    second = 1.5 * math.log(2)  # 0.5 ln 2 + 2 * 0.25 ln 4
    h = entropy_map(probs, normalize=False)
    torch.testing.assert_close(h, torch.tensor([[first, second]], dtype=torch.float64))
    torch.testing.assert_close(entropy_map(probs), h / math.log(3))


@pytest.mark.parametrize("num_classes", [1, 2, 4])
@pytest.mark.parametrize("dim", [1, -1, 0])
def test_from_logits_equals_from_probabilities(num_classes: int, dim: int) -> None:
    generator = torch.Generator().manual_seed(0)
    shape = [3, 4, 5]
    shape[dim] = num_classes
    logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    probs = torch.sigmoid(logits) if num_classes == 1 else torch.softmax(logits, dim=dim)
    for normalize in (False, True):
        torch.testing.assert_close(
            entropy_map(logits, from_logits=True, normalize=normalize, dim=dim),
            entropy_map(probs, normalize=normalize, dim=dim),
        )


def test_class_dim_anywhere_matches_moving_it() -> None:
    probs = torch.softmax(torch.randn(2, 5, 6, 3), dim=-1)  # channels last
    expected = entropy_map(probs.movedim(-1, 1))
    torch.testing.assert_close(entropy_map(probs, dim=-1), expected)
    torch.testing.assert_close(entropy_map(probs, dim=3), expected)


def test_two_dim_input_is_batch_by_classes() -> None:
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    torch.testing.assert_close(entropy_map(probs), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_numpy_in_numpy_out_equals_torch(dtype: type) -> None:
    probs = torch.softmax(torch.randn(2, 3, 4, 4, dtype=torch.float64), dim=1)
    array = probs.numpy().astype(dtype)
    result = entropy_map(array)
    assert isinstance(result, np.ndarray)
    assert result.dtype == dtype
    np.testing.assert_array_equal(result, entropy_map(torch.from_numpy(array)).numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("from_logits", [False, True])
def test_dtype_preserved_and_low_precision_computed_in_float32(
    dtype: torch.dtype, from_logits: bool
) -> None:
    logits = torch.randn(2, 4, 8, 8) * 4
    x = logits if from_logits else torch.softmax(logits, dim=1)
    x = x.to(dtype)
    h = entropy_map(x, from_logits=from_logits)
    assert h.dtype == dtype and h.shape == (2, 8, 8)
    assert torch.isfinite(h).all()
    if dtype in (torch.float16, torch.bfloat16):
        # computed from the float32 upcast of the same values, rounded once at the end
        expected = entropy_map(x.float(), from_logits=from_logits).to(dtype)
        torch.testing.assert_close(h, expected, atol=0, rtol=0)
    else:
        expected = entropy_map(x.double(), from_logits=from_logits).to(dtype)
        torch.testing.assert_close(h, expected)


def test_device_followed() -> None:
    x = torch.empty(2, 3, 4, 4, device="meta")
    h = entropy_map(x, from_logits=True)
    assert h.device.type == "meta" and h.shape == (2, 4, 4)
    if torch.cuda.is_available():
        probs = torch.softmax(torch.randn(2, 3, 4, device="cuda"), dim=1)
        h = entropy_map(probs)
        assert h.device == probs.device
        torch.testing.assert_close(h.cpu(), entropy_map(probs.cpu()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_huge_logits_are_finite_with_finite_gradient(dtype: torch.dtype, num_classes: int) -> None:
    logits = torch.tensor([1e4, -1e4, 0.0, 5e3, -5e3, 1e4])[: 2 * num_classes]
    logits = logits.reshape(2, num_classes, 1).to(dtype).requires_grad_()
    h = entropy_map(logits, from_logits=True, normalize=False)
    assert torch.isfinite(h).all()
    assert (h >= 0).all()
    h.float().sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("num_classes", [1, 3])
def test_gradient_finite_at_one_hot_probabilities(num_classes: int) -> None:
    if num_classes == 1:
        probs = torch.tensor([0.0, 1.0, 0.5]).reshape(1, 1, 3)
    else:
        probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).T.reshape(1, 3, 2).contiguous()
    probs.requires_grad_()
    h = entropy_map(probs)
    h.sum().backward()
    assert probs.grad is not None and torch.isfinite(probs.grad).all()


@pytest.mark.parametrize("num_classes", [1, 3])
def test_gradcheck_float64(num_classes: int) -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, num_classes, 3, generator=generator, dtype=torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: entropy_map(z, from_logits=True), (logits,))
    probs = (torch.sigmoid(logits) if num_classes == 1 else torch.softmax(logits, 1)).detach()
    probs.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: entropy_map(p, normalize=False), (probs,))


ENTROPY_MAP_ERRORS = [
    (torch.zeros(2, 3, dtype=torch.long), {}, TypeError,
        r"`x` must have a floating dtype, got torch.int64"),
    (np.zeros((2, 3), dtype=np.int32), {}, TypeError,
        r"`x` must have a floating dtype, got torch.int32"),
    ([[0.5, 0.5]], {}, TypeError, r"`x` must be a torch.Tensor or numpy.ndarray, got list"),
    (torch.ones(3), {}, ValueError,
        r"`x` must have at least 2 dims, \(B, C, \*S\) .* got shape \(3,\)"),
    (torch.ones(2, 3), {"dim": 2}, ValueError,
        r"`dim` must be in \[-2, 1\] for `x` of shape \(2, 3\), got 2"),
    (torch.ones(2, 3), {"dim": -3}, ValueError, r"`dim` must be in \[-2, 1\] .* got -3"),
    (torch.ones(2, 3), {"dim": 1.0}, TypeError, r"`dim` must be an int, got float"),
    (torch.ones(2, 3), {"dim": True}, TypeError, r"`dim` must be an int, got bool"),
    (torch.ones(2, 0, 4), {}, ValueError,
        r"`x` must have at least one class along dim=1, got shape \(2, 0, 4\)"),
    (torch.ones(2, 3), {"eps": 0.0}, ValueError, r"`eps` must be a finite number > 0, got 0.0"),
    (torch.ones(2, 3), {"eps": "1e-6"}, TypeError, r"`eps` must be a number, got str"),
]  # fmt: skip


@pytest.mark.parametrize(("x", "kwargs", "error", "match"), ENTROPY_MAP_ERRORS)
def test_entropy_map_errors(x: Any, kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        entropy_map(x, **kwargs)


# --------------------------------------------------------------------------------------------
# entropy_map: properties


@PROPERTY
@given(logits=class_logits(max_rank=3), from_logits=st.booleans())
def test_entropy_bounded_by_log_c(logits: torch.Tensor, from_logits: bool) -> None:
    num_classes = max(logits.shape[1], 2)
    x = as_prediction(logits, from_logits)
    raw = entropy_map(x, from_logits=from_logits, normalize=False)
    assert raw.shape == (logits.shape[0], *logits.shape[2:])
    assert torch.isfinite(raw).all()
    assert (raw >= 0).all() and (raw <= math.log(num_classes) + 1e-9).all()
    normalized = entropy_map(x, from_logits=from_logits)
    assert (normalized >= 0).all() and (normalized <= 1 + 1e-9).all()
    torch.testing.assert_close(normalized, raw / math.log(num_classes))


@PROPERTY
@given(logits=class_logits(min_classes=2), seed=seeds())
def test_entropy_with_exact_zeros_is_finite_and_bounded(logits: torch.Tensor, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(logits.shape, generator=generator) < 0.5
    keep |= torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1).bool()
    probs = probs_of(logits) * keep
    probs = probs / probs.sum(1, keepdim=True)
    h = entropy_map(probs)
    assert torch.isfinite(h).all() and (h >= 0).all() and (h <= 1 + 1e-9).all()
    # zeros drop out: the same as the entropy over the kept classes only
    kept_entropy = -(torch.where(keep, probs * probs.clamp_min(1e-300).log(), 0)).sum(1)
    torch.testing.assert_close(h, kept_entropy / math.log(logits.shape[1]))


# --------------------------------------------------------------------------------------------
# entropy_map: the streamed CPU path (from logits, no grad, >= _CHUNK_ELEMENTS elements)


@contextlib.contextmanager
def chunk_elements(size: int) -> Iterator[None]:
    """Set the streamed path's chunk size (and threshold): 1 << 62 turns it off."""
    saved = U._CHUNK_ELEMENTS
    U._CHUNK_ELEMENTS = size
    try:
        yield
    finally:
        U._CHUNK_ELEMENTS = saved


def plain_entropy(x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with chunk_elements(1 << 62):
        return entropy_map(x, from_logits=True, **kwargs)


def streamed_entropy(x: torch.Tensor, chunk: int, **kwargs: Any) -> torch.Tensor:
    with chunk_elements(chunk):
        return entropy_map(x, from_logits=True, **kwargs)


SPECIAL_LOGITS = (float("nan"), float("inf"), -float("inf"), 1e4, -1e4, 0.0, -0.0)


@PROPERTY
@given(
    logits=class_logits(max_classes=5, max_batch=3, max_rank=2, max_side=5),
    dim=st.integers(0, 3),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    chunk=st.sampled_from([1, 2, 3, 7, 16, 50, 1000]),
    special=st.sampled_from([0.0, 0.05, 0.3]),
    normalize=st.booleans(),
    seed=seeds(),
)
def test_streamed_equals_plain(
    logits: torch.Tensor,
    dim: int,
    dtype: torch.dtype,
    chunk: int,
    special: float,
    normalize: bool,
    seed: int,
) -> None:
    """Every chunk boundary (rows and voxel blocks), class dim, dtype, NaN and +-inf."""
    x = logits.movedim(1, dim % logits.ndim)
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor(SPECIAL_LOGITS, dtype=x.dtype)
    pick = torch.randint(len(values), x.shape, generator=generator)
    x = torch.where(torch.rand(x.shape, generator=generator) < special, values[pick], x)
    x = x.to(dtype)
    dim = dim % x.ndim
    expected = plain_entropy(x, dim=dim, normalize=normalize)
    h = streamed_entropy(x, chunk, dim=dim, normalize=normalize)
    assert h.dtype == expected.dtype == dtype and h.shape == expected.shape
    assert torch.equal(h.isnan(), expected.isnan())  # NaN exactly where the plain path has NaN
    assert not torch.signbit(h[~h.isnan()]).any()  # +0 for certain voxels
    scale = 1.0 if normalize else math.log(max(x.shape[dim], 2))
    if dtype in (torch.float32, torch.float64):
        atol = scale * (1e-12 if dtype == torch.float64 else 1e-6)
        torch.testing.assert_close(h, expected, atol=atol, rtol=0, equal_nan=True)
    else:  # computed in float32 on both paths; the half results may differ by one rounding
        torch.testing.assert_close(h, expected, atol=scale * 1e-6, rtol=2**-7, equal_nan=True)
        # ... and is exactly the float32 streamed result rounded once
        as_float = streamed_entropy(x.float(), chunk, dim=dim, normalize=normalize)
        torch.testing.assert_close(h, as_float.to(dtype), atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("num_classes", [1, 2, 3])
def test_streamed_inf_and_nan_follow_log_softmax(num_classes: int) -> None:
    """+inf logit -> NaN, -inf among finite ones -> contributes 0, binary +-inf -> 0."""
    inf, nan = float("inf"), float("nan")
    rows = [
        [inf, 0.0, 1.0], [-inf, 0.0, 1.0], [0.0, -inf, -inf], [-inf, -inf, -inf],
        [inf, -inf, 0.0], [nan, 0.0, 0.0], [0.0, 0.0, 0.0], [1e4, -1e4, 0.0],
    ]  # fmt: skip
    x = torch.tensor(rows)[:, :num_classes].T.reshape(1, num_classes, len(rows)).contiguous()
    for normalize in (False, True):
        expected = plain_entropy(x, normalize=normalize)
        for chunk in (1, 3, 100):
            h = streamed_entropy(x, chunk, normalize=normalize)
            torch.testing.assert_close(h, expected, atol=1e-6, rtol=0, equal_nan=True)


@pytest.mark.parametrize("num_classes", [1, 2])
def test_two_class_formula(num_classes: int) -> None:
    """H = softplus(-|d|) + |d| sigmoid(-|d|) with d the logit difference (or the binary logit)."""
    generator = torch.Generator().manual_seed(4)
    edges = torch.tensor([0.0, 1e-8, 30.0, -40.0, 700.0, -1e4], dtype=torch.float64)
    d = torch.cat([torch.randn(200, generator=generator, dtype=torch.float64) * 20, edges])
    if num_classes == 1:
        x = d.reshape(1, 1, -1)
    else:
        z0 = torch.randn(d.shape, generator=generator, dtype=torch.float64)
        x = torch.stack([z0, z0 + d]).reshape(1, 2, -1)
        d = x[0, 1] - x[0, 0]  # the difference as it rounds
    a = d.abs()
    formula = torch.nn.functional.softplus(-a) + a * torch.sigmoid(-a)
    reference = reference_entropy(probs_of(x), dim=1)[0]
    torch.testing.assert_close(formula, reference, atol=1e-12, rtol=1e-10)
    h = streamed_entropy(x, 16, normalize=False)[0]
    torch.testing.assert_close(h, formula, atol=1e-15, rtol=1e-12)
    torch.testing.assert_close(streamed_entropy(x, 16)[0], (formula / math.log(2)).clamp(max=1))
    expected32 = (formula / math.log(2)).float().clamp(max=1)
    torch.testing.assert_close(streamed_entropy(x.float(), 16)[0], expected32, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(3, 5, 200, 200), (2, 2, 80, 80, 41), (4, 1, 300, 500)])
def test_streamed_default_chunk_on_large_inputs(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 5
    assert x.numel() >= U._CHUNK_ELEMENTS  # the default path is the streamed one
    torch.testing.assert_close(
        entropy_map(x, from_logits=True), plain_entropy(x), atol=1e-6, rtol=0
    )


def test_streamed_path_skipped_for_grad_and_non_viewable_inputs() -> None:
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with chunk_elements(4):
        z = x.clone().requires_grad_()
        h = entropy_map(z, from_logits=True)
        assert h.requires_grad  # the differentiable path
        h.sum().backward()
        assert z.grad is not None and torch.isfinite(z.grad).all()
        with torch.no_grad():  # streamed: no autograd anyway
            assert not entropy_map(z, from_logits=True).requires_grad
        assert not entropy_map(z.detach(), from_logits=True).requires_grad
        # (B, C, H, W) with H and W swapped in memory: not viewable as (P, C, N)
        swapped = x.transpose(2, 3).contiguous().transpose(2, 3)
        torch.testing.assert_close(entropy_map(swapped, from_logits=True), plain_entropy(x))
        torch.testing.assert_close(entropy_map(x, from_logits=True), plain_entropy(x))


def test_streamed_path_allocates_no_full_size_temporary() -> None:
    """Peak extra memory of the streamed path: the output plus a few chunk-sized buffers."""
    profiler = pytest.importorskip("torch.profiler")
    x = torch.randn(8, 4, 128, 128)  # 2 MiB output, 8 MiB input
    out_bytes = 8 * 128 * 128 * 4

    def peak(streamed: bool) -> int:
        with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as p:
            if streamed:
                streamed_entropy(x, 1 << 16)
            else:
                plain_entropy(x)
        current = best = 0
        for event in sorted(p.events(), key=lambda e: e.time_range.start):
            current += event.self_cpu_memory_usage
            best = max(best, current)
        return best

    # chunks of 2^16 elements: two (4, 2^14) buffers and three 2^14 ones, float32
    assert peak(True) <= out_bytes + 2 * (1 << 16) * 4 + 3 * (1 << 14) * 4 + 4096
    assert peak(False) >= 4 * out_bytes  # what the plain path costs (log_softmax, exp, ...)


# --------------------------------------------------------------------------------------------
# ensemble_uncertainty


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("from_logits", [True, False])
def test_streaming_list_equals_stacked_reference(num_classes: int, from_logits: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    stack = torch.randn(6, 2, num_classes, 5, 4, generator=generator, dtype=torch.float64) * 2
    if not from_logits:
        stack = torch.sigmoid(stack) if num_classes == 1 else torch.softmax(stack, dim=2)
    expected = reference_estimate(stack, from_logits=from_logits)
    members = list(stack.unbind(0))
    for predictions in (members, iter(members), stack, tuple(members)):
        estimate = ensemble_uncertainty(predictions, from_logits=from_logits)
        assert isinstance(estimate, UncertaintyEstimate)
        assert_estimates_close(estimate, expected, atol=1e-12, rtol=1e-10)


def test_hand_computed_two_member_ensemble() -> None:
    a = torch.tensor([0.9, 0.1], dtype=torch.float64).reshape(1, 2, 1)
    b = torch.tensor([0.1, 0.9], dtype=torch.float64).reshape(1, 2, 1)
    estimate = ensemble_uncertainty([a, b], from_logits=False)
    h_member = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    torch.testing.assert_close(estimate.mean_probs, torch.full((1, 2, 1), 0.5, dtype=a.dtype))
    torch.testing.assert_close(
        estimate.predictive_entropy, torch.tensor([[math.log(2)]], dtype=a.dtype)
    )
    torch.testing.assert_close(estimate.expected_entropy, torch.tensor([[h_member]], dtype=a.dtype))
    torch.testing.assert_close(
        estimate.mutual_information, torch.tensor([[math.log(2) - h_member]], dtype=a.dtype)
    )
    torch.testing.assert_close(estimate.variance, torch.full((1, 2, 1), 0.16, dtype=a.dtype))
    normalized = ensemble_uncertainty([a, b], from_logits=False, normalize=True)
    for name in ("predictive_entropy", "expected_entropy", "mutual_information"):
        torch.testing.assert_close(getattr(normalized, name), getattr(estimate, name) / math.log(2))
    torch.testing.assert_close(normalized.variance, estimate.variance)


def test_binary_members_are_expanded_to_two_classes() -> None:
    p = torch.tensor([0.2, 0.6]).reshape(1, 1, 2)
    q = torch.tensor([0.4, 0.6]).reshape(1, 1, 2)
    estimate = ensemble_uncertainty([p, q], from_logits=False, normalize=True)
    torch.testing.assert_close(estimate.mean_probs, torch.tensor([[[0.7, 0.4], [0.3, 0.6]]]))
    torch.testing.assert_close(estimate.variance, torch.tensor([[[0.01, 0.0], [0.01, 0.0]]]))
    torch.testing.assert_close(
        estimate.predictive_entropy, entropy_map(torch.tensor([[[0.3, 0.6]]]))
    )


def test_single_member_has_zero_variance_and_mutual_information() -> None:
    logits = torch.randn(2, 3, 4, 4)
    estimate = ensemble_uncertainty([logits])
    assert torch.equal(estimate.variance, torch.zeros_like(estimate.variance))
    torch.testing.assert_close(estimate.predictive_entropy, estimate.expected_entropy)
    torch.testing.assert_close(
        estimate.predictive_entropy, entropy_map(logits, from_logits=True, normalize=False)
    )


def test_stacked_numpy_gives_numpy_fields() -> None:
    stack = torch.randn(3, 2, 3, 4, dtype=torch.float64)
    estimate = ensemble_uncertainty(stack.numpy())
    assert isinstance(estimate, UncertaintyEstimate)
    expected = ensemble_uncertainty(stack)
    for name in FIELDS:
        value = getattr(estimate, name)
        assert isinstance(value, np.ndarray)
        np.testing.assert_array_equal(value, getattr(expected, name).numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_accumulates_in_float32(dtype: torch.dtype) -> None:
    stack = torch.randn(4, 2, 3, 5) * 3
    estimate = ensemble_uncertainty(stack.to(dtype))
    expected = reference_estimate(stack.to(dtype).double(), from_logits=True)
    for name in FIELDS:
        value = getattr(estimate, name)
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
        torch.testing.assert_close(value.double(), getattr(expected, name), atol=1e-5, rtol=1e-4)
    assert ensemble_uncertainty(stack.double()).variance.dtype == torch.float64


def test_result_carries_no_autograd_history() -> None:
    logits = torch.randn(2, 2, 3, 3, requires_grad=True)
    estimate = ensemble_uncertainty([logits, logits * 2])
    assert not any(getattr(estimate, name).requires_grad for name in FIELDS)


def test_members_are_not_modified() -> None:
    probs = torch.softmax(torch.randn(3, 2, 4, 5), dim=2)
    copy = probs.clone()
    ensemble_uncertainty(list(probs), from_logits=False)
    assert torch.equal(probs, copy)


ENSEMBLE_ERRORS = [
    ([], ValueError, r"`predictions` must hold at least one prediction, got none"),
    (3, TypeError, r"`predictions` must be a sequence of tensors \(B, C, \*S\) or a stacked "
        r"tensor \(T, B, C, \*S\), got int"),
    ("abc", TypeError, r"`predictions` must be a sequence .* got str"),
    (torch.zeros(2, 3, 4), ValueError, r"`predictions` as one stacked tensor must have shape "
        r"\(T, B, C, \*S\) with at least one spatial dim, got \(2, 3, 4\)"),
    (torch.zeros(2, 3, 4, 5, dtype=torch.int64), TypeError,
        r"`predictions` must have a floating dtype, got torch.int64"),
    ([torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)], ValueError,
        r"`predictions\[2\]` must have the shape of `predictions\[0\]` \(2, 3, 4\), "
        r"got \(2, 3, 5\)"),
    ([torch.zeros(2, 3, 4), torch.zeros(2, 1, 4)], ValueError,
        r"`predictions\[1\]` must have the shape of `predictions\[0\]` \(2, 3, 4\), "
        r"got \(2, 1, 4\)"),
    ([torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.int32)], TypeError,
        r"`predictions\[1\]` must have a floating dtype, got torch.int32"),
    ([torch.zeros(2, 3, 4), np.zeros((2, 3, 4))], TypeError,
        r"`predictions\[1\]` must be a torch.Tensor, got ndarray"),
    ([torch.zeros(2, 3)], ValueError,
        r"`predictions\[0\]` must have shape \(B, C, \*S\) with at least one spatial dim, "
        r"got \(2, 3\)"),
    ([torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, device="meta")], ValueError,
        r"`predictions\[1\]` must be on the same device as `predictions\[0\]` \(cpu\), got meta"),
]  # fmt: skip


@pytest.mark.parametrize(("predictions", "error", "match"), ENSEMBLE_ERRORS)
def test_ensemble_errors(predictions: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ensemble_uncertainty(predictions)


# --------------------------------------------------------------------------------------------
# ensemble_uncertainty: properties


@PROPERTY
@given(
    stack=class_logits(members=(1, 5), max_rank=3),
    from_logits=st.booleans(),
    normalize=st.booleans(),
)
def test_mutual_information_between_zero_and_predictive_entropy(
    stack: torch.Tensor, from_logits: bool, normalize: bool
) -> None:
    predictions = stack if from_logits else probs_of(stack, dim=2)
    estimate = ensemble_uncertainty(predictions, from_logits=from_logits, normalize=normalize)
    batch, classes, *spatial = stack.shape[1:]
    assert (
        estimate.mean_probs.shape == estimate.variance.shape == (batch, max(classes, 2), *spatial)
    )
    assert estimate.mutual_information.shape == (batch, *spatial)
    for name in FIELDS:
        assert torch.isfinite(getattr(estimate, name)).all()
    mi, predictive = estimate.mutual_information, estimate.predictive_entropy
    assert (mi >= 0).all()
    assert (mi <= predictive + 1e-9).all()
    assert (estimate.expected_entropy <= predictive + 1e-9).all()
    upper = 1.0 if normalize else math.log(max(classes, 2))
    assert (predictive <= upper + 1e-9).all()
    assert (estimate.variance >= 0).all() and (estimate.variance <= 0.25 + 1e-12).all()
    torch.testing.assert_close(estimate.mean_probs.sum(1), torch.ones_like(mi))


@PROPERTY
@given(logits=class_logits(max_rank=3), copies=st.integers(1, 6), from_logits=st.booleans())
def test_identical_members_have_no_disagreement(
    logits: torch.Tensor, copies: int, from_logits: bool
) -> None:
    prediction = as_prediction(logits, from_logits)
    estimate = ensemble_uncertainty([prediction] * copies, from_logits=from_logits)
    assert torch.equal(estimate.variance, torch.zeros_like(estimate.variance))
    torch.testing.assert_close(
        estimate.mutual_information,
        torch.zeros_like(estimate.mutual_information),
        atol=1e-9,
        rtol=0,
    )
    torch.testing.assert_close(estimate.mean_probs, probs_of(logits))


@PROPERTY
@given(stack=class_logits(members=(2, 5), max_rank=2), seed=seeds())
def test_member_order_does_not_matter(stack: torch.Tensor, seed: int) -> None:
    order = torch.randperm(stack.shape[0], generator=torch.Generator().manual_seed(seed))
    assert_estimates_close(
        ensemble_uncertainty(list(stack)),
        ensemble_uncertainty([stack[i] for i in order]),
        atol=1e-12,
        rtol=1e-9,
    )


@PROPERTY
@given(stack=class_logits(members=(1, 6), max_rank=3), from_logits=st.booleans())
def test_streaming_equals_direct_computation(stack: torch.Tensor, from_logits: bool) -> None:
    predictions = stack if from_logits else probs_of(stack, dim=2)
    if not from_logits and stack.shape[2] == 1:
        predictions = predictions[:, :, 1:]
    assert_estimates_close(
        ensemble_uncertainty(list(predictions), from_logits=from_logits),
        reference_estimate(predictions, from_logits=from_logits),
        atol=1e-10,
        rtol=1e-8,
    )


# --------------------------------------------------------------------------------------------
# mc_dropout_uncertainty


def tiny_net(num_classes: int = 3, *, dropout: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout2d(0.5))
    layers.append(nn.Conv2d(4, num_classes, 1))
    return nn.Sequential(*layers)


class Recorder(nn.Module):
    """Wraps a model; records each forward's input and every module's training flag."""

    def __init__(self, inner: nn.Module, raise_on_call: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.raise_on_call = raise_on_call
        self.inputs: list[torch.Tensor] = []
        self.modes: list[dict[str, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        self.modes.append({name: m.training for name, m in self.named_modules()})
        if len(self.inputs) == self.raise_on_call:
            raise RuntimeError("forward failed on purpose")
        return self.inner(x)


def modes_of(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_" in k}


@pytest.mark.parametrize("start", ["eval", "train", "mixed"])
def test_only_dropout_switched_and_all_modes_restored(start: str) -> None:
    model = Recorder(tiny_net())
    model.train(start != "eval")
    if start == "mixed":
        model.inner[0].eval()  # a conv in eval inside a training model
        model.inner[3].eval()  # and the dropout itself off
    before = modes_of(model)
    stats = bn_state(model)
    estimate = mc_dropout_uncertainty(model, torch.randn(2, 1, 6, 6), passes=4)
    assert modes_of(model) == before
    assert estimate.mutual_information.shape == (2, 6, 6)
    assert len(model.modes) == 4
    for during in model.modes:
        assert during["inner.3"] is True  # dropout on
        assert {k: v for k, v in during.items() if k != "inner.3"} == {
            k: v for k, v in before.items() if k != "inner.3"
        }
    if start == "eval":
        assert all(torch.equal(v, bn_state(model)[k]) for k, v in stats.items())


@pytest.mark.parametrize(
    "dropout",
    [
        nn.Dropout(0.5),
        nn.Dropout1d(0.5),
        nn.Dropout2d(0.5),
        nn.Dropout3d(0.5),
        nn.AlphaDropout(0.5),
        nn.FeatureAlphaDropout(0.5),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_dropout_kind_is_switched_on(dropout: nn.Module) -> None:
    model = Recorder(nn.Sequential(nn.Identity(), dropout)).eval()
    spatial = {nn.Dropout2d: (4, 4), nn.Dropout3d: (4, 4, 4)}.get(type(dropout), (8,))
    x = torch.randn(2, 3, *spatial)
    mc_dropout_uncertainty(model, x, passes=2)
    assert all(modes["inner.1"] for modes in model.modes)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("start", ["eval", "train"])
def test_modes_restored_when_forward_raises(start: str) -> None:
    model = Recorder(tiny_net(), raise_on_call=2)
    model.train(start == "train")
    before = modes_of(model)
    with pytest.raises(RuntimeError, match="forward failed on purpose"):
        mc_dropout_uncertainty(model, torch.randn(2, 1, 6, 6), passes=4)
    assert len(model.inputs) == 2
    assert modes_of(model) == before


def test_dropout_makes_passes_disagree() -> None:
    torch.manual_seed(0)
    estimate = mc_dropout_uncertainty(tiny_net().eval(), torch.randn(2, 1, 8, 8), passes=8)
    assert (estimate.mutual_information > 1e-4).any()
    assert (estimate.variance > 0).any()


@pytest.mark.parametrize("num_classes", [1, 3])
def test_without_dropout_all_passes_agree(num_classes: int) -> None:
    model = tiny_net(num_classes, dropout=False).eval()
    x = torch.randn(2, 1, 6, 6)
    estimate = mc_dropout_uncertainty(model, x, passes=8)
    assert torch.equal(estimate.variance, torch.zeros_like(estimate.variance))
    torch.testing.assert_close(
        estimate.mutual_information,
        torch.zeros_like(estimate.mutual_information),
        atol=1e-6,
        rtol=0,
    )
    with torch.no_grad():
        torch.testing.assert_close(estimate.mean_probs, probs_of(model(x)))
        torch.testing.assert_close(
            estimate.predictive_entropy, entropy_map(model(x), from_logits=True, normalize=False)
        )


@pytest.mark.parametrize("batch_repeats", [1, 2, 4, 8])
def test_batch_repeats_runs_several_passes_per_forward(batch_repeats: int) -> None:
    model = Recorder(tiny_net(dropout=False)).eval()
    x = torch.randn(2, 1, 5, 5)
    estimate = mc_dropout_uncertainty(model, x, passes=8, batch_repeats=batch_repeats)
    assert len(model.inputs) == 8 // batch_repeats
    assert all(torch.equal(i, x.repeat(batch_repeats, 1, 1, 1)) for i in model.inputs)
    assert_estimates_close(
        estimate, mc_dropout_uncertainty(model.inner, x, passes=8), atol=1e-6, rtol=1e-5
    )


def test_mc_dropout_uses_the_ensemble_estimators() -> None:
    """A callable replaying fixed outputs gives exactly ensemble_uncertainty of those outputs."""
    outputs = torch.randn(8, 2, 3, 4, 4)
    calls = iter(outputs.reshape(4, 4, 3, 4, 4))  # two passes (2 x B rows) per forward

    def replay(x: torch.Tensor) -> torch.Tensor:
        return next(calls)

    estimate = mc_dropout_uncertainty(replay, torch.zeros(2, 1, 4, 4), passes=8, batch_repeats=2)
    assert_estimates_close(estimate, ensemble_uncertainty(outputs), atol=0, rtol=0)


def test_input_noise_is_gaussian_and_clipped() -> None:
    model = Recorder(tiny_net(dropout=False)).eval()
    x = torch.randn(4, 1, 16, 16)
    mc_dropout_uncertainty(model, x, passes=4, noise_std=0.5, noise_clip=0.2, batch_repeats=2)
    noise = torch.stack(model.inputs) - x.repeat(2, 1, 1, 1)
    assert noise.abs().max() <= 0.2 + 1e-6
    assert (noise.abs() > 0.19).float().mean() > 0.5  # std 0.5 clipped at 0.2: mostly at the clip
    assert not torch.equal(model.inputs[0], model.inputs[1])

    model.inputs.clear()
    mc_dropout_uncertainty(model, x, passes=2, noise_std=0.1)
    noise = torch.stack(model.inputs) - x
    assert 0.08 < noise.std() < 0.12 and noise.abs().max() > 0.2  # unclipped

    model.inputs.clear()
    mc_dropout_uncertainty(model, x, passes=2)
    assert all(torch.equal(i, x) for i in model.inputs)


def test_seeded_runs_are_reproducible() -> None:
    model = tiny_net().eval()
    x = torch.randn(2, 1, 6, 6)
    torch.manual_seed(5)
    first = mc_dropout_uncertainty(model, x, passes=4, noise_std=0.1, noise_clip=0.2)
    torch.manual_seed(5)
    second = mc_dropout_uncertainty(model, x, passes=4, noise_std=0.1, noise_clip=0.2)
    assert_estimates_close(first, second, atol=0, rtol=0)


def test_binary_model_and_normalize() -> None:
    model = tiny_net(1).eval()
    estimate = mc_dropout_uncertainty(model, torch.randn(2, 1, 6, 6), passes=4, normalize=True)
    assert estimate.mean_probs.shape == (2, 2, 6, 6)
    torch.testing.assert_close(estimate.mean_probs.sum(1), torch.ones(2, 6, 6))
    assert (estimate.predictive_entropy <= 1 + 1e-6).all()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


X = torch.ones(2, 3, 4)
MC_DROPOUT_ERRORS = [
    ("net", X, {}, TypeError,
        r"`model` must be a torch.nn.Module or a callable returning logits, got str"),
    (_identity, X.long(), {}, TypeError, r"`x` must have a floating dtype, got torch.int64"),
    (_identity, torch.tensor(1.0), {}, ValueError,
        r"`x` must have a batch dim \(B, ...\), got shape \(\)"),
    (_identity, X, {"passes": 0}, ValueError, r"`passes` must be an int >= 1, got 0"),
    (_identity, X, {"passes": 2.0}, TypeError, r"`passes` must be an int, got float"),
    (_identity, X, {"passes": True}, TypeError, r"`passes` must be an int, got bool"),
    (_identity, X, {"batch_repeats": 0}, ValueError, r"`batch_repeats` must be an int >= 1, got 0"),
    (_identity, X, {"passes": 8, "batch_repeats": 3}, ValueError,
        r"`passes` must be divisible by `batch_repeats` \(3\), since each forward runs "
        r"`batch_repeats` passes, got passes=8"),
    (_identity, X, {"noise_std": -0.1}, ValueError,
        r"`noise_std` must be a finite number >= 0, got -0.1"),
    (_identity, X, {"noise_clip": 0.0}, ValueError,
        r"`noise_clip` must be a finite number > 0, got 0.0"),
    (_identity, X, {"noise_clip": "0.2"}, TypeError, r"`noise_clip` must be a number, got str"),
    (_identity, torch.ones(2, 3), {}, ValueError,
        r"`model\(x\)` must have shape \(B, C, \*S\) with at least one spatial dim, got \(2, 3\)"),
    (lambda x: x[:1], X, {"batch_repeats": 2, "passes": 2}, ValueError,
        r"`model\(x\)` must return batch_repeats \* B = 2 \* 2 rows along dim 0 for `x` of "
        r"shape \(2, 3, 4\), got \(1, 3, 4\)"),
    (lambda x: x.long(), X, {}, TypeError,
        r"`model\(x\)` must have a floating dtype, got torch.int64"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "x", "kwargs", "error", "match"), MC_DROPOUT_ERRORS)
def test_mc_dropout_errors(
    model: Any, x: torch.Tensor, kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        mc_dropout_uncertainty(model, x, **kwargs)


def test_model_output_changing_shape_between_passes() -> None:
    shapes = iter([(2, 3, 4), (2, 3, 5)])

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(next(shapes))

    with pytest.raises(
        ValueError,
        match=r"`model\(x\) at pass 2` must have the shape of `model\(x\) at pass 1` \(2, 3, 4\)",
    ):
        mc_dropout_uncertainty(model, torch.ones(2, 3, 4), passes=2)


# --------------------------------------------------------------------------------------------
# streaming memory: live tensor bytes must not grow with the number of passes


def _storage_pointer(tensor: torch.Tensor) -> int:
    """The CPU storage address, or 0 for tensors without one (e.g. FakeTensors that
    torch.compile caches from earlier tests keep alive in the same process)."""
    if tensor.device.type != "cpu":
        return 0
    try:
        return int(tensor.untyped_storage().data_ptr())
    except RuntimeError:
        return 0


def live_tensor_bytes(exclude: set[int]) -> int:
    """Bytes of the distinct storages of the live tensors that the garbage collector lists,
    except storages whose address is in ``exclude``. Views share a storage and count once."""
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance reads __class__, which wakes lazy module proxies.
        if not issubclass(type(obj), torch.Tensor):
            continue
        pointer = _storage_pointer(obj)
        if pointer == 0 or pointer in exclude or pointer in seen:
            continue
        seen.add(pointer)
        total += obj.untyped_storage().nbytes()
    return total


def peak_live_tensor_bytes(run: Callable[[Callable[[], None]], object]) -> int:
    """Largest number of bytes held by tensors created inside ``run``, sampled at each probe.

    ``run(probe)`` calls ``probe()`` wherever a sample should be taken (at each forward pass).
    Exact byte counts, no timing: the same code gives the same number on every run.

    Objects that exist before ``run`` are frozen (``gc.freeze``), so ``gc.get_objects()`` lists
    only new ones and a probe stays cheap however large the process is. New tensors that share
    the storage of an old one (the input itself, views of parameters) are excluded by address;
    the old tensors are kept alive meanwhile, so their addresses are not reused.
    """
    gc.collect()
    # Held until the end: a freed old storage could hand its address to a new tensor.
    existing = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
    exclude = {_storage_pointer(t) for t in existing}
    peak = 0

    def probe() -> None:
        nonlocal peak
        peak = max(peak, live_tensor_bytes(exclude))

    gc.freeze()
    try:
        run(probe)
    finally:
        gc.unfreeze()
        del existing
    return peak


def mc_dropout_peak_bytes(passes: int, batch_repeats: int = 1) -> int:
    model = tiny_net(4).eval()
    x = torch.randn(2, 1, 32, 32)

    def run(probe: Callable[[], None]) -> None:
        def forward(inputs: torch.Tensor) -> torch.Tensor:
            probe()  # what survives from earlier passes is alive right now
            return model(inputs)

        mc_dropout_uncertainty(forward, x, passes=passes, batch_repeats=batch_repeats)

    return peak_live_tensor_bytes(run)


def ensemble_peak_bytes(members: int) -> int:
    generator = torch.Generator().manual_seed(0)

    def run(probe: Callable[[], None]) -> None:
        def predictions() -> Iterator[torch.Tensor]:
            for _ in range(members):
                probe()
                yield torch.randn(2, 4, 32, 32, generator=generator)

        ensemble_uncertainty(predictions())

    return peak_live_tensor_bytes(run)


@pytest.mark.parametrize(("few_passes", "batch_repeats"), [(2, 1), (4, 2)])
def test_mc_dropout_memory_does_not_grow_with_passes(few_passes: int, batch_repeats: int) -> None:
    # few_passes gives two forwards: the probe at the second sees the accumulator.
    few = mc_dropout_peak_bytes(few_passes, batch_repeats)
    many = mc_dropout_peak_bytes(16, batch_repeats)
    one_pass = 2 * 4 * 32 * 32 * 4  # float32 probabilities of one pass
    assert few >= 2 * one_pass  # the accumulator (mean and M2) is really being seen
    assert many <= 1.1 * few, (few, many)


def test_ensemble_memory_does_not_grow_with_members() -> None:
    few = ensemble_peak_bytes(2)
    many = ensemble_peak_bytes(16)
    assert few >= 2 * (2 * 4 * 32 * 32 * 4)
    assert many <= 1.1 * few, (few, many)
