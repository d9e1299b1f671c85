"""Shared hypothesis strategies (small shapes: the test machine has few cores)."""

from __future__ import annotations

from typing import Optional

import torch
from hypothesis import strategies as st


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator``: hypothesis shrinks the seed, torch makes the data."""
    return st.integers(min_value=0, max_value=2**32 - 1)


def spatial_shapes(
    *, min_rank: int = 1, max_rank: int = 3, max_side: int = 4
) -> st.SearchStrategy[tuple[int, ...]]:
    """Spatial shapes ``*S`` of rank ``min_rank..max_rank`` (1D, 2D and 3D alike)."""
    return st.integers(min_rank, max_rank).flatmap(
        lambda rank: st.tuples(*[st.integers(1, max_side)] * rank)
    )


@st.composite
def class_logits(
    draw: st.DrawFn,
    *,
    min_classes: int = 1,
    max_classes: int = 5,
    max_batch: int = 2,
    min_rank: int = 1,
    max_rank: int = 3,
    max_side: int = 4,
    members: Optional[tuple[int, int]] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Logits ``(B, C, *S)``, or ``(T, B, C, *S)`` with ``T`` in ``members``.

    The scale is drawn too (0.1 .. 50), so near-uniform and saturated predictions both occur.
    """
    shape = (
        draw(st.integers(1, max_batch)),
        draw(st.integers(min_classes, max_classes)),
        *draw(spatial_shapes(min_rank=min_rank, max_rank=max_rank, max_side=max_side)),
    )
    if members is not None:
        shape = (draw(st.integers(*members)), *shape)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 50.0]))
    generator = torch.Generator().manual_seed(draw(seeds()))
    return torch.randn(shape, generator=generator, dtype=dtype) * scale


# --------------------------------------------------------------------------------------------
# uncertainty maps, thresholds and ratios (regions, schedules)

#: A handful of values, so voxels tie with each other and with the threshold.
TIE_VALUES = (0.0, 0.25, 0.5, 0.75, 1.0)


@st.composite
def uncertainty_maps(
    draw: st.DrawFn,
    *,
    kind: Optional[str] = None,
    max_batch: int = 3,
    min_rank: int = 1,
    max_rank: int = 3,
    max_side: int = 4,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uncertainty maps ``(B, *S)``.

    ``kind``: ``"ties"`` (values from ``TIE_VALUES``), ``"distinct"`` (all values different, a
    scaled permutation), ``"random"`` (uniform in [0, 1)); ``None`` draws one of them.
    """
    kind = kind if kind is not None else draw(st.sampled_from(["ties", "distinct", "random"]))
    shape = (
        draw(st.integers(1, max_batch)),
        *draw(spatial_shapes(min_rank=min_rank, max_rank=max_rank, max_side=max_side)),
    )
    n = 1
    for side in shape:
        n *= side
    generator = torch.Generator().manual_seed(draw(seeds()))
    if kind == "ties":
        index = torch.randint(len(TIE_VALUES), shape, generator=generator)
        return torch.tensor(TIE_VALUES, dtype=dtype)[index]
    if kind == "distinct":
        # k / n is exact in float32 for these small n, so the values stay distinct.
        return (torch.randperm(n, generator=generator).to(dtype) / n).reshape(shape)
    if kind == "random":
        return torch.rand(shape, generator=generator, dtype=dtype)
    raise ValueError(f"unknown kind {kind!r}")


def threshold_values() -> st.SearchStrategy[float]:
    """Python thresholds: often exactly on a ``TIE_VALUES`` voxel, sometimes +-inf.

    ``width=32`` keeps them exact in a float32 map, so torch and numpy compare the same value.
    """
    return st.one_of(
        st.sampled_from(TIE_VALUES),
        st.floats(-0.5, 1.5, width=32),
        st.sampled_from([float("-inf"), float("inf")]),
    )


def ratios() -> st.SearchStrategy[float]:
    """Ratios in [0, 1], with the end points and a half-way tie for rounding."""
    return st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0))


# --------------------------------------------------------------------------------------------
# region losses: logits, labels and region weights

#: Region-weight kinds drawn by :func:`region_problems`: uniform in [0, 1), uniform in
#: [0.25, 1] (no near-empty sums), 0/1 in the logits' dtype, all ones, all zeros.
REGION_WEIGHT_KINDS = ("random", "positive", "binary", "ones", "zeros")


@st.composite
def region_problems(
    draw: st.DrawFn,
    *,
    min_classes: int = 1,
    max_classes: int = 4,
    max_batch: int = 3,
    min_rank: int = 1,
    max_rank: int = 3,
    max_side: int = 4,
    weight_kinds: tuple[str, ...] = REGION_WEIGHT_KINDS,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, labels, region_weight)`` for the region losses.

    logits ``(B, C, *S)`` from :func:`class_logits` (``C == 1`` is a binary model); labels
    ``(B, *S)`` int64 in ``[0, max(C, 2))``; region weight ``(B, *S)`` in ``dtype`` of a kind
    drawn from ``weight_kinds`` (see :data:`REGION_WEIGHT_KINDS`).
    """
    logits = draw(
        class_logits(
            min_classes=min_classes,
            max_classes=max_classes,
            max_batch=max_batch,
            min_rank=min_rank,
            max_rank=max_rank,
            max_side=max_side,
            dtype=dtype,
        )
    )
    b, c, *spatial = logits.shape
    kind = draw(st.sampled_from(weight_kinds))
    generator = torch.Generator().manual_seed(draw(seeds()))
    labels = torch.randint(max(c, 2), (b, *spatial), generator=generator)
    uniform = torch.rand((b, *spatial), generator=generator, dtype=dtype)
    if kind == "random":
        weight = uniform
    elif kind == "positive":
        weight = 0.25 + 0.75 * uniform
    elif kind == "binary":
        weight = (uniform < 0.5).to(dtype)
    elif kind == "ones":
        weight = torch.ones_like(uniform)
    elif kind == "zeros":
        weight = torch.zeros_like(uniform)
    else:
        raise ValueError(f"unknown weight kind {kind!r}")
    return logits, labels, weight
