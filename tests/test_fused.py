"""Correctness of the fused region statistics (bual_losses.fused) against the reference.

The fused path must equal ``impl="reference"`` on every option, 2D and 3D alike, in value and in
gradient: float64 to 1e-10, float32 to 1e-5 relative. Property tests draw shapes, targets,
weights and options; the chunking tests shrink ``CHUNK_ELEMENTS`` so that chunks split inside
samples and group several samples; derived uncertainty weights are compared with an explicit
weight computed here; gradcheck runs in float64; a memory test proves that nothing of size
``(B, C, *S)`` is saved.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import bual_losses.fused as fused_module
from bual_losses._core import Finish, RegionStats, finish, parse_options
from bual_losses._reference import reference_stats
from bual_losses.engines import use_engine
from bual_losses.fused import UncertaintyWeight, fused_stats
from bual_losses.losses import region_ce_dice_loss, region_ce_loss, region_dice_loss
from tests.strategies import seeds, spatial_shapes

# every test here runs on both fused engines (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("fused_engine")

PROPERTY = settings(max_examples=80, deadline=None)
CHUNKED = settings(max_examples=40, deadline=None)
F64 = {"rtol": 1e-10, "atol": 1e-10}

FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "ce_dice": region_ce_dice_loss,
    "ce": region_ce_loss,
    "dice": region_dice_loss,
}

# keyword arguments of region_ce_dice_loss that parse_options takes (with their defaults)
PARSE_DEFAULTS: dict[str, Any] = {
    "include_background": True,
    "softmax": None,
    "sigmoid": None,
    "squared_pred": False,
    "smooth_nr": 1e-5,
    "smooth_dr": 1e-5,
    "batch": False,
    "class_weight": None,
    "ignore_index": None,
    "eps": 1e-8,
}
FINISH_DEFAULTS: dict[str, Any] = {"lambda_ce": 1.0, "lambda_dice": 1.0, "reduction": "mean"}


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """The tensors here are tiny: intra-op threads only spin (3x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# inputs


class Case(NamedTuple):
    """One call: ``FUNCTIONS[function](logits, target, weight, **options)``."""

    logits: torch.Tensor
    target: torch.Tensor
    weight: Optional[torch.Tensor]
    function: str
    options: dict[str, Any]


LABEL_KINDS = ("labels", "labels_ch_int", "labels_ch_float", "labels_i32", "labels_u8")
TARGET_KINDS = (*LABEL_KINDS, "labels_bool", "onehot", "soft")
WEIGHT_KINDS = (
    None,
    "float",
    "float_ch",
    "float32",
    "bool",
    "broadcast",
    "broadcast_ch",
    "zeros",
    "empty_sample",
)


def make_target(
    kind: str,
    shape: tuple[int, ...],
    generator: torch.Generator,
    dtype: torch.dtype,
    ignore_value: Optional[int] = None,
    ignore_fraction: float = 0.0,
) -> torch.Tensor:
    """A target of ``kind`` for logits of ``shape`` (B, C, *S); C == 1 is binary."""
    b, c, *spatial = shape
    k = max(c, 2)
    labels = torch.randint(0, k, (b, *spatial), generator=generator)
    if ignore_value is not None:
        hit = torch.rand(labels.shape, generator=generator) < ignore_fraction
        labels = torch.where(hit, torch.full_like(labels, ignore_value), labels)
    if kind == "labels":
        return labels
    if kind == "labels_ch_int":
        return labels.unsqueeze(1)
    if kind == "labels_ch_float":  # only for C >= 2: a float (B, 1, *S) is a probability for C == 1
        return labels.unsqueeze(1).float()
    if kind == "labels_i32":
        return labels.int()
    if kind == "labels_u8":
        return labels.to(torch.uint8)
    if kind == "labels_bool":
        return labels.bool()
    if kind == "onehot":
        if c == 1:
            return labels.unsqueeze(1).to(dtype)
        return F.one_hot(labels, c).movedim(-1, 1).to(dtype)  # non-contiguous on purpose
    if kind == "soft":
        if c == 1:
            return torch.rand((b, 1, *spatial), generator=generator, dtype=dtype)
        scores = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
        return torch.softmax(scores, dim=1).to(dtype)
    raise AssertionError(kind)


def make_weight(
    kind: Optional[str], shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype
) -> Optional[torch.Tensor]:
    b, _, *spatial = shape

    def rand(*size: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.rand(size, generator=generator, dtype=dt) * 3

    if kind is None:
        return None
    if kind == "float":
        return rand(b, *spatial)
    if kind == "float_ch":
        return rand(b, 1, *spatial)
    if kind == "float32":
        return rand(b, *spatial, dt=torch.float32)
    if kind == "bool":
        return torch.rand((b, *spatial), generator=generator) < 0.6
    if kind == "broadcast":
        return rand(1, *spatial)
    if kind == "broadcast_ch":
        return rand(1, 1, *spatial)
    if kind == "zeros":
        w = rand(b, *spatial)
        return w * (torch.rand(w.shape, generator=generator) < 0.5)
    if kind == "empty_sample":  # the first sample has an empty region
        w = rand(b, *spatial)
        w[0] = 0
        return w
    raise AssertionError(kind)


@st.composite
def cases(
    draw: st.DrawFn,
    *,
    dtype: torch.dtype = torch.float64,
    max_batch: int = 3,
    max_side: int = 4,
    scales: tuple[float, ...] = (0.1, 1.0, 5.0, 50.0),
) -> Case:
    """Logits, target, region weight and options for one of the three loss functions."""
    c = draw(st.integers(1, 5))
    shape = (
        draw(st.integers(1, max_batch)),
        c,
        *draw(spatial_shapes(min_rank=1, max_rank=3, max_side=max_side)),
    )
    k = max(c, 2)
    generator = torch.Generator().manual_seed(draw(seeds()))
    scale = draw(st.sampled_from(scales))
    logits = torch.randn(shape, generator=generator, dtype=dtype) * scale

    kinds = [kd for kd in TARGET_KINDS if not (c == 1 and kd == "labels_ch_float")]
    kinds = [kd for kd in kinds if not (k > 2 and kd == "labels_bool")]
    kind = draw(st.sampled_from(kinds))
    target_dtype = draw(st.sampled_from([dtype, torch.float32]))
    ignore_index = ignore_value = None
    fraction = 0.0
    if kind in LABEL_KINDS and not (c == 1 and kind == "labels_ch_float"):
        mode = draw(st.sampled_from(["none", "present", "absent"]))
        if mode != "none":
            ignore_index = 255 if kind == "labels_u8" else draw(st.sampled_from([255, -1]))
        if mode == "present":
            ignore_value = ignore_index
            fraction = draw(st.sampled_from([0.25, 0.6]))
    target = make_target(kind, shape, generator, target_dtype, ignore_value, fraction)
    weight = make_weight(draw(st.sampled_from(WEIGHT_KINDS)), shape, generator, dtype)

    function = draw(st.sampled_from(sorted(FUNCTIONS)))
    options: dict[str, Any] = {}
    if function != "ce":
        options["include_background"] = draw(st.booleans())
        options["squared_pred"] = draw(st.booleans())
        options["smooth_nr"] = draw(st.sampled_from([0.0, 1e-5, 0.5]))
        options["smooth_dr"] = draw(st.sampled_from([0.0, 1e-5, 1.0]))
        options["batch"] = draw(st.booleans())
    if function == "ce_dice":
        options["lambda_ce"] = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
        options["lambda_dice"] = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    options["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    if function == "ce_dice" and options["reduction"] == "none":
        options["batch"] = False
    if draw(st.booleans()):
        values = draw(st.lists(st.sampled_from([0.0, 0.3, 1.0, 2.5]), min_size=k, max_size=k))
        as_tensor = draw(st.booleans())
        options["class_weight"] = torch.tensor(values, dtype=dtype) if as_tensor else values
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
    if draw(st.booleans()):
        options["sigmoid" if c == 1 else "softmax"] = True
    return Case(logits, target, weight, function, options)


def case_options(case: Case, impl: str = "fused") -> Any:
    """The ``Options`` of ``case`` (as the public functions build them)."""
    kwargs = {key: case.options.get(key, value) for key, value in PARSE_DEFAULTS.items()}
    if case.function == "ce":
        kwargs.update(squared_pred=False, batch=False, include_background=True)
    return parse_options(case.logits, case.target, case.weight, impl=impl, validate=True, **kwargs)


# --------------------------------------------------------------------------------------------
# running and comparing


def fused_region_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    region_weight: Optional[torch.Tensor],
    opts: Any,
    derived_weight: Optional[UncertaintyWeight] = None,
) -> tuple[RegionStats, Optional[torch.Tensor]]:
    """``fused_stats`` as ``(stats, mass)`` (``mass`` is None if only stats are returned)."""
    out = fused_stats(logits, target, region_weight, opts, derived_weight=derived_weight)
    if isinstance(out, RegionStats):
        return out, None
    stats, mass = out
    assert isinstance(stats, RegionStats)
    return stats, mass


class Result(NamedTuple):
    value: torch.Tensor
    grad: torch.Tensor


def cotangent(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def run(case: Case, impl: str, logits: Optional[torch.Tensor] = None) -> Result:
    """Value of the loss and the gradient of ``<loss, v>`` w.r.t. the logits."""
    z = (case.logits if logits is None else logits).detach().clone().requires_grad_()
    value = FUNCTIONS[case.function](z, case.target, case.weight, impl=impl, **case.options)
    if not value.requires_grad:  # lambda_ce = lambda_dice = 0: a constant
        return Result(value.detach(), torch.zeros_like(z))
    (grad,) = torch.autograd.grad((value * cotangent(value.shape, value.dtype)).sum(), z)
    return Result(value.detach(), grad)


def assert_results_close(fused: Result, reference: Result, **tol: Any) -> None:
    assert fused.value.dtype == reference.value.dtype
    assert fused.value.shape == reference.value.shape
    assert fused.grad.dtype == reference.grad.dtype
    # equal_nan: where the reference's gradient overflows (smooth_dr = 0 and a class with
    # vanishing mass) the fused one must be non-finite at the same places, NaN where it is NaN
    close = partial(torch.testing.assert_close, **tol, equal_nan=True)
    close(fused.value, reference.value, msg=lambda m: f"value: {m}")
    close(fused.grad, reference.grad, msg=lambda m: f"grad: {m}")


def assert_stats_close(fused: RegionStats, reference: RegionStats, **tol: Any) -> None:
    for name, a, b in zip(RegionStats._fields, fused, reference):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


def assert_fused_equals_reference(case: Case, **tol: Any) -> None:
    tol = tol or F64
    opts = case_options(case)
    with torch.no_grad():
        assert_stats_close(
            fused_region_stats(case.logits, case.target, case.weight, opts)[0],
            reference_stats(case.logits, case.target, case.weight, opts),
            **tol,
        )
    assert_results_close(run(case, "fused"), run(case, "reference"), **tol)


def on_the_chunked_engine(test: Callable[..., None]) -> Callable[..., None]:
    """For tests of the CPU engine's node itself (what it saves, what its ctx holds): they run
    there whatever engine the module's fixture selects."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        with use_engine("chunked"):
            test(*args, **kwargs)

    return wrapper


@contextmanager
def chunk_elements(n: int) -> Iterator[None]:
    """Temporarily set ``bual_losses.fused.CHUNK_ELEMENTS`` (safe inside hypothesis tests)."""
    old = fused_module.CHUNK_ELEMENTS
    fused_module.CHUNK_ELEMENTS = n
    try:
        yield
    finally:
        fused_module.CHUNK_ELEMENTS = old


def simple_case(
    shape: tuple[int, ...],
    kind: str = "labels",
    weight: Optional[str] = "float",
    function: str = "ce_dice",
    dtype: torch.dtype = torch.float64,
    scale: float = 3.0,
    seed: int = 0,
    **options: Any,
) -> Case:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator, dtype=dtype) * scale
    target = make_target(kind, shape, generator, dtype)
    return Case(logits, target, make_weight(weight, shape, generator, dtype), function, options)


# --------------------------------------------------------------------------------------------
# 1. fused == reference on every option (float64)


@PROPERTY
@given(case=cases())
def test_fused_equals_reference_float64(case: Case) -> None:
    assert_fused_equals_reference(case)


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 3, 3, 4, 2), (3, 1, 4, 3), (2, 1, 2, 3, 3)])
@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_fused_equals_reference_2d_3d_grid(
    function: str, shape: tuple[int, ...], kind: str
) -> None:
    """A fixed grid so that 2D/3D x binary/multi-class x every target family always runs."""
    case = simple_case(
        shape, kind, function=function, class_weight=[0.5, 2.0, 1.0][: max(2, shape[1])]
    )
    assert_fused_equals_reference(case)
    options = {"squared_pred": True, "batch": True, "include_background": False}
    if function == "ce":
        options = {"reduction": "sum"}
    assert_fused_equals_reference(case._replace(options=options))


# --------------------------------------------------------------------------------------------
# 2. chunking: chunks inside samples and groups of samples


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 1000])
@pytest.mark.parametrize("batch, channels, voxels", [(1, 1, 1), (3, 5, 17), (4, 2, 9), (2, 3, 100)])
def test_chunks_cover_every_voxel_once(chunk: int, batch: int, channels: int, voxels: int) -> None:
    with chunk_elements(chunk):
        chunks = fused_module._chunks(batch, voxels, channels)
    seen = torch.zeros(batch, voxels, dtype=torch.long)
    for ch in chunks:
        assert 0 <= ch.b0 < ch.b1 <= batch and 0 <= ch.s0 < ch.s1 <= voxels
        assert ch.b1 - ch.b0 == 1 or (ch.s0, ch.s1) == (0, voxels)  # groups hold whole samples
        assert (ch.b1 - ch.b0) * (ch.s1 - ch.s0) * channels <= max(chunk, channels)
        seen[ch.b0 : ch.b1, ch.s0 : ch.s1] += 1
    assert torch.equal(seen, torch.ones_like(seen))


@CHUNKED
@given(case=cases(max_side=5), chunk=st.sampled_from([7, 64, 1000]))
def test_fused_equals_reference_with_tiny_chunks(case: Case, chunk: int) -> None:
    with chunk_elements(chunk):
        assert_fused_equals_reference(case)


@pytest.mark.parametrize("chunk", [7, 13, 64, 1000])
@pytest.mark.parametrize("kind", ["labels", "soft"])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_chunk_boundaries_with_every_option(chunk: int, kind: str, channels: int) -> None:
    """Odd sizes: chunks end mid-sample, mid-row, and group 2-3 samples with a ragged tail."""
    shape = (5, channels, 3, 7)
    kw: dict[str, Any] = {"squared_pred": True, "class_weight": [0.2, 1.5, 3.0][: max(2, channels)]}
    if kind == "labels":
        kw["ignore_index"] = 255
    case = simple_case(shape, kind, weight="broadcast", **kw)
    if kind == "labels":
        target = case.target.clone()
        target[:, 1, 2:5] = 255
        case = case._replace(target=target)
    with chunk_elements(chunk):
        assert_fused_equals_reference(case)
        options = {"batch": True, "ignore_index": 255} if kind == "labels" else {"batch": True}
        assert_fused_equals_reference(case._replace(weight=None, options=options))


# --------------------------------------------------------------------------------------------
# 3. float32


@settings(max_examples=60, deadline=None)
@given(case=cases(dtype=torch.float32, scales=(0.1, 1.0, 5.0)))
def test_fused_equals_reference_float32(case: Case) -> None:
    """Logit scales up to 5: larger, confident logits hit the xfail below (CE precision)."""
    fused, reference = run(case, "fused"), run(case, "reference")
    assert fused.value.dtype == reference.value.dtype == torch.float32
    assert fused.grad.dtype == torch.float32
    torch.testing.assert_close(fused.value, reference.value, rtol=1e-5, atol=1e-6)
    grad_atol = 1e-5 * max(float(reference.grad.abs().max()), 1e-3)
    torch.testing.assert_close(fused.grad, reference.grad, rtol=1e-5, atol=grad_atol)

    # and against the float64 computation on the same (exactly representable) inputs
    def widen(x: Any) -> Any:
        is_float = isinstance(x, torch.Tensor) and x.is_floating_point()
        return x.double() if is_float else x

    options = {key: widen(value) for key, value in case.options.items()}
    wide = Case(*(widen(x) for x in case[:3]), case.function, options)
    exact = run(wide, "reference")
    torch.testing.assert_close(fused.value.double(), exact.value, rtol=1e-5, atol=1e-6)
    exact_atol = 1e-5 * max(float(exact.grad.abs().max()), 1e-3)
    torch.testing.assert_close(fused.grad.double(), exact.grad, rtol=1e-5, atol=exact_atol)


@pytest.mark.parametrize("kind", ["labels", "soft"])
@pytest.mark.parametrize("pattern", ["confident", "offset", "ties"])
def test_float32_ce_keeps_precision_for_large_logits(kind: str, pattern: str) -> None:
    generator = torch.Generator().manual_seed(0)
    shape = (2, 3, 5, 5)
    labels = torch.randint(0, 3, (2, 5, 5), generator=generator)
    one_hot = F.one_hot(labels, 3).movedim(-1, 1).float()
    noise = torch.randn(shape, generator=generator)
    if pattern == "confident":  # right and sure of it: CE ~ 1e-2 per voxel, logits ~ 20
        logits = 20 + 5 * one_hot + 0.1 * noise
    elif pattern == "offset":  # large logits with O(1) differences
        logits = 1e4 + noise
    else:  # +-1e4 with ties between classes, the label one of the tied winners (CE ln 2, ln 3)
        logits = torch.randint(0, 2, shape, generator=generator).float() * 2e4 - 1e4
        logits[:, 0] = 1e4
        labels = torch.zeros_like(labels)
    target = labels if kind == "labels" else torch.softmax(logits.double(), 1).float()
    if kind == "soft" and pattern == "confident":
        target = one_hot
    exact = region_ce_loss(logits.double(), target.double() if kind == "soft" else target)
    fused = region_ce_loss(logits, target, impl="fused")
    reference = region_ce_loss(logits, target, impl="reference")
    torch.testing.assert_close(reference.double(), exact, rtol=1e-5, atol=0)  # the oracle is fine
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------
# 4. gradcheck (float64, impl="fused")

GRADCHECK_CASES: list[tuple[str, dict[str, Any]]] = [
    ("labels 2D", {"shape": (2, 3, 3, 4)}),
    ("labels 3D squared batch", {"shape": (2, 3, 2, 3, 2), "squared_pred": True, "batch": True}),
    ("labels (B,1,*S) float", {"shape": (2, 4, 3, 3), "kind": "labels_ch_float"}),
    ("soft", {"shape": (2, 3, 3, 4), "kind": "soft"}),
    (
        "soft squared batch",
        {"shape": (2, 3, 4, 2), "kind": "soft", "squared_pred": True, "batch": True},
    ),
    ("binary labels", {"shape": (2, 1, 3, 4)}),
    ("binary soft", {"shape": (2, 1, 3, 4), "kind": "soft", "squared_pred": True}),
    ("binary class weight", {"shape": (2, 1, 5), "class_weight": [0.3, 2.0]}),
    (
        "class weight no background",
        {"shape": (2, 4, 3, 3), "class_weight": [0.5, 1.0, 2.0, 0.0], "include_background": False},
    ),
    ("soft class weight", {"shape": (2, 3, 4, 2), "kind": "soft", "class_weight": [2.0, 0.5, 1.0]}),
    ("ignore_index", {"shape": (2, 3, 4, 4), "ignore_index": 255}),
    ("sum", {"shape": (2, 3, 3, 3), "reduction": "sum", "weight": "bool"}),
    ("none", {"shape": (2, 3, 3, 3), "reduction": "none", "weight": "broadcast"}),
    ("no smoothing", {"shape": (2, 3, 4, 3), "smooth_nr": 0.0, "smooth_dr": 0.0}),
    ("ce only", {"shape": (2, 3, 4), "function": "ce", "class_weight": [1.0, 2.0, 3.0]}),
    ("dice only", {"shape": (2, 3, 4), "function": "dice", "reduction": "none"}),
]


TINY_CHUNK_GRADCHECK = {"labels 3D squared batch", "soft", "binary soft", "ignore_index", "none"}


@pytest.mark.parametrize(
    ("name", "spec", "chunk"),
    [(n, spec, None) for n, spec in GRADCHECK_CASES]
    + [(n, spec, 7) for n, spec in GRADCHECK_CASES if n in TINY_CHUNK_GRADCHECK],
    ids=[n for n, _ in GRADCHECK_CASES]
    + [f"{n}, tiny chunks" for n, _ in GRADCHECK_CASES if n in TINY_CHUNK_GRADCHECK],
)
def test_gradcheck_fused(name: str, spec: dict[str, Any], chunk: Optional[int]) -> None:
    spec = dict(spec)
    shape = spec.pop("shape")
    case = simple_case(
        shape,
        spec.pop("kind", "labels"),
        spec.pop("weight", "float"),
        spec.pop("function", "ce_dice"),
        scale=2.0,
        **spec,
    )
    if "ignore_index" in case.options:
        target = case.target.clone()
        target.view(-1)[::3] = case.options["ignore_index"]
        case = case._replace(target=target)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return FUNCTIONS[case.function](z, case.target, case.weight, impl="fused", **case.options)

    z = case.logits.clone().requires_grad_()
    if chunk is None:
        assert torch.autograd.gradcheck(loss, (z,), eps=1e-6, atol=1e-7, rtol=1e-6)
    else:  # many chunks per call: the fast (random projection) mode keeps this cheap
        with chunk_elements(chunk):
            assert torch.autograd.gradcheck(
                loss, (z,), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True
            )


@pytest.mark.parametrize("kind", ["labels", "soft"])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_gradcheck_fused_stats_all_outputs(kind: str, channels: int) -> None:
    """Every output of the node at once (random cotangents on ce_num, inter and pred)."""
    case = simple_case((2, channels, 2, 3), kind, "float", squared_pred=True)
    opts = case_options(case)
    z = case.logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: tuple(fused_region_stats(x, case.target, case.weight, opts)[0]),
        (z,),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-6,
    )


# --------------------------------------------------------------------------------------------
# 5. weights derived from the uncertainty of the logits


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Independent reference: ``H(p) / ln K`` with K = C, or 2 for binary [1 - p, p]."""
    if logits.shape[1] == 1:
        logp = torch.cat([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=1)
    else:
        logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1) / math.log(logp.shape[1])


def explicit_indicator(spec: UncertaintyWeight, u: torch.Tensor) -> torch.Tensor:
    """``s = [u > thr]`` or ``sigmoid((u - thr) / T)``; ``1 - s`` for ``side="low"``."""
    thr = spec.threshold.to(u.dtype)
    thr = thr.view(-1, *([1] * (u.ndim - 1))) if thr.ndim == 1 else thr
    if spec.temperature is None:
        s = (u > thr).to(u.dtype)
        return 1 - s if spec.side == "low" else s
    # 1 - sigmoid(x) = sigmoid(-x), without the cancellation of 1 - s when s is close to 1
    x = (u - thr) / spec.temperature
    return torch.sigmoid(-x if spec.side == "low" else x)


def explicit_weight(spec: UncertaintyWeight, u: torch.Tensor) -> torch.Tensor:
    return spec.base + spec.scale * explicit_indicator(spec, u)


@st.composite
def derived_specs(draw: st.DrawFn, batch: int) -> UncertaintyWeight:
    if draw(st.booleans()):
        threshold = torch.tensor(draw(st.floats(0.02, 0.98)), dtype=torch.float64)
    else:
        values = draw(st.lists(st.floats(0.02, 0.98), min_size=batch, max_size=batch))
        threshold = torch.tensor(
            values, dtype=draw(st.sampled_from([torch.float64, torch.float32]))
        )
    return UncertaintyWeight(
        threshold=threshold,
        side=draw(st.sampled_from(["high", "low"])),
        base=draw(st.sampled_from([0.0, 0.5, 1.0])),
        scale=draw(st.sampled_from([0.0, 1.0, 2.5])),
        temperature=draw(st.sampled_from([None, None, 0.05, 0.3, 1.0])),
    )


@settings(max_examples=60, deadline=None)
@given(
    case=cases(scales=(0.3, 1.0, 3.0, 10.0)),
    data=st.data(),
    chunk=st.sampled_from([None, 7, 64]),
    with_region_weight=st.booleans(),
)
def test_derived_weight_equals_explicit_weight(
    case: Case, data: st.DataObject, chunk: Optional[int], with_region_weight: bool
) -> None:
    spec = data.draw(derived_specs(case.logits.shape[0]))
    u = normalised_entropy(case.logits)
    derived = explicit_weight(spec, u)
    if spec.temperature is None:  # no voxel within rounding of a hard threshold
        thr = spec.threshold.to(u.dtype)
        thr = thr.view(-1, *([1] * (u.ndim - 1))) if thr.ndim == 1 else thr
        assume(bool(((u - thr).abs() > 1e-9).all()))
    region = case.weight if with_region_weight else None
    if region is not None:
        region_view = region[:, 0] if region.ndim == case.logits.ndim else region
        explicit = derived * region_view.to(derived.dtype)
    else:
        explicit = derived
    opts = case_options(case._replace(weight=region))
    spec_f = {key: case.options.get(key, value) for key, value in FINISH_DEFAULTS.items()}
    if case.function == "ce":
        spec_f.update(lambda_dice=0.0)
    elif case.function == "dice":
        spec_f.update(lambda_ce=0.0)
    if spec_f["reduction"] == "none":
        opts = opts._replace(batch=False)

    masses = []

    def loss(z: torch.Tensor, fused: bool) -> tuple[torch.Tensor, RegionStats]:
        if fused:
            stats, mass = fused_region_stats(z, case.target, region, opts, derived_weight=spec)
            masses.append(mass)
        else:
            stats = reference_stats(z, case.target, explicit.detach(), opts)
        return finish(stats, opts, Finish(**spec_f)), stats

    results = []
    for fused in (True, False):
        z = case.logits.clone().requires_grad_()
        with chunk_elements(chunk or fused_module.CHUNK_ELEMENTS):
            value, stats = loss(z, fused)
            if value.requires_grad:
                (grad,) = torch.autograd.grad(
                    (value * cotangent(value.shape, value.dtype)).sum(), z
                )
            else:
                grad = torch.zeros_like(z)
        results.append((value.detach(), grad, RegionStats(*(s.detach() for s in stats))))
    (fv, fg, fs), (rv, rg, rs) = results
    assert_stats_close(fs, rs, **F64)
    torch.testing.assert_close(fv, rv, **F64)
    torch.testing.assert_close(fg, rg, **F64)
    if masses[0] is not None:  # per-sample sum of the region indicator over all voxels
        expected_mass = explicit_indicator(spec, u).flatten(1).sum(1)
        assert not masses[0].requires_grad
        torch.testing.assert_close(masses[0], expected_mass, **F64)


def test_derived_weight_gradcheck_away_from_threshold() -> None:
    """A hard derived weight is piecewise constant: the gradient is the region-weighted one."""
    case = simple_case((2, 3, 4, 4), "labels", None, scale=1.5, seed=3)
    u = normalised_entropy(case.logits).flatten().sort().values
    gap = (u[1:] - u[:-1])[4:-4].argmax() + 4  # the widest interior gap between voxels
    spec = UncertaintyWeight(torch.tensor(float(u[gap] + u[gap + 1]) / 2), base=1.0, scale=2.0)
    opts = case_options(case)

    def loss(z: torch.Tensor) -> torch.Tensor:
        stats, _ = fused_region_stats(z, case.target, None, opts, derived_weight=spec)
        return finish(stats, opts, Finish())

    z = case.logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(loss, (z,), eps=1e-7, atol=1e-7, rtol=1e-6)


def test_derived_weight_receives_no_gradient_soft() -> None:
    """With a soft weight the fused gradient is the reference gradient with the weight detached."""
    case = simple_case((2, 4, 3, 5), "soft", "float")
    spec = UncertaintyWeight(torch.tensor([0.3, 0.7]), side="low", base=0.2, temperature=0.1)
    opts = case_options(case)
    z = case.logits.clone().requires_grad_()
    stats, _ = fused_region_stats(z, case.target, case.weight, opts, derived_weight=spec)
    (fused_grad,) = torch.autograd.grad(finish(stats, opts, Finish(**FINISH_DEFAULTS)), z)

    z2 = case.logits.clone().requires_grad_()
    attached = explicit_weight(spec, normalised_entropy(z2)) * case.weight
    for weight, same in ((attached.detach(), True), (attached, False)):
        stats = reference_stats(z2, case.target, weight, opts)
        (grad,) = torch.autograd.grad(finish(stats, opts, Finish(**FINISH_DEFAULTS)), z2)
        if same:
            torch.testing.assert_close(fused_grad, grad, **F64)
        else:  # the attached weight would change the gradient: the check above is meaningful
            assert not torch.allclose(fused_grad, grad, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# 6. edge cases


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("empty", ["zero_weight", "all_ignored"])
def test_empty_region_is_finite_and_ce_exactly_zero(
    function: str, channels: int, empty: str
) -> None:
    case = simple_case((2, channels, 3, 4), "labels", "float", function)
    if empty == "zero_weight":
        case = case._replace(weight=torch.zeros_like(case.weight))
    else:
        case = case._replace(
            target=torch.full_like(case.target, 255), options={"ignore_index": 255}
        )
    for impl in ("fused", "reference"):
        result = run(case, impl)
        assert torch.isfinite(result.value).all() and torch.isfinite(result.grad).all()
    assert_fused_equals_reference(case)
    z = case.logits.clone().requires_grad_()
    ce = region_ce_loss(z, case.target, case.weight, impl="fused", **case.options)
    assert ce.item() == 0.0
    ce.backward()
    assert z.grad is not None and torch.equal(z.grad, torch.zeros_like(z))
    opts = case_options(case)
    stats, mass = fused_region_stats(case.logits, case.target, case.weight, opts)
    for name in ("ce_num", "ce_den", "inter", "pred", "ground"):
        assert torch.equal(getattr(stats, name), torch.zeros_like(getattr(stats, name))), name
    if mass is not None:  # no derived weight: zeros
        assert torch.equal(mass, torch.zeros_like(mass))


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["+inf", "-inf", "nan"])
@pytest.mark.parametrize("at_target", [True, False])
@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_non_finite_logits_behave_as_in_the_reference(
    channels: int, value: float, at_target: bool, kind: str
) -> None:
    """One non-finite logit, at the voxel's target class or at another one: the fused loss is
    NaN / Inf / finite exactly where the reference's is (two classes are computed from the
    logit difference, which must not hide a +Inf), and validation raises for both or neither."""
    case = simple_case((2, channels, 3, 4), kind, "float", seed=5)
    logits = case.logits.clone()
    target = case.target.clone()
    k = max(channels, 2)
    if kind == "labels":
        target[0, 1, 2] = 0
    else:  # all mass on class 0 at that voxel
        target[0, :, 1, 2] = 0.0
        if channels > 1:
            target[0, 0, 1, 2] = 1.0
    # the logit of class 0 (its own class at the voxel) or of the last class (another one);
    # binary logits hold the foreground (class 1) logit only
    cls = (0 if at_target else k - 1) if channels > 1 else 0
    logits[0, cls, 1, 2] = value
    for function in sorted(FUNCTIONS):  # the CE alone too: its terms zero 0 * inf products
        results = {}
        for impl in ("reference", "fused"):
            z = logits.clone().requires_grad_()
            loss = FUNCTIONS[function](z, target, case.weight, impl=impl, validate=False)
            loss.backward()
            assert z.grad is not None
            results[impl] = (loss.detach(), z.grad)
            try:
                FUNCTIONS[function](logits, target, case.weight, impl=impl)
                results[impl] += (None,)
            except ValueError as error:
                assert "`logits` must be finite" in str(error)
                results[impl] += ("raised",)
        (fv, fg, fr), (rv, rg, rr) = results["fused"], results["reference"]
        assert fr == rr, function
        torch.testing.assert_close(fv, rv, **F64, equal_nan=True, msg=function)
        if torch.isfinite(rv):
            torch.testing.assert_close(fg, rg, **F64, equal_nan=True, msg=function)


@pytest.mark.parametrize("smooth_dr", [0.0, 1e-5])
@pytest.mark.parametrize("batch", [False, True])
def test_absent_class(smooth_dr: float, batch: bool) -> None:
    case = simple_case((2, 4, 3, 4), "labels", "float", smooth_dr=smooth_dr, batch=batch)
    case = case._replace(target=case.target % 2)  # classes 2 and 3 never occur
    assert_fused_equals_reference(case)
    result = run(case, "fused")
    assert torch.isfinite(result.value).all() and torch.isfinite(result.grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels", [1, 2, 4])
@pytest.mark.parametrize("pattern", ["signs", "mixed"])
@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_extreme_logits_finite_and_equal(
    dtype: torch.dtype, channels: int, pattern: str, kind: str
) -> None:
    generator = torch.Generator().manual_seed(7)
    shape = (2, channels, 4, 5)
    huge = torch.where(torch.rand(shape, generator=generator) < 0.5, -1e4, 1e4).double()
    if pattern == "mixed":  # huge logits in some voxels/classes, ordinary ones elsewhere
        small = torch.randn(shape, generator=generator, dtype=torch.float64)
        huge = torch.where(torch.rand(shape, generator=generator) < 0.5, huge, small)
    huge += torch.rand(shape, generator=generator, dtype=torch.float64)  # break exact ties
    logits = huge.to(dtype)
    target = make_target(kind, shape, generator, dtype)
    weight = make_weight("float", shape, generator, dtype)
    for function in sorted(FUNCTIONS):
        for options in (
            {},
            {
                "squared_pred": True,
                "batch": True,
                "class_weight": [1.0, 2.0, 0.5, 1.0][: max(2, channels)],
            },
        ):
            if function == "ce":
                options = {k: v for k, v in options.items() if k == "class_weight"}
            case = Case(logits, target, weight, function, options)
            fused, reference = run(case, "fused"), run(case, "reference")
            assert torch.isfinite(fused.value).all() and torch.isfinite(fused.grad).all()
            if dtype == torch.float64:
                assert_results_close(fused, reference, **F64)
            else:  # see test_float32_ce_keeps_precision_for_large_logits for the strict check
                assert_results_close(fused, reference, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("spatial", [(1,), (1, 1), (1, 1, 1)])
@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_single_voxel(channels: int, spatial: tuple[int, ...], kind: str) -> None:
    for function in sorted(FUNCTIONS):
        case = simple_case((1, channels, *spatial), kind, None, function)
        assert_fused_equals_reference(case)
        assert_fused_equals_reference(
            case._replace(options={"squared_pred": True} if function != "ce" else {})
        )


def non_contiguous_layouts(
    logits: torch.Tensor,
) -> dict[str, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """Leaf tensors and differentiable views of them with the values of ``logits``."""
    b, c, *spatial = logits.shape
    layouts: dict[str, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] = {
        "permuted": (logits.movedim(1, -1).contiguous(), lambda x: x.movedim(-1, 1)),
        "sliced": (torch.stack([logits, -logits], dim=-1).flatten(-2), lambda x: x[..., ::2]),
        "transposed": (logits.transpose(-1, -2).contiguous(), lambda x: x.transpose(-1, -2)),
        "expanded": (logits[:1].clone(), lambda x: x.expand(b, c, *spatial)),
    }
    if logits.ndim == 4:
        cl = logits.contiguous(memory_format=torch.channels_last)
        layouts["channels_last"] = (cl, lambda x: x)
    if logits.ndim == 5:
        cl = logits.contiguous(memory_format=torch.channels_last_3d)
        layouts["channels_last_3d"] = (cl, lambda x: x)
    return layouts


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 3, 4, 2), (2, 1, 4, 5)])
@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_non_contiguous_logits(shape: tuple[int, ...], kind: str) -> None:
    case = simple_case(shape, kind, "float_ch", squared_pred=True)
    cot = cotangent(torch.Size([]), torch.float64)
    for name, (leaf, view) in non_contiguous_layouts(case.logits).items():
        if shape[1] > 1 or name not in ("permuted", "channels_last"):
            assert not view(leaf).is_contiguous(), name
        results = []
        for impl, chunk in (("fused", None), ("fused", 7), ("reference", None)):
            base = leaf.detach().clone().requires_grad_()
            assert base.stride() == leaf.stride()
            logits = view(base) if impl == "fused" else view(base).contiguous()
            with chunk_elements(chunk or fused_module.CHUNK_ELEMENTS):
                value = region_ce_dice_loss(
                    logits, case.target, case.weight, impl=impl, **case.options
                )
                (grad,) = torch.autograd.grad(value * cot, base)
            results.append(Result(value.detach(), grad))
        assert_results_close(results[0], results[2], **F64)
        assert_results_close(results[1], results[2], **F64)


def test_non_contiguous_target_and_weight() -> None:
    case = simple_case((2, 3, 4, 5), "soft", None, squared_pred=True)
    target = case.target.movedim(1, -1).contiguous().movedim(-1, 1)
    weight = torch.rand(2, 5, 4, dtype=torch.float64).transpose(-1, -2)
    labels = torch.randint(0, 3, (2, 5, 4)).transpose(-1, -2)
    assert not target.is_contiguous() and not weight.is_contiguous()
    assert_fused_equals_reference(case._replace(target=target, weight=weight))
    assert_fused_equals_reference(case._replace(target=labels, weight=weight[:1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("kind", ["labels", "soft"])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_half_precision_logits(dtype: torch.dtype, channels: int, kind: str, scale: float) -> None:
    case = simple_case(
        (2, channels, 4, 4), kind, "float", dtype=torch.float32, scale=1.0, squared_pred=True
    )
    generator = torch.Generator().manual_seed(5)
    if scale > 100:
        logits = torch.where(
            torch.rand(case.logits.shape, generator=generator) < 0.5, -scale, scale
        )
    else:
        logits = case.logits * scale
    half = logits.to(dtype)
    fused = run(case, "fused", logits=half)
    assert fused.value.dtype == torch.float32
    assert fused.grad.dtype == dtype
    assert torch.isfinite(fused.value).all() and torch.isfinite(fused.grad.float()).all()
    # the same computation in float32 on the upcast values (float32 accumulation is exact here)
    upcast = run(case, "fused", logits=half.float())
    torch.testing.assert_close(fused.value, upcast.value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.grad, upcast.grad.to(dtype), rtol=0, atol=0)
    reference = run(case, "reference", logits=half)
    assert reference.value.dtype == torch.float32 and reference.grad.dtype == dtype
    # +-1e4 logits with ties: see test_float32_ce_keeps_precision_for_large_logits
    value_rtol = 1e-5 if scale < 100 else 1e-3
    torch.testing.assert_close(fused.value, reference.value, rtol=value_rtol, atol=1e-5)
    tol = (
        {"rtol": 1.6e-2, "atol": 1e-3} if dtype == torch.bfloat16 else {"rtol": 1e-3, "atol": 1e-5}
    )
    torch.testing.assert_close(fused.grad.float(), reference.grad.float(), **tol)


# --------------------------------------------------------------------------------------------
# 7. memory: nothing of size (B, C, *S) is saved


def saved_bytes(call: Callable[[], torch.Tensor], inputs: list[Optional[torch.Tensor]]) -> int:
    """Bytes of the storages autograd saves during ``call``, except the inputs' own storages."""
    records: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        records.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    excluded = {x.untyped_storage().data_ptr() for x in inputs if x is not None}
    storages = {}
    for t in records:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


MEMORY_CASES: list[dict[str, Any]] = [
    {"kind": "labels"},
    {"kind": "soft", "squared_pred": True, "batch": True},
    {"kind": "labels_u8", "ignore_index": 255, "class_weight": [1.0, 2.0, 0.5, 1.0]},
    {"kind": "onehot", "weight": "bool", "include_background": False},
    {"kind": "labels", "channels": 1, "weight": "broadcast"},
    {"kind": "soft", "channels": 1, "class_weight": [0.5, 2.0]},
]


@pytest.mark.parametrize("spec", MEMORY_CASES, ids=[str(i) for i in range(len(MEMORY_CASES))])
@on_the_chunked_engine
def test_fused_saves_only_per_sample_statistics(spec: dict[str, Any]) -> None:
    spec = dict(spec)
    shape = (2, spec.pop("channels", 4), 16, 8, 8)
    case = simple_case(shape, spec.pop("kind"), spec.pop("weight", "float"), **spec)
    b, c = shape[:2]
    k = max(c, 2)
    voxels = math.prod(shape[2:])
    itemsize = case.logits.element_size()
    z = case.logits.clone().requires_grad_()
    inputs = [z, case.target, case.weight]

    def call(impl: str) -> Callable[[], torch.Tensor]:
        return lambda: region_ce_dice_loss(z, case.target, case.weight, impl=impl, **case.options)

    fused = saved_bytes(call("fused"), inputs)
    reference = saved_bytes(call("reference"), inputs)
    assert fused <= 64 * b * k * itemsize, fused  # O(B * C), independent of the voxels
    assert reference >= b * c * voxels * itemsize, reference  # the reference keeps (B, C, *S)
    assert fused * 50 < reference

    opts = case_options(case)
    spec_w = UncertaintyWeight(torch.tensor([0.3, 0.6]), temperature=0.1)
    with_derived = saved_bytes(
        lambda: finish(
            fused_region_stats(z, case.target, case.weight, opts, derived_weight=spec_w)[0],
            opts,
            Finish(**FINISH_DEFAULTS),
        ),
        inputs,
    )
    assert with_derived <= 64 * b * k * itemsize


@on_the_chunked_engine
def test_memory_check_detects_saved_probabilities() -> None:
    """The measure above does see a saved (B, C, *S) tensor (guards the test itself)."""
    z = torch.randn(2, 4, 16, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 16, 16))
    leaky = saved_bytes(lambda: (torch.softmax(z, 1) * 2).sum(), [z, labels])
    assert leaky >= z.numel() * z.element_size()
    assert saved_bytes(lambda: region_ce_dice_loss(z, labels, impl="fused"), [z, labels]) < 4096


def fused_node(out: torch.Tensor) -> Any:
    """The grad_fn node (the ctx) of the fused engine's node that ``out`` depends on."""
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("_FusedRegionStatsBackward", "_AcceleratorLossBackward"):
            return node
        stack.extend(next_node for next_node, _ in node.next_functions)
    raise AssertionError("no fused node in the graph")


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)


def assert_ctx_holds_only_inputs(
    z: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], **options: Any
) -> None:
    """Tensors kept on the ctx outside save_for_backward must be the inputs or O(B) small."""
    out = region_ce_dice_loss(z, target, weight, impl="fused", **options)
    node = fused_node(out)
    inputs = {x.untyped_storage().data_ptr() for x in (z, target, weight) if x is not None}
    small = z.shape[0] * max(z.shape[1], 2)
    for name, value in vars(node).items():
        for t in tensors_in(value):
            shared = t.untyped_storage().data_ptr() in inputs
            assert shared or t.numel() <= small, (name, tuple(t.shape))


@on_the_chunked_engine
def test_ctx_keeps_views_of_contiguous_inputs() -> None:
    case = simple_case((2, 3, 8, 8), "soft", "float_ch", squared_pred=True)
    z = case.logits.clone().requires_grad_()
    assert_ctx_holds_only_inputs(z, case.target, case.weight)
    labels = torch.randint(0, 3, (2, 1, 8, 8))
    assert_ctx_holds_only_inputs(z, labels, case.weight, ignore_index=255)


@pytest.mark.parametrize("which", ["channels_last_logits", "transposed_soft_target"])
@on_the_chunked_engine
def test_ctx_keeps_no_copy_of_non_contiguous_inputs(which: str) -> None:
    """Regression: a contiguous (B, C, N) copy of channels_last logits (or of a target whose
    spatial dims do not merge) used to be kept on the ctx until backward."""
    case = simple_case((2, 3, 8, 8), "soft", None)
    z, target = case.logits, case.target
    if which == "channels_last_logits":
        z = z.contiguous(memory_format=torch.channels_last)
    else:
        target = target.transpose(-1, -2)
    assert_ctx_holds_only_inputs(z.detach().requires_grad_(), target, None)


@on_the_chunked_engine
def test_ctx_keeps_views_of_channels_last_targets() -> None:
    """A target whose spatial dims merge into a view is not copied (one_hot(...).movedim)."""
    case = simple_case((2, 3, 8, 8), "labels", None)
    target = F.one_hot(case.target, 3).movedim(-1, 1).double()
    assert not target.is_contiguous()
    assert_ctx_holds_only_inputs(case.logits.clone().requires_grad_(), target, None)


@pytest.mark.parametrize("which", ["weight", "target"])
@on_the_chunked_engine
def test_in_place_change_after_forward_is_detected_or_harmless(which: str) -> None:
    """Regression: target and weight used to bypass save_for_backward, so an in-place change
    between forward and backward silently changed the fused gradient."""
    case = simple_case((2, 3, 4, 4), "labels", "float")
    expected = run(case, "reference").grad
    target, weight = case.target.clone(), case.weight.clone()
    z = case.logits.clone().requires_grad_()
    value = region_ce_dice_loss(z, target, weight, impl="fused")
    if which == "weight":
        weight.zero_()
    else:
        target.fill_(0)
    try:
        (grad,) = torch.autograd.grad(value * cotangent(value.shape, value.dtype), z)
    except RuntimeError:
        return  # detected, as autograd does for saved tensors
    torch.testing.assert_close(grad, expected, **F64)


# --------------------------------------------------------------------------------------------
# 8. impl selection


@settings(max_examples=25, deadline=None)
@given(case=cases(max_side=3))
def test_auto_is_fused(case: Case) -> None:
    auto, fused = run(case, "auto"), run(case, "fused")
    assert torch.equal(auto.value, fused.value) and torch.equal(auto.grad, fused.grad)
    default = FUNCTIONS[case.function](case.logits, case.target, case.weight, **case.options)
    assert torch.equal(default, fused.value)


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_auto_and_default_dispatch_to_fused(function: str) -> None:
    """The graph of the default and of impl="auto" holds the fused node; the reference's not."""
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 4))
    call = FUNCTIONS[function]
    for out in (call(logits, labels), call(logits, labels, impl="auto")):
        fused_node(out)
    with pytest.raises(AssertionError, match="no fused node"):
        fused_node(call(logits, labels, impl="reference"))


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
@pytest.mark.parametrize("impl", ["Fused", "triton", "", None, "ref"])
def test_bad_impl_raises(function: str, impl: Any) -> None:
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    with pytest.raises(ValueError, match="`impl` must be one of"):
        FUNCTIONS[function](logits, labels, impl=impl)


# --------------------------------------------------------------------------------------------
# 9. torch.compile


@pytest.mark.parametrize("channels", [1, 2, 4])
@pytest.mark.parametrize("kind", ["labels", "soft"])
@pytest.mark.parametrize("chunk", [None, 64], ids=["whole-samples", "inside-samples"])
def test_fused_compiles_fullgraph_and_equals_eager(channels: int, kind: str, chunk: int) -> None:
    """The default (fused) path traces without a graph break, forward and backward, for every
    engine (K > 2, two classes, binary), with chunks of several samples or inside one; every
    ``out=`` is contiguous (dynamo refuses others). Backend ``aot_eager``: traced, no codegen."""
    case = simple_case((2, channels, 5, 6), kind, "float", squared_pred=True, seed=7)
    options = dict(case.options)
    if kind == "labels":
        options["ignore_index"] = 255
        case.target[0, 0] = 255

    def loss_fn(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return region_ce_dice_loss(z, y, w, **options)

    with chunk_elements(chunk or fused_module.CHUNK_ELEMENTS):
        z = case.logits.clone().requires_grad_()
        eager = loss_fn(z, case.target, case.weight)
        (eager_grad,) = torch.autograd.grad(eager, z)
        torch._dynamo.reset()
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        out = compiled(z, case.target, case.weight)
        (compiled_grad,) = torch.autograd.grad(out, z)
    torch.testing.assert_close(out, eager, **F64)
    torch.testing.assert_close(compiled_grad, eager_grad, **F64)
