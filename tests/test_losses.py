"""Tests for the reference region losses (``bual_losses.losses`` with ``impl="reference"``).

Read in this order to learn what the losses mean:

1. hand-computed tiny cases: the numbers, with the arithmetic in comments;
2. equivalence: with region weight 1 the losses *are* MONAI's ``DiceCELoss`` / ``DiceLoss`` and
   SSL4MIS's ``DiceLoss`` (an independent implementation written here from its definition);
3. properties (hypothesis): what a region weight means (permutations, slicing, scaling, empty
   regions, reductions);
4. the Dice empty-denominator policy, ``ignore_index``, half precision, gradcheck,
   ``torch.compile``;
5. validation: every bad input fails with a message that names the argument.

Every call says ``impl="reference"``; fused == reference is the subject of another file. Only
gradcheck and half precision run both implementations.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bual_losses._core import parse_options
from bual_losses._reference import reference_stats
from bual_losses.engines import use_engine
from bual_losses.losses import (
    SSL4MIS_DICE,
    RegionStats,
    region_ce_dice_loss,
    region_ce_loss,
    region_dice_loss,
)
from tests.strategies import region_problems

# every test here runs on both fused engines (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("fused_engine")

monai_losses = pytest.importorskip("monai.losses")

REF = "reference"
IMPLS = ("reference", "fused")
F64 = torch.float64
LN2 = math.log(2.0)
PROPERTY = settings(max_examples=40, deadline=None)

LossFn = Callable[..., torch.Tensor]
LOSSES: dict[str, LossFn] = {
    "ce": region_ce_loss,
    "dice": region_dice_loss,
    "ce_dice": region_ce_dice_loss,
}


# --------------------------------------------------------------------------------------------
# helpers


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype) * scale


def randint(high: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(high, shape, generator=torch.Generator().manual_seed(seed))


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, *S)`` labels -> ``(B, C, *S)`` float64 one-hot target."""
    return F.one_hot(labels, num_classes).movedim(-1, 1).to(F64)


def close(actual: torch.Tensor, expected: Any, *, rtol: float = 1e-6, atol: float = 1e-10) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def option_id(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def permute_voxels(x: torch.Tensor, perm: torch.Tensor, first_spatial: int) -> torch.Tensor:
    """Apply one permutation to the flattened spatial dims (from ``first_spatial`` on)."""
    flat = x.flatten(first_spatial)
    return flat[..., perm].reshape(x.shape)


def voxel_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Independent per-voxel CE ``(B, *S)``: PyTorch's CE, or BCE-with-logits for ``C == 1``."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(
            logits[:, 0], labels.to(logits.dtype), reduction="none"
        )
    return F.cross_entropy(logits, labels, reduction="none")


# --------------------------------------------------------------------------------------------
# 1. hand-computed tiny cases
#
# One sample, two classes, a 2x2 image with labels
#     0 1
#     1 1
# (class 0 on one voxel, class 1 on three).

LABELS_2X2 = torch.tensor([[[0, 1], [1, 1]]])


def test_zero_logits_ce_is_ln2() -> None:
    # Zero logits: p = 1/2 for both classes everywhere, every voxel costs -ln(1/2) = ln 2.
    logits = torch.zeros(1, 2, 2, 2, dtype=F64)
    close(region_ce_loss(logits, LABELS_2X2, impl=REF), LN2)
    # "sum" is the CE summed over voxels: 4 ln 2.
    close(region_ce_loss(logits, LABELS_2X2, reduction="sum", impl=REF), 4 * LN2)


def test_zero_logits_dice_by_hand() -> None:
    logits = torch.zeros(1, 2, 2, 2, dtype=F64)
    # p = 1/2 everywhere. Sums per class (I = sum p g, P = sum p, G = sum g), no smoothing:
    #   class 0: I = 1 * 1/2 = 1/2, P = 4 * 1/2 = 2, G = 1  ->  1 - 2(1/2) / (2 + 1) = 2/3
    #   class 1: I = 3 * 1/2 = 3/2, P = 2,           G = 3  ->  1 - 2(3/2) / (2 + 3) = 2/5
    plain = {"smooth_nr": 0.0, "smooth_dr": 0.0, "impl": REF}
    terms = region_dice_loss(logits, LABELS_2X2, reduction="none", **plain)
    close(terms, [[2 / 3, 2 / 5]])
    # "mean" averages over (sample, class): (2/3 + 2/5) / 2 = 8/15; "sum" adds them: 16/15.
    close(region_dice_loss(logits, LABELS_2X2, **plain), 8 / 15)
    close(region_dice_loss(logits, LABELS_2X2, reduction="sum", **plain), 16 / 15)
    # Squared denominator (k = 2): P = 4 * (1/2)^2 = 1, and G^2 = G for a one-hot target:
    #   class 0: 1 - 1 / (1 + 1) = 1/2;  class 1: 1 - 3 / (1 + 3) = 1/4;  mean 3/8
    close(region_dice_loss(logits, LABELS_2X2, squared_pred=True, **plain), 3 / 8)
    # Without the background class only class 1 is left: 2/5.
    close(region_dice_loss(logits, LABELS_2X2, include_background=False, **plain), 2 / 5)
    # The default smoothing 1e-5 enters numerator and denominator:
    s = 1e-5
    expected = (1 - (1 + s) / (3 + s) + 1 - (3 + s) / (5 + s)) / 2
    close(region_dice_loss(logits, LABELS_2X2, impl=REF), expected, rtol=1e-12)
    # CE + Dice adds the two means (lambda_ce = lambda_dice = 1 by default). The CE normaliser
    # carries eps = 1e-8: 4 ln 2 / (4 + 1e-8).
    ce = 4 * LN2 / (4 + 1e-8)
    close(region_ce_dice_loss(logits, LABELS_2X2, impl=REF), ce + expected, rtol=1e-12)


def test_batch_dice_by_hand() -> None:
    # Sample 2: zero logits, all labels 0.
    logits = torch.zeros(2, 2, 2, 2, dtype=F64)
    labels = torch.cat([LABELS_2X2, torch.zeros_like(LABELS_2X2)])
    plain = {"smooth_nr": 0.0, "smooth_dr": 0.0, "impl": REF}
    # Per sample: sample 1 as above (2/3, 2/5); sample 2:
    #   class 0: I = 4 * 1/2 = 2, P = 2, G = 4  ->  1 - 4/6 = 1/3
    #   class 1: I = 0,           P = 2, G = 0  ->  1 - 0/2 = 1 (predicted but absent)
    close(region_dice_loss(logits, labels, reduction="none", **plain), [[2 / 3, 2 / 5], [1 / 3, 1]])
    close(region_dice_loss(logits, labels, **plain), (2 / 3 + 2 / 5 + 1 / 3 + 1) / 4)
    # batch=True sums I, P, G over the samples first, one Dice per class:
    #   class 0: I = 1/2 + 2 = 5/2, P = 4, G = 5  ->  1 - 5/9 = 4/9
    #   class 1: I = 3/2,           P = 4, G = 3  ->  1 - 3/7 = 4/7
    close(region_dice_loss(logits, labels, batch=True, reduction="none", **plain), [4 / 9, 4 / 7])
    close(region_dice_loss(logits, labels, batch=True, **plain), (4 / 9 + 4 / 7) / 2)


# Logits where voxel (0, 0) predicts class 1 with p = 3/4 (class-1 logit ln 3, class-0 logit 0)
# and every other voxel is undecided (p = 1/2). Per-voxel CE:
#     (0,0): label 0, p_0 = 1/4 -> ln 4      (0,1), (1,0), (1,1): label 1, p_1 = 1/2 -> ln 2
LOGITS_LN3 = torch.zeros(1, 2, 2, 2, dtype=F64)
LOGITS_LN3[0, 1, 0, 0] = math.log(3.0)


def test_region_weight_by_hand() -> None:
    # No weight: (ln 4 + 3 ln 2) / 4 = 5/4 ln 2.
    close(region_ce_loss(LOGITS_LN3, LABELS_2X2, impl=REF), 1.25 * LN2)
    # 0/1 weight keeping the top row only: (ln 4 + ln 2) / 2 = 3/2 ln 2.
    top_row = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]], dtype=F64)
    close(region_ce_loss(LOGITS_LN3, LABELS_2X2, top_row, impl=REF), 1.5 * LN2)
    # Float weights are a weighted mean: (2 ln 4 + 1 ln 2) / (2 + 1) = 5/3 ln 2.
    weighted = torch.tensor([[[2.0, 1.0], [0.0, 0.0]]], dtype=F64)
    close(region_ce_loss(LOGITS_LN3, LABELS_2X2, weighted, impl=REF), 5 / 3 * LN2)
    # Dice on the top row (no smoothing). Voxel (0,0): p = (1/4, 3/4), label 0;
    # voxel (0,1): p = (1/2, 1/2), label 1.
    #   class 0: I = 1/4,        P = 1/4 + 1/2 = 3/4, G = 1  ->  1 - (1/2) / (7/4) = 5/7
    #   class 1: I = 1/2,        P = 3/4 + 1/2 = 5/4, G = 1  ->  1 - 1 / (9/4)    = 5/9
    # The softmax is taken over the full image before weighting: logits are never masked.
    terms = region_dice_loss(
        LOGITS_LN3, LABELS_2X2, top_row, smooth_nr=0, smooth_dr=0, reduction="none", impl=REF
    )
    close(terms, [[5 / 7, 5 / 9]])


def test_class_weight_by_hand() -> None:
    # class_weight (1, 3) scales each voxel's CE by the weight of its label and normalises by
    # the same (PyTorch's CrossEntropyLoss(weight=...)): (1 ln 4 + 3 * 3 ln 2) / (1 + 3 * 3)
    # = 11/10 ln 2.
    cw = (1.0, 3.0)
    close(region_ce_loss(LOGITS_LN3, LABELS_2X2, class_weight=cw, impl=REF), 1.1 * LN2)
    # and multiplies each class's Dice term: zero logits give (2/3, 2/5) -> (2/3, 6/5).
    logits = torch.zeros(1, 2, 2, 2, dtype=F64)
    terms = region_dice_loss(
        logits, LABELS_2X2, class_weight=cw, smooth_nr=0, smooth_dr=0, reduction="none", impl=REF
    )
    close(terms, [[2 / 3, 6 / 5]])


def test_binary_logits_by_hand() -> None:
    # C == 1: sigmoid, treated as the two classes [1 - p, p]. Zero logits: p = 1/2.
    logits = torch.zeros(1, 1, 2, 2, dtype=F64)
    close(region_ce_loss(logits, LABELS_2X2, impl=REF), LN2)
    # Dice on the foreground channel only (as MONAI with C == 1):
    #   I = 3 * 1/2, P = 4 * 1/2 = 2, G = 3  ->  1 - 3 / 5 = 2/5
    terms = region_dice_loss(
        logits, LABELS_2X2, smooth_nr=0, smooth_dr=0, reduction="none", impl=REF
    )
    close(terms, [[2 / 5]])


def test_ignore_index_by_hand() -> None:
    # Voxel (0,0) (label 0, CE ln 4) is ignored: the CE is the mean of the other three, ln 2.
    labels = torch.tensor([[[255, 1], [1, 1]]])
    close(region_ce_loss(LOGITS_LN3, labels, ignore_index=255, impl=REF), LN2)


def test_reference_stats_by_hand() -> None:
    # Stage 1: per-sample sums from which every loss is finished. Binary logits have K = 2
    # channels (background, foreground) in the statistics.
    logits = torch.zeros(1, 1, 2, 2, dtype=F64, requires_grad=True)
    weight = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]], dtype=F64)
    opts = parse_options(
        logits,
        LABELS_2X2,
        weight,
        include_background=True,
        softmax=None,
        sigmoid=None,
        squared_pred=False,
        smooth_nr=0.0,
        smooth_dr=0.0,
        batch=False,
        class_weight=None,
        ignore_index=None,
        eps=1e-8,
        impl=REF,
        validate=True,
    )
    stats = reference_stats(logits, LABELS_2X2, weight, opts)
    assert isinstance(stats, RegionStats)
    # Three weighted voxels, labels 0, 1, 1, p = 1/2 each: CE sum 3 ln 2 over weight 3.
    close(stats.ce_num, [3 * LN2])
    close(stats.ce_den, [3.0])
    close(stats.inter, [[0.5, 1.0]])  # sum w p g per class
    close(stats.pred, [[1.5, 1.5]])  # sum w p
    close(stats.ground, [[1.0, 2.0]])  # sum w g
    # ce_den and ground do not depend on the logits.
    assert stats.ce_num.requires_grad and stats.inter.requires_grad and stats.pred.requires_grad
    assert not stats.ce_den.requires_grad and not stats.ground.requires_grad


# --------------------------------------------------------------------------------------------
# 2a. MONAI equivalence (region weight None or all ones)

B, C = 2, 3
SPATIAL = {"2d": (5, 4), "3d": (3, 4, 2)}
CLASS_WEIGHT = (0.2, 1.0, 3.0)
WEIGHT_FORMS = ("none", "ones")

#: region_ce_dice_loss options checked against monai.losses.DiceCELoss(to_onehot_y=True,
#: softmax=True, <same options>, weight=<class_weight as a tensor>), 2D and 3D, region weight
#: None and all ones, float64, labels (B, 1, *S).
MONAI_DICECE_OPTIONS: list[dict[str, Any]] = [
    {},
    {"include_background": False},
    {"squared_pred": True},
    {"batch": True},
    {"squared_pred": True, "batch": True, "include_background": False},
    {"class_weight": CLASS_WEIGHT},
    {"class_weight": CLASS_WEIGHT, "include_background": False},
    {"class_weight": CLASS_WEIGHT, "squared_pred": True, "batch": True},
    {"smooth_nr": 0.0, "smooth_dr": 1e-6},
    {"smooth_nr": 1.0, "smooth_dr": 1.0, "squared_pred": True},
    {"lambda_ce": 0.3, "lambda_dice": 1.7},
    {"lambda_ce": 0.0},
    {"lambda_dice": 0.0, "class_weight": CLASS_WEIGHT},
    {"reduction": "sum"},
    {"reduction": "sum", "batch": True, "class_weight": CLASS_WEIGHT, "include_background": False},
]

#: region_dice_loss options checked against monai.losses.DiceLoss(to_onehot_y=True,
#: softmax=True, <same options>, weight=<class_weight>); reduction="none" compares our (B, C)
#: (or (C,) with batch=True) with MONAI's (B, C, 1, ...) (or (C, 1, ...)).
MONAI_DICE_OPTIONS: list[dict[str, Any]] = [
    {},
    {"include_background": False},
    {"squared_pred": True},
    {"batch": True},
    {"batch": True, "squared_pred": True, "include_background": False},
    {"class_weight": CLASS_WEIGHT},
    {"class_weight": CLASS_WEIGHT, "include_background": False, "squared_pred": True},
    {"smooth_nr": 0.0, "smooth_dr": 1e-6},
    {"reduction": "sum"},
    {"reduction": "sum", "class_weight": CLASS_WEIGHT, "batch": True},
    {"reduction": "none"},
    {"reduction": "none", "batch": True},
    {"reduction": "none", "class_weight": CLASS_WEIGHT, "include_background": False},
]

#: One-hot float targets (MONAI with to_onehot_y=False). PyTorch's CE with probability targets
#: and class weights divides by the voxel count, ours by the class weights (so that a one-hot
#: target means the same as its labels, see test_one_hot_target_equals_labels): the
#: class-weighted "mean" CE combinations are left out here.
MONAI_ONEHOT_DICECE_OPTIONS = [
    o for o in MONAI_DICECE_OPTIONS if not ("class_weight" in o and o.get("reduction") != "sum")
]

#: Soft (non-one-hot) probability targets: CE against probabilities, Dice with soft targets.
MONAI_SOFT_OPTIONS: list[dict[str, Any]] = [
    {},
    {"squared_pred": True},
    {"batch": True, "include_background": False},
    {"reduction": "sum"},
]

#: Binary C == 1 logits: MONAI DiceCELoss(sigmoid=True) (BCE-with-logits + Dice on the single
#: channel). No class weights: MONAI's weight is BCE's pos_weight there, ours is (bg, fg).
MONAI_BINARY_OPTIONS: list[dict[str, Any]] = [
    {},
    {"squared_pred": True},
    {"batch": True},
    {"include_background": False},  # ignored for one channel, by MONAI and by us
    {"smooth_nr": 0.0, "smooth_dr": 1e-6, "lambda_ce": 0.4},
    {"reduction": "sum", "squared_pred": True},
]

#: Every MONAI combination covered, for quoting: (MONAI class, target, options).
MONAI_COMBINATIONS: list[tuple[str, str, dict[str, Any]]] = (
    [("DiceCELoss", "labels", o) for o in MONAI_DICECE_OPTIONS]
    + [("DiceLoss", "labels", o) for o in MONAI_DICE_OPTIONS]
    + [("DiceCELoss", "one-hot", o) for o in MONAI_ONEHOT_DICECE_OPTIONS]
    + [("DiceLoss", "one-hot", o) for o in MONAI_DICE_OPTIONS]
    + [("DiceCELoss", "soft", o) for o in MONAI_SOFT_OPTIONS]
    + [("DiceCELoss", "binary labels", o) for o in MONAI_BINARY_OPTIONS]
    + [("DiceCELoss", "binary soft", o) for o in MONAI_BINARY_OPTIONS]
)


def monai_kwargs(options: dict[str, Any], *, dice_loss: bool = False) -> dict[str, Any]:
    """Our options as MONAI's: ``class_weight`` becomes the ``weight`` tensor.

    We always take C class weights and drop the first for Dice without background (as MONAI's
    ``DiceCELoss`` does); MONAI's standalone ``DiceLoss`` wants the kept classes' weights only.
    """
    kwargs = dict(options)
    if "class_weight" in kwargs:
        weight = torch.tensor(kwargs.pop("class_weight"), dtype=F64)
        if dice_loss and not kwargs.get("include_background", True):
            weight = weight[1:]
        kwargs["weight"] = weight
    return kwargs


def monai_problem(dims: str, classes: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 logits and labels (B, 1, *S); the second sample lacks the last class, so the
    smoothing of an absent class is compared too."""
    spatial = SPATIAL[dims]
    logits = randn(B, classes, *spatial, seed=1, scale=2.0)
    labels = randint(max(classes, 2), B, 1, *spatial, seed=2)
    labels[1] = labels[1] % max(classes - 1, 1)
    return logits, labels


def region_weight_of(form: str, logits: torch.Tensor) -> Optional[torch.Tensor]:
    if form == "none":
        return None
    return torch.ones(logits.shape[0], *logits.shape[2:], dtype=logits.dtype)


def assert_monai_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # MONAI's squared_pred path computes the intersection as (|p|^2 + |g|^2 - |p - g|^2) / 2,
    # about 1e-8 (relative) away from sum(p g) in float64.
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("weight_form", WEIGHT_FORMS)
@pytest.mark.parametrize("dims", SPATIAL)
@pytest.mark.parametrize("options", MONAI_DICECE_OPTIONS, ids=option_id)
def test_ce_dice_equals_monai_dicece(options: dict[str, Any], dims: str, weight_form: str) -> None:
    logits, labels = monai_problem(dims)
    monai = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True, **monai_kwargs(options))
    weight = region_weight_of(weight_form, logits)
    ours = region_ce_dice_loss(logits, labels, weight, impl=REF, **options)
    assert_monai_close(ours, monai(logits, labels))


@pytest.mark.parametrize("weight_form", WEIGHT_FORMS)
@pytest.mark.parametrize("dims", SPATIAL)
@pytest.mark.parametrize("options", MONAI_DICE_OPTIONS, ids=option_id)
def test_dice_equals_monai_dice(options: dict[str, Any], dims: str, weight_form: str) -> None:
    logits, labels = monai_problem(dims)
    monai = monai_losses.DiceLoss(
        to_onehot_y=True, softmax=True, **monai_kwargs(options, dice_loss=True)
    )
    expected = monai(logits, labels)
    weight = region_weight_of(weight_form, logits)
    ours = region_dice_loss(logits, labels, weight, impl=REF, **options)
    if options.get("reduction") == "none":
        # MONAI keeps broadcastable spatial dims of size 1: (B, C, 1, ...), or (C, 1, ...).
        kept = C - (0 if options.get("include_background", True) else 1)
        assert ours.shape == ((kept,) if options.get("batch") else (B, kept))
        expected = expected.reshape(ours.shape)
    assert_monai_close(ours, expected)


@pytest.mark.parametrize("dims", SPATIAL)
@pytest.mark.parametrize("options", MONAI_ONEHOT_DICECE_OPTIONS, ids=option_id)
def test_ce_dice_one_hot_target_equals_monai(options: dict[str, Any], dims: str) -> None:
    logits, labels = monai_problem(dims)
    target = one_hot(labels[:, 0], C)
    monai = monai_losses.DiceCELoss(to_onehot_y=False, softmax=True, **monai_kwargs(options))
    ours = region_ce_dice_loss(logits, target, impl=REF, **options)
    assert_monai_close(ours, monai(logits, target))


@pytest.mark.parametrize("dims", SPATIAL)
@pytest.mark.parametrize("options", MONAI_DICE_OPTIONS, ids=option_id)
def test_dice_one_hot_target_equals_monai(options: dict[str, Any], dims: str) -> None:
    logits, labels = monai_problem(dims)
    target = one_hot(labels[:, 0], C)
    monai = monai_losses.DiceLoss(softmax=True, **monai_kwargs(options, dice_loss=True))
    expected = monai(logits, target)
    ours = region_dice_loss(logits, target, impl=REF, **options)
    assert_monai_close(ours, expected.reshape(ours.shape))


@pytest.mark.parametrize("dims", SPATIAL)
@pytest.mark.parametrize("options", MONAI_SOFT_OPTIONS, ids=option_id)
def test_ce_dice_soft_target_equals_monai(options: dict[str, Any], dims: str) -> None:
    logits, _ = monai_problem(dims)
    target = torch.softmax(randn(*logits.shape, seed=3), dim=1)  # rows sum to 1
    monai = monai_losses.DiceCELoss(softmax=True, **monai_kwargs(options))
    ours = region_ce_dice_loss(logits, target, impl=REF, **options)
    assert_monai_close(ours, monai(logits, target))


@pytest.mark.parametrize("target_kind", ["labels", "soft"])
@pytest.mark.parametrize("weight_form", WEIGHT_FORMS)
@pytest.mark.parametrize("dims", SPATIAL)
@pytest.mark.parametrize("options", MONAI_BINARY_OPTIONS, ids=option_id)
def test_binary_ce_dice_equals_monai(
    options: dict[str, Any], dims: str, weight_form: str, target_kind: str
) -> None:
    logits, labels = monai_problem(dims, classes=1)
    # labels: integer (B, 1, *S) for us, the same as float for MONAI's BCE; soft: a float
    # (B, 1, *S) foreground probability for both.
    if target_kind == "labels":
        ours_target, monai_target = labels, labels.to(F64)
    else:
        ours_target = monai_target = torch.sigmoid(randn(*logits.shape, seed=4))
    monai = monai_losses.DiceCELoss(sigmoid=True, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "single channel prediction, ... ignored"
        expected = monai(logits, monai_target)
    weight = region_weight_of(weight_form, logits)
    ours = region_ce_dice_loss(logits, ours_target, weight, impl=REF, **options)
    assert_monai_close(ours, expected)


# --------------------------------------------------------------------------------------------
# 2b. SSL4MIS compatibility


def ssl4mis_dice(
    logits: torch.Tensor, labels: torch.Tensor, weight: Optional[list[float]] = None
) -> torch.Tensor:
    """SSL4MIS ``DiceLoss`` written from its definition, independently of the package.

    Softmax over classes, one-hot target; per class, over the whole batch and all voxels,
    ``1 - (2 sum(p g) + 1e-5) / (sum(p p) + sum(g g) + 1e-5)``; ``sum_c dice_c w_c / n_classes``.
    """
    smooth = 1e-5
    n_classes = logits.shape[1]
    probs = torch.softmax(logits, dim=1)
    weight = [1.0] * n_classes if weight is None else weight
    loss = torch.zeros((), dtype=logits.dtype)
    for c in range(n_classes):
        score = probs[:, c]
        target = (labels == c).to(probs.dtype)
        intersect = torch.sum(score * target)
        y_sum = torch.sum(target * target)
        z_sum = torch.sum(score * score)
        dice = 1 - (2 * intersect + smooth) / (z_sum + y_sum + smooth)
        loss = loss + dice * weight[c]
    return loss / n_classes


SSL4MIS_SPATIAL = {"2d": (2, 6, 5), "3d": (2, 4, 3, 3)}  # (B, *S)
SSL4MIS_CLASS_WEIGHT = [0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("class_weight", [None, SSL4MIS_CLASS_WEIGHT], ids=["unweighted", "cw"])
@pytest.mark.parametrize("dims", SSL4MIS_SPATIAL)
def test_ssl4mis_dice(dims: str, class_weight: Optional[list[float]]) -> None:
    b, *spatial = SSL4MIS_SPATIAL[dims]
    logits = randn(b, 4, *spatial, seed=5, scale=2.0)
    labels = randint(4, b, *spatial, seed=6)
    labels[0] = labels[0] % 3  # class 3 only in the second sample
    ours = region_dice_loss(logits, labels, class_weight=class_weight, impl=REF, **SSL4MIS_DICE)
    torch.testing.assert_close(ours, ssl4mis_dice(logits, labels, class_weight), rtol=1e-9, atol=0)


@pytest.mark.parametrize("class_weight", [None, SSL4MIS_CLASS_WEIGHT], ids=["unweighted", "cw"])
@pytest.mark.parametrize("dims", SSL4MIS_SPATIAL)
def test_ssl4mis_supervised_loss(dims: str, class_weight: Optional[list[float]]) -> None:
    # SSL4MIS's supervised loss: 0.5 * (CrossEntropyLoss()(outputs, labels) + dice_loss(...)).
    b, *spatial = SSL4MIS_SPATIAL[dims]
    logits = randn(b, 4, *spatial, seed=7, scale=2.0)
    labels = randint(4, b, *spatial, seed=8)
    ce_weight = None if class_weight is None else torch.tensor(class_weight, dtype=F64)
    ce = torch.nn.CrossEntropyLoss(weight=ce_weight)(logits, labels)
    expected = 0.5 * (ce + ssl4mis_dice(logits, labels, class_weight))
    ours = region_ce_dice_loss(
        logits,
        labels,
        lambda_ce=0.5,
        lambda_dice=0.5,
        class_weight=class_weight,
        impl=REF,
        **SSL4MIS_DICE,
    )
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------------------------
# 2c. accepted input forms mean the same


def test_label_forms_are_equivalent() -> None:
    logits = randn(2, 3, 4, 5, seed=9)
    labels = randint(3, 2, 4, 5, seed=10)
    expected = region_ce_dice_loss(logits, labels, impl=REF)
    for form in (labels[:, None], labels.int(), labels.to(torch.uint8), labels.to(F64)):
        torch.testing.assert_close(region_ce_dice_loss(logits, form, impl=REF), expected)


def test_region_weight_forms_are_equivalent() -> None:
    logits = randn(2, 3, 4, 5, seed=11)
    labels = randint(3, 2, 4, 5, seed=12)
    mask = rand(1, 4, 5, seed=13) < 0.5
    expected = region_ce_dice_loss(logits, labels, mask.expand(2, 4, 5).to(F64), impl=REF)
    # (1, *S) and (1, 1, *S) broadcast over the batch; (B, 1, *S) has a channel dim; bool works.
    forms = (mask.to(F64), mask[:, None].to(F64), mask.expand(2, 4, 5)[:, None].float(), mask)
    for form in forms:
        torch.testing.assert_close(region_ce_dice_loss(logits, labels, form, impl=REF), expected)


@pytest.mark.parametrize("name", LOSSES)
def test_one_hot_target_equals_labels(name: str) -> None:
    # A one-hot (B, C, *S) target means the same as its labels, class weights included (the CE
    # normaliser is the class weight of each voxel in both cases).
    logits = randn(2, 3, 4, 3, seed=14)
    labels = randint(3, 2, 4, 3, seed=15)
    weight = rand(2, 4, 3, seed=16)
    for options in ({}, {"class_weight": CLASS_WEIGHT}):
        expected = LOSSES[name](logits, labels, weight, impl=REF, **options)
        actual = LOSSES[name](logits, one_hot(labels, 3), weight, impl=REF, **options)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_binary_logits_equal_two_class_softmax() -> None:
    # sigmoid(z) = softmax([0, z])[1]: a binary model is the two-class model with logits [0, z].
    z = randn(2, 1, 4, 3, seed=17, scale=3.0)
    labels = randint(2, 2, 4, 3, seed=18)
    weight = rand(2, 4, 3, seed=19)
    two_class = torch.cat([torch.zeros_like(z), z], dim=1)
    cw = (0.5, 2.0)
    torch.testing.assert_close(
        region_ce_loss(z, labels, weight, class_weight=cw, impl=REF),
        region_ce_loss(two_class, labels, weight, class_weight=cw, impl=REF),
    )
    # Dice: binary logits keep the foreground only, i.e. include_background=False.
    torch.testing.assert_close(
        region_dice_loss(z, labels, weight, squared_pred=True, impl=REF),
        region_dice_loss(
            two_class, labels, weight, squared_pred=True, include_background=False, impl=REF
        ),
    )


def test_binary_dice_ignores_class_weight() -> None:
    # Binary logits: class_weight = (background, foreground) weighs the CE only; the single
    # foreground Dice term is not scaled (MONAI ignores `weight` for a one-channel Dice too).
    z = randn(2, 1, 4, 3, seed=20, scale=3.0)
    labels = randint(2, 2, 4, 3, seed=21)
    torch.testing.assert_close(
        region_dice_loss(z, labels, class_weight=(0.5, 4.0), impl=REF),
        region_dice_loss(z, labels, impl=REF),
    )
    ce_weighted = region_ce_loss(z, labels, class_weight=(0.5, 4.0), impl=REF)
    assert not torch.allclose(ce_weighted, region_ce_loss(z, labels, impl=REF))


# --------------------------------------------------------------------------------------------
# 3. properties of the region weight (hypothesis)

dice_options = st.fixed_dictionaries(
    {
        "batch": st.booleans(),
        "squared_pred": st.booleans(),
        "include_background": st.booleans(),
    }
)


@PROPERTY
@given(problem=region_problems(), options=dice_options, data=st.data())
def test_invariant_under_joint_voxel_permutation(
    problem: tuple[torch.Tensor, ...], options: dict[str, bool], data: st.DataObject
) -> None:
    logits, labels, weight = problem
    n = labels[0].numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    permuted = (
        permute_voxels(logits, perm, 2),
        permute_voxels(labels, perm, 1),
        permute_voxels(weight, perm, 1),
    )
    expected = region_ce_dice_loss(logits, labels, weight, impl=REF, **options)
    actual = region_ce_dice_loss(*permuted, impl=REF, **options)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


@PROPERTY
@given(problem=region_problems(), options=dice_options)
def test_all_ones_weight_equals_no_weight(
    problem: tuple[torch.Tensor, ...], options: dict[str, bool]
) -> None:
    logits, labels, _ = problem
    ones = torch.ones_like(labels, dtype=F64)
    for reduction in ("mean", "sum"):
        torch.testing.assert_close(
            region_ce_dice_loss(logits, labels, ones, reduction=reduction, impl=REF, **options),
            region_ce_dice_loss(logits, labels, reduction=reduction, impl=REF, **options),
            rtol=1e-12,
            atol=1e-14,
        )


@PROPERTY
@given(problem=region_problems(weight_kinds=("binary",)))
def test_ce_with_0_1_weight_equals_ce_on_the_region(problem: tuple[torch.Tensor, ...]) -> None:
    logits, labels, weight = problem
    inside = weight.bool()
    # The selected voxels as a plain (N, C) classification problem.
    z = logits.movedim(1, -1)[inside]
    y = labels[inside]
    if y.numel() == 0:
        expected = torch.zeros((), dtype=F64)
    elif logits.shape[1] == 1:
        expected = F.binary_cross_entropy_with_logits(z[:, 0], y.to(F64))
    else:
        expected = F.cross_entropy(z, y)
    actual = region_ce_loss(logits, labels, weight, impl=REF)
    # eps = 1e-8 in the normaliser: relative error <= 1e-8 / N.
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-12)


@PROPERTY
@given(
    problem=region_problems(),
    options=dice_options,
    smooth=st.sampled_from([0.0, 1e-5, 1.0]),
    soft=st.booleans(),
)
def test_dice_terms_lie_in_unit_interval(
    problem: tuple[torch.Tensor, ...], options: dict[str, bool], smooth: float, soft: bool
) -> None:
    # 2 p g <= p + g (and <= p^2 + g^2) for p, g in [0, 1], so with smooth_nr == smooth_dr each
    # term 1 - (2I + s) / (P + G + s) is in [0, 1].
    logits, labels, weight = problem
    target: torch.Tensor = labels
    if soft:
        target = torch.rand(logits.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    terms = region_dice_loss(
        logits,
        target,
        weight,
        smooth_nr=smooth,
        smooth_dr=smooth,
        reduction="none",
        impl=REF,
        **options,
    )
    assert terms.min() >= -1e-12 and terms.max() <= 1 + 1e-12


@PROPERTY
@given(problem=region_problems(weight_kinds=("zeros",)), options=dice_options)
def test_empty_region_gives_exact_zero_and_zero_gradients(
    problem: tuple[torch.Tensor, ...], options: dict[str, bool]
) -> None:
    logits, labels, weight = problem
    logits.requires_grad_(True)
    ce = region_ce_loss(logits, labels, weight, impl=REF)
    # default smoothing: (0 + s) / (0 + 0 + s) = 1 exactly, term 0
    dice = region_dice_loss(logits, labels, weight, impl=REF, **options)
    assert ce.item() == 0.0 and dice.item() == 0.0
    (grad,) = torch.autograd.grad(ce + dice, logits)
    assert torch.isfinite(grad).all() and (grad == 0).all()


@PROPERTY
@given(
    problem=region_problems(weight_kinds=("positive",)),
    options=dice_options,
    factor=st.floats(0.1, 10.0),
)
def test_scaling_the_weight_changes_nothing(
    problem: tuple[torch.Tensor, ...], options: dict[str, bool], factor: float
) -> None:
    logits, labels, weight = problem
    # CE is a weighted mean: invariant up to eps = 1e-8 in its normaliser (weights >= 0.25).
    torch.testing.assert_close(
        region_ce_loss(logits, labels, factor * weight, impl=REF),
        region_ce_loss(logits, labels, weight, impl=REF),
        rtol=1e-6,
        atol=1e-12,
    )
    # Dice is a ratio of weighted sums: invariant without smoothing (all weights > 0, so every
    # denominator is positive or the class is absent and unpredicted).
    plain = {"smooth_nr": 0.0, "smooth_dr": 0.0, "impl": REF, **options}
    torch.testing.assert_close(
        region_dice_loss(logits, labels, factor * weight, **plain),
        region_dice_loss(logits, labels, weight, **plain),
        rtol=1e-9,
        atol=1e-12,
    )


@PROPERTY
@given(
    problem=region_problems(weight_kinds=("positive", "binary", "ones")),
    class_weighted=st.booleans(),
)
def test_reductions_are_consistent(problem: tuple[torch.Tensor, ...], class_weighted: bool) -> None:
    logits, labels, weight = problem
    c = max(logits.shape[1], 2)
    cw = torch.linspace(0.5, 2.0, c, dtype=F64) if class_weighted else None
    per_voxel_cw = torch.ones_like(weight) if cw is None else cw[labels]
    w = weight * per_voxel_cw  # what each voxel's CE is weighted by
    ce_voxel = voxel_ce(logits, labels)
    opts: dict[str, Any] = {"class_weight": cw, "impl": REF}

    # CE "sum": the weighted CE summed over voxels.
    ce_sum = region_ce_loss(logits, labels, weight, reduction="sum", **opts)
    torch.testing.assert_close(ce_sum, (w * ce_voxel).sum(), rtol=1e-9, atol=1e-12)
    # CE "none": one weighted mean per sample; "mean" pools the samples by their weight.
    ce_none = region_ce_loss(logits, labels, weight, reduction="none", **opts)
    per_sample = w.flatten(1).sum(1)
    expected_none = (w * ce_voxel).flatten(1).sum(1) / (per_sample + 1e-8)
    torch.testing.assert_close(ce_none, expected_none, rtol=1e-9, atol=1e-12)
    ce_mean = region_ce_loss(logits, labels, weight, **opts)
    pooled = (per_sample * ce_none).sum() / per_sample.sum().clamp_min(1e-300)
    torch.testing.assert_close(ce_mean, pooled, rtol=1e-6, atol=1e-12)

    # Dice "none" holds the terms; "sum" and "mean" reduce them.
    dice_none = region_dice_loss(logits, labels, weight, reduction="none", **opts)
    assert dice_none.shape == logits.shape[:2]  # (B, C); (B, 1): binary keeps the foreground
    torch.testing.assert_close(
        region_dice_loss(logits, labels, weight, reduction="sum", **opts), dice_none.sum()
    )
    torch.testing.assert_close(
        region_dice_loss(logits, labels, weight, **opts), dice_none.mean(), rtol=1e-12, atol=0
    )
    # CE + Dice "none": per-sample CE plus the class mean of that sample's Dice terms.
    both = region_ce_dice_loss(logits, labels, weight, reduction="none", **opts)
    torch.testing.assert_close(both, ce_none + dice_none.mean(-1))


# --------------------------------------------------------------------------------------------
# 4a. the Dice empty-denominator policy


@pytest.mark.parametrize("smooth_nr", [0.0, 1e-5])
@pytest.mark.parametrize("squared_pred", [False, True])
def test_dice_zero_smooth_dr_on_empty_region_is_zero(smooth_nr: float, squared_pred: bool) -> None:
    # smooth_dr = 0 and nothing in the region: 0/0 is defined as a perfect score (loss 0),
    # with a finite zero gradient, not NaN.
    logits = randn(2, 3, 4, 4, seed=20).requires_grad_(True)
    labels = randint(3, 2, 4, 4, seed=21)
    empty = torch.zeros(2, 4, 4, dtype=F64)
    loss = region_dice_loss(
        logits,
        labels,
        empty,
        smooth_nr=smooth_nr,
        smooth_dr=0.0,
        squared_pred=squared_pred,
        impl=REF,
    )
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all() and (grad == 0).all()


def test_dice_zero_smoothing_empty_sample_next_to_a_full_one() -> None:
    # Only the empty sample's terms are 0; the other sample is unaffected and its gradient flows.
    logits = randn(2, 3, 4, 4, seed=22).requires_grad_(True)
    labels = randint(3, 2, 4, 4, seed=23)
    weight = torch.ones(2, 4, 4, dtype=F64)
    weight[1] = 0
    plain = {"smooth_nr": 0.0, "smooth_dr": 0.0, "impl": REF}
    terms = region_dice_loss(logits, labels, weight, reduction="none", **plain)
    assert (terms[1] == 0).all()
    torch.testing.assert_close(
        terms[0], region_dice_loss(logits[:1], labels[:1], reduction="none", **plain)[0]
    )
    (grad,) = torch.autograd.grad(terms.sum(), logits)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all() and (grad[0] != 0).any()


def test_absent_class_with_predictions_costs_about_one() -> None:
    # Labels all 0, class 1 predicted: I = 0, P > 0, G = 0 -> 1 - s / (P + s), about 1 (MONAI).
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    logits = torch.zeros(1, 2, 4, 4, dtype=F64)
    logits[:, 1] = 2.0
    terms = region_dice_loss(logits, labels, reduction="none", impl=REF)
    close(terms[0, 1], 1.0, rtol=0, atol=1e-4)
    # and exactly 1 without smoothing
    plain = region_dice_loss(logits, labels, smooth_nr=0, smooth_dr=0, reduction="none", impl=REF)
    close(plain[0, 1], 1.0, rtol=0, atol=0)


def test_absent_class_not_predicted_costs_about_zero() -> None:
    # Labels all 0 and class 1 (practically) never predicted: s / (P + s) with P ~ 0 -> term ~ 0.
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    logits = torch.zeros(1, 2, 4, 4, dtype=F64)
    logits[:, 0] = 50.0
    terms = region_dice_loss(logits, labels, reduction="none", impl=REF)
    close(terms[0], [0.0, 0.0], rtol=0, atol=1e-9)


@PROPERTY
@given(
    problem=region_problems(),
    options=dice_options,
    smooth=st.sampled_from([(0.0, 0.0), (0.0, 1e-5), (1e-5, 1e-5), (1.0, 1.0)]),
    magnify=st.sampled_from([1.0, 100.0]),
)
def test_dice_is_never_nan(
    problem: tuple[torch.Tensor, ...],
    options: dict[str, bool],
    smooth: tuple[float, float],
    magnify: float,
) -> None:
    # Saturated logits, empty regions, absent classes, no smoothing: values and gradients stay
    # finite (with smooth_nr <= smooth_dr).
    logits, labels, weight = problem
    logits = (logits * magnify).requires_grad_(True)
    loss = region_ce_dice_loss(
        logits, labels, weight, smooth_nr=smooth[0], smooth_dr=smooth[1], impl=REF, **options
    )
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------
# 4b. ignore_index


@PROPERTY
@given(
    problem=region_problems(weight_kinds=("random", "binary", "ones")),
    options=dice_options,
    ignore_index=st.sampled_from([255, -100, -1]),
    name=st.sampled_from(list(LOSSES)),
)
def test_ignore_index_equals_zero_weight(
    problem: tuple[torch.Tensor, ...],
    options: dict[str, bool],
    ignore_index: int,
    name: str,
) -> None:
    logits, labels, weight = problem
    generator = torch.Generator().manual_seed(labels.numel())
    ignored = torch.rand(labels.shape, generator=generator) < 0.3
    replacement = torch.randint(max(logits.shape[1], 2), labels.shape, generator=generator)
    fn = LOSSES[name]
    kwargs = {} if name == "ce" else options
    with_ignore = fn(
        logits,
        torch.where(ignored, ignore_index, labels),
        weight,
        ignore_index=ignore_index,
        impl=REF,
        **kwargs,
    )
    # The same voxels excluded by a zero region weight; their label is then irrelevant.
    zeroed = fn(
        logits, torch.where(ignored, replacement, labels), weight * ~ignored, impl=REF, **kwargs
    )
    torch.testing.assert_close(with_ignore, zeroed, rtol=1e-12, atol=1e-14)


def test_ignore_index_ce_equals_pytorch() -> None:
    logits = randn(2, 4, 5, 3, seed=24)
    labels = randint(4, 2, 5, 3, seed=25)
    labels[0, :2] = -100
    expected = F.cross_entropy(logits, labels, ignore_index=-100)
    close(region_ce_loss(logits, labels, ignore_index=-100, impl=REF), expected, rtol=1e-9)


def test_everything_ignored_gives_zero() -> None:
    logits = randn(1, 3, 2, 2, seed=26)
    labels = torch.full((1, 2, 2), 255)
    assert region_ce_dice_loss(logits, labels, ignore_index=255, impl=REF).item() == 0.0


def test_ignore_index_with_probability_target_raises() -> None:
    logits = randn(2, 3, 4, 4, seed=27)
    target = torch.softmax(randn(2, 3, 4, 4, seed=28), dim=1)
    with pytest.raises(ValueError, match=r"`ignore_index` applies to label targets"):
        region_ce_dice_loss(logits, target, ignore_index=255, impl=REF)


# --------------------------------------------------------------------------------------------
# 4c. -Inf logits (a common way to forbid a class)


@pytest.mark.parametrize("name", LOSSES)
def test_minus_inf_logit_at_a_non_target_class_is_allowed(name: str) -> None:
    # Class 0 is forbidden (-Inf) at voxel 0, whose label is 1: p_0 = 0 there, nothing is wrong.
    logits = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]], dtype=F64)  # (1, 2, 2)
    logits[0, 0, 0] = -math.inf
    labels = torch.tensor([[1, 1]])
    finite = logits.clone()
    finite[0, 0, 0] = -1e4  # exp(-1e4) = 0 in float64: the same probabilities
    expected = LOSSES[name](finite, labels, impl=REF)
    torch.testing.assert_close(LOSSES[name](logits, labels, impl=REF), expected)


# --------------------------------------------------------------------------------------------
# 4d. half precision


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", LOSSES)
def test_half_precision_reduces_in_float32(name: str, dtype: torch.dtype, impl: str) -> None:
    fn = LOSSES[name]
    logits32 = randn(2, 3, 6, 5, seed=29, dtype=torch.float32, scale=4.0)
    logits32[0, 1, :2] = 300.0  # saturated: exp would overflow in float16
    labels = randint(3, 2, 6, 5, seed=30)
    weight = rand(2, 6, 5, seed=31, dtype=torch.float32).to(dtype)
    half = logits32.to(dtype).requires_grad_(True)
    loss = fn(half, labels, weight, impl=impl)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Exactly the float32 computation on the rounded inputs ...
    rounded = fn(half.detach().float(), labels, weight.float(), impl=impl)
    torch.testing.assert_close(loss, rounded, rtol=1e-5, atol=1e-6)
    # ... and close to the float32 inputs (bfloat16 keeps 8 bits of mantissa).
    torch.testing.assert_close(
        loss, fn(logits32, labels, weight.float(), impl=impl), rtol=0.03, atol=0.03
    )
    (grad,) = torch.autograd.grad(loss, half)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    none = fn(half, labels, weight, reduction="none", impl=impl)
    assert none.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# 4e. gradcheck (float64), both implementations

GRAD_CLASS_WEIGHT = (0.5, 1.0, 2.0)

#: name -> (loss, classes C, target kind, options, region weight kind)
GRADCHECK_CASES: dict[str, tuple[LossFn, int, str, dict[str, Any], Optional[str]]] = {
    "ce/labels": (region_ce_loss, 3, "labels", {}, None),
    "ce/one-hot": (region_ce_loss, 3, "one-hot", {}, "float"),
    "ce/soft": (region_ce_loss, 3, "soft", {}, "float"),
    "ce/class_weight": (region_ce_loss, 3, "labels", {"class_weight": GRAD_CLASS_WEIGHT}, "float"),
    "ce/ignore_index": (region_ce_loss, 3, "ignore", {"ignore_index": 255}, "float"),
    "ce/binary": (region_ce_loss, 1, "labels", {"class_weight": (0.5, 2.0)}, "float"),
    "ce/binary soft": (region_ce_loss, 1, "soft", {}, "binary"),
    "ce/sum": (region_ce_loss, 3, "labels", {"reduction": "sum"}, "float"),
    "ce/none": (region_ce_loss, 3, "labels", {"reduction": "none"}, "float"),
    "dice/labels": (region_dice_loss, 3, "labels", {}, None),
    "dice/squared": (region_dice_loss, 3, "labels", {"squared_pred": True}, "float"),
    "dice/batch": (region_dice_loss, 3, "labels", {"batch": True}, "float"),
    "dice/no background, class_weight": (
        region_dice_loss,
        3,
        "labels",
        {"include_background": False, "class_weight": GRAD_CLASS_WEIGHT},
        "float",
    ),
    "dice/one-hot": (region_dice_loss, 3, "one-hot", {"squared_pred": True}, None),
    "dice/soft squared batch": (
        region_dice_loss,
        3,
        "soft",
        {"squared_pred": True, "batch": True},
        "float",
    ),
    "dice/ignore_index": (region_dice_loss, 3, "ignore", {"ignore_index": 255}, "binary"),
    "dice/binary": (region_dice_loss, 1, "labels", {"squared_pred": True}, "float"),
    "dice/binary soft batch": (region_dice_loss, 1, "soft", {"batch": True}, None),
    "dice/no smoothing, empty sample": (
        region_dice_loss,
        3,
        "labels",
        {"smooth_nr": 0.0, "smooth_dr": 0.0},
        "empty sample",
    ),
    "dice/none": (region_dice_loss, 3, "labels", {"reduction": "none"}, "float"),
    "ce_dice/defaults": (region_ce_dice_loss, 3, "labels", {}, None),
    "ce_dice/all options": (
        region_ce_dice_loss,
        3,
        "ignore",
        {
            "squared_pred": True,
            "batch": True,
            "include_background": False,
            "class_weight": GRAD_CLASS_WEIGHT,
            "ignore_index": 255,
            "lambda_ce": 0.7,
            "lambda_dice": 1.3,
        },
        "float",
    ),
    "ce_dice/soft sum": (region_ce_dice_loss, 3, "soft", {"reduction": "sum"}, "float"),
    "ce_dice/none": (region_ce_dice_loss, 3, "labels", {"reduction": "none"}, "binary"),
    "ce_dice/binary": (region_ce_dice_loss, 1, "labels", {"batch": True}, "float"),
}


def gradcheck_inputs(
    classes: int, target_kind: str, weight_kind: Optional[str]
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    b, spatial = 2, (3, 2)
    logits = randn(b, classes, *spatial, seed=32, scale=1.5).requires_grad_(True)
    k = max(classes, 2)
    labels = randint(k, b, *spatial, seed=33)
    target: torch.Tensor
    if target_kind == "labels":
        target = labels
    elif target_kind == "ignore":
        target = labels.clone()
        target[:, 0, 0] = 255
    elif target_kind == "one-hot":
        target = one_hot(labels, classes)
    else:  # soft: a probability per class, or the foreground probability for C == 1
        target = rand(b, classes, *spatial, seed=34)
        if classes > 1:
            target = target / target.sum(1, keepdim=True)
    weight: Optional[torch.Tensor] = None
    if weight_kind == "float":
        weight = rand(b, *spatial, seed=35)
    elif weight_kind == "binary":
        weight = (rand(b, *spatial, seed=36) < 0.6).to(F64)
    elif weight_kind == "empty sample":
        weight = torch.ones(b, *spatial, dtype=F64)
        weight[1] = 0
    return logits, target, weight


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck(case: str, impl: str) -> None:
    fn, classes, target_kind, options, weight_kind = GRADCHECK_CASES[case]
    logits, target, weight = gradcheck_inputs(classes, target_kind, weight_kind)
    # fast_mode compares v^T J u for random u, v (a few evaluations instead of one per input);
    # a wrong gradient fails it with probability 1.
    assert torch.autograd.gradcheck(
        lambda z: fn(z, target, weight, impl=impl, **options),
        (logits,),
        eps=1e-6,
        atol=1e-6,
        fast_mode=True,
    )


# --------------------------------------------------------------------------------------------
# 4f. torch.compile


def test_compiled_fullgraph_equals_eager() -> None:
    # fullgraph=True fails on any graph break. The value checks are skipped while compiling;
    # backend "aot_eager" traces forward and backward without generating kernels (fast on CPU).
    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return region_ce_dice_loss(
            logits,
            labels,
            weight,
            squared_pred=True,
            include_background=False,
            class_weight=(0.5, 1.0, 2.0),
            ignore_index=255,
            impl=REF,
        )

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    logits = randn(2, 3, 5, 4, seed=37).requires_grad_(True)
    labels = randint(3, 2, 5, 4, seed=38)
    labels[0, 0] = 255
    weight = rand(2, 5, 4, seed=39)
    eager = loss_fn(logits, labels, weight)
    (eager_grad,) = torch.autograd.grad(eager, logits)
    out = compiled(logits, labels, weight)
    (compiled_grad,) = torch.autograd.grad(out, logits)
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# 5. validation: the argument, what was expected, what arrived

LOGITS = randn(2, 3, 4, 4, seed=40)
LABELS = randint(3, 2, 4, 4, seed=41)


def _bad_labels(value: float) -> torch.Tensor:
    labels = LABELS.clone().to(F64 if isinstance(value, float) else torch.long)
    labels[0, 0, 0] = value
    return labels


def _weight(value: float) -> torch.Tensor:
    weight = torch.ones(2, 4, 4)
    weight[1, 2, 3] = value
    return weight


def _nan_logits() -> torch.Tensor:
    logits = LOGITS.clone()
    logits[1, 2, 3, 0] = math.nan
    return logits


def _inf_logits() -> torch.Tensor:
    logits = LOGITS.clone()
    logits[0, 0, 0, 0] = math.inf
    return logits


def ce_dice(*args: Any, **kwargs: Any) -> torch.Tensor:
    return region_ce_dice_loss(*args, impl=kwargs.pop("impl", REF), **kwargs)


#: (description, call, exception type, message pattern, matched with re.search)
INVALID_CALLS: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "logits not a tensor",
        lambda: ce_dice(LOGITS.tolist(), LABELS),
        TypeError,
        "`logits` must be a torch.Tensor, got list.",
    ),
    (
        "integer logits",
        lambda: ce_dice(LOGITS.long(), LABELS),
        TypeError,
        "`logits` must have a floating dtype, got torch.int64.",
    ),
    (
        "logits without spatial dims",
        lambda: ce_dice(LOGITS[:, :, 0, 0], LABELS[:, 0, 0]),
        ValueError,
        "`logits` must have shape (B, C, *S) with at least one spatial dim, got (2, 3).",
    ),
    (
        "target of the wrong spatial shape",
        lambda: ce_dice(LOGITS, LABELS[:, :, :3]),
        ValueError,
        "`target` must have shape (B, *S) = (2, 4, 4), (B, 1, *S) or (B, C, *S) = (2, 3, 4, 4) "
        "to match `logits` (2, 3, 4, 4), got (2, 4, 3).",
    ),
    (
        "target with the wrong channel count",
        lambda: ce_dice(LOGITS, torch.zeros(2, 2, 4, 4)),
        ValueError,
        "`target` must have shape (B, *S) = (2, 4, 4), (B, 1, *S) or (B, C, *S) = (2, 3, 4, 4) "
        "to match `logits` (2, 3, 4, 4), got (2, 2, 4, 4).",
    ),
    (
        "target not a tensor",
        lambda: ce_dice(LOGITS, LABELS.tolist()),
        TypeError,
        "`target` must be a torch.Tensor, got list.",
    ),
    (
        "region_weight of the wrong shape",
        lambda: ce_dice(LOGITS, LABELS, torch.ones(2, 4, 5)),
        ValueError,
        "`region_weight` must have shape (B, *S) = (2, 4, 4) or (B, 1, *S) (B may be 1 to "
        "broadcast over the batch) to match `logits` (2, 3, 4, 4), got (2, 4, 5).",
    ),
    (
        "integer region_weight",
        lambda: ce_dice(LOGITS, LABELS, torch.ones(2, 4, 4, dtype=torch.long)),
        TypeError,
        "`region_weight` must be a floating or bool tensor, got torch.int64.",
    ),
    (
        "negative region_weight",
        lambda: ce_dice(LOGITS, LABELS, _weight(-0.5)),
        ValueError,
        "`region_weight` must be finite and >= 0; found other values.",
    ),
    (
        "NaN region_weight",
        lambda: ce_dice(LOGITS, LABELS, _weight(math.nan)),
        ValueError,
        "`region_weight` must be finite and >= 0; found other values.",
    ),
    (
        "label too large",
        lambda: ce_dice(LOGITS, _bad_labels(3)),
        ValueError,
        "`target` must be labels: integers in [0, 2]; found other values.",
    ),
    (
        "negative label",
        lambda: ce_dice(LOGITS, _bad_labels(-1)),
        ValueError,
        "`target` must be labels: integers in [0, 2]; found other values.",
    ),
    (
        "label out of range next to ignore_index",
        lambda: ce_dice(LOGITS, _bad_labels(7), ignore_index=255),
        ValueError,
        "`target` must be labels: integers in [0, 2] or ignore_index=255; found other values.",
    ),
    (
        "non-integral float labels",
        lambda: ce_dice(LOGITS, _bad_labels(0.5)),
        ValueError,
        "`target` labels must be integers in [0, 2].",
    ),
    (
        "probability target outside [0, 1]",
        lambda: ce_dice(LOGITS, torch.full((2, 3, 4, 4), 1.5)),
        ValueError,
        "`target` must be probabilities in [0, 1]; found other values.",
    ),
    (
        "NaN logits",
        lambda: ce_dice(_nan_logits(), LABELS),
        ValueError,
        "`logits` must be finite",
    ),
    (
        "+Inf logits",
        lambda: region_dice_loss(_inf_logits(), LABELS, impl=REF),
        ValueError,
        "`logits` must be finite",
    ),
    (
        "class_weight of the wrong length",
        lambda: ce_dice(LOGITS, LABELS, class_weight=(1.0, 2.0)),
        ValueError,
        # (the received shape is matched up to its closing: see test_one_element_shapes_...)
        "`class_weight` must have shape (3,) (one weight per class), got (2,).",
    ),
    (
        "class_weight of the wrong length for binary logits",
        lambda: ce_dice(LOGITS[:, :1], LABELS % 2, class_weight=(1.0,)),
        ValueError,
        "`class_weight` must have shape (2,) (one weight per class, background first, for "
        "binary logits), got (1,).",
    ),
    (
        "negative class_weight",
        lambda: ce_dice(LOGITS, LABELS, class_weight=(1.0, -1.0, 1.0)),
        ValueError,
        "`class_weight` must be finite and >= 0, got [1.0, -1.0, 1.0].",
    ),
    (
        "class_weight not a sequence",
        lambda: ce_dice(LOGITS, LABELS, class_weight=2.0),
        TypeError,
        "`class_weight` must be a sequence, array or 1-D tensor of 3 real numbers, got float.",
    ),
    (
        "unknown reduction",
        lambda: ce_dice(LOGITS, LABELS, reduction="avg"),
        ValueError,
        "`reduction` must be one of ('mean', 'sum', 'none'), got 'avg'.",
    ),
    (
        "unknown reduction (dice)",
        lambda: region_dice_loss(LOGITS, LABELS, reduction="batchmean", impl=REF),
        ValueError,
        "`reduction` must be one of ('mean', 'sum', 'none'), got 'batchmean'.",
    ),
    (
        "unknown impl",
        lambda: ce_dice(LOGITS, LABELS, impl="triton"),
        ValueError,
        "`impl` must be one of ('auto', 'fused', 'reference'), got 'triton'.",
    ),
    (
        "negative lambda_ce",
        lambda: ce_dice(LOGITS, LABELS, lambda_ce=-1.0),
        ValueError,
        "`lambda_ce` must be a finite number >= 0, got -1.0.",
    ),
    (
        "infinite lambda_dice",
        lambda: ce_dice(LOGITS, LABELS, lambda_dice=math.inf),
        ValueError,
        "`lambda_dice` must be a finite number >= 0, got inf.",
    ),
    (
        "negative smooth_nr",
        lambda: ce_dice(LOGITS, LABELS, smooth_nr=-1e-5),
        ValueError,
        "`smooth_nr` must be a finite number >= 0, got -1e-05.",
    ),
    (
        "smooth_dr not a number",
        lambda: region_dice_loss(LOGITS, LABELS, smooth_dr="1e-5", impl=REF),
        TypeError,
        "`smooth_dr` must be a number, got str.",
    ),
    (
        "eps = 0",
        lambda: region_ce_loss(LOGITS, LABELS, eps=0.0, impl=REF),
        ValueError,
        "`eps` must be a finite number > 0, got 0.0.",
    ),
    (
        "softmax=True with C == 1",
        lambda: ce_dice(LOGITS[:, :1], LABELS % 2, softmax=True),
        ValueError,
        "`softmax=True` needs C >= 2 classes; logits with C == 1 are binary",
    ),
    (
        "sigmoid=True with C > 1",
        lambda: ce_dice(LOGITS, LABELS, sigmoid=True),
        ValueError,
        "`sigmoid=True` is for binary logits with C == 1 (treated as classes [1-p, p]); "
        "got C = 3. Use softmax for C >= 2.",
    ),
    (
        "softmax and sigmoid",
        lambda: ce_dice(LOGITS[:, :1], LABELS % 2, softmax=True, sigmoid=True),
        ValueError,
        "`softmax` and `sigmoid` are mutually exclusive, got both True.",
    ),
    (
        "no activation",
        lambda: ce_dice(LOGITS, LABELS, softmax=False, sigmoid=False),
        ValueError,
        "The losses take logits and need an activation",
    ),
    (
        "reduction='none' with batch=True",
        lambda: ce_dice(LOGITS, LABELS, reduction="none", batch=True),
        ValueError,
        "`reduction='none'` gives one loss per sample and needs `batch=False`",
    ),
    (
        "ignore_index not an int",
        lambda: ce_dice(LOGITS, LABELS, ignore_index=255.0),
        TypeError,
        "`ignore_index` must be an int or None, got float.",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in INVALID_CALLS],
)
def test_invalid_input_raises(
    call: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_one_element_shapes_are_written_as_tuples() -> None:
    with pytest.raises(ValueError, match=re.escape("got (2,).")):
        ce_dice(LOGITS, LABELS, class_weight=(1.0, 2.0))


@pytest.mark.parametrize("name", LOSSES)
def test_every_entry_point_validates(name: str) -> None:
    # The checks live in one place and every public function goes through them.
    with pytest.raises(ValueError, match=re.escape("got (2, 4, 3).")):
        LOSSES[name](LOGITS, LABELS[:, :, :3], impl=REF)
    with pytest.raises(ValueError, match=re.escape("`target` must be labels")):
        LOSSES[name](LOGITS, _bad_labels(3), impl=REF)
    with pytest.raises(ValueError, match=re.escape("`region_weight` must be finite and >= 0")):
        LOSSES[name](LOGITS, LABELS, _weight(-1.0), impl=REF)


def test_validate_false_skips_the_value_checks() -> None:
    # validate=False trusts the values (no pass over them); metadata checks still run.
    loss = ce_dice(LOGITS, LABELS, _weight(-0.5), validate=False)
    assert torch.isfinite(loss)
    loss = ce_dice(_nan_logits(), LABELS, validate=False)
    assert torch.isnan(loss)
    with pytest.raises(TypeError, match="`region_weight` must be a floating or bool tensor"):
        ce_dice(LOGITS, LABELS, torch.ones(2, 4, 4, dtype=torch.long), validate=False)


def test_batch_dice_alone_may_return_its_terms() -> None:
    # reduction="none" is refused only where a per-sample value is asked for: the Dice terms
    # alone with batch=True are one per class, and CE + Dice with lambda_dice=0 is per sample.
    assert region_dice_loss(LOGITS, LABELS, batch=True, reduction="none", impl=REF).shape == (3,)
    assert ce_dice(LOGITS, LABELS, batch=True, reduction="none", lambda_dice=0).shape == (2,)


# --------------------------------------------------------------------------------------------
# issue 15, item 4: validate=False skips the up-front checks, never the label range


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("bad", [7, -1])
def test_out_of_range_labels_fail_without_validation(
    impl: str, bad: int, fused_engine: str
) -> None:
    """With validate=False every engine refuses a label outside [0, C): the chunked engine with
    the loss's own message, the others with their indexing error (on a GPU a device-side
    assertion). Before, the chunked engine read such a label as "no class" (a finite loss)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, 4, generator=g)
    labels = torch.randint(0, 3, (2, 5, 4), generator=g)
    labels[1, 2, 3] = bad
    if impl == "fused" and fused_engine == "chunked":
        error, match = ValueError, r"`target` labels must be integers in \[0, 2\]; found other"
    else:  # one_hot's RuntimeError (reference), nll_loss's IndexError (accelerator)
        error, match = (RuntimeError, IndexError), "out of bounds|num_classes|non-negative"
    with pytest.raises(error, match=match):
        region_ce_dice_loss(logits, labels, validate=False, impl=impl)


def test_fractional_float_labels_fail_on_the_chunked_engine_without_validation() -> None:
    """The chunked engine's one-hot compares float labels with the class values, so 1.5 would
    be "no class"; it refuses it. (The indexing engines truncate it: only validate=True, the
    default, catches it there, as the sharp-edges page says.)"""
    labels = torch.zeros(2, 5, 4)
    labels[0, 0, 0] = 1.5
    with use_engine("chunked"), pytest.raises(ValueError, match="found other values"):
        region_ce_dice_loss(torch.randn(2, 3, 5, 4), labels, validate=False)


def test_ignored_labels_pass_without_validation() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 5, 4), generator=g)
    labels[0, :2] = 255
    checked = region_ce_dice_loss(logits, labels, ignore_index=255)
    unchecked = region_ce_dice_loss(logits, labels, ignore_index=255, validate=False)
    torch.testing.assert_close(unchecked, checked, rtol=0, atol=0)
