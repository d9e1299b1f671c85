"""Error-detection diagnostics: known answers, an independent numpy reference, properties, plots.

The reference below works on the raw scores with numpy (pairwise AUROC, tie groups for AP and
the retention curve), independently of the histogram code. On uncertainty values that sit at
bin centres the histogram metrics must equal it to rounding; on continuous values they must
stay within the documented bounds.
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import bual_losses.diagnostics as diagnostics
from bual_losses.diagnostics import (
    ErrorDetectionAccumulator,
    ErrorDetectionReport,
    error_detection_report,
)
from bual_losses.uncertainty import entropy_map
from tests.strategies import seeds

PROPERTY = settings(max_examples=30, deadline=None)
F64 = torch.float64


def _f(x: Any) -> float:
    return float(x)


def assert_reports_equal(a: Any, b: Any, *, exact: bool = True) -> None:
    """Same keys and values (NaN == NaN); ``exact`` compares bit for bit."""
    assert set(a) == set(b)
    for key in a:
        if key == "per_class":
            assert_reports_equal(a[key], b[key], exact=exact)
            continue
        x, y = torch.as_tensor(np.asarray(a[key])), torch.as_tensor(np.asarray(b[key]))
        tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-9, "atol": 1e-9}
        torch.testing.assert_close(x, y, equal_nan=True, check_dtype=exact, msg=key, **tol)


# --------------------------------------------------------------------------------------------
# independent numpy reference on the raw scores


def ref_auroc(u: np.ndarray, err: np.ndarray) -> float:
    pos, neg = u[err], u[~err]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def ref_vertices(u: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (voxels, errors) after each group of equal values, most uncertain first."""
    values = np.unique(u)[::-1]
    n = [0] + [int((u >= v).sum()) for v in values]
    e = [0] + [int(err[u >= v].sum()) for v in values]
    return np.asarray(n, dtype=float), np.asarray(e, dtype=float)


def ref_average_precision(u: np.ndarray, err: np.ndarray) -> float:
    n, e = ref_vertices(u, err)
    if e[-1] == 0:
        return math.nan
    recall = e / e[-1]
    precision = np.divide(e, n, out=np.ones_like(e), where=n > 0)
    return float(np.sum(np.diff(recall) * precision[1:]))


def ref_retention(u: np.ndarray, err: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, float]:
    """Expected share of errors in the top k N voxels (ties broken at random), and the area."""
    n, e = ref_vertices(u, err)
    curve = np.interp(k * n[-1], n, e) / e[-1]
    area = float(np.sum(np.diff(n) * (e[1:] + e[:-1])) / 2 / (n[-1] * e[-1]))
    return curve, area


def ref_ece(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    index = np.clip(np.floor(confidence * bins), 0, bins - 1).astype(int)
    total = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            total += sel.sum() * abs(correct[sel].mean() - confidence[sel].mean())
    return total / confidence.size


def problem(
    seed: int, shape: tuple[int, ...] = (2, 3, 6, 5), *, scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=F64) * scale
    labels = torch.randint(0, max(shape[1], 2), (shape[0], *shape[2:]), generator=g)
    return logits, labels


def errors_of(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    if logits.shape[1] == 1:
        pseudo = (logits[:, 0] > 0).long()
    else:
        pseudo = logits.argmax(1)
    return (pseudo != labels).numpy().reshape(-1)


# --------------------------------------------------------------------------------------------
# hand-computed cases


def tie_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 voxels, all predicted class 1; errors at u = 0.15 and 0.35; a tie at 0.15."""
    err = torch.tensor([[0, 1, 0, 1]])
    fg = torch.full((1, 4), 0.8)
    probs = torch.stack([1 - fg, fg], dim=1)  # (1, 2, 4)
    labels = 1 - err
    u = torch.tensor([[0.05, 0.15, 0.15, 0.35]])
    return probs, labels, u


def test_hand_computed_ties() -> None:
    probs, labels, u = tie_case()
    r = error_detection_report(
        probs, labels, from_logits=False, uncertainty=u, thresholds=[0.3, 0.1, 0.15],
        ratios=0.5, retention_points=5,
    )  # fmt: skip
    # pairs (err, correct): (.35,.05) (.35,.15) (.15,.05) win, (.15,.15) ties: 3.5 / 4
    assert _f(r["auroc"]) == pytest.approx(0.875, abs=1e-12)
    # tie groups from the top: {.35}: P = 1, recall 1/2; {.15, .15}: P = 2/3, recall 1
    assert _f(r["average_precision"]) == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    # vertices (0, 0), (1/4, 1/2), (3/4, 1), (1, 1); grid k = 0, .25, .5, .75, 1
    np.testing.assert_allclose(r["retention_curve"], [0, 0.5, 0.75, 1, 1], atol=1e-12)
    np.testing.assert_allclose(r["oracle_curve"], [0, 0.5, 1, 1, 1], atol=1e-12)
    assert _f(r["retention_auc"]) == pytest.approx(0.0625 + 0.375 + 0.25, abs=1e-12)
    assert _f(r["oracle_retention_auc"]) == pytest.approx(0.75, abs=1e-12)
    # exact threshold sweep, sorted: u > .1: {.15, .15, .35}; u > .15 (tie is low): {.35}
    np.testing.assert_allclose(r["thresholds"], [0.1, 0.15, 0.3])
    np.testing.assert_allclose(r["high_fraction"], [0.75, 0.25, 0.25])
    np.testing.assert_allclose(r["error_rate_high"], [2 / 3, 1, 1])
    np.testing.assert_allclose(r["error_rate_low"], [0, 1 / 3, 1 / 3])
    # top half: .35 (error) + one of the tied .15 (1/2 error expected)
    assert r["ratio_error_rate_high"].shape == ()  # one number: 0-d
    assert _f(r["ratio_error_rate_high"]) == pytest.approx(0.75)
    assert _f(r["ratio_error_rate_low"]) == pytest.approx(0.25)
    assert _f(r["ratio_thresholds"]) == pytest.approx(0.15, abs=1e-3)
    assert int(r["num_voxels"]) == 4 and int(r["num_errors"]) == 2


def test_hand_computed_calibration() -> None:
    fg = torch.tensor([0.9, 0.6, 0.3, 0.1])
    probs = torch.stack([1 - fg, fg]).reshape(1, 2, 4)
    labels = torch.tensor([[1, 0, 1, 0]])  # pseudo-labels 1, 1, 0, 0: voxels 1, 2 wrong
    r = error_detection_report(probs, labels, from_logits=False, calibration_bins=5)
    # conf .9, .6, .7, .9 -> bins 4, 3, 3, 4 of width .2
    np.testing.assert_array_equal(r["reliability_counts"], [0, 0, 0, 2, 2])
    np.testing.assert_allclose(r["reliability_accuracy"][3:], [0, 1])
    np.testing.assert_allclose(r["reliability_confidence"][3:], [0.65, 0.9], atol=1e-6)
    assert torch.isnan(r["reliability_accuracy"][:3]).all()
    assert _f(r["ece"]) == pytest.approx(0.5 * 0.65 + 0.5 * 0.1, abs=1e-6)
    # entropies: .469 (x2, correct), .971 and .881 (errors): a perfect ranking
    assert _f(r["auroc"]) == 1.0 and _f(r["average_precision"]) == 1.0


def test_per_class_by_pseudo_label() -> None:
    pseudo = torch.tensor([[0, 0, 1, 1, 2, 2]])
    probs = torch.nn.functional.one_hot(pseudo, 3).permute(0, 2, 1).double() * 0.6 + 0.1
    labels = torch.tensor([[0, 1, 1, 1, 0, 2]])
    u = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.8, 0.4]], dtype=F64)
    r = error_detection_report(probs, labels, from_logits=False, uncertainty=u, thresholds=0.5)
    pc = r["per_class"]
    np.testing.assert_array_equal(pc["num_voxels"], [2, 2, 2])
    np.testing.assert_array_equal(pc["num_errors"], [1, 0, 1])
    np.testing.assert_allclose(pc["error_rate"], [0.5, 0, 0.5])
    np.testing.assert_allclose(pc["auroc"], [1, math.nan, 1], equal_nan=True)
    assert _f(r["auroc"]) == 1.0
    # thresholds given as a number: 0-d overall, (C',) per class
    assert r["error_rate_high"].shape == () and pc["error_rate_high"].shape == (3,)
    np.testing.assert_allclose(pc["error_rate_high"], [1, math.nan, 1], equal_nan=True)
    np.testing.assert_allclose(pc["error_rate_low"], [0, 0, 0])
    assert int(pc["num_voxels"].sum()) == int(r["num_voxels"])


def test_perfect_and_inverted_detectors() -> None:
    logits, labels = problem(0, (4, 3, 32, 32))
    err = torch.as_tensor(errors_of(logits, labels)).reshape(labels.shape).double()
    g = torch.Generator().manual_seed(1)
    # error indicator + noise below one bin width (1e-3), away from the bin edges
    u = 0.25 + 0.5 * err + 1e-4 * torch.rand(err.shape, generator=g, dtype=F64)
    r = error_detection_report(logits, labels, from_logits=True, uncertainty=u)
    assert _f(r["auroc"]) == 1.0 and _f(r["average_precision"]) == 1.0
    assert _f(r["auroc_max_error"]) == 0.0
    np.testing.assert_allclose(r["retention_curve"], r["oracle_curve"], atol=1e-12)
    assert _f(r["retention_auc"]) == pytest.approx(_f(r["oracle_retention_auc"]), abs=1e-12)
    np.testing.assert_allclose(
        r["per_class"]["retention_curve"], r["per_class"]["oracle_curve"], atol=1e-12
    )
    inverted = error_detection_report(logits, labels, from_logits=True, uncertainty=1 - u)
    assert _f(inverted["auroc"]) == 0.0


def test_independent_detector_is_random() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 2, 128, 128, generator=g)
    labels = torch.randint(0, 2, (8, 128, 128), generator=g)
    u = torch.rand(8, 128, 128, generator=g)
    r = error_detection_report(logits, labels, from_logits=True, uncertainty=u)
    assert abs(_f(r["auroc"]) - 0.5) < 0.01
    assert abs(_f(r["retention_auc"]) - 0.5) < 0.01
    assert abs(_f(r["average_precision"]) - _f(r["error_rate"])) < 0.01
    inner = r["ratio_error_rate_high"][1:-1]
    assert (inner - r["error_rate"]).abs().max() < 0.03


def test_no_error_and_empty_class_are_nan_not_errors() -> None:
    probs = torch.tensor([[[0.2, 0.9]]])  # binary: pseudo 0, 1
    r = error_detection_report(probs, torch.tensor([[0, 1]]), from_logits=False)
    assert _f(r["error_rate"]) == 0.0
    for key in ("auroc", "average_precision", "retention_auc", "oracle_retention_auc"):
        assert math.isnan(_f(r[key])), key
    assert torch.isnan(r["retention_curve"]).all()
    d = r.to_dict()
    assert d["auroc"] is None and d["error_rate"] == 0.0
    json.dumps(d, allow_nan=False)
    # a class never predicted: all its rates NaN, its counts 0
    logits = torch.tensor([[[5.0, 4.0], [0.0, 0.0], [1.0, 9.0]]])  # pseudo 0, 2
    r = error_detection_report(logits, torch.tensor([[0, 1]]), from_logits=True)
    assert r["per_class"]["num_voxels"].tolist() == [1, 0, 1]
    assert math.isnan(_f(r["per_class"]["ece"][1]))


# --------------------------------------------------------------------------------------------
# against the reference, and properties


@st.composite
def problems(draw: st.DrawFn) -> dict[str, Any]:
    b = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    seed = draw(seeds())
    scale = draw(st.sampled_from([0.3, 2.0, 20.0]))
    logits, labels = problem(seed % 2**31, (b, c, *spatial), scale=scale)
    kind = draw(st.sampled_from(["centres", "continuous", "entropy"]))
    num_bins = draw(st.sampled_from([4, 37, 1000]))
    g = torch.Generator().manual_seed(seed % 2**31 + 1)
    if kind == "centres":  # exactly representable bin centres, many ties
        j = torch.randint(0, num_bins, labels.shape, generator=g, dtype=F64)
        u: Optional[torch.Tensor] = (j + 0.5) / num_bins
    elif kind == "continuous":
        u = torch.rand(labels.shape, generator=g, dtype=F64)
    else:
        u = None
    return {"logits": logits, "labels": labels, "u": u, "kind": kind, "num_bins": num_bins}


@PROPERTY
@given(problems())
def test_matches_reference_within_documented_bounds(p: dict[str, Any]) -> None:
    logits, labels, num_bins = p["logits"], p["labels"], p["num_bins"]
    r = error_detection_report(
        logits, labels, from_logits=True, uncertainty=p["u"], num_bins=num_bins
    )
    u = p["u"] if p["u"] is not None else entropy_map(logits, from_logits=True)
    u_np, err = u.numpy().reshape(-1), errors_of(logits, labels)
    assert int(r["num_voxels"]) == u_np.size and int(r["num_errors"]) == err.sum()
    k = r["retention_fractions"].numpy()
    ref_auc = ref_auroc(u_np, err)
    if math.isnan(ref_auc):
        assert math.isnan(_f(r["auroc"]))
    elif p["kind"] == "centres":
        assert _f(r["auroc"]) == pytest.approx(ref_auc, abs=1e-12)
        assert _f(r["auroc_max_error"]) <= 0.5 + 1e-12
        assert _f(r["average_precision"]) == pytest.approx(
            ref_average_precision(u_np, err), abs=1e-12
        )
        curve, area = ref_retention(u_np, err, k)
        np.testing.assert_allclose(r["retention_curve"], curve, atol=1e-12)
        assert _f(r["retention_auc"]) == pytest.approx(area, abs=1e-12)
    else:
        assert abs(_f(r["auroc"]) - ref_auc) <= _f(r["auroc_max_error"]) + 1e-12
        # mass of one bin: the largest share of errors in one bin (computed here by numpy)
        bins = np.clip(np.floor(u_np * num_bins), 0, num_bins - 1).astype(int)
        e_b = np.bincount(bins[err], minlength=num_bins)
        n_b = np.bincount(bins, minlength=num_bins)
        curve, area = ref_retention(u_np, err, k)
        bound = e_b.max() / err.sum()
        assert np.abs(r["retention_curve"].numpy() - curve).max() <= bound + 1e-12
        area_bound = float(np.sum(n_b / u_np.size * e_b / err.sum()))
        assert abs(_f(r["retention_auc"]) - area) <= area_bound + 1e-12
    # the exact threshold sweep against masks
    thresholds = r["thresholds"].numpy()
    high = u_np[None, :] > thresholds[:, None].astype(u_np.dtype)
    np.testing.assert_allclose(r["high_fraction"], high.mean(1), atol=1e-15)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(
            r["error_rate_high"], (high & err).sum(1) / high.sum(1), atol=1e-15
        )
        np.testing.assert_allclose(
            r["error_rate_low"], (~high & err).sum(1) / (~high).sum(1), atol=1e-15
        )
    if logits.shape[1] == 1:
        fg = torch.sigmoid(logits[:, 0]).numpy().reshape(-1)
        confidence = np.maximum(fg, 1 - fg)
    else:
        confidence = torch.softmax(logits, 1).amax(1).numpy().reshape(-1)
    assert _f(r["ece"]) == pytest.approx(ref_ece(confidence, ~err, 15), abs=1e-6)


def defined_rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows[~torch.isnan(rows).any(-1)]


@PROPERTY
@given(problems(), st.booleans())
def test_properties(p: dict[str, Any], ignore: bool) -> None:
    labels = p["labels"].clone()
    if ignore:
        labels.view(-1)[::3] = 255
    r = error_detection_report(
        p["logits"], labels, from_logits=True, uncertainty=p["u"], num_bins=p["num_bins"],
        ignore_index=255 if ignore else None,
    )  # fmt: skip
    for group in (r, r["per_class"]):
        curve, oracle = group["retention_curve"], group["oracle_curve"]
        defined = ~torch.isnan(curve).any(-1)
        c, o = curve[defined], oracle[defined]
        assert (c.diff(dim=-1) >= -1e-12).all() and (o.diff(dim=-1) >= -1e-12).all()
        assert ((c >= 0) & (c <= 1 + 1e-12) & (c <= o + 1e-12)).all()
        if c.numel():
            assert (c[..., 0] == 0).all() and (c[..., -1] - 1).abs().max() < 1e-12
        for key in ("auroc", "average_precision", "retention_auc", "oracle_retention_auc", "ece"):
            v = group[key][~torch.isnan(group[key])]
            assert ((v >= 0) & (v <= 1 + 1e-12)).all(), key
        auc = group["retention_auc"][defined]
        assert (auc <= group["oracle_retention_auc"][defined] + 1e-12).all()
        # sweeps: the high region shrinks as tau grows; ratio thresholds fall as r grows
        assert (defined_rows(group["high_fraction"]).diff(dim=-1) <= 0).all()
        assert (defined_rows(group["ratio_thresholds"]).diff(dim=-1) <= 1e-12).all()
    pc = r["per_class"]
    assert int(pc["num_voxels"].sum()) == int(r["num_voxels"])
    assert int(pc["num_errors"].sum()) == int(r["num_errors"])
    assert int(r["num_voxels"]) == int((labels != 255).sum())


# --------------------------------------------------------------------------------------------
# streaming, numpy, dtypes, devices


@settings(max_examples=20, deadline=None)
@given(problems(), st.integers(1, 3))
def test_streaming_equals_one_shot(p: dict[str, Any], chunk: int) -> None:
    logits, labels, u = p["logits"], p["labels"], p["u"]
    options = {"from_logits": True, "num_bins": p["num_bins"], "thresholds": [0.2, 0.5]}
    one_shot = error_detection_report(logits, labels, uncertainty=u, **options)
    acc = ErrorDetectionAccumulator(**options)
    for start in range(0, logits.shape[0], chunk):
        rows = slice(start, start + chunk)
        acc.update(logits[rows], labels[rows], uncertainty=None if u is None else u[rows])
    assert_reports_equal(acc.compute(), one_shot, exact=True)


def test_compute_does_not_change_the_state() -> None:
    logits, labels = problem(3)
    acc = ErrorDetectionAccumulator(from_logits=True)
    acc.update(logits[:1], labels[:1])
    first = acc.compute()
    assert_reports_equal(acc.compute(), first)
    acc.update(logits[1:], labels[1:])
    assert_reports_equal(acc.compute(), error_detection_report(logits, labels, from_logits=True))
    acc.reset()
    with pytest.raises(RuntimeError, match="at least one update"):
        acc.compute()


def test_numpy_equals_torch() -> None:
    logits, labels = problem(4, (2, 4, 5, 7))
    u = torch.rand(2, 5, 7, dtype=F64, generator=torch.Generator().manual_seed(0))
    for uncertainty in (None, u):
        t = error_detection_report(logits, labels, from_logits=True, uncertainty=uncertainty)
        n = error_detection_report(
            logits.numpy(), labels.numpy(), from_logits=True,
            uncertainty=None if uncertainty is None else uncertainty.numpy(),
        )  # fmt: skip
        assert isinstance(n, ErrorDetectionReport)
        assert isinstance(n["auroc"], np.ndarray) and isinstance(n["per_class"]["ece"], np.ndarray)
        assert isinstance(t["auroc"], torch.Tensor)
        assert_reports_equal(n, t)
    # mixed: numpy labels with torch predictions follow the predictions
    mixed = error_detection_report(logits, labels.numpy(), from_logits=True)
    assert isinstance(mixed["auroc"], torch.Tensor)


def test_binary_single_channel_equals_two_classes() -> None:
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 1, 9, 9, generator=g, dtype=F64) * 3
    labels = torch.randint(0, 2, (2, 9, 9), generator=g)
    u = torch.rand(2, 9, 9, generator=g, dtype=F64)
    one = error_detection_report(z, labels, from_logits=True, uncertainty=u)
    two = error_detection_report(
        torch.cat([torch.zeros_like(z), z], 1), labels, from_logits=True, uncertainty=u
    )
    assert_reports_equal(one, two, exact=False)
    probs = error_detection_report(torch.sigmoid(z), labels, from_logits=False, uncertainty=u)
    assert_reports_equal(one, probs, exact=False)
    assert one["per_class"]["auroc"].shape == (2,)


def test_ignore_index_equals_dropping_the_voxels() -> None:
    logits, labels = problem(6, (3, 3, 4, 4))
    ignored = labels.clone()
    ignored[1] = -1
    r = error_detection_report(logits, ignored, from_logits=True, ignore_index=-1)
    kept = torch.tensor([0, 2])
    assert_reports_equal(r, error_detection_report(logits[kept], labels[kept], from_logits=True))


def test_value_range_and_clamping() -> None:
    logits, labels = problem(7, (2, 3, 8, 8))
    nats = entropy_map(logits, from_logits=True, normalize=False)
    r = error_detection_report(
        logits, labels, from_logits=True, uncertainty=nats, value_range=(0.0, math.log(3))
    )
    default = error_detection_report(logits, labels, from_logits=True)
    assert _f(r["auroc"]) == pytest.approx(_f(default["auroc"]), abs=1e-3)
    assert _f(r["out_of_range_fraction"]) == 0.0
    # thresholds default to the range: 21 points from 0 to ln 3
    assert _f(r["thresholds"][-1]) == pytest.approx(math.log(3))
    clamped = error_detection_report(logits, labels, from_logits=True, uncertainty=nats)
    expected = float(((nats < 0) | (nats > 1)).double().mean())
    assert _f(clamped["out_of_range_fraction"]) == pytest.approx(expected)
    assert expected > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    logits, labels = problem(8, (2, 3, 4, 4, 4))  # 3-D volumes
    r = error_detection_report(logits.to(dtype), labels, from_logits=True)
    ref = error_detection_report(logits.to(dtype).double(), labels, from_logits=True)
    assert r["auroc"].dtype == F64
    assert int(r["num_errors"]) == int(ref["num_errors"])
    assert _f(r["auroc"]) == pytest.approx(_f(ref["auroc"]), abs=0.02)


def test_no_grad_and_detached() -> None:
    logits, labels = problem(9)
    logits.requires_grad_(True)
    r = error_detection_report(logits, labels, from_logits=True)
    assert not r["auroc"].requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:  # pragma: no cover - CPU CI
    logits, labels = problem(10, (2, 3, 16, 16))
    cpu = error_detection_report(logits, labels, from_logits=True)
    acc = ErrorDetectionAccumulator(from_logits=True)
    acc.update(logits[:1].cuda(), labels[:1].cuda())  # allocation outside the check
    logits_cuda, labels_cuda = logits[1:].cuda(), labels[1:].cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # update must not synchronise with the host
    try:
        acc.update(logits_cuda, labels_cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cuda = acc.compute()
    assert cuda["auroc"].device.type == "cuda"
    assert_reports_equal({k: _cpu(v) for k, v in cuda.items()}, cpu, exact=False)


def _cpu(v: Any) -> Any:
    return {k: x.cpu() for k, x in v.items()} if isinstance(v, dict) else v.cpu()


# --------------------------------------------------------------------------------------------
# errors


def test_argument_errors() -> None:
    logits, labels = problem(11, (2, 3, 4, 4))
    with pytest.raises(TypeError, match="from_logits"):
        error_detection_report(logits, labels)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="`from_logits` must be a bool"):
        error_detection_report(logits, labels, from_logits=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`labels` must have shape \(B, \*S\) = \(2, 4, 4\)"):
        error_detection_report(logits, labels[:, :3], from_logits=True)
    with pytest.raises(ValueError, match=r"`uncertainty` must have shape .* got \(2, 3, 4, 4\)"):
        error_detection_report(logits, labels, from_logits=True, uncertainty=logits)
    with pytest.raises(TypeError, match="`uncertainty` must have a floating dtype"):
        error_detection_report(logits, labels, from_logits=True, uncertainty=labels)
    with pytest.raises(TypeError, match="`probs_or_logits` must have a floating dtype"):
        error_detection_report(labels[:, None], labels, from_logits=True)
    with pytest.raises(TypeError, match=r"torch\.Tensor or numpy\.ndarray, got list"):
        error_detection_report([1.0], labels, from_logits=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`labels` must be labels: integers in \[0, 2\]"):
        error_detection_report(logits, labels + 3, from_logits=True)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        error_detection_report(logits, labels, from_logits=False)
    with pytest.raises(ValueError, match="`uncertainty` must be finite"):
        u = torch.full((2, 4, 4), math.nan)
        error_detection_report(logits, labels, from_logits=True, uncertainty=u)
    # a first update that fails its value checks leaves no state behind
    acc = ErrorDetectionAccumulator(from_logits=True)
    with pytest.raises(ValueError, match="`labels` must be labels"):
        acc.update(logits, labels + 3)
    with pytest.raises(RuntimeError, match="at least one update"):
        acc.compute()
    # with validate=False bad values do not raise (and NaN uncertainty lands in the top bin)
    error_detection_report(
        logits, labels, from_logits=True, uncertainty=torch.full((2, 4, 4), math.nan),
        validate=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"num_bins": 0}, ValueError, "`num_bins` must be an int >= 1, got 0"),
        ({"num_bins": 10.0}, TypeError, "`num_bins` must be an int"),
        ({"value_range": (1.0, 0.0)}, ValueError, r"`value_range` must be .* lo < hi"),
        ({"value_range": 1.0}, TypeError, r"`value_range` must be a pair of numbers"),
        ({"thresholds": [0.1, math.nan]}, ValueError, "`thresholds` must be finite"),
        ({"thresholds": []}, ValueError, "`thresholds` must hold at least one value"),
        ({"thresholds": "0.5"}, TypeError, "`thresholds` must be a number"),
        ({"ratios": 1.5}, ValueError, r"`ratios` must lie in \[0, 1\], got \[1.5\]"),
        ({"ratios": torch.ones(2, 2)}, TypeError, r"`ratios` .* shape \(2, 2\)"),
        ({"retention_points": 1}, ValueError, "`retention_points` must be an int >= 2"),
        ({"calibration_bins": 0}, ValueError, "`calibration_bins` must be an int >= 1"),
        ({"ignore_index": 1.5}, TypeError, "`ignore_index` must be an int or None"),
        ({"validate": 1}, TypeError, "`validate` must be a bool"),
        ({"sync_dist": "yes"}, TypeError, "`sync_dist` must be False, True"),
    ],
)
def test_option_errors(options: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ErrorDetectionAccumulator(from_logits=True, **options)


def test_update_consistency_errors() -> None:
    logits, labels = problem(12, (2, 3, 4, 4))
    acc = ErrorDetectionAccumulator(from_logits=True)
    acc.update(logits, labels)
    with pytest.raises(ValueError, match=r"number of classes of the earlier updates \(C = 3\)"):
        acc.update(logits[:, :2], labels.clamp(max=1))
    with pytest.raises(ValueError, match="must be on the device of the earlier updates"):
        acc.update(logits.to("meta"), labels.to("meta"))


# --------------------------------------------------------------------------------------------
# sync_dist


def test_sync_dist_false_makes_no_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no collective expected")

    monkeypatch.setattr(dist, "all_reduce", forbidden)
    logits, labels = problem(13)
    error_detection_report(logits, labels, from_logits=True, sync_dist=False)


def test_sync_dist_without_process_group_raises() -> None:
    logits, labels = problem(14)
    acc = ErrorDetectionAccumulator(from_logits=True, sync_dist=True)
    acc.update(logits, labels)  # update never synchronises
    with pytest.raises(RuntimeError, match="init_process_group"):
        acc.compute()


def test_sync_dist_sums_the_histograms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two simulated ranks: the reduction adds the other rank's state."""
    logits, labels = problem(15, (5, 3, 4, 4))
    other = ErrorDetectionAccumulator(from_logits=True)
    other.update(logits[2:], labels[2:])
    calls = []

    def fake_all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
        calls.append(group)
        return tensor + torch.cat([t.reshape(-1) for t in other._state()])

    monkeypatch.setattr(diagnostics, "all_reduce_sum", fake_all_reduce_sum)
    acc = ErrorDetectionAccumulator(from_logits=True, sync_dist=True)
    acc.update(logits[:2], labels[:2])
    assert_reports_equal(acc.compute(), error_detection_report(logits, labels, from_logits=True))
    assert calls == [True]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        logits, labels = problem(16, (5, 3, 4, 4))
        rows = slice(0, 2) if rank == 0 else slice(2, 5)
        acc = ErrorDetectionAccumulator(from_logits=True, sync_dist=True)
        acc.update(logits[rows], labels[rows])
        torch.save(dict(acc.compute()), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_sync_dist_two_gloo_ranks(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    context = mp.start_processes(
        _rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:  # pragma: no cover
            for process in context.processes:
                process.terminate()
            pytest.fail("the spawned ranks did not finish")
    logits, labels = problem(16, (5, 3, 4, 4))
    expected = error_detection_report(logits, labels, from_logits=True)
    for rank in range(2):
        assert_reports_equal(torch.load(tmp_path / f"rank{rank}.pt"), expected)


# --------------------------------------------------------------------------------------------
# plots


@pytest.fixture(scope="module")
def report() -> ErrorDetectionReport:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    g = torch.Generator().manual_seed(17)
    labels = torch.randint(0, 3, (2, 24, 24), generator=g)
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    logits = 2 * one_hot + torch.randn(2, 3, 24, 24, generator=g)
    return error_detection_report(logits, labels, from_logits=True)


def _saved(fig: Any, path: Path) -> None:
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_plots(report: ErrorDetectionReport, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from bual_losses.plotting import (
        plot_error_detection_report,
        plot_error_rate_vs_threshold,
        plot_reliability_diagram,
        plot_retention_curve,
    )

    fig = plot_retention_curve(report, per_class=True, class_names=["bg", "a", "b"])
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_ylabel() == "fraction of errors caught"
    assert len(ax.get_lines()) == 3 + 3  # curve, oracle, random, three classes
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), report["retention_curve"])
    _saved(fig, tmp_path / "retention.png")

    fig = plot_error_rate_vs_threshold(report)
    assert fig.axes[0].get_xlabel() == "uncertainty threshold τ"
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), report["error_rate_high"])
    fig = plot_error_rate_vs_threshold(report.to_dict(), sweep="ratio", per_class=True)
    assert fig.axes[0].get_title() == "error rate vs ratio"
    _saved(fig, tmp_path / "rates.png")

    fig = plot_reliability_diagram(report)
    assert "ECE" in fig.axes[0].get_title()
    assert len(fig.axes[0].patches) == int((report["reliability_counts"] > 0).sum())
    _saved(fig, tmp_path / "reliability.png")

    fig = plot_error_detection_report(json.loads(json.dumps(report.to_dict())))
    assert [a.get_title() for a in fig.axes][:2] == ["error retention", "error rate vs threshold"]
    assert len(fig.axes) == 3
    _saved(fig, tmp_path / "summary.png")

    # drawing into a given axes returns its figure
    outer = Figure()
    axes = outer.subplots(1, 2)
    assert plot_retention_curve(report, ax=axes[1]) is outer
    # a single threshold draws points
    single = error_detection_report(
        torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), from_logits=True,
        thresholds=0.5,
    )  # fmt: skip
    assert len(plot_error_rate_vs_threshold(single).axes[0].get_lines()[0].get_xdata()) == 1


def test_overlay_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bual_losses.plotting import plot_error_overlay

    g = torch.Generator().manual_seed(18)
    label = torch.randint(0, 3, (16, 16), generator=g)
    label[0] = 255
    prediction = torch.randint(0, 3, (16, 16), generator=g)
    u = torch.rand(16, 16, generator=g)
    fig = plot_error_overlay(
        torch.rand(16, 16), label, prediction, u, threshold=0.5, ignore_index=255
    )
    titles = [a.get_title() for a in fig.axes]
    assert titles[:5] == ["image", "label", "prediction", "uncertainty", "errors"]
    _saved(fig, tmp_path / "overlay.png")
    fig = plot_error_overlay(
        np.random.default_rng(0).random((16, 16, 3)), label.numpy(), prediction.numpy(), u
    )
    assert "wrong" in fig.axes[4].get_xlabel()
    with pytest.raises(ValueError, match=r"`label` must be one 2-D slice \(H, W\)"):
        plot_error_overlay(u, label[None], prediction, u)
    with pytest.raises(ValueError, match=r"`prediction` must have the shape of `label`"):
        plot_error_overlay(u, label, prediction[:8], u)
    with pytest.raises(TypeError, match=r"`image` must be a torch\.Tensor or numpy\.ndarray"):
        plot_error_overlay([[0.0]], label, prediction, u)


def test_plot_errors(report: ErrorDetectionReport, monkeypatch: pytest.MonkeyPatch) -> None:
    from bual_losses.plotting import plot_error_rate_vs_threshold, plot_retention_curve

    with pytest.raises(TypeError, match="`report` must be an error-detection report"):
        plot_retention_curve([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no key 'retention_curve'"):
        plot_retention_curve({"retention_fractions": [0, 1]})
    with pytest.raises(ValueError, match=r"`class_names` must have one name per class \(3\)"):
        plot_retention_curve(report, per_class=True, class_names=["a"])
    with pytest.raises(ValueError, match="`sweep` must be one of"):
        plot_error_rate_vs_threshold(report, sweep="tau")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"bual-losses\[plot\]"):
        plot_retention_curve(report)


def test_import_does_not_need_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh copies of both modules execute with matplotlib hidden (imported lazily)."""
    import importlib.util

    for name in [key for key in sys.modules if key.split(".")[0] == "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for module in ("diagnostics", "plotting"):
        path = Path(diagnostics.__file__).with_name(f"{module}.py")
        spec = importlib.util.spec_from_file_location(f"bual_losses._fresh_{module}", path)
        assert spec is not None and spec.loader is not None
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize("module", ["bual_losses.diagnostics", "bual_losses.plotting"])
def test_docstring_examples(module: str) -> None:
    if module.endswith("plotting"):
        pytest.importorskip("matplotlib")
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
