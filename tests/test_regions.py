"""Region masks: hand-computed cases, hypothesis properties of the mask logic, errors."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bual_losses.regions import (
    high_uncertainty_mask,
    low_uncertainty_mask,
    ratio_threshold,
    region_fraction,
    resolve_threshold,
    soft_uncertainty_weight,
    valid_mask,
)
from bual_losses.schedules import RatioSchedule, linear_schedule, ratio_schedule, relative_threshold
from tests.strategies import TIE_VALUES, ratios, seeds, threshold_values, uncertainty_maps

PROPERTY = settings(max_examples=150, deadline=None)
NEG_INF = float("-inf")


def expected_k(ratio: float, n: int) -> int:
    # Python's round is half-to-even on doubles, like torch.round on float64.
    return round(ratio * n)


def per_sample_counts(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1).sum(dim=1)


# --------------------------------------------------------------------------------------------
# hand-computed cases


U = torch.tensor([[0.1, 0.5, 0.9, 0.3]])


def test_masks_hand_computed() -> None:
    assert high_uncertainty_mask(U, 0.5).tolist() == [[False, False, True, False]]
    assert low_uncertainty_mask(U, 0.5).tolist() == [[True, True, False, True]]
    assert high_uncertainty_mask(U, 0.2).tolist() == [[False, True, True, True]]
    assert high_uncertainty_mask(U, NEG_INF).all() and low_uncertainty_mask(U, math.inf).all()
    assert high_uncertainty_mask(U, torch.tensor(0.4)).tolist() == [[False, True, True, False]]


def test_per_sample_threshold_on_channel_map() -> None:
    # (B, 1, *S) maps are accepted; one threshold per sample broadcasts over the rest.
    u = torch.tensor([[[[0.1, 0.6], [0.4, 0.9]]], [[[0.1, 0.6], [0.4, 0.9]]]])
    mask = high_uncertainty_mask(u, torch.tensor([0.5, 0.05]))
    assert mask.shape == u.shape
    assert mask[0].flatten().tolist() == [False, True, False, True]
    assert mask[1].all()


def test_3d_map() -> None:
    u = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4) / 48
    mask = high_uncertainty_mask(u, ratio_schedule(0.25), step=0)
    assert per_sample_counts(mask).tolist() == [6, 6]
    assert mask[0].flatten()[-6:].all() and not mask[0].flatten()[:-6].any()


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (0.5, 0.3),  # k = 2: top {0.9, 0.5}
        (0.25, 0.5),  # k = 1
        (0.75, 0.1),  # k = 3
        (0.0, 0.9),  # k = 0: the maximum, nothing above it
        (1.0, NEG_INF),  # k = N: everything
        (0.125, 0.9),  # 0.5 rounds half-to-even to k = 0
        (0.375, 0.3),  # 1.5 rounds half-to-even to k = 2
    ],
)
def test_ratio_threshold_hand_computed(ratio: float, expected: float) -> None:
    u = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    thr = ratio_threshold(u, ratio)
    assert thr.shape == (1, 1)
    assert thr.item() == pytest.approx(expected)
    assert ratio_threshold(u, torch.tensor(ratio)).item() == pytest.approx(expected)


def test_ratio_threshold_ties_go_low() -> None:
    u = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    thr = ratio_threshold(u, 0.5)  # k = 2 but the boundary value 0.5 is tied three times
    assert thr.item() == 0.5
    assert not high_uncertainty_mask(u, thr).any()


def test_ratio_threshold_per_sample_and_per_batch() -> None:
    u = torch.tensor([[0.9, 0.1], [0.5, 0.3]])
    per_sample = ratio_threshold(u, 0.5)
    assert per_sample.shape == (2, 1)
    torch.testing.assert_close(per_sample, torch.tensor([[0.1], [0.3]]))
    per_batch = ratio_threshold(u, 0.5, per_sample=False)
    assert per_batch.shape == ()
    assert per_batch.item() == pytest.approx(0.3)
    assert high_uncertainty_mask(u, per_batch).tolist() == [[True, False], [True, False]]


def test_tensor_ratio_is_clamped() -> None:
    u = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    assert ratio_threshold(u, torch.tensor(1.5)).item() == NEG_INF
    assert ratio_threshold(u, torch.tensor(-0.5)).item() == pytest.approx(0.9)
    assert ratio_threshold(u, torch.tensor(float("nan"))).item() == pytest.approx(0.9)
    assert ratio_threshold(u, torch.tensor(1)).item() == NEG_INF  # integer tensor


def test_resolve_threshold_forms() -> None:
    u = torch.rand(2, 3, 4, dtype=torch.float64)
    scalar = resolve_threshold(u, 0.5)
    assert scalar.shape == () and scalar.dtype == torch.float64 and scalar.item() == 0.5
    vector = resolve_threshold(u, torch.tensor([0.25, 0.75]))
    assert vector.shape == (2, 1, 1) and vector.dtype == torch.float64
    assert vector.flatten().tolist() == [0.25, 0.75]
    assert torch.equal(resolve_threshold(u, vector), vector)  # idempotent
    assert resolve_threshold(u, torch.full((1, 1, 1), 0.5)).shape == (1, 1, 1)
    zero_d = resolve_threshold(u, torch.tensor(0.5, dtype=torch.float32))
    assert zero_d.dtype == torch.float64
    scheduled = resolve_threshold(u, linear_schedule(0.0, 1.0, 10), step=3)
    assert scheduled.item() == pytest.approx(0.3)
    ratio = resolve_threshold(u, ratio_schedule(0.5, per_sample=False), step=0)
    assert ratio.shape == () and ratio.item() == ratio_threshold(u, 0.5, per_sample=False).item()
    assert resolve_threshold(u, np.float32(0.25)).item() == 0.25


def test_threshold_compared_in_map_dtype() -> None:
    u = torch.tensor([[0.1, 0.2]], dtype=torch.float16)
    thr = resolve_threshold(u, 0.1)
    assert thr.dtype == torch.float16
    # 0.1 rounds to the same half value as the voxel: a tie, hence low.
    assert high_uncertainty_mask(u, 0.1).tolist() == [[False, True]]


def test_soft_weight_hand_computed() -> None:
    u = torch.tensor([[0.0, 0.5, 1.0]])
    high = soft_uncertainty_weight(u, 0.5, temperature=0.1)
    low = soft_uncertainty_weight(u, 0.5, temperature=0.1, high=False)
    s5 = 1.0 / (1.0 + math.exp(-5.0))
    torch.testing.assert_close(high, torch.tensor([[1 - s5, 0.5, s5]]))
    torch.testing.assert_close(low, torch.tensor([[s5, 0.5, 1 - s5]]))
    everything = soft_uncertainty_weight(u, ratio_schedule(1.0), temperature=0.1, step=0)
    assert torch.equal(everything, torch.ones_like(u))


def test_nan_uncertainty_is_validated() -> None:
    u = torch.tensor([[0.1, float("nan")]])
    for fn in (high_uncertainty_mask, low_uncertainty_mask):
        with pytest.raises(ValueError, match=r"`uncertainty` must be finite; it contains NaN"):
            fn(u, 0.5)
    with pytest.raises(ValueError, match=r"`uncertainty` must be finite"):
        soft_uncertainty_weight(u, 0.5, temperature=1.0)
    # Unvalidated, NaN compares False: it lands in the low region.
    assert low_uncertainty_mask(u, 0.5, validate=False).tolist() == [[True, True]]
    with pytest.raises(ValueError, match=r"`threshold` must not be NaN; it contains NaN"):
        high_uncertainty_mask(torch.rand(2, 3), torch.tensor([0.5, float("nan")]))


def test_valid_mask() -> None:
    target = torch.tensor([[0, 255, 2], [1, 1, 255]])
    assert valid_mask(target, ignore_index=255).tolist() == [
        [True, False, True],
        [True, True, False],
    ]
    assert valid_mask(target).all() and valid_mask(target).dtype == torch.bool
    assert valid_mask(target, ignore_index=-100).all()
    out = valid_mask(target.numpy(), ignore_index=255)
    assert isinstance(out, np.ndarray) and out.dtype == np.bool_
    assert valid_mask(target.float(), ignore_index=255).sum().item() == 4


def test_region_fraction() -> None:
    mask = torch.tensor([[True, False], [True, True]])
    fraction = region_fraction(mask)
    assert fraction.shape == () and fraction.dtype == torch.float32 and fraction.item() == 0.75
    torch.testing.assert_close(region_fraction(mask, per_sample=True), torch.tensor([0.5, 1.0]))
    weights = torch.tensor([[0.25, 0.75], [0.0, 0.5]], dtype=torch.float64)
    assert region_fraction(weights).dtype == torch.float64
    assert region_fraction(weights.half()).dtype == torch.float32
    torch.testing.assert_close(
        region_fraction(weights, per_sample=True), torch.tensor([0.5, 0.25], dtype=torch.float64)
    )
    out = region_fraction(mask.numpy(), per_sample=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [0.5, 1.0]


def test_numpy_in_numpy_out() -> None:
    u = np.array([[0.1, 0.5, 0.9, 0.3]], dtype=np.float32)
    high = high_uncertainty_mask(u, 0.4)
    assert isinstance(high, np.ndarray) and high.dtype == np.bool_
    assert high.tolist() == [[False, True, True, False]]
    assert isinstance(low_uncertainty_mask(u, np.array([0.4], dtype=np.float32)), np.ndarray)
    thr = ratio_threshold(u, 0.5)
    assert isinstance(thr, np.ndarray) and thr.tolist() == [[pytest.approx(0.3)]]
    assert isinstance(resolve_threshold(u, 0.5), np.ndarray)
    soft = soft_uncertainty_weight(u, 0.5, temperature=0.1)
    assert isinstance(soft, np.ndarray) and soft.dtype == np.float32


def test_meta_device_and_dtype_follow_input() -> None:
    u = torch.empty(2, 3, 4, device="meta", dtype=torch.bfloat16)
    assert high_uncertainty_mask(u, 0.5, validate=False).device.type == "meta"
    thr = ratio_threshold(u, 0.5)
    assert thr.device.type == "meta" and thr.dtype == torch.bfloat16 and thr.shape == (2, 1, 1)
    soft = soft_uncertainty_weight(u, 0.5, temperature=0.1, validate=False)
    assert soft.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, from dynamo
def test_compiled_masks_match_eager() -> None:
    threshold = linear_schedule(0.2, 0.6, 10)
    top = ratio_schedule(linear_schedule(0.5, 0.1, 10))

    def regions(u: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, ...]:
        high = high_uncertainty_mask(u, top, step=step)
        low = low_uncertainty_mask(u, threshold, step=step)
        soft = soft_uncertainty_weight(u, threshold, temperature=0.05, step=step, high=False)
        per_sample = high_uncertainty_mask(u, u.amax(dim=(1, 2)) / 2)
        return high, low, soft, per_sample, region_fraction(high, per_sample=True)

    # aot_eager traces the whole graph (fullgraph: no breaks, no host syncs, no data-dependent
    # branches) without inductor's cold C++ compile, which takes 12-17 s on the CI machine.
    compiled = torch.compile(regions, fullgraph=True, backend="aot_eager")
    u = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(0))
    for step in (0, 4, 20):
        s = torch.tensor(step)
        for got, want in zip(compiled(u, s), regions(u, s)):
            torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# properties


@PROPERTY
@given(u=uncertainty_maps(), threshold=threshold_values())
def test_high_and_low_partition_the_voxels(u: torch.Tensor, threshold: float) -> None:
    high = high_uncertainty_mask(u, threshold)
    low = low_uncertainty_mask(u, threshold)
    assert high.dtype == low.dtype == torch.bool and high.shape == low.shape == u.shape
    assert (high | low).all()
    assert not (high & low).any()
    # Ties with the threshold go low.
    assert torch.equal(low, u <= threshold)


@PROPERTY
@given(u=uncertainty_maps(kind="ties"), data=st.data())
def test_per_sample_thresholds_partition_and_broadcast(
    u: torch.Tensor, data: st.DataObject
) -> None:
    values = data.draw(
        st.lists(st.sampled_from(TIE_VALUES), min_size=u.shape[0], max_size=u.shape[0])
    )
    thresholds = torch.tensor(values)
    high = high_uncertainty_mask(u, thresholds)
    low = low_uncertainty_mask(u, thresholds)
    assert (high ^ low).all()
    for i, value in enumerate(values):
        assert torch.equal(high[i], u[i] > value)


@PROPERTY
@given(u=uncertainty_maps(), a=threshold_values(), b=threshold_values())
def test_raising_the_threshold_never_adds_high_voxels(u: torch.Tensor, a: float, b: float) -> None:
    lower, upper = min(a, b), max(a, b)
    added = high_uncertainty_mask(u, upper) & ~high_uncertainty_mask(u, lower)
    assert not added.any()


@PROPERTY
@given(u=uncertainty_maps(), a=ratios(), b=ratios(), per_sample=st.booleans())
def test_raising_the_ratio_never_removes_high_voxels(
    u: torch.Tensor, a: float, b: float, per_sample: bool
) -> None:
    small, large = min(a, b), max(a, b)
    removed = high_uncertainty_mask(u, ratio_threshold(u, small, per_sample=per_sample)) & ~(
        high_uncertainty_mask(u, ratio_threshold(u, large, per_sample=per_sample))
    )
    assert not removed.any()


@PROPERTY
@given(u=uncertainty_maps(kind="distinct"), ratio=ratios())
def test_ratio_selects_exactly_k_distinct_per_sample(u: torch.Tensor, ratio: float) -> None:
    n = u[0].numel()
    counts = per_sample_counts(high_uncertainty_mask(u, ratio_schedule(ratio), step=0))
    assert counts.tolist() == [expected_k(ratio, n)] * u.shape[0]


@PROPERTY
@given(u=uncertainty_maps(kind="distinct", max_batch=1), ratio=ratios(), data=st.data())
def test_ratio_selects_exactly_k_distinct_per_batch(
    u: torch.Tensor, ratio: float, data: st.DataObject
) -> None:
    # Distinct within the whole batch: stack shifted copies of a distinct sample.
    batch = data.draw(st.integers(1, 3))
    u = torch.cat([u + i for i in range(batch)])
    mask = high_uncertainty_mask(u, ratio_schedule(ratio, per_sample=False), step=0)
    assert int(mask.sum()) == expected_k(ratio, u.numel())


@PROPERTY
@given(u=uncertainty_maps(kind="ties"), ratio=ratios(), per_sample=st.booleans())
def test_ratio_with_ties_selects_the_largest_top_set_of_at_most_k(
    u: torch.Tensor, ratio: float, per_sample: bool
) -> None:
    thr = ratio_threshold(u, ratio, per_sample=per_sample)
    high = high_uncertainty_mask(u, thr)
    rows = u.shape[0] if per_sample else 1
    flat_u, flat_high = u.reshape(rows, -1), high.reshape(rows, -1)
    n = flat_u.shape[1]
    k = expected_k(ratio, n)
    for values, selected in zip(flat_u, flat_high):
        count = int(selected.sum())
        assert count <= k
        if selected.any() and (~selected).any():
            assert values[selected].min() > values[~selected].max()
        if k < n:
            # Adding the boundary tie group would overshoot k: the set is maximal.
            boundary = values[~selected].max()
            assert int((values >= boundary).sum()) > k


@PROPERTY
@given(u=uncertainty_maps(), ratio=ratios())
def test_per_sample_ratio_is_per_batch_ratio_of_each_sample(u: torch.Tensor, ratio: float) -> None:
    per_sample = ratio_threshold(u, ratio)
    assert per_sample.shape == (u.shape[0],) + (1,) * (u.ndim - 1)
    for i in range(u.shape[0]):
        alone = ratio_threshold(u[i : i + 1], ratio, per_sample=False)
        assert alone.shape == ()
        assert torch.equal(per_sample[i].reshape(()), alone)
    if u.shape[0] == 1:
        assert torch.equal(per_sample.reshape(()), ratio_threshold(u, ratio, per_sample=False))


@PROPERTY
@given(u=uncertainty_maps(), ratio=ratios())
def test_tensor_ratio_matches_float_ratio(u: torch.Tensor, ratio: float) -> None:
    as_float = ratio_threshold(u, ratio)
    as_tensor = ratio_threshold(u, torch.tensor(ratio, dtype=torch.float64))
    assert torch.equal(as_float, as_tensor)


def _permute_voxels(u: torch.Tensor, perm: torch.Tensor, per_sample: bool) -> torch.Tensor:
    rows = u.shape[0] if per_sample else 1
    return u.reshape(rows, -1)[:, perm].reshape(u.shape)


@PROPERTY
@given(u=uncertainty_maps(), data=st.data())
def test_masks_are_permutation_equivariant(u: torch.Tensor, data: st.DataObject) -> None:
    per_sample = data.draw(st.booleans())
    thresholds: list[object] = [
        data.draw(threshold_values()),
        RatioSchedule(data.draw(ratios()), per_sample=per_sample),
    ]
    if per_sample:
        thresholds.append(torch.rand(u.shape[0], generator=torch.Generator().manual_seed(0)))
    n = u[0].numel() if per_sample else u.numel()
    perm = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.long)
    permuted = _permute_voxels(u, perm, per_sample)
    for threshold in thresholds:
        mask = high_uncertainty_mask(u, threshold, step=0)
        assert torch.equal(
            high_uncertainty_mask(permuted, threshold, step=0),
            _permute_voxels(mask, perm, per_sample),
        )


@PROPERTY
@given(u=uncertainty_maps(), threshold=threshold_values(), temperature=st.floats(1e-3, 10.0))
def test_soft_high_plus_soft_low_is_one(
    u: torch.Tensor, threshold: float, temperature: float
) -> None:
    high = soft_uncertainty_weight(u, threshold, temperature=temperature)
    low = soft_uncertainty_weight(u, threshold, temperature=temperature, high=False)
    assert ((high >= 0) & (high <= 1)).all()
    torch.testing.assert_close(high + low, torch.ones_like(u), rtol=0, atol=1e-6)


@PROPERTY
@given(u=uncertainty_maps(kind="random"), threshold=threshold_values())
def test_soft_tends_to_hard_away_from_the_threshold(u: torch.Tensor, threshold: float) -> None:
    away = (u - threshold).abs() > 0.05
    hard = high_uncertainty_mask(u, threshold).to(u.dtype)
    for temperature in (1e-2, 1e-3):
        soft = soft_uncertainty_weight(u, threshold, temperature=temperature)
        # |u - tau| / T > 5 (then > 50): the error is at most sigmoid(-5) (then ~0).
        bound = 1.0 / (1.0 + math.exp(0.05 / temperature))
        assert ((soft - hard).abs()[away] <= bound + 1e-7).all()
    assert ((soft - hard).abs()[away] <= 1e-6).all()


@PROPERTY
@given(u=uncertainty_maps(), threshold=threshold_values(), ratio=ratios(), per_sample=st.booleans())
def test_numpy_matches_torch(
    u: torch.Tensor, threshold: float, ratio: float, per_sample: bool
) -> None:
    x = u.numpy()
    for fn in (high_uncertainty_mask, low_uncertainty_mask):
        got = fn(x, threshold)
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, fn(u, threshold).numpy())
    np.testing.assert_array_equal(
        ratio_threshold(x, ratio, per_sample=per_sample),
        ratio_threshold(u, ratio, per_sample=per_sample).numpy(),
    )
    np.testing.assert_array_equal(
        soft_uncertainty_weight(x, threshold, temperature=0.1),
        soft_uncertainty_weight(u, threshold, temperature=0.1).numpy(),
    )
    mask = high_uncertainty_mask(u, threshold)
    np.testing.assert_array_equal(
        region_fraction(mask.numpy(), per_sample=per_sample),
        region_fraction(mask, per_sample=per_sample).numpy(),
    )


@PROPERTY
@given(u=uncertainty_maps(kind="ties"), step=st.integers(-2, 10), tensor_step=st.booleans())
def test_schedule_at_a_step_gives_the_mask_of_its_value(
    u: torch.Tensor, step: int, tensor_step: bool
) -> None:
    # T = 8 makes the schedule hit 0.25, 0.5, 0.75, 1.0 exactly: ties with the voxels.
    schedule = linear_schedule(0.0, 1.0, 8)
    at: int | torch.Tensor = torch.tensor(step) if tensor_step else step
    value = schedule(step)
    for fn in (high_uncertainty_mask, low_uncertainty_mask):
        assert torch.equal(fn(u, schedule, step=at), fn(u, value))
    top = ratio_schedule(linear_schedule(0.0, 1.0, 8), per_sample=False)
    assert torch.equal(
        high_uncertainty_mask(u, top, step=at),
        high_uncertainty_mask(u, ratio_threshold(u, top(step), per_sample=False)),
    )


@PROPERTY
@given(seed=seeds(), fraction=st.floats(0.0, 1.0))
def test_region_fraction_is_the_mean(seed: int, fraction: float) -> None:
    mask = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(seed)) < fraction
    overall = region_fraction(mask)
    assert overall.item() == pytest.approx(mask.sum().item() / mask.numel())
    per_sample = region_fraction(mask, per_sample=True)
    assert per_sample.mean().item() == pytest.approx(overall.item())


# --------------------------------------------------------------------------------------------
# errors


SCHEDULE = linear_schedule(0.0, 1.0, 10)
MAP = torch.rand(2, 3, 4)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: resolve_threshold(MAP, "0.5"),
            TypeError,
            r"`threshold` must be a number, a tensor, a Schedule, a RatioSchedule or a "
            r"RelativeThreshold, got str",
        ),
        (
            lambda: high_uncertainty_mask(MAP, torch.rand(3)),
            ValueError,
            r"`threshold` must be .* shape \(B,\) or \(B, 1, ..., 1\) = \(2, 1, 1\) \(B = 2\) "
            r"to match `uncertainty` \(2, 3, 4\), got \(3,\)",
        ),
        (
            lambda: high_uncertainty_mask(MAP, torch.rand(2, 3)),
            ValueError,
            r"`threshold` must be .* got \(2, 3\)",
        ),
        (
            lambda: high_uncertainty_mask(MAP, torch.rand(2, device="meta")),
            ValueError,
            r"`threshold` must be on the same device as `uncertainty` \(cpu\), got meta",
        ),
        (
            lambda: high_uncertainty_mask(MAP, SCHEDULE),
            ValueError,
            r"`step` is required when `threshold` is a Schedule, got None",
        ),
        (
            lambda: low_uncertainty_mask(MAP, ratio_schedule(0.2)),
            ValueError,
            r"`step` is required when `threshold` is a RatioSchedule, got None",
        ),
        (
            lambda: high_uncertainty_mask(MAP, float("nan")),
            ValueError,
            r"`threshold` must not be NaN \(\+-inf are allowed\), got nan",
        ),
        (
            lambda: high_uncertainty_mask(MAP, lambda step: SCHEDULE, step=1),
            TypeError,
            r"`threshold` schedule must return a number or a tensor, got _Interpolation",
        ),
        (
            lambda: ratio_threshold(MAP, 1.5),
            ValueError,
            r"`ratio` must lie in \[0, 1\], got 1\.5",
        ),
        (
            lambda: high_uncertainty_mask(MAP, RatioSchedule(lambda step: -0.5), step=1),
            ValueError,
            r"`ratio` must lie in \[0, 1\], got -0\.5",
        ),
        (
            lambda: ratio_threshold(MAP, torch.tensor([0.1, 0.2])),
            ValueError,
            r"`ratio` must be a number or a 0-d tensor, got shape \(2,\)",
        ),
        (
            lambda: ratio_threshold(MAP, "half"),
            TypeError,
            r"`ratio` must be a number or a 0-d tensor, got str",
        ),
        (
            lambda: ratio_threshold(MAP, 0.5, per_sample=1),
            TypeError,
            r"`per_sample` must be a bool, got int",
        ),
        (
            lambda: soft_uncertainty_weight(MAP, 0.5, temperature=0.0),
            ValueError,
            r"`temperature` must be a finite number > 0, got 0\.0",
        ),
        (
            lambda: soft_uncertainty_weight(MAP, 0.5, temperature=-1),
            ValueError,
            r"`temperature` must be a finite number > 0, got -1",
        ),
        (
            lambda: soft_uncertainty_weight(MAP, 0.5, temperature="0.1"),
            TypeError,
            r"`temperature` must be a number, got str",
        ),
        (
            lambda: soft_uncertainty_weight(MAP, 0.5, temperature=0.1, high="low"),
            TypeError,
            r"`high` must be a bool, got str",
        ),
        (
            lambda: high_uncertainty_mask(torch.ones(2, 3, dtype=torch.long), 0.5),
            TypeError,
            r"`uncertainty` must have a floating dtype, got torch\.int64",
        ),
        (
            lambda: high_uncertainty_mask(torch.rand(4), 0.5),
            ValueError,
            r"`uncertainty` must have shape \(B, \*S\) or \(B, 1, \*S\) with at least one "
            r"spatial dim, got \(4,\)",
        ),
        (
            lambda: high_uncertainty_mask([[0.1, 0.2]], 0.5),
            TypeError,
            r"`uncertainty` must be a torch\.Tensor, got list",
        ),
        (
            lambda: valid_mask(torch.zeros(2, 3), ignore_index=1.5),
            TypeError,
            r"`ignore_index` must be an int or None, got float",
        ),
        (
            lambda: valid_mask([0, 1], ignore_index=1),
            TypeError,
            r"`target` must be a torch\.Tensor, got list",
        ),
        (
            lambda: region_fraction(torch.tensor(True), per_sample=True),
            ValueError,
            r"`mask` must have shape \(B, \*S\) for per_sample=True, got \(\)",
        ),
    ],
)
def test_errors(call: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_relative_threshold_is_a_multiple_of_the_maps_own_mean() -> None:
    """Worked by hand: sample means 0.3 and 0.2, batch mean 0.25."""
    u = torch.tensor([[0.1, 0.2, 0.3, 0.6], [0.0, 0.0, 0.4, 0.4]], dtype=torch.float64)
    per_sample = resolve_threshold(u, relative_threshold(), step=0)
    torch.testing.assert_close(per_sample, torch.tensor([[0.3], [0.2]], dtype=torch.float64))
    batch = resolve_threshold(u, relative_threshold(2.0, per_sample=False), step=0)
    torch.testing.assert_close(batch, torch.tensor(0.5, dtype=torch.float64))
    scheduled = resolve_threshold(u, relative_threshold(linear_schedule(1.0, 2.0, 10)), step=5)
    torch.testing.assert_close(scheduled, 1.5 * per_sample)
    high = high_uncertainty_mask(u, relative_threshold(), step=0)
    assert high.tolist() == [[False, False, False, True], [False, False, True, True]]
    low = low_uncertainty_mask(u.numpy(), relative_threshold(), step=0)  # numpy in, numpy out
    assert low.tolist() == [[True, True, True, False], [True, True, False, False]]
    with pytest.raises(ValueError, match="`step` is required when `threshold` is a Relative"):
        resolve_threshold(u, relative_threshold())
