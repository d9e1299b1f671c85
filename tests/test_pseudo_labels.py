"""Tests for bual_losses.pseudo: exactly torch.argmax (ties, NaN), binary, numpy, errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bual_losses.pseudo as PL
from bual_losses.pseudo import pseudo_labels
from tests.strategies import seeds, spatial_shapes

PROPERTY = settings(max_examples=80, deadline=None)
NAN, INF = float("nan"), float("inf")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the module's default sizes below which torch.argmax is used (the tests lower them to 0)
DEFAULT_THRESHOLDS = PL._FAST_MIN_VOXELS, PL._FAST_VOXELS_PER_CLASS


@contextlib.contextmanager
def fast_path_for_every_size() -> Iterator[None]:
    """The CPU fast path for tiny inputs too (by default they take torch.argmax)."""
    saved = PL._FAST_MIN_VOXELS, PL._FAST_VOXELS_PER_CLASS
    PL._FAST_MIN_VOXELS, PL._FAST_VOXELS_PER_CLASS = 0, 0
    try:
        yield
    finally:
        PL._FAST_MIN_VOXELS, PL._FAST_VOXELS_PER_CLASS = saved


@pytest.fixture(autouse=True)
def fast_path() -> Iterator[None]:
    with fast_path_for_every_size():
        yield


def reference(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.argmax, or z > 0 for a binary logit."""
    if logits.shape[dim] == 1:
        return (logits.select(dim, 0) > 0).long()
    return logits.argmax(dim)


@st.composite
def scores(draw: st.DrawFn, *, special: bool = True) -> tuple[torch.Tensor, int]:
    """``(scores, dim)``: any rank 1..4, C in 1..6 along any dim, any float dtype, with ties
    (values from a small set), and optionally NaN / +-inf / -0.0 sprinkled in; sometimes a
    non-contiguous view."""
    rest = draw(spatial_shapes(min_rank=0, max_rank=3, max_side=5))
    num_classes = draw(st.integers(1, 6))
    dim = draw(st.integers(0, len(rest)))
    shape = (*rest[:dim], num_classes, *rest[dim:])
    dtype = draw(st.sampled_from(FLOATS))
    generator = torch.Generator().manual_seed(draw(seeds()))
    kind = draw(st.sampled_from(["random", "ties"]))
    if kind == "ties":
        x = torch.randint(-2, 3, shape, generator=generator).to(torch.float64)
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * 10
    if special:
        values = torch.tensor([NAN, INF, -INF, -0.0, 0.0], dtype=torch.float64)
        pick = torch.randint(len(values), shape, generator=generator)
        where = torch.rand(shape, generator=generator) < draw(st.sampled_from([0.0, 0.1, 0.4]))
        x = torch.where(where, values[pick], x)
    x = x.to(dtype)
    if draw(st.booleans()) and x.ndim >= 2:  # a non-contiguous view with the same class dim
        x = x.flip(-1) if draw(st.booleans()) else x.transpose(0, -1).contiguous().transpose(0, -1)
    return x, (dim - x.ndim if draw(st.booleans()) else dim)


# --------------------------------------------------------------------------------------------
# equals torch.argmax


@PROPERTY
@given(case=scores())
def test_equals_torch_argmax(case: tuple[torch.Tensor, int]) -> None:
    x, dim = case
    with fast_path_for_every_size():  # hypothesis runs outside function-scoped fixtures
        labels = pseudo_labels(x, dim=dim)
    expected = reference(x, dim)
    assert labels.dtype == torch.int64
    assert labels.shape == expected.shape
    assert torch.equal(labels, expected)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "shape", [(12, 4, 64, 64), (2, 2, 24, 24, 16), (3, 7, 50), (2, 300, 40), (1, 3, 4)]
)
def test_equals_torch_argmax_large_and_default_thresholds(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[..., ::7] = torch.round(x[..., ::7])  # some ties
    assert torch.equal(pseudo_labels(x), x.argmax(1))
    saved = PL._FAST_MIN_VOXELS, PL._FAST_VOXELS_PER_CLASS
    PL._FAST_MIN_VOXELS, PL._FAST_VOXELS_PER_CLASS = DEFAULT_THRESHOLDS
    try:
        assert torch.equal(pseudo_labels(x), x.argmax(1))
    finally:
        PL._FAST_MIN_VOXELS, PL._FAST_VOXELS_PER_CLASS = saved


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_ties_go_to_the_lowest_index(num_classes: int) -> None:
    assert torch.equal(
        pseudo_labels(torch.zeros(2, num_classes, 4, 4)), torch.zeros(2, 4, 4).long()
    )
    x = torch.zeros(1, num_classes, 3)
    x[:, 1:3] = 1.0  # classes 1 and 2 tie (C = 2: class 1 alone)
    assert torch.equal(pseudo_labels(x), torch.ones(1, 3).long())
    x[:, 0] = -0.0  # -0.0 and 0.0 tie too
    x[:, 1:] = 0.0
    assert torch.equal(pseudo_labels(x), torch.zeros(1, 3).long())


@pytest.mark.parametrize("dtype", FLOATS)
def test_nan_counts_as_the_maximum_first_nan_wins(dtype: torch.dtype) -> None:
    rows = [
        [0.0, NAN, 1.0, NAN],  # first NaN: 1
        [NAN, 0.0, 0.0, 0.0],  # 0
        [INF, NAN, 0.0, 0.0],  # NaN beats +inf: 1
        [1.0, 2.0, 0.0, NAN],  # 3
        [-INF, -INF, -INF, -INF],  # all equal: 0
        [-INF, -INF, 5.0, INF],  # 3
    ]
    x = torch.tensor(rows, dtype=dtype).T.reshape(1, 4, len(rows))
    expected = torch.tensor([[1, 0, 1, 3, 0, 3]])
    assert torch.equal(x.argmax(1), expected)  # the semantics being matched
    assert torch.equal(pseudo_labels(x), expected)
    two = torch.tensor([[NAN, 1.0], [1.0, NAN], [NAN, NAN], [INF, -INF], [-INF, -INF]], dtype=dtype)
    two = two.T.reshape(1, 2, 5)
    assert torch.equal(two.argmax(1), torch.tensor([[0, 1, 0, 0, 0]]))
    assert torch.equal(pseudo_labels(two), two.argmax(1))


def test_binary_is_logit_above_zero() -> None:
    z = torch.tensor([-1.0, 0.0, -0.0, 1e-30, INF, -INF, NAN]).reshape(1, 1, 7)
    assert torch.equal(pseudo_labels(z), torch.tensor([[0, 0, 0, 1, 1, 0, 0]]))
    assert torch.equal(pseudo_labels(z.reshape(7, 1), dim=-1), torch.tensor([0, 0, 0, 1, 1, 0, 0]))


def test_no_grad_history_and_works_under_no_grad() -> None:
    z = torch.randn(2, 3, 5, 5, requires_grad=True)
    labels = pseudo_labels(z)
    assert not labels.requires_grad and labels.grad_fn is None
    with torch.no_grad():
        assert torch.equal(pseudo_labels(z), z.argmax(1))
    assert torch.equal(labels, z.argmax(1))


def test_class_dim_anywhere_and_one_dim_input() -> None:
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(3))
    for dim in range(-4, 4):
        assert torch.equal(pseudo_labels(x, dim=dim), x.argmax(dim))
    v = torch.tensor([0.5, 2.0, 2.0])
    assert pseudo_labels(v, dim=0).shape == ()
    assert int(pseudo_labels(v, dim=0)) == 1


def test_empty_batch() -> None:
    assert pseudo_labels(torch.empty(0, 3, 4)).shape == (0, 4)
    assert pseudo_labels(torch.empty(0, 2, 4)).shape == (0, 4)
    assert pseudo_labels(torch.empty(2, 1, 0)).shape == (2, 0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("num_classes", [1, 2, 4])
def test_numpy_in_numpy_out(dtype: type, num_classes: int) -> None:
    array = np.random.default_rng(0).normal(size=(2, num_classes, 5, 6)).astype(dtype)
    result = pseudo_labels(array)
    assert isinstance(result, np.ndarray) and result.dtype == np.int64
    expected = array[:, 0] > 0 if num_classes == 1 else np.argmax(array, axis=1)
    np.testing.assert_array_equal(result, expected)


def test_device_followed() -> None:
    x = torch.empty(2, 3, 4, 4, device="meta")
    labels = pseudo_labels(x)
    assert labels.device.type == "meta" and labels.shape == (2, 4, 4)
    assert labels.dtype == torch.int64
    if torch.cuda.is_available():
        z = torch.randn(2, 4, 8, 8, device="cuda")
        z[0, 2, 0, 0] = NAN
        assert torch.equal(pseudo_labels(z).cpu(), pseudo_labels(z.cpu()))


def test_compiled_equals_eager() -> None:
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(lambda z: pseudo_labels(z), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), x.argmax(1))


PSEUDO_LABEL_ERRORS = [
    (torch.zeros(2, 3, 4, dtype=torch.long), {}, TypeError,
        r"`logits` must have a floating dtype, got torch.int64"),
    (torch.zeros(2, 3, 4, dtype=torch.bool), {}, TypeError,
        r"`logits` must have a floating dtype, got torch.bool"),
    (np.zeros((2, 3), dtype=np.int32), {}, TypeError,
        r"`logits` must have a floating dtype, got torch.int32"),
    ([[0.5, 0.5]], {}, TypeError, r"`logits` must be a torch.Tensor or numpy.ndarray, got list"),
    (torch.tensor(1.0), {}, ValueError, r"`logits` must have at least 1 dim"),
    (torch.ones(2, 0, 4), {}, ValueError,
        r"`logits` must have at least one class along dim=1, got shape \(2, 0, 4\)"),
    (torch.ones(2, 3), {"dim": 2}, ValueError,
        r"`dim` must be in \[-2, 1\] for `logits` of shape \(2, 3\), got 2"),
    (torch.ones(2, 3), {"dim": 1.0}, TypeError, r"`dim` must be an int, got float"),
    (torch.ones(2, 3), {"dim": True}, TypeError, r"`dim` must be an int, got bool"),
]  # fmt: skip


@pytest.mark.parametrize(("x", "kwargs", "error", "match"), PSEUDO_LABEL_ERRORS)
def test_pseudo_label_errors(x: Any, kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        pseudo_labels(x, **kwargs)


def test_dim_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        pseudo_labels(torch.zeros(2, 3, 4), 1)  # type: ignore[misc]
