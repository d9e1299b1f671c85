"""Tiny fixture folders in exactly the layouts of SSL4MIS's ACDC and UA-MT's LA, cut from the
MNI ICBM152 template that ships in the nilearn wheel (``data.load_mni``), so that the readers
in ``protocols`` and the trainer run end to end without the real data sets, and what they
learn is a real segmentation.

* ``write_ssl4mis_acdc``: patients ``patientNNN`` with two frames each, a frame being a few
  axial slices (every ``ACDC_STRIDE``-th voxel) from a patient's own z range, cropped to an
  in-plane size that differs between patients (as ACDC's do). Four classes like ACDC's: 0
  outside the brain (T1 below ``OUTSIDE_T1``), 1 the rest of the template's background/CSF,
  2 grey matter, 3 white matter. Images are the T1 in ``[0, 1]``.
* ``write_ua_mt_la``: cases with 20-character names, ``mri_norm2.h5`` volumes ``(W, H, D)``
  (every ``LA_STRIDE``-th voxel of the template's ``(X, Y, Z)``), z-score normalised like UA-MT's,
  label 1 white matter, 0 the rest. Some are smaller than a 48 x 48 x 32 crop along an axis
  (``LA_TRAIN_SIZES``, ``LA_TEST_SIZES``) so that padding is exercised.

Everything is deterministic: the same arguments write the same bytes. Run it with::

    python -m examples.bual_demo.fixtures acdc ROOT
    python -m examples.bual_demo.fixtures la ROOT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import center_crop_or_pad, load_mni
from .protocols import LA_FILE, LA_FOLDERS, read_ssl4mis_acdc, read_ua_mt_la

#: T1 below this is outside the brain (the template is 0 there): ACDC fixture class 0.
OUTSIDE_T1 = 0.05
#: Every ``ACDC_STRIDE``-th voxel along each axis: ACDC fixture voxels are 4 mm cubes.
ACDC_STRIDE = 4
#: In-plane sizes (H, W) of the ACDC fixture's patients, in turn (real ACDC's differ too).
ACDC_SIZES = ((52, 44), (48, 40), (44, 48), (56, 48), (40, 44), (52, 48), (48, 44), (44, 40))
#: Every ``LA_STRIDE``-th voxel along each axis: LA fixture voxels are 3 mm cubes.
LA_STRIDE = 3
#: Sizes (W, H, D) of the LA fixture's cases, in turn; the second of each is smaller than a
#: 48 x 48 x 32 crop (W 44 and D 28; H 44 and D 30).
LA_TRAIN_SIZES = ((56, 60, 40), (44, 60, 28), (52, 56, 36), (56, 52, 40), (48, 56, 36),
                  (52, 60, 32))  # fmt: skip
LA_TEST_SIZES = ((56, 56, 40), (48, 44, 30))
#: The voxel size in mm of each fixture along its array axes (the template's is 1 mm).
ACDC_SPACING = (float(ACDC_STRIDE),) * 3
LA_SPACING = (float(LA_STRIDE),) * 3


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray, gzip: bool = False) -> None:
    """``image`` as float32 and ``label`` as uint8 datasets of a new HDF5 file ``path``."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    compression = "gzip" if gzip else None
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), compression=compression)
        f.create_dataset("label", data=label.astype(np.uint8), compression=compression)


def _write_list(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names))


def _check_count(value: int, name: str) -> None:
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}.")


# --------------------------------------------------------------------------------------------
# SSL4MIS ACDC


def _acdc_plan(patients: int, seed: int) -> list[tuple[str, int, int, tuple[int, int]]]:
    """``(name, first z, slices, (H, W))`` per patient: distinct numbers 1..100 in a drawn
    (not sorted) order, z ranges spread over the brain."""
    numbers = np.random.default_rng(seed).permutation(np.arange(1, 101))[:patients]
    return [(f"patient{int(num):03d}", 40 + (23 * i) % 70, 4 + i % 3,
             ACDC_SIZES[i % len(ACDC_SIZES)])
            for i, num in enumerate(numbers)]  # fmt: skip


def _acdc_frame(
    t1: np.ndarray, label: np.ndarray, z: int, depth: int, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``depth`` axial slices from ``z`` (``ACDC_STRIDE`` apart) of the template ``(X, Y, Z)``
    as ``(D, H, W)`` image and 4-class label, rows anterior to posterior, cropped to ``size``."""
    s = ACDC_STRIDE
    zs = z + s * np.arange(depth)
    image = t1[::s, ::s, zs].transpose(2, 1, 0)[:, ::-1]
    mni = label[::s, ::s, zs].transpose(2, 1, 0)[:, ::-1]
    acdc = np.where((mni == 0) & (image < OUTSIDE_T1), 0, mni + 1)
    crop = [center_crop_or_pad(torch.from_numpy(np.ascontiguousarray(a)), size).numpy()
            for a in (image, acdc)]  # fmt: skip
    return crop[0], crop[1]


def write_ssl4mis_acdc(
    root: Path,
    *,
    train_patients: int = 6,
    val_patients: int = 1,
    test_patients: int = 1,
    seed: int = 0,
) -> Path:
    """Write a fixture in SSL4MIS's ACDC layout into ``root`` and return ``root``.

    ``data/NAME.h5`` holds every frame ``patientNNN_frameMM`` as a volume (image ``(D, H, W)``
    float32, label uint8), ``data/slices/NAME_slice_K.h5`` the training patients' slices ``K =
    1 .. D`` (image ``(H, W)``). ``train_slices.list`` lists the training patients in a drawn
    order, each patient's frame 01 then 02, each frame's slices shuffled, as SSL4MIS's list
    does; ``val.list`` and ``test.list`` the frames of the other patients. Each patient has
    4 to 6 slices a frame and its own in-plane size (``ACDC_SIZES``); voxels are
    ``ACDC_SPACING`` mm. Files of other names already in ``root`` are left alone.
    """
    for value, name in ((train_patients, "train_patients"), (val_patients, "val_patients"),
                        (test_patients, "test_patients")):  # fmt: skip
        _check_count(value, name)
    if train_patients + val_patients + test_patients > 100:
        raise ValueError(
            f"at most 100 patients (patient001 .. patient100), got {train_patients} + "
            f"{val_patients} + {test_patients}."
        )
    plan = _acdc_plan(train_patients + val_patients + test_patients, seed)
    z0 = min(p[1] for p in plan)
    z1 = max(p[1] + 2 + ACDC_STRIDE * (p[2] - 1) for p in plan) + 1
    t1, label, _ = load_mni((z0, z1))
    rng = np.random.default_rng(seed + 1)
    splits = (["train_slices"] * train_patients + ["val"] * val_patients
              + ["test"] * test_patients)  # fmt: skip
    lists: dict[str, list[str]] = {"train_slices": [], "val": [], "test": []}
    root = Path(root)
    for (patient, z, depth, size), split in zip(plan, splits):
        for frame in (1, 2):
            name = f"{patient}_frame{frame:02d}"
            image, acdc = _acdc_frame(t1, label, z - z0 + 2 * (frame - 1), depth, size)
            _write_h5(root / "data" / f"{name}.h5", image, acdc)
            if split != "train_slices":
                lists[split].append(name)
                continue
            for k in rng.permutation(depth) + 1:
                _write_h5(root / "data" / "slices" / f"{name}_slice_{k}.h5", image[k - 1],
                          acdc[k - 1])  # fmt: skip
                lists[split].append(f"{name}_slice_{k}")
    for split, names in lists.items():
        _write_list(root / f"{split}.list", names)
    return root


# --------------------------------------------------------------------------------------------
# UA-MT LA


def _la_names(count: int, seed: int) -> list[str]:
    """``count`` distinct 20-character names of uppercase letters and digits, like LA's."""
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(alphabet, 20))
        if name not in names:
            names.append(name)
    return names


def _la_case(
    t1: np.ndarray, label: np.ndarray, size: tuple[int, int, int], shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` box of the strided template, centred on the brain moved by ``shift`` voxels:
    the z-scored image and the label 1 white matter, 0 the rest."""
    centre = np.array([33, 39, 26]) + shift  # the brain's centre in the strided template
    lo = [max(0, min(int(c) - n // 2, dim - n)) for c, n, dim in zip(centre, size, t1.shape)]
    box = tuple(slice(a, a + n) for a, n in zip(lo, size))
    image = t1[box]
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), (label[box] == 2).astype(np.uint8)


def write_ua_mt_la(
    root: Path,
    *,
    train_cases: int = 6,
    test_cases: int = 2,
    seed: int = 0,
    folder: Optional[str] = None,
) -> Path:
    """Write a fixture in UA-MT's LA layout into ``root`` and return ``root``.

    ``root/2018LA_Seg_Training Set/NAME/mri_norm2.h5`` (``folder`` names another case folder,
    e.g. ``2018LA_Seg_Training_Set``) holds each case: image ``(W, H, D)`` float32 z-scored,
    label uint8 (1 white matter), gzip-compressed as UA-MT writes them; ``train.list`` and
    ``test.list`` at ``root`` name the cases. Case sizes run through ``LA_TRAIN_SIZES`` and
    ``LA_TEST_SIZES`` (the second case of each is smaller than a 48 x 48 x 32 crop along an
    axis); voxels are ``LA_SPACING`` mm. Files of other names already in ``root`` are left
    alone.
    """
    _check_count(train_cases, "train_cases")
    _check_count(test_cases, "test_cases")
    if folder is not None and folder not in LA_FOLDERS:
        raise ValueError(f"`folder` must be one of {LA_FOLDERS}, got {folder!r}.")
    t1, label, _ = load_mni()
    every = slice(None, None, LA_STRIDE)
    t1, label = t1[every, every, every], label[every, every, every]
    names = _la_names(train_cases + test_cases, seed)
    shifts = np.random.default_rng(seed + 1).integers(-3, 4, size=(len(names), 3))
    sizes = [LA_TRAIN_SIZES[i % len(LA_TRAIN_SIZES)] for i in range(train_cases)] + [
        LA_TEST_SIZES[i % len(LA_TEST_SIZES)] for i in range(test_cases)]  # fmt: skip
    cases = Path(root) / (folder or LA_FOLDERS[0])
    for name, size, shift in zip(names, sizes, shifts):
        image, wm = _la_case(t1, label, size, shift)
        _write_h5(cases / name / LA_FILE, image, wm, gzip=True)
    _write_list(Path(root) / "train.list", names[:train_cases])
    _write_list(Path(root) / "test.list", names[train_cases:])
    return Path(root)


# --------------------------------------------------------------------------------------------
# command line


def _acdc_summary(root: Path) -> str:
    layout = read_ssl4mis_acdc(root)
    sizes = ", ".join(f"{h}x{w}" for h, w in sorted({x.shape for x, _ in layout.slices}))
    return (
        f"wrote SSL4MIS's ACDC layout to {root}: {len(layout.slice_names)} training slices "
        f"(data/slices/, H x W {sizes}), {len(layout.val)} validation and {len(layout.test)} "
        f"test volumes (data/); voxels {ACDC_SPACING[0]:g} mm"
    )


def _la_summary(root: Path) -> str:
    layout = read_ua_mt_la(root)
    shapes = ", ".join("x".join(map(str, v.image.shape)) for v in layout.train + layout.test)
    return (
        f"wrote UA-MT's LA layout to {root}: {len(layout.train)} training and "
        f"{len(layout.test)} test cases in {LA_FOLDERS[0]}/NAME/{LA_FILE} (W x H x D "
        f"{shapes}); voxels {LA_SPACING[0]:g} mm"
    )


def main(argv: Optional[list[str]] = None) -> int:
    """Write the fixture a command line asks for and print what was written (0), or print
    the error (2)."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.bual_demo.fixtures",
        description="Write a tiny fixture folder in SSL4MIS's ACDC or UA-MT's LA layout, cut "
        "from the MNI template (needs the nilearn wheel). The same arguments write the same "
        "bytes.",
    )
    sub = parser.add_subparsers(dest="layout", required=True)
    acdc = sub.add_parser("acdc", help="SSL4MIS's ACDC layout (2D training slices)")
    acdc.add_argument("root", type=Path, help="the folder to write (SSL4MIS's data/ACDC)")
    acdc.add_argument("--train-patients", type=int, default=6, help="default: %(default)s")
    acdc.add_argument("--val-patients", type=int, default=1, help="default: %(default)s")
    acdc.add_argument("--test-patients", type=int, default=1, help="default: %(default)s")
    la = sub.add_parser("la", help="UA-MT's LA layout (3D volumes)")
    la.add_argument("root", type=Path, help="the folder to write (UA-MT's data/)")
    la.add_argument("--train-cases", type=int, default=6, help="default: %(default)s")
    la.add_argument("--test-cases", type=int, default=2, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        if args.layout == "acdc":
            root = write_ssl4mis_acdc(args.root, train_patients=args.train_patients,
                                      val_patients=args.val_patients,
                                      test_patients=args.test_patients)  # fmt: skip
            print(_acdc_summary(root))
        else:
            root = write_ua_mt_la(args.root, train_cases=args.train_cases,
                                  test_cases=args.test_cases)  # fmt: skip
            print(_la_summary(root))
    except (ValueError, OSError) as err:  # DataError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
