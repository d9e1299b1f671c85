"""Tests for the ``nn.Module`` wrappers :class:`RegionCEDiceLoss` and :class:`BidirectionalLoss`.

A module is its function: same value and gradients for the same options; options are checked
at construction; class weights are a buffer (``state_dict``, ``.to``); ``forward`` mutates
nothing; ``repr`` shows the options; modules survive ``pickle`` and ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
import math
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from bual_losses import (
    BidirectionalLoss,
    RegionCEDiceLoss,
    bidirectional_loss,
    cosine_schedule,
    linear_schedule,
    rampup_schedule,
    ratio_schedule,
    region_ce_dice_loss,
)

# every test here runs on both fused engines (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("fused_engine")

F64 = torch.float64
IMPLS = ("reference", "fused")
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def region_inputs(
    classes: int = 3, spatial: tuple[int, ...] = (4, 5), batch: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = torch.randn(batch, classes, *spatial, generator=gen(seed), dtype=F64)
    labels = torch.randint(max(classes, 2), (batch, *spatial), generator=gen(seed + 1))
    weight = torch.rand(batch, *spatial, generator=gen(seed + 2), dtype=F64)
    return logits, labels, weight


def bidirectional_inputs(
    classes: int = 3, spatial: tuple[int, ...] = (4, 5), seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    zl = torch.randn(2, classes, *spatial, generator=gen(seed), dtype=F64)
    y = torch.randint(max(classes, 2), (2, *spatial), generator=gen(seed + 1))
    zu = torch.randn(3, classes, *spatial, generator=gen(seed + 2), dtype=F64)
    zt = torch.randn(3, classes, *spatial, generator=gen(seed + 3), dtype=F64)
    return zl, y, zu, zt


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# RegionCEDiceLoss == region_ce_dice_loss

REGION_OPTIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "reference": {"impl": "reference"},
    "class_weight": {"class_weight": [0.5, 1.0, 2.0]},
    "class_weight_tensor": {"class_weight": torch.tensor([0.5, 1.0, 2.0])},
    "no_background_squared": {"include_background": False, "squared_pred": True},
    "batch_smoothing": {"batch": True, "smooth_nr": 0.0, "smooth_dr": 1e-3},
    "lambdas": {"lambda_ce": 0.25, "lambda_dice": 2.0, "eps": 1e-6},
    "reduction_sum": {"reduction": "sum"},
    "reduction_none": {"reduction": "none"},
    "ignore_index": {"ignore_index": 255},
    "no_validate": {"validate": False, "impl": "fused"},
    "everything": {
        "class_weight": [1.0, 3.0, 0.5],
        "include_background": False,
        "squared_pred": True,
        "batch": True,
        "lambda_ce": 0.7,
        "impl": "reference",
    },
}


@pytest.mark.parametrize("case", REGION_OPTIONS)
@pytest.mark.parametrize("weighted", [True, False])
def test_region_module_equals_function(case: str, weighted: bool) -> None:
    options = REGION_OPTIONS[case]
    logits, labels, weight = region_inputs(seed=3)
    if "ignore_index" in options:
        labels = labels.clone()
        labels[:, 0] = 255
    region = weight if weighted else None
    module = RegionCEDiceLoss(**options)
    z_module = logits.clone().requires_grad_()
    z_function = logits.clone().requires_grad_()
    got = module(z_module, labels, region)
    expected = region_ce_dice_loss(z_function, labels, region, **options)
    torch.testing.assert_close(got, expected, **TIGHT)
    got.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(z_module.grad, z_function.grad, **TIGHT)


@pytest.mark.parametrize("classes,spatial", [(1, (3, 4)), (2, (2, 3, 4)), (4, (5,))])
def test_region_module_binary_and_other_ranks(classes: int, spatial: tuple[int, ...]) -> None:
    logits, labels, weight = region_inputs(classes, spatial, seed=4)
    cw = [1.0, 2.0, 0.5, 1.5][: max(classes, 2)]
    module = RegionCEDiceLoss(class_weight=cw, squared_pred=True)
    expected = region_ce_dice_loss(logits, labels, weight, class_weight=cw, squared_pred=True)
    torch.testing.assert_close(module(logits, labels, weight), expected, **TIGHT)


def test_region_module_forward_takes_region_weight_positionally_and_by_default() -> None:
    logits, labels, weight = region_inputs(seed=5)
    module = RegionCEDiceLoss()
    torch.testing.assert_close(module(logits, labels), region_ce_dice_loss(logits, labels))
    torch.testing.assert_close(
        module(logits, labels, region_weight=weight), region_ce_dice_loss(logits, labels, weight)
    )


# --------------------------------------------------------------------------------------------
# BidirectionalLoss == bidirectional_loss

BIDIRECTIONAL_OPTIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "reference": {"impl": "reference", "total_steps": 100},
    "fused_soft": {"impl": "fused", "temperature": 0.1, "alpha": 2.0, "beta": 0.2},
    "thresholds": {"high_threshold": 0.6, "low_threshold": torch.tensor(0.8)},
    "ratios": {
        "high_threshold": ratio_schedule(0.3),
        "low_threshold": ratio_schedule(0.5, per_sample=False),
    },
    "schedules": {
        "total_steps": 50,
        "high_threshold": linear_schedule(0.9, 0.6, 50),
        "consistency_weight": linear_schedule(0.0, 1.0, 50),
    },
    "consistency_float": {"consistency_weight": 0.5},
    "loss_options": {
        "include_background": False,
        "squared_pred": True,
        "batch": True,
        "smooth_nr": 0.0,
        "smooth_dr": 1e-4,
        "lambda_ce": 0.5,
        "lambda_dice": 1.5,
        "eps": 1e-7,
        "validate": False,
    },
    "class_weight": {"class_weight": [0.5, 1.0, 2.0], "impl": "reference"},
    "class_weight_fused": {"class_weight": [0.5, 1.0, 2.0], "impl": "fused"},
    "ignore_index": {"ignore_index": 255},
}


@pytest.mark.parametrize("case", BIDIRECTIONAL_OPTIONS)
def test_bidirectional_module_equals_function(case: str) -> None:
    options = BIDIRECTIONAL_OPTIONS[case]
    zl, y, zu, zt = bidirectional_inputs(seed=6)
    if "ignore_index" in options:
        y = y.clone()
        y[0, 1] = 255
    module = BidirectionalLoss(**options)
    results = []
    for use_module in (True, False):
        a, b = zl.clone().requires_grad_(), zu.clone().requires_grad_()
        step = torch.tensor(20)
        if use_module:
            loss, parts = module(a, y, b, zt, step=step, return_parts=True)
        else:
            loss, parts = bidirectional_loss(a, y, b, zt, step=step, return_parts=True, **options)
        results.append((loss, parts, torch.autograd.grad(loss, (a, b))))
    (got, got_parts, got_grads), (want, want_parts, want_grads) = results
    torch.testing.assert_close(got, want, **TIGHT)
    for name in got_parts._fields:
        torch.testing.assert_close(getattr(got_parts, name), getattr(want_parts, name), **TIGHT)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **TIGHT)


def test_bidirectional_module_forwards_per_call_arguments() -> None:
    zl, y, zu, zt = bidirectional_inputs(seed=7)
    extra = {
        "teacher_labeled_logits": torch.randn(zl.shape, generator=gen(70), dtype=F64),
        "unlabeled_uncertainty": torch.rand(3, 1, 4, 5, generator=gen(71), dtype=F64),
    }
    module = BidirectionalLoss(total_steps=10, high_threshold=0.5)
    got = module(zl, y, zu, zt, step=3, **extra)
    want = bidirectional_loss(zl, y, zu, zt, step=3, total_steps=10, high_threshold=0.5, **extra)
    torch.testing.assert_close(got, want, **TIGHT)
    labeled = torch.rand(2, 4, 5, generator=gen(72), dtype=F64)
    got = module(zl, y, zu, zt, step=3, labeled_uncertainty=labeled)
    want = bidirectional_loss(
        zl, y, zu, zt, step=3, total_steps=10, high_threshold=0.5, labeled_uncertainty=labeled
    )
    torch.testing.assert_close(got, want, **TIGHT)
    # no unlabeled images in this batch
    got = module(zl, y, None, None, step=3)
    want = bidirectional_loss(zl, y, None, None, step=3, total_steps=10, high_threshold=0.5)
    torch.testing.assert_close(got, want, **TIGHT)


def test_bidirectional_module_step_is_keyword_only() -> None:
    zl, y, zu, zt = bidirectional_inputs()
    with pytest.raises(TypeError):
        BidirectionalLoss()(zl, y, zu, zt, 3)  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# class weights are a buffer


@pytest.mark.parametrize("cls", [RegionCEDiceLoss, BidirectionalLoss])
def test_class_weight_is_a_buffer(cls: type[nn.Module]) -> None:
    module = cls(class_weight=[0.5, 1.0, 2.0])
    state = module.state_dict()
    assert list(state) == ["class_weight"]
    assert "class_weight" in dict(module.named_buffers())
    assert list(module.parameters()) == []
    assert state["class_weight"].dtype == torch.float32
    torch.testing.assert_close(state["class_weight"], torch.tensor([0.5, 1.0, 2.0]))
    assert module.to(F64) is module
    assert module.class_weight is not None and module.class_weight.dtype == F64
    assert module.to("meta").class_weight.device.type == "meta"  # follows the device


@pytest.mark.parametrize("cls", [RegionCEDiceLoss, BidirectionalLoss])
def test_no_class_weight_means_no_state(cls: type[nn.Module]) -> None:
    module = cls()
    assert module.class_weight is None
    assert module.state_dict() == {}


def test_class_weight_buffer_loads_from_state_dict() -> None:
    source = RegionCEDiceLoss(class_weight=[1.0, 2.0, 3.0])
    target = RegionCEDiceLoss(class_weight=[0.0, 0.0, 0.0])
    target.load_state_dict(source.state_dict())
    logits, labels, weight = region_inputs(seed=8)
    torch.testing.assert_close(target(logits, labels, weight), source(logits, labels, weight))


def test_float64_module_equals_float32_class_weight_function() -> None:
    """After ``.to(float64)`` the module still equals the function fed the float32 weights."""
    cw32 = torch.tensor([0.1, 0.3, 0.7])
    module = RegionCEDiceLoss(class_weight=[0.1, 0.3, 0.7]).to(F64)
    logits, labels, weight = region_inputs(seed=9)
    expected = region_ce_dice_loss(logits, labels, weight, class_weight=cw32.double())
    torch.testing.assert_close(module(logits, labels, weight), expected, **TIGHT)


# --------------------------------------------------------------------------------------------
# bad options fail at construction

BAD_REGION: dict[str, tuple[type[Exception], str, dict[str, Any]]] = {
    "negative_smooth_nr": (
        ValueError,
        "`smooth_nr` must be a finite number >= 0, got -1",
        {"smooth_nr": -1.0},
    ),
    "negative_smooth_dr": (ValueError, "`smooth_dr` must be a finite", {"smooth_dr": -1e-5}),
    "eps_zero": (ValueError, "`eps` must be a finite number > 0", {"eps": 0.0}),
    "unknown": (TypeError, r"RegionCEDiceLoss got unknown options \['gamma'\]", {"gamma": 2.0}),
    "step_is_no_option": (TypeError, r"unknown options \['step'\]", {"step": 1}),
    "impl": (ValueError, r"`impl` must be one of \('auto', 'fused', 'reference'\)", {"impl": "x"}),
    "reduction": (ValueError, "`reduction` must be one of", {"reduction": "avg"}),
    "none_with_batch": (
        ValueError,
        "`reduction='none'` gives one loss per sample and needs `batch=False`",
        {"reduction": "none", "batch": True},
    ),
    "negative_lambda": (ValueError, "`lambda_ce` must be a finite", {"lambda_ce": -1.0}),
    "negative_class_weight": (
        ValueError,
        r"`class_weight` must be a 1-D sequence of finite weights >= 0, got \[1.0, -1.0, 1.0\]",
        {"class_weight": [1.0, -1.0, 1.0]},
    ),
    "nan_class_weight": (
        ValueError,
        "`class_weight` must be a 1-D sequence of finite weights",
        {"class_weight": [1.0, math.nan]},
    ),
    "class_weight_2d": (
        ValueError,
        "`class_weight` must be a 1-D sequence",
        {"class_weight": [[1.0, 2.0]]},
    ),
}

BAD_BIDIRECTIONAL: dict[str, tuple[type[Exception], str, dict[str, Any]]] = {
    "negative_smooth_nr": (
        ValueError,
        "`smooth_nr` must be a finite number >= 0",
        {"smooth_nr": -1.0},
    ),
    "unknown": (
        TypeError,
        r"bidirectional_loss got unknown options \['gamma'\]",
        {"gamma": 2.0},
    ),
    "region_only_option": (TypeError, r"unknown options \['reduction'\]", {"reduction": "sum"}),
    "impl": (ValueError, "`impl` must be one of", {"impl": "cuda"}),
    "beta_above_one": (ValueError, r"`beta` must lie in \[0, 1\], got 1.5", {"beta": 1.5}),
    "negative_alpha": (ValueError, "`alpha` must be a finite number >= 0", {"alpha": -0.5}),
    "temperature_zero": (
        ValueError,
        "`temperature` must be a finite number > 0",
        {"temperature": 0},
    ),
    "threshold_string": (TypeError, "`high_threshold` must be a number", {"high_threshold": "x"}),
    "negative_total_steps": (ValueError, "`total_steps` must be", {"total_steps": -5}),
    "consistency_string": (
        TypeError,
        "`consistency_weight` must be a number",
        {"consistency_weight": "0.1"},
    ),
    "negative_class_weight": (
        ValueError,
        "`class_weight` must be a 1-D sequence of finite weights >= 0",
        {"class_weight": [1.0, -2.0, 1.0]},
    ),
}


@pytest.mark.parametrize("case", BAD_REGION)
def test_region_module_bad_options_raise_at_construction(case: str) -> None:
    error, message, options = BAD_REGION[case]
    with pytest.raises(error, match=message):
        RegionCEDiceLoss(**options)


@pytest.mark.parametrize("case", BAD_BIDIRECTIONAL)
def test_bidirectional_module_bad_options_raise_at_construction(case: str) -> None:
    error, message, options = BAD_BIDIRECTIONAL[case]
    with pytest.raises(error, match=message):
        BidirectionalLoss(**options)


# --------------------------------------------------------------------------------------------
# forward mutates nothing; repr; pickle; deepcopy


def test_region_forward_does_not_mutate_the_module() -> None:
    options = {"include_background": False, "impl": "reference", "batch": True}
    module = RegionCEDiceLoss(class_weight=[1.0, 2.0, 3.0], **options)
    before, options_before = state_snapshot(module), dict(module.options)
    logits, labels, weight = region_inputs(seed=10)
    module(logits.requires_grad_(), labels, weight).backward()
    assert_same_state(before, state_snapshot(module))
    assert module.options == options_before == options
    assert module.training  # no mode switch either


@pytest.mark.parametrize("impl", IMPLS)
def test_bidirectional_forward_does_not_mutate_the_module(impl: str) -> None:
    options: dict[str, Any] = {
        "impl": impl,
        "total_steps": 100,
        "high_threshold": ratio_schedule(0.2),
        "temperature": 0.1,
    }
    module = BidirectionalLoss(class_weight=[1.0, 2.0, 3.0], **options)
    before, options_before = state_snapshot(module), dict(module.options)
    zl, y, zu, zt = bidirectional_inputs(seed=11)
    for step in (0, torch.tensor(50)):
        loss, _ = module(zl.requires_grad_(), y, zu, zt, step=step, return_parts=True)
        loss.backward()
    assert_same_state(before, state_snapshot(module))
    assert module.options == options_before
    assert module.options.keys() == options.keys()
    assert "step" not in module.options and "return_parts" not in module.options


def test_repr_shows_the_options() -> None:
    region = repr(RegionCEDiceLoss(include_background=False, smooth_nr=0.0, impl="reference"))
    assert region.startswith("RegionCEDiceLoss(")
    for text in ("include_background=False", "smooth_nr=0.0", "impl='reference'"):
        assert text in region
    bidirectional = repr(
        BidirectionalLoss(total_steps=1000, alpha=2.0, beta=0.1, high_threshold=0.7)
    )
    assert bidirectional.startswith("BidirectionalLoss(")
    for text in ("total_steps=1000", "alpha=2.0", "beta=0.1", "high_threshold=0.7"):
        assert text in bidirectional
    assert "RatioSchedule(ratio=0.3, per_sample=False)" in repr(
        BidirectionalLoss(low_threshold=ratio_schedule(0.3, per_sample=False))
    )
    assert repr(RegionCEDiceLoss()) == "RegionCEDiceLoss()"


PICKLABLE: dict[str, Any] = {
    "region": lambda: RegionCEDiceLoss(class_weight=[1.0, 2.0, 3.0], squared_pred=True),
    "region_plain": lambda: RegionCEDiceLoss(),
    "bidirectional": lambda: BidirectionalLoss(
        class_weight=[1.0, 2.0, 3.0], total_steps=100, alpha=2.0, temperature=0.1
    ),
    "bidirectional_ratio": lambda: BidirectionalLoss(
        high_threshold=ratio_schedule(0.25), low_threshold=torch.tensor(0.8), impl="reference"
    ),
    # library schedules are values, not closures (issue 15): a module holding them pickles
    "bidirectional_schedules": lambda: BidirectionalLoss(
        total_steps=100,
        high_threshold=linear_schedule(0.9, 0.6, 100),
        low_threshold=ratio_schedule(cosine_schedule(0.3, 0.1, 100)),
        consistency_weight=rampup_schedule(0.5, 100),
        class_weight=[1.0, 2.0, 3.0],
    ),
}


def _evaluate(module: nn.Module) -> torch.Tensor:
    if isinstance(module, RegionCEDiceLoss):
        logits, labels, weight = region_inputs(seed=12)
        return module(logits, labels, weight)
    zl, y, zu, zt = bidirectional_inputs(seed=12)
    return module(zl, y, zu, zt, step=30)


@pytest.mark.parametrize("case", PICKLABLE)
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_modules_survive_pickle_and_deepcopy(case: str, how: str) -> None:
    module = PICKLABLE[case]()
    clone = pickle.loads(pickle.dumps(module)) if how == "pickle" else copy.deepcopy(module)
    assert type(clone) is type(module)
    assert repr(clone) == repr(module)
    assert_same_state(state_snapshot(module), state_snapshot(clone))
    if module.class_weight is not None:
        assert clone.class_weight is not None
        assert clone.class_weight.data_ptr() != module.class_weight.data_ptr()
    torch.testing.assert_close(_evaluate(clone), _evaluate(module), rtol=0, atol=0)


def test_modules_compose_with_nn_containers() -> None:
    """Loss modules sit in a ModuleDict and move with it."""
    losses = nn.ModuleDict(
        {"region": RegionCEDiceLoss(class_weight=[1.0, 2.0, 3.0]), "bual": BidirectionalLoss()}
    )
    losses.to(F64)
    assert losses["region"].class_weight.dtype == F64
    assert set(losses.state_dict()) == {"region.class_weight"}


# --------------------------------------------------------------------------------------------
# known bugs (strict xfails: they fail loudly once fixed)


@pytest.mark.parametrize("cls", ["region", "bidirectional"])
def test_float64_class_weight_keeps_its_precision(cls: str) -> None:
    cw = torch.tensor([0.1, 0.3, 0.7], dtype=F64)
    if cls == "region":
        logits, labels, weight = region_inputs(seed=13)
        got = RegionCEDiceLoss(class_weight=cw).to(F64)(logits, labels, weight)
        expected = region_ce_dice_loss(logits, labels, weight, class_weight=cw)
    else:
        zl, y, zu, zt = bidirectional_inputs(seed=13)
        got = BidirectionalLoss(class_weight=cw).to(F64)(zl, y, zu, zt, step=5)
        expected = bidirectional_loss(zl, y, zu, zt, step=5, class_weight=cw)
    torch.testing.assert_close(got, expected, **TIGHT)
