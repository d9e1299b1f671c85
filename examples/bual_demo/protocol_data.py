"""The training data of the two published protocols, as the trainer samples and scores them:
SSL4MIS's ACDC (2D slices, ``ACDCData``) and UA-MT's LA (3D volumes, ``LAData``).

Both offer what ``data.SliceData`` offers the trainer (``draw``, ``volumes``,
``predict_volume``, ``example``, ``summary``), with each protocol's own augmentation and
whole-volume inference; ``protocols.py`` reads their folders.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataError, Spacing, TensorPools, Volume, example_slice, spacing_text
from .inference import predict_slices, predict_sliding_window, zoom_nearest
from .protocols import (
    ACDC_CLASSES,
    LA_CLASSES,
    acdc_labeled_slices,
    read_ssl4mis_acdc,
    read_ua_mt_la,
)

#: the distances' grid without a voxel size: the volumes as stored, the unit of both papers
VOXELS = "of the volumes as stored (the unit SSL4MIS and UA-MT report)"
#: UA-MT's sliding-window strides (x, y, z) at test time (``test_LA.py``: 18, 18, 4).
LA_STRIDE = (18, 18, 4)


class ProtocolVolumes:
    """What both protocols' data share: the classes (``class_names``) and the test volumes
    (``test``) of the class using it."""

    voxels = VOXELS

    @property
    def num_classes(self) -> int:
        return len(self.class_names)  # type: ignore[attr-defined]

    @property
    def unit(self) -> str:
        """The unit of the distances (HD95, ASD): "mm", or "voxels" when the size is unknown."""
        test = self.test  # type: ignore[attr-defined]
        return "voxels" if not test or test[0].spacing is None else "mm"


# -------------------------------------------------------------------------------- ACDC (2D)


def ssl4mis_augment(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSL4MIS's ``RandomGenerator`` on square ``(B, 1, P, P)`` slices: with probability 1/2 a
    random 90-degree rotation and a flip along a random axis, else with probability 1/2 a
    rotation by a whole angle in [-20, 20) degrees (nearest, zero fill, as ``ndimage.rotate(
    order=0, reshape=False)``), else nothing; one draw per slice from ``generator``."""
    xs, ys = [], []
    for xi, yi in zip(x, y):
        if torch.rand((), generator=generator) > 0.5:
            k = int(torch.randint(0, 4, (), generator=generator))
            axis = int(torch.randint(0, 2, (), generator=generator))
            xi = torch.rot90(xi, k, (-2, -1)).flip(-2 + axis)
            yi = torch.rot90(yi, k, (-2, -1)).flip(-2 + axis)
        elif torch.rand((), generator=generator) > 0.5:
            angle = math.radians(int(torch.randint(-20, 20, (), generator=generator)))
            theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0],
                                  [math.sin(angle), math.cos(angle), 0.0]])[None]  # fmt: skip
            grid = F.affine_grid(theta, [1, 1, *xi.shape[-2:]], align_corners=False)
            xi = F.grid_sample(xi[None], grid, mode="nearest", align_corners=False)[0]
            yi = F.grid_sample(yi[None, None].float(), grid, mode="nearest",
                               align_corners=False)[0, 0].long()  # fmt: skip
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


@dataclasses.dataclass
class ACDCData(TensorPools, ProtocolVolumes):
    """SSL4MIS's ACDC protocol: training slices zoomed (nearest) to the ``patch`` (SSL4MIS
    zooms every training slice to it), the first ``labeled`` of them labeled; validation and
    test volumes kept at their own size and predicted slice by slice as SSL4MIS's
    ``test_single_volume`` does (``predict_slices`` with the patch)."""

    labeled_x: torch.Tensor
    labeled_y: torch.Tensor
    unlabeled_x: torch.Tensor
    unlabeled_y: torch.Tensor
    val: list[Volume]
    test: list[Volume]
    patch: tuple[int, int]
    class_names: tuple[str, ...]
    description: str
    ignore_index: Optional[int] = None

    network = "ssl4mis-unet"

    @property
    def inference(self) -> str:
        p = self.patch
        return (f"a volume of test.list: its slices zoomed to the {p[0]}x{p[1]} patch "
                "(nearest, SSL4MIS's `zoom(order=0)`), predicted and zoomed back, at the "
                "volume's own size")  # fmt: skip

    def draw(
        self, pool: str, k: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.pool(pool)
        idx = torch.randint(0, len(x), (k,), generator=generator)
        return ssl4mis_augment(x[idx], y[idx].long(), generator)

    def volumes(self, split: str) -> list[Volume]:
        return self.val if split == "val" else self.test

    def predict_volume(self, model: torch.nn.Module, image: np.ndarray, amp: str) -> np.ndarray:
        return predict_slices(model, image, self.patch, amp=amp)

    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A slice of the first test volume with foreground, zoomed to the patch."""
        v = self.test[0]
        k = example_slice(torch.from_numpy(v.label), self.num_classes)
        x = zoom_nearest(v.image[k].astype(np.float32), self.patch)
        y = zoom_nearest(v.label[k], self.patch)
        return torch.from_numpy(x)[None, None], torch.from_numpy(y.astype(np.int64))

    def summary(self) -> str:
        p = self.patch
        slices = sum(len(v.image) for v in self.test)
        return (f"{self.description}: {len(self.labeled_x)} labeled and "
                f"{len(self.unlabeled_x)} unlabeled training slices zoomed to {p[0]}x{p[1]}, "
                f"{len(self.val)} validation and {len(self.test)} test volumes ({slices} test "
                f"slices) scored whole at their own size, "
                f"{spacing_text([v.spacing for v in self.test])}; classes "
                f"{', '.join(self.class_names)}")  # fmt: skip


# ---------------------------------------------------------------------------------- LA (3D)


def _pad_to(volume: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """UA-MT's padding before a crop: a volume no larger than the patch along some axis gets
    ``max((patch - size) // 2 + 3, 0)`` zeros on both sides of every axis."""
    if all(s > p for s, p in zip(volume.shape, patch)):
        return volume
    pads = [max((p - s) // 2 + 3, 0) for s, p in zip(volume.shape, patch)]
    return np.pad(volume, [(q, q) for q in pads], mode="constant", constant_values=0)


def ua_mt_crop(
    image: np.ndarray, label: np.ndarray, patch: tuple[int, int, int],
    generator: Optional[torch.Generator],
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """UA-MT's ``RandomCrop`` (a ``generator``) or ``CenterCrop`` (None), padding first."""
    image, label = _pad_to(image, patch), _pad_to(label, patch)
    if generator is None:
        starts = [round((s - p) / 2.0) for s, p in zip(image.shape, patch)]
    else:  # np.random.randint(0, s - p): the last start s - p is never drawn, as in UA-MT
        starts = [int(torch.randint(0, s - p, (), generator=generator))
                  for s, p in zip(image.shape, patch)]  # fmt: skip
    window = tuple(slice(a, a + p) for a, p in zip(starts, patch))
    return image[window], label[window]


def ua_mt_rot_flip(
    image: np.ndarray, label: np.ndarray, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """UA-MT's ``RandomRotFlip``: a random multiple of 90 degrees in the first two axes, then
    a flip along axis 0 or 1."""
    k = int(torch.randint(0, 4, (), generator=generator))
    axis = int(torch.randint(0, 2, (), generator=generator))
    return (np.flip(np.rot90(image, k), axis=axis), np.flip(np.rot90(label, k), axis=axis))


@dataclasses.dataclass
class LAData(ProtocolVolumes):
    """UA-MT's LA protocol: whole training volumes, the first ``len(labeled)`` of
    ``train.list`` labeled; each draw a random rotation / flip and a random ``patch`` crop
    (UA-MT's ``RandomRotFlip`` + ``RandomCrop``); test volumes predicted by sliding windows
    with UA-MT's strides. UA-MT has no validation set (``volumes("val")`` is empty)."""

    labeled: list[Volume]
    unlabeled: list[Volume]
    test: list[Volume]
    patch: tuple[int, int, int]
    class_names: tuple[str, ...]
    description: str
    stride: tuple[int, int, int] = LA_STRIDE
    ignore_index: Optional[int] = None

    network = "vnet"

    @property
    def inference(self) -> str:
        p, s = self.patch, self.stride
        return (f"a volume of test.list, predicted by {p[0]}x{p[1]}x{p[2]} sliding windows "
                f"with UA-MT's strides {s[0]}, {s[1]}, {s[2]}: softmax averaged where they "
                "overlap, zero-padded where the volume is smaller than the patch")  # fmt: skip

    def draw(
        self, pool: str, k: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        volumes = {"labeled": self.labeled, "unlabeled": self.unlabeled,
                   "all": self.labeled + self.unlabeled}[pool]  # fmt: skip
        xs, ys = [], []
        for i in torch.randint(0, len(volumes), (k,), generator=generator).tolist():
            image, label = ua_mt_rot_flip(volumes[i].image, volumes[i].label, generator)
            image, label = ua_mt_crop(image, label, self.patch, generator)
            xs.append(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)))
            ys.append(torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)))
        return torch.stack(xs)[:, None], torch.stack(ys)

    def volumes(self, split: str) -> list[Volume]:
        return [] if split == "val" else self.test

    def predict_volume(self, model: torch.nn.Module, image: np.ndarray, amp: str) -> np.ndarray:
        return predict_sliding_window(model, image, self.patch, self.stride, self.num_classes,
                                      amp=amp)  # fmt: skip

    def _center(self, v: Volume) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = ua_mt_crop(v.image, v.label, self.patch, None)
        return (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
                torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)))  # fmt: skip

    @functools.cached_property
    def _unlabeled_crops(self) -> tuple[torch.Tensor, torch.Tensor]:
        crops = [self._center(v) for v in self.unlabeled]
        return torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])

    @property
    def unlabeled_x(self) -> torch.Tensor:
        """The centre crops (UA-MT's ``CenterCrop``) of the unlabeled volumes, ``(N, 1, *patch)``:
        what the pseudo-label diagnostics evaluate."""
        return self._unlabeled_crops[0]

    @property
    def unlabeled_y(self) -> torch.Tensor:
        return self._unlabeled_crops[1]

    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The centre crop of the first test volume, ``(1, 1, *patch)`` and ``patch``."""
        x, y = self._center(self.test[0])
        return x[None], y

    def summary(self) -> str:
        p = self.patch
        return (f"{self.description}: {len(self.labeled)} labeled and {len(self.unlabeled)} "
                f"unlabeled training volumes (random {p[0]}x{p[1]}x{p[2]} crops), "
                f"{len(self.test)} test volumes scored whole, "
                f"{spacing_text([v.spacing for v in self.test], 'the stored axes')}; "
                f"classes {', '.join(self.class_names)}")  # fmt: skip


# ---------------------------------------------------------------------------------- building


def acdc_data(
    root: Path, labeled_cases: int, patch: tuple[int, int], spacing: Optional[Spacing] = None
) -> ACDCData:
    """SSL4MIS's ACDC folder as training data: the slices of the first ``labeled_cases``
    patients of ``train_slices.list`` labeled (``acdc_labeled_slices``), the rest unlabeled."""
    layout = read_ssl4mis_acdc(root, spacing)
    try:
        n = acdc_labeled_slices(layout.slice_names, labeled_cases)
    except ValueError as err:  # more patients than the list holds: the data's fault, not a flag's
        raise DataError(str(err)) from None
    if n >= len(layout.slices):
        raise DataError(f"--labeled-cases {labeled_cases} labels all {len(layout.slices)} "
                        f"training slices of {root}: none is left unlabeled.")  # fmt: skip
    # labels as uint8: the real list's 1312 slices would take 0.7 GB as int64 (draw widens)
    x = torch.from_numpy(np.stack([zoom_nearest(image, patch) for image, _ in layout.slices]))
    y = torch.from_numpy(np.stack([zoom_nearest(label, patch) for _, label in layout.slices])
                         .astype(np.uint8))  # fmt: skip
    return ACDCData(
        labeled_x=x[:n, None].float(), labeled_y=y[:n], unlabeled_x=x[n:, None].float(),
        unlabeled_y=y[n:], val=layout.val, test=layout.test, patch=patch,
        class_names=ACDC_CLASSES,
        description=f"SSL4MIS ACDC layout {root} (labeled: the {n} slices of the first "
        f"{labeled_cases} patients of train_slices.list)",
    )  # fmt: skip


def la_data(
    root: Path, labeled_cases: int, patch: tuple[int, int, int],
    spacing: Optional[Spacing] = None,
) -> LAData:  # fmt: skip
    """UA-MT's LA folder as training data: the first ``labeled_cases`` of ``train.list``
    labeled, the rest unlabeled (UA-MT: 16 of 80)."""
    layout = read_ua_mt_la(root, spacing)
    n = len(layout.train)
    if labeled_cases >= n:
        raise DataError(f"--labeled-cases {labeled_cases}: {root}/train.list has {n} cases, "
                        "so none would be left unlabeled; use fewer.")  # fmt: skip

    def small(v: Volume) -> Volume:  # labels as uint8 (draw widens): a quarter of the memory
        return dataclasses.replace(v, label=v.label.astype(np.uint8))

    train = [small(v) for v in layout.train]
    return LAData(
        labeled=train[:labeled_cases], unlabeled=train[labeled_cases:],
        test=[small(v) for v in layout.test], patch=patch, class_names=LA_CLASSES,
        description=f"UA-MT LA layout {root} (labeled: the first {labeled_cases} cases of "
        "train.list)",
    )  # fmt: skip
