"""Data for the example trainer: the MNI ICBM152 2009a template, or a user's NIfTI / HDF5 files.

Everything becomes 2D slices ``(N, 1, H, W)`` float32 (intensity-normalised per volume) with
integer labels ``(N, H, W)``, split into labeled, unlabeled, validation and test sets that never
share a slice (and, where slices come from one volume, are separated by gaps of unused slices).
The validation and test slices remember the volume they came from (``SliceVolume``), with its
voxel size after resizing, so that the metrics score whole volumes in mm.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from bual_losses.pseudo import pseudo_labels

MNI_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MNI_CLASSES = ("background/CSF", "grey matter", "white matter")
MNI_SHAPE = (197, 233, 189)

#: NIfTI spatial units (``header.get_xyzt_units()[0]``) -> mm. "unknown" is read as mm, the
#: convention of the tools that write such headers (the MNI template's header says "unknown").
NIFTI_UNITS_MM = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 0.001}


class DataError(ValueError):
    """A problem with the input files, with a message that names the file and the fix."""


Spacing = tuple[float, float, float]


def _check_spacing(spacing: Any, name: str) -> Optional[Spacing]:
    """``spacing`` as three floats > 0 (or None), else ``ValueError`` naming ``name``."""
    if spacing is None:
        return None
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"`{name}` must be None (unknown) or three numbers > 0, the voxel size (slice, row, "
            f"column) in mm, got {spacing!r}."
        )
    return (float(values[0]), float(values[1]), float(values[2]))


@dataclasses.dataclass(frozen=True)
class SliceVolume:
    """The validation or test slices ``start:stop`` stacked back into the volume (or slab)
    they came from.

    ``spacing`` is its voxel size (slice, row, column) in mm after the in-plane resize, or None
    when unknown (the metrics are then in voxels).
    """

    name: str
    start: int
    stop: int
    spacing: Optional[Spacing]


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """One volume to predict and score whole: the image as the network's inference reads it
    (``(D, H, W)`` slices for a 2D network, the array as stored for a 3D one), its class-id
    label of the same shape and its voxel size in mm along those axes (None: unknown).
    Compared by identity (``eq=False``): arrays have no single truth value."""

    name: str
    image: np.ndarray
    label: np.ndarray
    spacing: Optional[Spacing]


#: ``draw``'s pools: the labeled training images, the unlabeled ones (hidden labels) or all.
POOLS = ("labeled", "unlabeled", "all")


def spacing_text(spacings: list[Optional[Spacing]], axes: str = "slice x row x column") -> str:
    """The voxel size(s) of the test volumes for the data summary, along ``axes``."""
    if any(s is None for s in spacings):
        return "voxel size unknown (HD95 and ASD in voxels)"
    known = np.asarray(spacings, dtype=float)
    lo, hi = known.min(0), known.max(0)
    sizes = [f"{a:.3g}" if a == b else f"{a:.3g}..{b:.3g}" for a, b in zip(lo, hi)]
    return f"voxels {' x '.join(sizes)} mm ({axes})"


class TensorPools:
    """The training pools of data held as tensors (``labeled_x``, ``labeled_y``,
    ``unlabeled_x``, ``unlabeled_y`` of the class using it), by the names of ``POOLS``."""

    @functools.cached_property
    def _all(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.labeled_x, self.unlabeled_x])  # type: ignore[attr-defined]
        y = torch.cat([self.labeled_y, self.unlabeled_y])  # type: ignore[attr-defined]
        return x, y

    def pool(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of the pool ``name`` (one of ``POOLS``)."""
        if name == "all":
            return self._all
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


@dataclasses.dataclass
class SliceData(TensorPools):
    """The four splits as tensors: images ``(N, 1, H, W)`` float32, labels ``(N, H, W)`` int64.

    ``unlabeled_y`` holds the hidden labels of the unlabeled slices: only the fully supervised
    upper bound and the diagnostics read them. ``test_volumes`` (``val_volumes``) cuts the test
    (validation) slices into the volumes the metrics (the validation Dice) score; left empty,
    all those slices are one volume of voxel size ``spacing``.
    """

    labeled_x: torch.Tensor
    labeled_y: torch.Tensor
    unlabeled_x: torch.Tensor
    unlabeled_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: tuple[str, ...]
    #: voxel size (slice, row, column) in mm of the test volumes after resizing, when they
    #: share one; None when unknown or when it differs by volume (see ``test_volumes``)
    spacing: Optional[Spacing]
    description: str
    #: the label id of unannotated voxels (``--ignore-label``): never trained on, never scored
    ignore_index: Optional[int] = None
    #: the test volumes, in order, covering ``test_x`` exactly; () -> one of voxel size spacing
    test_volumes: tuple[SliceVolume, ...] = ()
    #: the validation volumes, the same way over ``val_x`` (validation Dice is their mean)
    val_volumes: tuple[SliceVolume, ...] = ()

    def __post_init__(self) -> None:
        self.spacing = _check_spacing(self.spacing, "spacing")
        for name, x in (("test_volumes", self.test_x), ("val_volumes", self.val_x)):
            volumes = getattr(self, name) or (SliceVolume(name[:-8], 0, len(x), self.spacing),)
            setattr(self, name, volumes)
            edges = [(v.start, v.stop) for v in volumes]
            bounds = [0, *(stop for _, stop in edges)]
            if ([start for start, _ in edges] != bounds[:-1] or bounds[-1] != len(x)
                    or any(a >= b for a, b in edges)):  # fmt: skip
                raise ValueError(
                    f"`{name}` must cut the {len(x)} {name[:-8]} slices into consecutive "
                    f"non-empty ranges, got {edges}."
                )
            if len({v.spacing is not None for v in volumes}) > 1:
                raise ValueError(f"`{name}` mix known and unknown voxel sizes; give all or none.")

    #: the network this data trains (``train.build_model``)
    network = "unet2d"
    #: the grid of the distances when the voxel size is unknown, for the results header
    voxels = "of the resized slices"
    #: how ``volumes`` are predicted, for the results header
    inference = ("the MNI test slab, a case of a NIfTI or HDF5 folder, a test slab of a single "
                 "case: stacked back from its slices")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def unit(self) -> str:
        """The unit of the distances (HD95, ASD): "mm", or "voxels" when the size is unknown."""
        return "voxels" if self.test_volumes[0].spacing is None else "mm"

    # ------------------------------------------------ what the trainer asks of every data set

    def draw(
        self, pool: str, k: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` augmented training images ``(k, 1, H, W)`` and labels from ``pool`` (one of
        ``POOLS``), drawn with replacement from ``generator``."""
        x, y = self.pool(pool)
        idx = torch.randint(0, len(x), (k,), generator=generator)
        xb, yb = augment(x[idx], y[idx], generator)
        assert yb is not None
        return xb, yb

    def volumes(self, split: str) -> list[Volume]:
        """The ``"val"`` or ``"test"`` volumes, each scored whole (``val_volumes`` /
        ``test_volumes``: the MNI slab, each case of a folder, each slab of a single case)."""
        x, y, ranges = ((self.val_x, self.val_y, self.val_volumes) if split == "val" else
                        (self.test_x, self.test_y, self.test_volumes))  # fmt: skip
        return [Volume(v.name, x[v.start : v.stop, 0].numpy(), y[v.start : v.stop].numpy(),
                       v.spacing) for v in ranges]  # fmt: skip

    def predict_volume(self, model: torch.nn.Module, image: np.ndarray, amp: str) -> np.ndarray:
        """The class ids ``(D, H, W)`` the model predicts for a volume of ``volumes``."""
        from .inference import predict_slices

        return predict_slices(model, image, amp=amp)

    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The figures' test image ``(1, 1, H, W)`` and its label ``(H, W)``: a slice with
        foreground (``example_slice``)."""
        k = example_slice(self.test_y, self.num_classes)
        return self.test_x[k : k + 1], self.test_y[k]

    def summary(self) -> str:
        size = tuple(self.labeled_x.shape[-2:])
        n = len(self.test_volumes)
        return (
            f"{self.description}: slices {size[0]}x{size[1]} px (intensities scaled per volume), "
            f"{len(self.labeled_x)} labeled, "
            f"{len(self.unlabeled_x)} unlabeled, {len(self.val_x)} validation, "
            f"{len(self.test_x)} test in {n} volume{'s' if n > 1 else ''} scored whole, "
            f"{spacing_text([v.spacing for v in self.test_volumes])}; "
            f"classes {', '.join(self.class_names)}"
        )


# --------------------------------------------------------------------------------------------
# slice utilities


def normalize_volume(x: np.ndarray) -> np.ndarray:
    """Per-volume percentile scaling over the foreground: the volume's 1st percentile -> 0, its
    99th -> 1, then clipped to ``[-0.5, 1.5]``.

    ``x`` is the ``(N, H, W)`` slices of one volume. The foreground is the voxels above the
    volume's minimum: the nonzero region nnU-Net normalises MRI in, for any background value
    (zero padding, air at -1024), and the whole volume when the background is noise. One scale
    for the whole volume keeps a slice's intensities comparable with its neighbours' (per-slice
    percentiles turned slices with little tissue into near-binary noise); the statistics never
    read a label. A constant volume becomes all zeros.
    """
    x = x.astype(np.float32)
    foreground = x[x > x.min()] if x.size else x
    if foreground.size == 0:
        return np.zeros_like(x)
    lo, hi = np.percentile(foreground, [1, 99])
    scale = hi - lo if hi - lo > 1e-8 else 1.0
    return np.clip((x - lo) / scale, -0.5, 1.5).astype(np.float32)


def resize_slices(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``(N, H, W)`` images (area / bilinear) and labels (one-hot area average + argmax)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[:, None]
    y = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
    if tuple(x.shape[-2:]) == tuple(size):
        return x, y
    shrink = x.shape[-2] >= size[0] and x.shape[-1] >= size[1]
    mode = "area" if shrink else "bilinear"
    kwargs = {} if shrink else {"align_corners": False}
    x = F.interpolate(x, size=size, mode=mode, **kwargs)
    onehot = F.one_hot(y, num_classes).permute(0, 3, 1, 2).float()
    y = pseudo_labels(F.interpolate(onehot, size=size, mode=mode, **kwargs), dim=1)
    return x, y


def resized_spacing(
    spacing: Optional[Spacing], before: tuple[int, int], after: tuple[int, int]
) -> Optional[Spacing]:
    """The voxel size after ``resize_slices`` from ``before`` to ``after`` pixels: each
    in-plane size scaled by ``before / after`` (the slice distance unchanged)."""
    if spacing is None:
        return None
    return (spacing[0], spacing[1] * before[0] / after[0], spacing[2] * before[1] / after[1])


def center_crop_or_pad(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop (or zero-pad) the last two dims symmetrically to ``size``."""
    h, w = x.shape[-2:]
    th, tw = size
    if h < th or w < tw:
        ph, pw = max(th - h, 0), max(tw - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top : top + th, left : left + tw]


def spread_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (centres of ``k`` equal parts)."""
    if k > n:
        raise DataError(f"asked for {k} labeled slices but the training set has only {n}.")
    return [int((i + 0.5) * n / k) for i in range(k)]


def _require_unlabeled(unlabeled: list[int], n: int, gap: int) -> None:
    if not unlabeled:
        raise DataError(
            f"no unlabeled slices left: the training set has {n} slices and a gap of {gap} "
            "slices around each labeled one removes them all; use a smaller --gap or fewer "
            "--labeled slices."
        )


# --------------------------------------------------------------------------------------------
# MNI ICBM152


def mni_dir() -> Path:
    """The nilearn wheel's template folder, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the default data needs the nilearn wheel (it ships the MNI ICBM152 template): "
            "`pip install --no-deps nilearn`, or pass --nifti-dir / --h5-dir."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    for kind in ("t1", "gm", "wm"):
        if not (folder / MNI_FILE.format(kind)).is_file():
            raise DataError(f"missing MNI template file {folder / MNI_FILE.format(kind)}.")
    return folder


def load_mni(
    z_range: Optional[tuple[int, int]] = None,
) -> tuple[np.ndarray, np.ndarray, Spacing]:
    """T1 in ``[0, 1]``, labels ``argmax(1 - gm - wm, gm, wm)``, ``(197, 233, Z)``, and the
    voxel size in mm along those axes (the header's: 1 mm isotropic).

    ``z_range = (start, stop)`` reads only those axial slices (all 189 by default).
    """
    import nibabel as nib

    folder = mni_dir()
    z = slice(*z_range) if z_range else slice(None)
    vol = {}
    for kind in ("t1", "gm", "wm"):
        img = nib.load(folder / MNI_FILE.format(kind))
        vol[kind] = np.asarray(img.dataobj[:, :, z], dtype=np.float32) / np.float32(255.0)
        if kind == "t1":
            zooms = _voxel_size(img, folder / MNI_FILE.format(kind))
    label = np.where(vol["wm"] > vol["gm"], 2, 1)
    label = np.where(1.0 - vol["gm"] - vol["wm"] >= np.maximum(vol["gm"], vol["wm"]), 0, label)
    return vol["t1"], label.astype(np.int64), (zooms[0], zooms[1], zooms[2])


def corrupt_volume(
    image: np.ndarray,
    seed: int,
    *,
    strength: float = 1.0,
    full_shape: Optional[tuple[int, int, int]] = None,
    z_offset: int = 0,
) -> np.ndarray:
    """A realistic acquisition corruption, the same for every slice of the volume.

    A smooth multiplicative bias field (exp of a random quadratic polynomial of the position,
    about +-20%), a gamma change (``x ** 1.3``) and Rician noise (std 4% of the maximum).
    ``strength = 0`` returns the image unchanged. For a slab ``image`` of a larger volume,
    ``full_shape`` and ``z_offset`` place it, so the field is the one of the whole volume.
    """
    if strength == 0:
        return image
    rng = np.random.default_rng(seed)
    shape = full_shape or image.shape
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    axes[2] = axes[2][z_offset : z_offset + image.shape[2]]
    gx, gy, gz = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [gx, gy, gz, gx * gx, gy * gy, gz * gz, gx * gy, gy * gz]
    coeffs = rng.normal(0.0, 0.12 * strength, size=len(terms)).astype(np.float32)
    log_field = sum(c * t for c, t in zip(coeffs, terms))
    x = np.clip(image, 0, None) ** np.float32(1.0 + 0.3 * strength) * np.exp(log_field)
    sigma = np.float32(0.04 * strength)  # the template's maximum is 1
    noise = rng.standard_normal((2, *x.shape), dtype=np.float32) * sigma
    return np.sqrt((x + noise[0]) ** 2 + noise[1] ** 2)


@dataclasses.dataclass(frozen=True)
class SlabSplit:
    """Axial slab ranges ``[start, stop)`` of the MNI volume."""

    train: tuple[int, int] = (30, 110)
    val: tuple[int, int] = (114, 121)
    test: tuple[int, int] = (125, 150)
    gap: int = 3  # slices left out on each side of a labeled slice

    def check(self) -> None:
        """Raise ``DataError`` unless the slabs are ordered, disjoint and inside the volume."""
        slabs = [self.train, self.val, self.test]
        for (a0, a1), (b0, b1) in zip(slabs, slabs[1:]):
            if not (0 <= a0 < a1 <= b0 < b1 <= MNI_SHAPE[2]):
                raise DataError(
                    f"slabs [start, stop) must be ordered and disjoint inside the volume's "
                    f"{MNI_SHAPE[2]} slices, got train {self.train}, val {self.val}, "
                    f"test {self.test}."
                )


def mni_data(
    *,
    labeled: int = 2,
    size: tuple[int, int] = (96, 112),
    downsample: int = 2,
    split: SlabSplit = SlabSplit(),
    corruption: float = 1.0,
    data_seed: int = 0,
) -> SliceData:
    """Axial slices of the MNI ICBM152 2009a T1 with background/CSF, GM, WM labels.

    The test slab is one test volume; its voxel size is the template's (1 mm) with the
    in-plane size scaled by the downsampling (crop and padding change no voxel size).
    """
    split.check()
    z0, z1 = split.train[0], split.test[1]
    image, label, (sx, sy, sz) = load_mni((z0, z1))
    image = corrupt_volume(image, data_seed, strength=corruption, full_shape=MNI_SHAPE,
                           z_offset=z0)  # fmt: skip
    # axial slices: (X, Y, Z) -> (Z, Y, X) so rows run anterior-posterior; flip for display.
    # One intensity scale for the loaded span of the volume (train to test slab).
    image = normalize_volume(np.flip(image.transpose(2, 1, 0), axis=1))
    label = np.flip(label.transpose(2, 1, 0), axis=1)
    h, w = image.shape[1] // downsample, image.shape[2] // downsample

    def take(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = lo - z0, hi - z0
        x, y = resize_slices(image[lo:hi], label[lo:hi], (h, w), 3)
        return center_crop_or_pad(x, size), center_crop_or_pad(y, size)

    train_x, train_y = take(*split.train)
    lab_idx = spread_indices(len(train_x), labeled)
    unl_idx = [i for i in range(len(train_x)) if min(abs(i - j) for j in lab_idx) > split.gap]
    _require_unlabeled(unl_idx, len(train_x), split.gap)
    val_x, val_y = take(*split.val)
    test_x, test_y = take(*split.test)
    # axes (Z, Y, X) after the transpose; rows and columns resized from Y, X to h, w
    spacing = resized_spacing((sz, sy, sx), image.shape[1:], (h, w))
    volume = SliceVolume(f"test slab z {split.test[0]}..{split.test[1] - 1}", 0, len(test_x),
                        spacing)  # fmt: skip
    return SliceData(
        labeled_x=train_x[lab_idx], labeled_y=train_y[lab_idx],
        unlabeled_x=train_x[unl_idx], unlabeled_y=train_y[unl_idx],
        val_x=val_x, val_y=val_y, test_x=test_x, test_y=test_y,
        class_names=MNI_CLASSES, spacing=spacing, test_volumes=(volume,),
        description=(
            f"MNI ICBM152 2009a T1 (corruption {corruption:g}), axial train slab "
            f"{split.train[0]}..{split.train[1] - 1} (labeled z = "
            f"{', '.join(str(split.train[0] + i) for i in lab_idx)}), "
            f"val {split.val[0]}..{split.val[1] - 1}, test {split.test[0]}..{split.test[1] - 1}"
        ),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# users' data: NIfTI folders and SSL4MIS-style HDF5


def _check_labels(label: np.ndarray, source: str) -> np.ndarray:
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or not np.all(label == np.round(label)):
            bad = label[~(np.isfinite(label) & (label == np.round(label)))].ravel()[:3]
            raise DataError(
                f"{source}: labels must be integers (class indices), got non-integer values "
                f"such as {bad.tolist()}. Is this an image or a probability map?"
            )
    elif label.dtype.kind not in "iub":
        raise DataError(f"{source}: labels must be integers, got dtype {label.dtype}.")
    if label.size and label.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, got {label.min()}.")
    return label.astype(np.int64)


def _check_pair(image: np.ndarray, label: np.ndarray, source: str) -> None:
    if image.shape != label.shape:
        raise DataError(
            f"{source}: image shape {image.shape} does not match label shape {label.shape}."
        )
    if image.ndim not in (2, 3):
        raise DataError(f"{source}: expected a 2D slice or a 3D volume, got shape {image.shape}.")
    if not np.all(np.isfinite(image)):
        raise DataError(f"{source}: the image contains NaN or infinite values.")


_NIFTI = re.compile(r"^(?P<case>.+?)(_0000)?\.nii(\.gz)?$")


def _unreadable(path: Path, kind: str, err: BaseException) -> DataError:
    first = str(err).strip().splitlines()
    reason = first[0][:200] if first else type(err).__name__
    return DataError(f"{path} is not a readable {kind} file ({reason}).")


def _voxel_size(img: Any, path: Path) -> tuple[float, ...]:
    """The header's voxel size in mm along the array's axes (``NIFTI_UNITS_MM``)."""
    unit = img.header.get_xyzt_units()[0]
    scale = NIFTI_UNITS_MM.get(unit, 1.0)
    zooms = tuple(float(z) * scale for z in img.header.get_zooms()[: len(img.shape)])
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise DataError(
            f"{path}: the header's voxel size {zooms} is not positive; fix the header (the "
            "metrics need it for distances in mm)."
        )
    return zooms


def _read_nifti(path: Path, dtype: Optional[type] = None) -> tuple[np.ndarray, Any]:
    """The array of one NIfTI file and the image (for its header); any failure to read it
    names the file."""
    import nibabel as nib

    try:
        img = nib.load(path)
        return np.asarray(img.dataobj, dtype=dtype), img
    except Exception as err:  # nibabel, gzip and zlib raise many types for a broken file
        raise _unreadable(path, "NIfTI", err) from None


def read_nifti_dir(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray, Spacing]]:
    """Cases ``(name, image, label, spacing)`` from ``folder/images/NAME.nii[.gz]`` and
    ``folder/labels/NAME.nii[.gz]`` (an nnU-Net ``_0000`` suffix on images is accepted).

    A 3D volume ``(X, Y, Z)`` becomes slices ``(Z, X, Y)``, and ``spacing`` the image header's
    voxel size in mm in that order (slice, row, column); a 2D image is one slice.
    """
    folder = Path(folder)
    images_dir, labels_dir = folder / "images", folder / "labels"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DataError(
                f"missing folder {d}: --nifti-dir expects images/NAME.nii.gz and "
                "labels/NAME.nii.gz pairs."
            )
    labels = {}
    for p in sorted(labels_dir.iterdir()):
        m = _NIFTI.match(p.name)
        if m:
            labels[m["case"]] = p
    cases = []
    for p in sorted(images_dir.iterdir()):
        m = _NIFTI.match(p.name)
        if not m:
            continue
        if m["case"] not in labels:
            raise DataError(
                f"missing label for {p}: expected {labels_dir / (m['case'] + '.nii.gz')}."
            )
        image, img = _read_nifti(p, np.float32)
        label, _ = _read_nifti(labels[m["case"]])
        zooms = _voxel_size(img, p)
        _check_pair(image, label, f"{p.name} / {labels[m['case']].name}")
        label = _check_labels(label, str(labels[m["case"]]))
        if image.ndim == 3:  # axial slices along the last axis -> (Z, X, Y)
            image, label = image.transpose(2, 0, 1), label.transpose(2, 0, 1)
            spacing = (zooms[2], zooms[0], zooms[1])
        else:  # one slice: its distance to a neighbour never enters a distance
            image, label = image[None], label[None]
            spacing = (1.0, zooms[0], zooms[1])
        cases.append((m["case"], image, label, spacing))
    if not cases:
        raise DataError(f"no NIfTI images (*.nii or *.nii.gz) found in {images_dir}.")
    return cases


_SLICE = re.compile(r"^(?P<case>.+?)(_slice_?\d+)?\.h5$")


def read_h5_dir(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Cases from SSL4MIS-style ``*.h5`` files with ``image`` and ``label`` datasets.

    Only the files directly in ``folder`` are read, never its subfolders: SSL4MIS's ACDC folder
    holds the 3D volumes and, in ``slices/``, the same data again as 2D slices. 2D files
    (``patient001_frame01_slice_3.h5``) are grouped into a case by the name before
    ``_slice_N``; a 3D file is one case sliced along its first axis. A case made of both (a 3D
    file and 2D slices of the same name) is refused.
    """
    import h5py

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"missing folder {folder} (--h5-dir).")
    files = sorted(p for p in folder.glob("*.h5") if p.is_file())
    if not files:
        below = sorted({p.parent for p in folder.rglob("*.h5")})
        hint = f" (subfolders are not read; found some in {below[0]})" if below else ""
        raise DataError(f"no *.h5 files found in {folder}{hint}.")
    grouped: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    dims: dict[str, dict[int, Path]] = {}
    for p in files:
        try:
            with h5py.File(p, "r") as f:
                found = sorted(f.keys())
                if "image" in found and "label" in found:
                    image = np.asarray(f["image"], dtype=np.float32)
                    label = np.asarray(f["label"])
        except (OSError, KeyError, ValueError, TypeError) as err:  # not HDF5, truncated, ...
            raise _unreadable(p, "HDF5", err) from None
        for key in ("image", "label"):
            if key not in found:
                raise DataError(f"{p}: missing dataset '{key}' (found {found}).")
        _check_pair(image, label, str(p))
        label = _check_labels(label, str(p))
        m = _SLICE.match(p.name)
        case = m["case"] if m else p.stem
        num = re.findall(r"\d+", p.stem)
        order = int(num[-1]) if num else 0
        dims.setdefault(case, {}).setdefault(image.ndim, p)
        if len(dims[case]) > 1:
            raise DataError(
                f"case {case} mixes a 3D volume ({dims[case][3]}) and 2D slices "
                f"({dims[case][2]}): put one kind in --h5-dir (SSL4MIS keeps the slices in "
                "slices/)."
            )
        if image.ndim == 2:
            image, label = image[None], label[None]
        grouped.setdefault(case, []).append((order, image, label))
    cases = []
    for case, parts in grouped.items():
        parts.sort(key=lambda t: t[0])
        shapes = {p[1].shape[1:] for p in parts}
        if len(shapes) > 1:
            raise DataError(f"case {case}: slices of different shapes {sorted(shapes)}.")
        cases.append((case, np.concatenate([p[1] for p in parts]),
                      np.concatenate([p[2] for p in parts])))  # fmt: skip
    return cases


#: More distinct label values than this and the "labels" are taken for an image.
MAX_CLASSES = 64


def remap_labels(
    cases: list[tuple[str, np.ndarray, np.ndarray]], ignore_label: Optional[int] = None
) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], tuple[str, ...], Optional[int], str]:
    """Label values -> contiguous class ids ``0 .. C-1``, in sorted order.

    Labels ``{0, 1, 5}`` become classes 0, 1, 2 (not 6 classes, three of them empty). Voxels
    labelled ``ignore_label`` (e.g. 255 for unannotated voxels) get the id ``C`` that the losses
    and metrics ignore; without ``ignore_label`` every value found is a class. Returns the
    remapped cases, the class names (``background`` for value 0, else ``label V``), the ignore
    id (or None) and a note of the mapping for the data summary ("" when nothing changed).
    """
    found = {name: np.unique(label) for name, _, label in cases}
    values = np.unique(np.concatenate(list(found.values())))
    ignored = ignore_label is not None and bool(np.any(values == ignore_label))
    if ignore_label is not None:
        values = values[values != ignore_label]
    if len(values) < 2:
        raise DataError(
            f"the labels hold the single value {values.tolist()} (besides any --ignore-label); "
            "need a background and at least one class."
        )
    if len(values) > MAX_CLASSES:
        name = max(found, key=lambda n: len(found[n]))
        raise DataError(
            f"the labels hold {len(values)} distinct values (case {name}: {len(found[name])}, "
            f"from {found[name].min()} to {found[name].max()}); more than {MAX_CLASSES} "
            "classes: is an image in the labels folder?"
        )
    n_cls = len(values)
    ignore_index = n_cls if ignore_label is not None else None
    out = []
    for name, image, label in cases:
        ids = np.searchsorted(values, label)
        if ignore_index is not None:
            ids = np.where(label == ignore_label, ignore_index, ids)
        out.append((name, image, ids.astype(np.int64)))
    names = tuple("background" if v == 0 else f"label {v}" for v in values.tolist())
    notes = []
    if not np.array_equal(values, np.arange(n_cls)):
        notes.append(f"label values {', '.join(map(str, values.tolist()))} -> classes "
                     f"0..{n_cls - 1}")  # fmt: skip
        if values[0] != 0:
            names = (f"label {values[0]} (background)", *names[1:])
    if ignore_label is not None:
        notes.append(f"label {ignore_label} ignored" + ("" if ignored else " (none found)"))
    return out, names, ignore_index, "; ".join(notes)


SPLITS = ("training", "validation", "test")
#: Shares of one volume's slices (after the gaps) for training, validation and test.
VOLUME_SHARES = (0.6, 0.1, 0.3)


def _presence(y: torch.Tensor, num_classes: int) -> np.ndarray:
    """``(N, C)``: whether slice ``n`` holds a voxel of class ``c``."""
    return np.stack([(y == c).flatten(1).any(1).numpy() for c in range(num_classes)], 1)


def _ranges(indices: np.ndarray) -> str:
    """``[3, 4, 5, 9]`` -> ``"3..5, 9"``."""
    runs: list[list[int]] = []
    for i in indices.tolist():
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in runs)


def _block_slabs(z: int, blocks: int, gap: int) -> Optional[list[list[int]]]:
    """Training, validation and test slices of one volume of ``z`` slices cut into ``blocks``
    equal blocks, each cut into training | validation | test slabs (``VOLUME_SHARES``) with
    ``gap`` unused slices between two slabs and between two blocks; None if a slab is empty."""
    edges = np.linspace(0, z, blocks + 1).round().astype(int)
    parts: list[list[int]] = [[], [], []]
    for b in range(blocks):
        lo, hi = int(edges[b]), int(edges[b + 1]) - (gap if b < blocks - 1 else 0)
        usable = hi - lo - 2 * gap
        n_val = max(1, round(VOLUME_SHARES[1] * usable))
        n_test = max(1, round(VOLUME_SHARES[2] * usable))
        n_train = usable - n_val - n_test
        if n_train < 1:
            return None
        val_lo = lo + n_train + gap
        parts[0] += range(lo, lo + n_train)
        parts[1] += range(val_lo, val_lo + n_val)
        parts[2] += range(val_lo + n_val + gap, hi)
    return parts


def split_volume(
    name: str, y: torch.Tensor, names: tuple[str, ...], gap: int
) -> tuple[list[list[int]], int]:
    """Slabs of one volume such that training, validation and test each hold every class.

    First the plain split (training, validation, test slabs along the slices, ``gap`` slices
    between them). When a class is missing from a split (an object that occupies a few middle
    slices), the volume is cut into 2, 3, ... blocks, each split the same way, and the fewest
    blocks that give every split every class are used. Raises ``DataError`` naming the class
    and its slices when no number of blocks does. Returns the three lists of slice indices and
    the number of blocks.
    """
    present = _presence(y, len(names))
    lost = [names[c] for c in np.flatnonzero(~present.any(0))]
    if lost:
        raise DataError(
            f"case {name}: {', '.join(lost)} has no voxel left after resizing the slices to "
            f"{tuple(y.shape[-2:])} (too small): use a larger --size."
        )
    first: Optional[list[list[int]]] = None
    blocks = 1
    while (parts := _block_slabs(len(y), blocks, gap)) is not None:
        first = first or parts
        if all(present[p].any(0).all() for p in parts):
            return parts, blocks
        blocks += 1
    if first is None:
        raise DataError(
            f"case {name}: one volume of {len(y)} slices is too few to split into training, "
            f"validation and test slabs with --gap {gap}; use a smaller --gap or give >= 3 "
            "cases."
        )
    where = "; ".join(
        f"{names[c]} occupies slices {_ranges(np.flatnonzero(present[:, c]))}"
        for c in range(len(names)) if not all(present[p, c].any() for p in first)
    )  # fmt: skip
    raise DataError(
        f"case {name}: cannot split one volume of {len(y)} slices so that the training, "
        f"validation and test slabs (gap {gap}) each hold every class ({where}); give three or "
        "more cases (whole cases per split) or a smaller --gap."
    )


def _slice_volumes(
    split: list[tuple[int, int]], cases: list[tuple[str, np.ndarray, np.ndarray]],
    spacings: list[Optional[Spacing]],
) -> tuple[SliceVolume, ...]:  # fmt: skip
    """The slices ``split`` ((case, slice) in order) as volumes: each run of consecutive
    slices of one case. A whole case keeps its name; a slab of one is ``NAME slices A..B``."""
    volumes: list[SliceVolume] = []
    start = 0
    for k in range(1, len(split) + 1):
        if k < len(split) and split[k] == (split[k - 1][0], split[k - 1][1] + 1):
            continue
        i, z0, z1 = split[start][0], split[start][1], split[k - 1][1]
        name = cases[i][0]
        if (z0, z1) != (0, len(cases[i][2]) - 1):
            name = f"{name} slices {z0}..{z1}"
        volumes.append(SliceVolume(name, start, k, spacings[i]))
        start = k
    return tuple(volumes)


def cases_data(
    cases: list,
    *,
    labeled: int,
    size: tuple[int, int],
    description: str,
    gap: int = 3,
    spacing: Optional[Spacing] = None,
    ignore_label: Optional[int] = None,
) -> SliceData:
    """Split cases into train (labeled + unlabeled) / validation / test.

    ``cases`` holds ``(name, image, label)`` with ``(Z, H, W)`` arrays, or ``(name, image,
    label, spacing)`` with the case's voxel size (slice, row, column) in mm (``read_nifti_dir``);
    ``spacing`` is the voxel size of the cases without one (None: unknown, metrics in voxels).
    Label values become contiguous classes (``remap_labels``); each case is normalised as a
    volume (``normalize_volume``) and resized to ``size``, its in-plane voxel size scaled to
    match (``resized_spacing``). Several cases: whole cases go to one split (70% / 10% / 20%,
    at least one each), and the description says which class a split lacks; each test case is
    one test volume. One case: slabs along its slices that each hold every class
    (``split_volume``); each test slab is one test volume. Labeled slices are spread evenly
    over the training slices; the unlabeled ones are the rest, minus ``gap`` neighbours each
    side.
    """
    spacings = [_check_spacing(c[3] if len(c) > 3 else spacing, f"spacing of case {c[0]}")
                for c in cases]  # fmt: skip
    spacings = [resized_spacing(sp, c[2].shape[1:], size) for sp, c in zip(spacings, cases)]
    cases, names, ignore_index, note = remap_labels([tuple(c[:3]) for c in cases], ignore_label)
    notes = [note] if note else []
    n_ids = len(names) + (ignore_index is not None)  # the ignored voxels resize as one more id
    volumes = [resize_slices(normalize_volume(image), label, size, n_ids)
               for _, image, label in cases]  # fmt: skip
    if len(cases) >= 3:
        n = len(cases)
        n_test = max(1, round(0.2 * n))
        n_val = max(1, round(0.1 * n))
        groups = [range(n - n_val - n_test), range(n - n_val - n_test, n - n_test),
                  range(n - n_test, n)]  # fmt: skip
        splits = [[(i, z) for i in g for z in range(len(volumes[i][1]))] for g in groups]
        for split, g in zip(SPLITS, groups):
            held = np.concatenate([_presence(volumes[i][1], len(names)) for i in g]).any(0)
            if not held[1:].all():
                lack = ", ".join(names[c] for c in np.flatnonzero(~held) if c > 0)
                notes.append(f"the {split} cases hold no {lack}" +
                             (": n/a in the table" if split == "test" else ""))  # fmt: skip
    elif len(cases) == 1:
        parts, blocks = split_volume(cases[0][0], volumes[0][1], names, gap)
        splits = [[(0, z) for z in p] for p in parts]
        if blocks > 1:
            notes.append(f"slabs from {blocks} interleaved blocks, so that every split holds "
                         "every class")  # fmt: skip
    else:
        raise DataError(f"need one case (split into slabs) or at least three, got {len(cases)}.")

    def gather(split: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([volumes[i][0][z] for i, z in split])
        y = torch.stack([volumes[i][1][z] for i, z in split])
        return x, y

    train_x, train_y = gather(splits[0])
    lab_idx = spread_indices(len(train_x), labeled)
    unl_idx = [k for k, (i, z) in enumerate(splits[0])
               if all(i != splits[0][j][0] or abs(z - splits[0][j][1]) > gap
                      for j in lab_idx)]  # fmt: skip
    _require_unlabeled(unl_idx, len(train_x), gap)
    val_x, val_y = gather(splits[1])
    test_x, test_y = gather(splits[2])
    test_volumes = _slice_volumes(splits[2], cases, spacings)
    val_volumes = _slice_volumes(splits[1], cases, spacings)
    shared = {v.spacing for v in test_volumes}
    if notes:
        description = f"{description} ({'; '.join(notes)})"
    return SliceData(
        labeled_x=train_x[lab_idx], labeled_y=train_y[lab_idx],
        unlabeled_x=train_x[unl_idx], unlabeled_y=train_y[unl_idx],
        val_x=val_x, val_y=val_y, test_x=test_x, test_y=test_y,
        class_names=names, spacing=shared.pop() if len(shared) == 1 else None,
        description=description, ignore_index=ignore_index, test_volumes=test_volumes,
        val_volumes=val_volumes,
    )  # fmt: skip


def example_slice(labels: torch.Tensor, num_classes: int) -> int:
    """The slice a figure shows: among the slices that hold the most foreground classes (ids
    ``1 .. num_classes - 1``), the one nearest the middle; a slice without foreground would
    show nothing of what the models segment."""
    counts = _presence(labels, num_classes)[:, 1:].sum(1)
    candidates = np.flatnonzero(counts == counts.max())
    return int(candidates[np.argmin(np.abs(candidates - len(labels) // 2))])


def example_view(
    label: torch.Tensor, num_classes: int, *arrays: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``label`` and ``arrays`` (same trailing shape) as a figure shows them: a 2D slice as it
    is, a 3D crop at its slice along the last axis that ``example_slice`` picks."""
    if label.ndim == 2:
        return (label, *arrays)
    k = example_slice(label.permute(2, 0, 1), num_classes)
    return tuple(a[..., k] for a in (label, *arrays))


# --------------------------------------------------------------------------------------------
# augmentation


def augment(
    x: torch.Tensor,
    y: Optional[torch.Tensor],
    generator: torch.Generator,
    *,
    max_rotation: float = 15.0,
    noise: float = 0.05,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Random left-right flip, rotation (+-15 deg), scaling (0.9..1.1), smooth linear bias,
    gamma and Gaussian noise: one draw per sample from ``generator`` (deterministic)."""
    b = x.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    angle = uniform(-max_rotation, max_rotation) * math.pi / 180
    scale = uniform(0.9, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, torch.zeros(b)], 1),
         torch.stack([sin * flip, cos, torch.zeros(b)], 1)], 1)  # fmt: skip
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if y is not None:
        y = F.grid_sample(y[:, None].float(), grid, mode="nearest", align_corners=False)
        y = y[:, 0].long()
    # intensity: gamma on the clipped image, a linear bias field, then noise
    gamma = torch.exp(uniform(-0.3, 0.3, 1, 1, 1))
    out = out.clamp_min(0) ** gamma
    h, w = x.shape[-2:]
    ry = torch.linspace(-1, 1, h).view(1, 1, h, 1)
    rx = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    bias = 1 + uniform(-0.15, 0.15, 1, 1, 1) * ry + uniform(-0.15, 0.15, 1, 1, 1) * rx
    out = out * bias + noise * torch.randn(out.shape, generator=generator)
    return out, y
