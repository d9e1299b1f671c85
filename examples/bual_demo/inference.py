"""Whole-volume prediction as the two reproduction protocols do it.

* :func:`predict_slices`: SSL4MIS's ``test_single_volume`` (HiLab-git/SSL4MIS
  ``code/val_2D.py``, ACDC 2D): every slice of a volume zoomed to the network's size
  (nearest), predicted, and its label map zoomed back (nearest).
* :func:`predict_sliding_window`: UA-MT's ``test_single_case`` (yulequan/UA-MT
  ``code/test_util.py``, LA 3D): overlapping patches, their softmax averaged per voxel.

Both run the model in eval mode (restored afterwards), without gradients, on the model's
device and under :func:`autocast`, and return int64 label volumes of the input's shape.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
from scipy.ndimage import zoom
from torch import nn

__all__ = ["autocast", "predict_slices", "predict_sliding_window", "zoom_nearest"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: Any, amp: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``amp`` ("bf16" / "fp16") on ``device``; a no-op for "none"."""
    _check_amp(amp)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AMP_DTYPES[amp])


def predict_slices(
    model: nn.Module,
    image: np.ndarray,
    size: Optional[tuple[int, int]] = None,
    *,
    batch: int = 16,
    amp: str = "none",
) -> np.ndarray:
    """Labels of a volume predicted slice by slice (SSL4MIS's ``test_single_volume``).

    With ``size=None`` the ``(H, W)`` slices go through the model as they are. With
    ``size=(h, w)`` each slice is zoomed to ``(h, w)`` by ``scipy.ndimage.zoom(slice,
    (h / H, w / W), order=0)`` (nearest, SSL4MIS's exact call), the argmax of the logits is
    taken, and that label map is zoomed back by ``zoom(labels, (H / h, W / w), order=0)``.

    scipy sizes a zoom's output as ``round(side * factor)``, a product of floats. With these
    ratio factors that rounds to the wanted side (checked for every pair of sides up to
    1024), but the code does not rely on it: a slice or label map that comes out a voxel off
    (another scipy, other sides) is cropped, or padded by repeating its edge (the value
    nearest sampling reads there), to the exact shape, where SSL4MIS would fail instead.

    Args:
        model: maps ``(N, 1, H, W)`` float images to ``(N, C, H, W)`` logits.
        image: ``(D, H, W)`` volume of float slices.
        size: the side ``(h, w)`` the model sees, or ``None`` for the slices' own.
        batch: slices per forward pass (the result does not depend on it: eval mode).
        amp: "none", "bf16" or "fp16" (:func:`autocast`).

    Returns:
        ``(D, H, W)`` int64 labels.
    """
    image = _volume(image)
    side = None if size is None else _positive_ints("size", size, 2)
    batch = _positive_int("batch", batch)
    _check_amp(amp)
    depth, height, width = image.shape
    slices = image.astype(np.float32)
    if side is not None:
        slices = np.stack([zoom_nearest(s, side) for s in slices])
    labels = np.empty(slices.shape, dtype=np.int64)
    with _inference(model) as device, autocast(device, amp):
        for i in range(0, depth, batch):
            x = torch.from_numpy(slices[i : i + batch]).unsqueeze(1).to(device)
            logits = model(x)
            if logits.ndim != 4 or logits.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"`model` must map {tuple(x.shape)} slices to (N, C, "
                    f"{x.shape[2]}, {x.shape[3]}) logits, got {tuple(logits.shape)}."
                )
            labels[i : i + batch] = logits.float().argmax(dim=1).cpu().numpy()
    if side is None:
        return labels
    return np.stack([zoom_nearest(s, (height, width)) for s in labels])


def predict_sliding_window(
    model: nn.Module,
    image: np.ndarray,
    patch: tuple[int, int, int],
    stride: tuple[int, int, int] = (18, 18, 4),
    num_classes: int = 2,
    *,
    batch: int = 4,
    amp: str = "none",
) -> np.ndarray:
    """Labels of a volume from overlapping patches (UA-MT's ``test_single_case``).

    An axis shorter than the patch is padded with zeros (``pad // 2`` before, the rest
    after). Along an axis of (padded) length ``n``, windows start at
    ``min(stride * i, n - patch)`` for ``i = 0 .. ceil((n - patch) / stride)``; every window
    of the grid is predicted, its softmax added to a score map and 1 to a count map; the
    labels are ``argmax(score / count)`` with the padding cropped off. Windows are taken in
    UA-MT's order (x outermost, z innermost), so the float32 sums are UA-MT's.

    Args:
        model: maps ``(N, 1, *patch)`` float volumes to ``(N, num_classes, *patch)`` logits.
        image: ``(X, Y, Z)`` volume.
        patch: the window ``(px, py, pz)``.
        stride: the step between windows along each axis (UA-MT: 18, 18, 4).
        num_classes: the model's output channels.
        batch: windows per forward pass (the result does not depend on it: eval mode).
        amp: "none", "bf16" or "fp16" (:func:`autocast`); the softmax and the score map are
            float32.

    Returns:
        ``(X, Y, Z)`` int64 labels.
    """
    image = _volume(image)
    window = _positive_ints("patch", patch, 3)
    steps = _positive_ints("stride", stride, 3)
    num_classes = _positive_int("num_classes", num_classes)
    batch = _positive_int("batch", batch)
    _check_amp(amp)
    pads = [(max(p - n, 0) // 2, max(p - n, 0) - max(p - n, 0) // 2)
            for n, p in zip(image.shape, window)]  # fmt: skip
    padded = np.pad(image.astype(np.float32), pads, mode="constant", constant_values=0)
    # ceil((n - p) / s) + 1 windows per axis, in integers
    starts = [[min(s * i, n - p) for i in range(-(-(n - p) // s) + 1)]
              for n, p, s in zip(padded.shape, window, steps)]  # fmt: skip
    windows = [tuple(slice(a, a + p) for a, p in zip(corner, window))
               for corner in itertools.product(*starts)]  # fmt: skip
    with _inference(model) as device:
        volume = torch.from_numpy(padded).to(device)
        score = torch.zeros((num_classes, *padded.shape), dtype=torch.float32, device=device)
        count = torch.zeros(padded.shape, dtype=torch.float32, device=device)
        for i in range(0, len(windows), batch):
            chunk = windows[i : i + batch]
            x = torch.stack([volume[w] for w in chunk]).unsqueeze(1)
            with autocast(device, amp):
                logits = model(x)
            if logits.shape[1:] != (num_classes, *window):
                raise ValueError(
                    f"`model` must map {tuple(x.shape)} windows to (N, num_classes, *patch) = "
                    f"(N, {num_classes}, {', '.join(map(str, window))}) logits, got "
                    f"{tuple(logits.shape)}."
                )
            probs = torch.softmax(logits.float(), dim=1)
            for w, p in zip(chunk, probs):
                score[(slice(None), *w)] += p
                count[w] += 1
        labels = (score / count).argmax(dim=0).cpu().numpy()
    crop = tuple(slice(left, left + n) for (left, _), n in zip(pads, image.shape))
    return labels[crop].astype(np.int64)


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode (the previous mode restored on exit) and no gradients; yields the device of
    the model's parameters (the CPU for a model without any)."""
    was = model.training
    model.eval()
    first = next(model.parameters(), None)
    try:
        with torch.no_grad():
            yield first.device if first is not None else torch.device("cpu")
    finally:
        model.train(was)


def _volume(image: Any) -> np.ndarray:
    volume = np.asarray(image)
    if volume.ndim != 3 or 0 in volume.shape:
        raise ValueError(f"`image` must be a non-empty 3D volume, got shape {volume.shape}.")
    return volume


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value > 0)


def _positive_int(name: str, value: Any) -> int:
    if not _is_positive_int(value):
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def _positive_ints(name: str, value: Any, n: int) -> tuple[int, ...]:
    """``value`` as a tuple of ``n`` positive integers, else a ValueError naming ``name``."""
    if not (isinstance(value, Sequence) and len(value) == n and all(map(_is_positive_int, value))):
        raise ValueError(f"`{name}` must be {n} positive integers, got {value!r}.")
    return tuple(int(v) for v in value)


def _check_amp(amp: str) -> None:
    if amp != "none" and amp not in _AMP_DTYPES:
        raise ValueError(f'`amp` must be "none", "bf16" or "fp16", got {amp!r}.')


def zoom_nearest(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``a`` zoomed to ``shape`` as SSL4MIS zooms its slices: ``scipy.ndimage.zoom(a,
    (shape[0] / a.shape[0], ...), order=0)`` (nearest), then fitted to ``shape`` exactly."""
    return _fit(zoom(a, [t / n for t, n in zip(shape, a.shape)], order=0), shape)


def _fit(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``a`` cropped, or padded by repeating its edge, to ``shape`` (a zoom's output a voxel
    off the wanted shape; a no-op otherwise)."""
    a = a[tuple(slice(0, s) for s in shape)]
    pad = [(0, s - n) for n, s in zip(a.shape, shape)]
    return np.pad(a, pad, mode="edge") if any(p for _, p in pad) else a
