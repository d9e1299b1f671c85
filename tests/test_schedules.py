"""Schedules: hand-computed values, SSL4MIS equivalence, tensor steps, compile, errors."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bual_losses.schedules import (
    RatioSchedule,
    RelativeThreshold,
    as_schedule,
    constant_schedule,
    cosine_rampdown,
    cosine_schedule,
    linear_rampup,
    linear_schedule,
    rampup_schedule,
    ratio_schedule,
    relative_threshold,
    sigmoid_rampup,
    uamt_threshold_schedule,
)

LN2 = math.log(2.0)
PROPERTY = settings(max_examples=100, deadline=None)


# --------------------------------------------------------------------------------------------
# SSL4MIS `code/utils/ramps.py`, verbatim apart from style: the independent reference.


def ssl4mis_sigmoid_rampup(current: float, rampup_length: float) -> float:
    if rampup_length == 0:
        return 1.0
    current = np.clip(current, 0.0, rampup_length)
    phase = 1.0 - current / rampup_length
    return float(np.exp(-5.0 * phase * phase))


def ssl4mis_linear_rampup(current: float, rampup_length: float) -> float:
    assert current >= 0 and rampup_length >= 0
    if current >= rampup_length:
        return 1.0
    return current / rampup_length


def ssl4mis_cosine_rampdown(current: float, rampdown_length: float) -> float:
    assert 0 <= current <= rampdown_length
    return float(0.5 * (np.cos(np.pi * current / rampdown_length) + 1))


# --------------------------------------------------------------------------------------------
# ramps: hand-computed values


@pytest.mark.parametrize(
    ("step", "length", "expected"),
    [
        (0, 100, math.exp(-5.0)),
        (50, 100, math.exp(-1.25)),
        (100, 100, 1.0),
        (200, 100, 1.0),
        (-10, 100, math.exp(-5.0)),
        (0, 0, 1.0),
        (7, 0, 1.0),
        (2.5, 10.0, math.exp(-5.0 * 0.75**2)),
    ],
)
def test_sigmoid_rampup_values(step: float, length: float, expected: float) -> None:
    value = sigmoid_rampup(step, length)
    assert isinstance(value, float)
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("step", "length", "expected"),
    [(0, 100, 0.0), (25, 100, 0.25), (100, 100, 1.0), (150, 100, 1.0), (-5, 100, 0.0), (3, 0, 1.0)],
)
def test_linear_rampup_values(step: float, length: float, expected: float) -> None:
    value = linear_rampup(step, length)
    assert isinstance(value, float)
    assert value == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(
    ("step", "length", "expected"),
    [
        (0, 100, 1.0),
        (50, 100, 0.5),
        (100, 100, 0.0),
        (150, 100, 0.0),
        (-5, 100, 1.0),
        (25, 100, 0.5 * (math.cos(math.pi / 4) + 1)),
        (3, 0, 0.0),
    ],
)
def test_cosine_rampdown_values(step: float, length: float, expected: float) -> None:
    value = cosine_rampdown(step, length)
    assert isinstance(value, float)
    assert value == pytest.approx(expected, abs=1e-15)


def test_numpy_scalar_steps_are_numbers() -> None:
    assert sigmoid_rampup(np.int64(50), 100) == pytest.approx(math.exp(-1.25))
    assert linear_rampup(np.float32(25.0), 100) == pytest.approx(0.25)


@PROPERTY
@given(step=st.floats(0, 400), length=st.floats(0, 300))
def test_ramps_match_ssl4mis_on_its_domain(step: float, length: float) -> None:
    assert sigmoid_rampup(step, length) == pytest.approx(ssl4mis_sigmoid_rampup(step, length))
    assert linear_rampup(step, length) == pytest.approx(ssl4mis_linear_rampup(step, length))
    if length > 0 and step <= length:
        assert cosine_rampdown(step, length) == pytest.approx(
            ssl4mis_cosine_rampdown(step, length), abs=1e-12
        )


@PROPERTY
@given(a=st.floats(-50, 300), b=st.floats(-50, 300), length=st.floats(0, 200))
def test_ramps_are_monotone_and_bounded(a: float, b: float, length: float) -> None:
    lo, hi = min(a, b), max(a, b)
    assert math.exp(-5.0) - 1e-15 <= sigmoid_rampup(lo, length) <= sigmoid_rampup(hi, length) <= 1
    assert 0.0 <= linear_rampup(lo, length) <= linear_rampup(hi, length) <= 1.0
    assert 1.0 >= cosine_rampdown(lo, length) >= cosine_rampdown(hi, length) >= 0.0


# --------------------------------------------------------------------------------------------
# schedule constructors


def test_constant_schedule() -> None:
    schedule = constant_schedule(0.3)
    assert schedule(0) == 0.3 and schedule(10**6) == 0.3
    value = schedule(torch.tensor(5))
    assert (
        isinstance(value, torch.Tensor) and value.shape == () and value.item() == pytest.approx(0.3)
    )


def test_linear_schedule() -> None:
    schedule = linear_schedule(1.0, 3.0, transition_steps=10)
    assert [schedule(s) for s in (-1, 0, 5, 10, 20)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    # T = 0: already at the end value (linear_rampup(., 0) == 1), unlike optax.
    assert linear_schedule(1.0, 3.0, 0)(0) == 3.0


def test_cosine_schedule() -> None:
    schedule = cosine_schedule(1.0, 0.2, decay_steps=100)
    assert schedule(0) == pytest.approx(1.0)
    assert schedule(50) == pytest.approx(0.6)
    assert schedule(100) == pytest.approx(0.2)
    assert schedule(500) == pytest.approx(0.2)
    assert cosine_schedule(1.0, 0.2, 0)(0) == pytest.approx(0.2)
    # optax.cosine_decay_schedule(init_value=1, decay_steps=100, alpha=0.2) at step 30
    expected = (1 - 0.2) * 0.5 * (1 + math.cos(math.pi * 0.3)) + 0.2
    assert schedule(30) == pytest.approx(expected)


def test_rampup_schedule_kinds() -> None:
    assert rampup_schedule(0.1, 200)(100) == pytest.approx(0.1 * math.exp(-1.25))
    assert rampup_schedule(0.1, 200)(0) == pytest.approx(0.1 * math.exp(-5.0))
    assert rampup_schedule(0.1, 200)(400) == pytest.approx(0.1)
    assert rampup_schedule(2.0, 200, kind="linear")(50) == pytest.approx(0.5)
    assert rampup_schedule(2.0, 0, kind="linear")(0) == 2.0


@pytest.mark.parametrize(
    ("kwargs", "scale"),
    [
        ({"base": "ln2"}, LN2),
        ({"base": "lnC", "num_classes": 4}, math.log(4)),
        ({"base": "normalized"}, 1.0),
        ({}, 1.0),
        ({"base": 0.25}, 0.25),
        ({"base": 2}, 2.0),
        ({"base": "ln2", "num_classes": 2}, LN2),  # num_classes checked, unused
    ],
)
def test_uamt_threshold_schedule(kwargs: dict, scale: float) -> None:
    threshold = uamt_threshold_schedule(6000, **kwargs)
    assert threshold(0) == pytest.approx((0.75 + 0.25 * math.exp(-5.0)) * scale, rel=1e-12)
    assert threshold(3000) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * scale, rel=1e-12)
    assert threshold(6000) == pytest.approx(scale, rel=1e-12)
    assert threshold(10**5) == pytest.approx(scale, rel=1e-12)


def test_uamt_threshold_ln2_matches_uamt_code() -> None:
    # UA-MT: threshold = (0.75 + 0.25 * ramps.sigmoid_rampup(iter_num, max_iterations)) * np.log(2)
    threshold = uamt_threshold_schedule(6000, base="ln2")
    for it in (0, 1, 999, 4321, 6000, 7000):
        reference = (0.75 + 0.25 * ssl4mis_sigmoid_rampup(it, 6000)) * np.log(2)
        assert threshold(it) == pytest.approx(reference, rel=1e-12)


def test_ratio_schedule_constant_and_scheduled() -> None:
    top = ratio_schedule(0.2)
    assert isinstance(top, RatioSchedule) and top.per_sample is True
    assert top(0) == 0.2 and top(1000) == 0.2
    value = top(torch.tensor(3))
    assert isinstance(value, torch.Tensor) and value.item() == pytest.approx(0.2)
    assert ratio_schedule(1).ratio == 1.0 and isinstance(ratio_schedule(1).ratio, float)

    scheduled = ratio_schedule(linear_schedule(0.5, 0.1, 100), per_sample=False)
    assert scheduled.per_sample is False
    assert scheduled(50) == pytest.approx(0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        top.per_sample = False  # type: ignore[misc]
    assert repr(top) == "RatioSchedule(ratio=0.2, per_sample=True)"


def test_as_schedule() -> None:
    assert as_schedule(0.5)(10) == 0.5
    assert as_schedule(np.float32(0.5))(10) == 0.5
    ramp = rampup_schedule(1.0, 10)
    assert as_schedule(ramp) is ramp
    top = ratio_schedule(0.3)
    assert as_schedule(top) is top


# --------------------------------------------------------------------------------------------
# tensor steps


SCHEDULES = {
    "sigmoid_rampup": lambda s: sigmoid_rampup(s, 100),
    "sigmoid_rampup_0": lambda s: sigmoid_rampup(s, 0),
    "linear_rampup": lambda s: linear_rampup(s, 100),
    "cosine_rampdown": lambda s: cosine_rampdown(s, 100),
    "cosine_rampdown_0": lambda s: cosine_rampdown(s, 0),
    "constant": constant_schedule(0.7),
    "linear": linear_schedule(0.2, 0.9, 80),
    "cosine": cosine_schedule(1.0, 0.1, 80),
    "rampup_sigmoid": rampup_schedule(0.1, 60),
    "rampup_linear": rampup_schedule(0.1, 60, kind="linear"),
    "uamt_ln2": uamt_threshold_schedule(120, base="ln2"),
    "uamt_lnC": uamt_threshold_schedule(120, base="lnC", num_classes=4),
    "ratio": ratio_schedule(0.4),
    "ratio_scheduled": ratio_schedule(linear_schedule(0.5, 0.1, 30)),
}
STEPS = [-3, 0, 1, 17, 50, 99, 100, 150]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_tensor_step_matches_python_step(name: str) -> None:
    schedule = SCHEDULES[name]
    expected = [schedule(s) for s in STEPS]
    assert all(isinstance(v, float) for v in expected)

    # float64 step: same values to rounding, same shape, dtype kept.
    steps64 = torch.tensor(STEPS, dtype=torch.float64)
    out64 = schedule(steps64)
    assert isinstance(out64, torch.Tensor)
    assert out64.dtype == torch.float64 and out64.shape == steps64.shape
    torch.testing.assert_close(out64, torch.tensor(expected, dtype=torch.float64))

    # integer step counter: promoted to the default float dtype.
    out_long = schedule(torch.tensor(STEPS))
    assert out_long.dtype == torch.get_default_dtype()
    torch.testing.assert_close(out_long, torch.tensor(expected, dtype=out_long.dtype))

    # 0-d step gives a 0-d result.
    assert schedule(torch.tensor(17.0)).shape == ()


def test_tensor_step_follows_device() -> None:
    step = torch.tensor(5.0, device="meta")
    for schedule in SCHEDULES.values():
        assert schedule(step).device.type == "meta"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, from dynamo
def test_compiled_schedules_match_eager() -> None:
    weight = rampup_schedule(0.1, 40)
    threshold = uamt_threshold_schedule(100, base="ln2")
    decay = cosine_schedule(1.0, 0.0, 60)

    def combine(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return x * weight(step) + threshold(step) - decay(step) + linear_rampup(step, 30)

    # aot_eager traces the whole graph (fullgraph: no breaks, no host syncs, no data-dependent
    # branches) without inductor's cold C++ compile, which takes 12-17 s on the CI machine.
    compiled = torch.compile(combine, fullgraph=True, backend="aot_eager")
    x = torch.linspace(-1.0, 1.0, 5)
    for step in (0.0, 13.0, 45.0, 200.0):
        s = torch.tensor(step)
        torch.testing.assert_close(compiled(x, s), combine(x, s))


# --------------------------------------------------------------------------------------------
# configuration errors: raised at construction, naming the argument and the value


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (
            lambda: sigmoid_rampup(0, -1),
            ValueError,
            r"`length` must be a finite number >= 0, got -1",
        ),
        (lambda: linear_rampup(0, -2.5), ValueError, r"`length` .* got -2\.5"),
        (lambda: cosine_rampdown(0, float("inf")), ValueError, r"`length` .* got inf"),
        (lambda: sigmoid_rampup(0, "10"), TypeError, r"`length` must be a number, got str"),
        (lambda: sigmoid_rampup("10", 10), TypeError, r"`step` must be a number or a torch.* str"),
        (lambda: linear_rampup(None, 10), TypeError, r"`step` must be a number .* NoneType"),
        (lambda: constant_schedule(float("nan")), ValueError, r"`value` must be a finite .* nan"),
        (lambda: constant_schedule(True), TypeError, r"`value` must be a number, got bool"),
        (lambda: linear_schedule(0, 1, -10), ValueError, r"`transition_steps` .* got -10"),
        (lambda: linear_schedule(None, 1, 10), TypeError, r"`init_value` must be a number"),
        (lambda: linear_schedule(0, float("inf"), 10), ValueError, r"`end_value` .* got inf"),
        (lambda: cosine_schedule(1, 0, -1), ValueError, r"`decay_steps` .* got -1"),
        (lambda: rampup_schedule(0.1, -5), ValueError, r"`length` .* got -5"),
        (lambda: rampup_schedule(float("nan"), 5), ValueError, r"`peak` .* got nan"),
        (
            lambda: rampup_schedule(0.1, 5, kind="cosine"),
            ValueError,
            r"`kind` must be one of \('sigmoid', 'linear'\), got 'cosine'",
        ),
        (lambda: uamt_threshold_schedule(-1), ValueError, r"`total_steps` .* got -1"),
        (
            lambda: uamt_threshold_schedule(100, base="lnc"),
            ValueError,
            r"`base` must be one of \('normalized', 'ln2', 'lnC'\), got 'lnc'",
        ),
        (lambda: uamt_threshold_schedule(100, base=0.0), ValueError, r"`base` .* > 0, got 0\.0"),
        (lambda: uamt_threshold_schedule(100, base=-1), ValueError, r"`base` .* got -1"),
        (
            lambda: uamt_threshold_schedule(100, base=[2]),
            TypeError,
            r"`base` must be one of .* list",
        ),
        (
            lambda: uamt_threshold_schedule(100, base="lnC"),
            ValueError,
            r"`base='lnC'` needs `num_classes`.*got None",
        ),
        (
            lambda: uamt_threshold_schedule(100, base="lnC", num_classes=1),
            ValueError,
            r"`num_classes` must be >= 2 .* got 1",
        ),
        (
            lambda: uamt_threshold_schedule(100, base="ln2", num_classes=0),
            ValueError,
            r"`num_classes` must be an int >= 1, got 0",
        ),
        (
            lambda: uamt_threshold_schedule(100, base="lnC", num_classes=2.5),
            TypeError,
            r"`num_classes` must be an int, got float",
        ),
        (lambda: ratio_schedule(1.5), ValueError, r"`ratio` must lie in \[0, 1\], got 1\.5"),
        (lambda: ratio_schedule(-0.1), ValueError, r"`ratio` must lie in \[0, 1\], got -0\.1"),
        (
            lambda: ratio_schedule(float("nan")),
            ValueError,
            r"`ratio` must lie in \[0, 1\], got nan",
        ),
        (lambda: ratio_schedule("0.5"), TypeError, r"`ratio` must be a number in \[0, 1\] or a"),
        (
            lambda: ratio_schedule(0.5, per_sample=1),
            TypeError,
            r"`per_sample` must be a bool, got int",
        ),
        (lambda: RatioSchedule(2.0), ValueError, r"`ratio` must lie in \[0, 1\], got 2\.0"),
        (
            lambda: as_schedule("0.1", name="consistency_weight"),
            TypeError,
            r"`consistency_weight` must be a number or a Schedule .* got str",
        ),
        (lambda: as_schedule(float("inf"), name="peak"), ValueError, r"`peak` .* got inf"),
        (lambda: as_schedule(True), TypeError, r"`value` must be a number or a Schedule"),
    ],
)
def test_configuration_errors(
    build: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        build()


# --------------------------------------------------------------------------------------------
# issue 15, item 4: schedules are values (picklable, comparable, printable), not closures

LIBRARY_SCHEDULES = {
    "constant": constant_schedule(0.25),
    "linear": linear_schedule(1.0, 0.0, 10),
    "cosine": cosine_schedule(1.0, 0.2, 100),
    "rampup sigmoid": rampup_schedule(0.1, 200),
    "rampup linear": rampup_schedule(0.1, 200, kind="linear"),
    "uamt": uamt_threshold_schedule(6000, base="ln2"),
    "as_schedule": as_schedule(np.float32(0.5)),
    "ratio": ratio_schedule(linear_schedule(0.5, 0.1, 1000), per_sample=False),
    "relative": relative_threshold(linear_schedule(1.0, 2.0, 10)),
    "relative batch": relative_threshold(1.5, per_sample=False),
}


@pytest.mark.parametrize("name", LIBRARY_SCHEDULES)
def test_schedules_pickle_compare_and_print(name: str) -> None:
    import pickle

    schedule = LIBRARY_SCHEDULES[name]
    copy = pickle.loads(pickle.dumps(schedule))
    assert copy == schedule
    for step in (0, 3, 57.5, 250, 10_000):
        assert copy(step) == schedule(step)
        torch.testing.assert_close(
            copy(torch.tensor(float(step))), schedule(torch.tensor(float(step)))
        )
    # the repr is the call that builds an equal schedule
    rebuilt = eval(repr(schedule), {  # our own repr, names given explicitly
        "constant_schedule": constant_schedule, "linear_schedule": linear_schedule,
        "cosine_schedule": cosine_schedule, "rampup_schedule": rampup_schedule,
        "uamt_threshold_schedule": uamt_threshold_schedule, "RatioSchedule": RatioSchedule,
        "RelativeThreshold": RelativeThreshold,
    })  # fmt: skip
    assert rebuilt == schedule, repr(schedule)


def test_cpu_tensor_and_numpy_configuration_values() -> None:
    assert linear_schedule(np.float32(1.0), torch.tensor(0.0), np.int64(10))(5) == 0.5
    assert RatioSchedule(torch.tensor(0.25)).ratio == 0.25
    assert uamt_threshold_schedule(np.int64(10), base=np.float64(2.0))(10) == 2.0


def test_relative_threshold_configuration() -> None:
    assert relative_threshold()(7) == 1.0
    assert RelativeThreshold(np.float32(2))(torch.tensor(3.0)).item() == 2.0
    with pytest.raises(ValueError, match="`factor` must be a finite number >= 0, got -1"):
        relative_threshold(-1)
    with pytest.raises(TypeError, match="`factor` must be a number >= 0 or a Schedule, got str"):
        relative_threshold("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`per_sample` must be a bool, got int"):
        relative_threshold(per_sample=1)  # type: ignore[arg-type]
