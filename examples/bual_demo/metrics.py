"""Dice and the 95% Hausdorff distance per class, on 2D label maps."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    total = pred.sum() + target.sum()
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(pred, target).sum() / total)


def _surface(mask: np.ndarray) -> np.ndarray:
    # the voxels of the mask with at least one 4-neighbour (6 in 3D) outside it
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Optional[tuple[float, ...]] = None,
    *,
    empty_value: Optional[float] = None,
) -> float:
    """95th percentile of the symmetric surface distances between two masks, in mm.

    The surface of a mask is its voxels that touch the outside (4-/6-connectivity). The
    distance of every surface voxel of one mask to the nearest surface voxel of the other
    (Euclidean distance transform with the pixel ``spacing``) is collected in both directions;
    the result is the 95th percentile of the union (as MedPy's ``hd95``, the SSL4MIS metric).

    Absent classes: both masks empty -> ``0.0`` (perfect agreement); exactly one empty ->
    ``empty_value``, which defaults to the diagonal of the image in mm (the largest distance
    possible on the grid), so a missed or hallucinated structure is penalised, not skipped.
    """
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: pred {pred.shape}, target {target.shape}.")
    spacing = tuple(float(s) for s in (spacing or (1.0,) * pred.ndim))
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        if empty_value is not None:
            return float(empty_value)
        return math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing)))
    sp, st = _surface(pred), _surface(target)
    to_target = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    distances = np.concatenate([to_target[sp], to_pred[st]])
    return float(np.percentile(distances, 95))


def evaluate(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    spacing: tuple[float, float],
    ignore_index: Optional[int] = None,
) -> dict[str, list[Optional[float]]]:
    """Per-class Dice and HD95 (classes ``1..C-1``), averaged over the slices of ``(N, H, W)``.

    In a slice where a class is absent from both the target and the prediction it scores Dice
    1 and HD95 0 (see ``dice`` and ``hd95``). A class absent from the whole ``target`` is
    ``None`` (n/a): every slice would score 1 / 0 (or 0 / the diagonal for a false positive),
    measuring nothing about the class and inflating (or deflating) the mean over classes.
    Voxels whose target is ``ignore_index`` count for neither mask.
    """
    out: dict[str, list[Optional[float]]] = {"dice": [], "hd95": []}
    annotated = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    for c in range(1, num_classes):
        if not np.any(target == c):
            out["dice"].append(None)
            out["hd95"].append(None)
            continue
        found = (pred == c) & annotated
        d = [dice(p, t == c) for p, t in zip(found, target)]
        h = [hd95(p, t == c, spacing) for p, t in zip(found, target)]
        out["dice"].append(float(np.mean(d)))
        out["hd95"].append(float(np.mean(h)))
    return out
