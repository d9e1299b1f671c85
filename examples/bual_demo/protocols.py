"""Readers for the two folder layouts the semi-supervised segmentation literature trains on.

* **SSL4MIS ACDC** (``HiLab-git/SSL4MIS``, ``data/ACDC``): ``train_slices.list``, ``val.list``
  and ``test.list`` name the cases, one a line; the training slices are 2D files
  ``data/slices/NAME.h5``, the validation and test cases 3D volumes ``data/NAME.h5`` of shape
  ``(D, H, W)``; each file holds the datasets ``image`` and ``label`` (0 background, 1 right
  ventricle, 2 myocardium, 3 left ventricle). SSL4MIS labels the *first* slices of
  ``train_slices.list`` in file order (``acdc_labeled_slices`` counts them) and leaves the rest
  unlabeled.
* **UA-MT LA** (``yulequan/UA-MT``, ``data``): ``train.list`` and ``test.list`` name the cases;
  each case is a folder ``2018LA_Seg_Training Set/NAME/`` holding ``mri_norm2.h5`` with an
  ``image`` (z-score normalised) and a ``label`` (0 background, 1 left atrium), both ``(W, H,
  D)`` as UA-MT crops them (112 x 112 x 80 patches along those axes). UA-MT labels the first 16
  of ``train.list``'s 80 cases.

Both layouts store normalised images, so the images are returned as stored (float32), never
rescaled; labels become int64 class ids, checked against the layout's classes. HDF5 stores no
voxel size: the readers take it as an argument (``spacing``, mm along the array axes) and put
it into every ``Volume``; None means unknown (distances in voxels). Every problem with the
files raises ``DataError`` with one line that names the file.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .data import (
    DataError,
    Spacing,
    Volume,
    _check_labels,
    _check_pair,
    _check_spacing,
    _unreadable,
)

ACDC_CLASSES = ("background", "right ventricle", "myocardium", "left ventricle")
LA_CLASSES = ("background", "left atrium")
#: SSL4MIS's ``patients_to_slices`` for ACDC: labeled patients -> labeled slices of its
#: ``train_slices.list`` (1312 slices of 70 patients; the key 140 is its "all": 70 patients of
#: two frames each, i.e. 140 volumes).
ACDC_PATIENTS_TO_SLICES = {3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 140: 1312}
#: The length of SSL4MIS's ``data/ACDC/train_slices.list``: the table above holds for it only.
ACDC_TRAIN_SLICES = 1312
#: UA-MT's case folder, with a space as shipped, and the same name without one.
LA_FOLDERS = ("2018LA_Seg_Training Set", "2018LA_Seg_Training_Set")
LA_FILE = "mri_norm2.h5"

#: ``patient099_frame01_slice_15`` -> ``patient099``; a name without ``_frame`` is its own
#: patient (less any ``_slice_N``).
_PATIENT = re.compile(r"^(?P<patient>.+?)(_frame\d+)?(_slice_?\d+)?$")


@dataclasses.dataclass
class ACDCLayout:
    """SSL4MIS's ACDC folder read whole.

    ``slice_names`` is ``train_slices.list`` in file order and ``slices`` the matching
    ``(image (H, W) float32, label (H, W) int64)`` pairs (sizes differ between patients, as in
    ACDC); ``val`` and ``test`` the volumes ``(D, H, W)`` of ``val.list`` and ``test.list``.
    """

    slice_names: list[str]
    slices: list[tuple[np.ndarray, np.ndarray]]
    val: list[Volume]
    test: list[Volume]


@dataclasses.dataclass
class LALayout:
    """UA-MT's LA folder read whole: the volumes ``(W, H, D)`` of ``train.list`` and
    ``test.list``, each in file order."""

    train: list[Volume]
    test: list[Volume]


# --------------------------------------------------------------------------------------------
# shared helpers


def _read_list(path: Path) -> list[str]:
    """The names in a ``.list`` file, one a line, whitespace stripped, blank lines skipped."""
    if not path.is_file():
        raise DataError(f"missing list file {path}.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, "list", err) from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path} lists no cases (the file is empty).")
    return names


def _check_classes(label: np.ndarray, path: Path, classes: tuple[str, ...]) -> np.ndarray:
    """``label`` as int64 if every value is a class id ``0 .. len(classes) - 1``, else
    ``DataError`` naming the file, the values found and the allowed ones."""
    if label.dtype.kind in "biuf":
        values = np.unique(label)
        if not np.isin(values, np.arange(len(classes))).all():
            shown = ", ".join(f"{v:g}" for v in values[:8].tolist())
            more = f", ... ({len(values)} distinct)" if len(values) > 8 else ""
            allowed = ", ".join(f"{i} {name}" for i, name in enumerate(classes))
            raise DataError(
                f"{path}: labels must be class ids {{{allowed}}}, found values {{{shown}{more}}}."
            )
    return _check_labels(label, str(path))  # refuses other dtypes; int64


def _read_pair(
    path: Path, ndim: int, classes: tuple[str, ...], listed_in: Path
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (float32) and ``label`` (int64) of one HDF5 file of ``ndim`` dimensions."""
    import h5py

    if not path.is_file():
        raise DataError(f"missing file {path} (listed in {listed_in}).")
    arrays: dict[str, Any] = {}
    try:
        with h5py.File(path, "r") as f:
            found = sorted(f.keys())
            for key in ("image", "label"):
                if key in found:
                    arrays[key] = np.asarray(f[key])
    except (OSError, KeyError, ValueError, TypeError) as err:  # not HDF5, truncated, ...
        raise _unreadable(path, "HDF5", err) from None
    for key in ("image", "label"):
        if key not in arrays:
            raise DataError(f"{path}: missing dataset '{key}' (found {found}).")
    image, label = arrays["image"], arrays["label"]
    if image.ndim != ndim:
        kind = "2D slice (H, W)" if ndim == 2 else "3D volume"
        raise DataError(f"{path}: expected a {kind}, got an image of shape {image.shape}.")
    _check_pair(image, label, str(path))
    return image.astype(np.float32, copy=False), _check_classes(label, path, classes)


# --------------------------------------------------------------------------------------------
# SSL4MIS ACDC


def read_ssl4mis_acdc(root: Path, spacing: Optional[Spacing] = None) -> ACDCLayout:
    """Read SSL4MIS's ACDC folder (``root`` holds ``train_slices.list`` and ``data/``).

    Args:
        root: the folder SSL4MIS calls ``--root_path`` (``../data/ACDC``).
        spacing: voxel size (slice, row, column) in mm of the ``val`` and ``test`` volumes, or
            None when unknown. SSL4MIS's HDF5 files store none (and real ACDC's differs between
            patients, so one value is an approximation).

    Returns:
        ``ACDCLayout``: the training slices in ``train_slices.list`` order, labels checked to
        be class ids of ``ACDC_CLASSES``; the validation and test volumes ``(D, H, W)``.

    Raises:
        DataError: a missing folder, list or listed file, an empty list, a file that is not
            HDF5 or lacks ``image`` / ``label``, shapes that differ or have the wrong number of
            dimensions, label values outside ``0 .. 3``; the message names the file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"missing folder {root} (SSL4MIS's ACDC folder: train_slices.list, val.list, "
            "test.list, data/NAME.h5 and data/slices/NAME.h5)."
        )
    spacing = _check_spacing(spacing, "spacing")
    lists = {split: root / f"{split}.list" for split in ("train_slices", "val", "test")}
    names = {split: _read_list(path) for split, path in lists.items()}  # all, before any file
    slices = [_read_pair(root / "data" / "slices" / f"{n}.h5", 2, ACDC_CLASSES,
                         lists["train_slices"]) for n in names["train_slices"]]  # fmt: skip
    val, test = (
        [_read_volume(n, root / "data" / f"{n}.h5", ACDC_CLASSES, lists[split], spacing)
         for n in names[split]]
        for split in ("val", "test")
    )  # fmt: skip
    return ACDCLayout(slice_names=names["train_slices"], slices=slices, val=val, test=test)


def _read_volume(
    name: str, path: Path, classes: tuple[str, ...], listed_in: Path, spacing: Optional[Spacing]
) -> Volume:
    """The 3D volume ``name`` stored in ``path``."""
    image, label = _read_pair(path, 3, classes, listed_in)
    return Volume(name, image, label, spacing)


def acdc_patient(name: str) -> str:
    """The patient of an ACDC case or slice name: the part before ``_frame``
    (``patient099_frame01_slice_15`` -> ``patient099``)."""
    match = _PATIENT.match(name)
    return match["patient"] if match else name


def acdc_labeled_slices(slice_names: list[str], patients: int) -> int:
    """How many leading slices of ``slice_names`` SSL4MIS labels for ``patients`` patients.

    SSL4MIS labels the first ``k`` names of ``train_slices.list`` in file order (it never
    sorts), ``k`` from its table ``ACDC_PATIENTS_TO_SLICES``. For SSL4MIS's own list (1312
    names) and a key of the table, this returns the table's value. Otherwise ``k`` is counted:
    the number of leading names whose patient (``acdc_patient``) is one of the first
    ``patients`` distinct patients in file order. Where each patient's slices are contiguous
    (SSL4MIS's list, the fixtures) that is all the slices of those patients; on SSL4MIS's list
    the count reproduces every entry of the table except 140, which exceeds its 70 patients
    (the table's 140 means "all 140 volumes"). Where patients interleave, the count stops at
    the first slice of another patient, so no labeled slice belongs to a later patient.

    Raises:
        ValueError: ``patients`` is below 1 or above the number of patients in the list
            (unless the table answers), naming ``--labeled-cases``.
    """
    if len(slice_names) == ACDC_TRAIN_SLICES and patients in ACDC_PATIENTS_TO_SLICES:
        return ACDC_PATIENTS_TO_SLICES[patients]
    order = list(dict.fromkeys(acdc_patient(n) for n in slice_names))
    if not 1 <= patients <= len(order):
        raise ValueError(
            f"`--labeled-cases` must be between 1 and {len(order)} (the patients in the "
            f"training slice list), got {patients}."
        )
    labeled = set(order[:patients])
    count = 0
    for name in slice_names:
        if acdc_patient(name) not in labeled:
            break
        count += 1
    return count


# --------------------------------------------------------------------------------------------
# UA-MT LA


def la_cases_dir(root: Path) -> Path:
    """UA-MT's case folder in ``root``: ``2018LA_Seg_Training Set`` (as shipped) or
    ``2018LA_Seg_Training_Set``; ``DataError`` when neither or both exist."""
    found = [Path(root) / name for name in LA_FOLDERS if (Path(root) / name).is_dir()]
    if len(found) > 1:
        raise DataError(
            f"both {found[0]} and {found[1]} exist: keep one, the cases would be ambiguous."
        )
    if not found:
        raise DataError(
            f"missing folder {Path(root) / LA_FOLDERS[0]} (or {LA_FOLDERS[1]}): UA-MT's LA "
            f"layout holds the cases as FOLDER/NAME/{LA_FILE} next to train.list and test.list."
        )
    return found[0]


def read_ua_mt_la(root: Path, spacing: Optional[Spacing] = None) -> LALayout:
    """Read UA-MT's LA folder (``root`` holds ``train.list``, ``test.list`` and the cases).

    Args:
        root: the folder above UA-MT's ``--root_path`` (``../data``: UA-MT reads the lists
            from ``root_path/..``).
        spacing: voxel size in mm along the array axes ``(W, H, D)``, or None when unknown
            (LA's is 0.625 x 0.625 x 0.625 mm; ``mri_norm2.h5`` stores none).

    Returns:
        ``LALayout``: the volumes ``(W, H, D)`` of ``train.list`` and ``test.list`` in file
        order, images as stored (float32), labels checked to be 0 / 1.

    Raises:
        DataError: a missing or doubled case folder (``la_cases_dir``), a missing list or
            ``NAME/mri_norm2.h5``, an empty list, an unreadable file, shapes that differ or
            are not 3D, label values other than 0 and 1; the message names the file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"missing folder {root} (UA-MT's LA folder: train.list, test.list and "
            f"{LA_FOLDERS[0]}/NAME/{LA_FILE})."
        )
    spacing = _check_spacing(spacing, "spacing")
    cases = la_cases_dir(root)
    lists = {split: root / f"{split}.list" for split in ("train", "test")}
    names = {split: _read_list(path) for split, path in lists.items()}  # all, before any file
    train, test = (
        [_read_volume(n, cases / n / LA_FILE, LA_CLASSES, lists[split], spacing)
         for n in names[split]]
        for split in ("train", "test")
    )  # fmt: skip
    return LALayout(train=train, test=test)
