"""The readers of SSL4MIS's ACDC and UA-MT's LA layouts (examples/bual_demo/protocols.py) and
the fixture folders written in those layouts from the MNI template (fixtures.py)."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

h5py = pytest.importorskip("h5py")
pytest.importorskip("examples.bual_demo")
from examples.bual_demo.data import DataError  # noqa: E402
from examples.bual_demo.protocols import (  # noqa: E402
    ACDC_PATIENTS_TO_SLICES,
    acdc_labeled_slices,
    acdc_patient,
    read_ssl4mis_acdc,
    read_ua_mt_la,
)

CROP = (48, 48, 32)  # the 3D crop CI trains the LA fixture with


def _needs_mni() -> None:
    pytest.importorskip("nibabel")
    if importlib.util.find_spec("nilearn") is None:
        pytest.skip("the MNI template ships in the nilearn wheel (pip install --no-deps nilearn)")


@pytest.fixture(scope="session")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two fixture folders, written once per session (per xdist worker)."""
    _needs_mni()
    from examples.bual_demo.fixtures import write_ssl4mis_acdc, write_ua_mt_la

    base = tmp_path_factory.mktemp("fixtures")
    return {"acdc": write_ssl4mis_acdc(base / "acdc"), "la": write_ua_mt_la(base / "la")}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


# ------------------------------------------------------------------------------ fixtures


def test_acdc_fixture_reads_back_in_file_order(written):
    root = written["acdc"]
    layout = read_ssl4mis_acdc(root, spacing=(4.0, 4.0, 4.0))
    assert layout.slice_names == _lines(root / "train_slices.list")
    assert len(layout.slice_names) == len(layout.slices) == 60
    patients = list(dict.fromkeys(acdc_patient(n) for n in layout.slice_names))
    assert len(patients) == 6 and patients != sorted(patients)  # SSL4MIS's list is not sorted
    assert [v.name for v in layout.val] == _lines(root / "val.list")
    assert [v.name for v in layout.test] == _lines(root / "test.list")
    assert len(layout.val) == len(layout.test) == 2
    held_out = {acdc_patient(v.name) for v in layout.val + layout.test}
    assert len(held_out) == 2 and not held_out & set(patients)
    sizes = {}
    for name, (image, label) in zip(layout.slice_names, layout.slices):
        assert image.ndim == 2 and image.shape == label.shape
        assert image.dtype == np.float32 and label.dtype == np.int64
        assert 0 <= image.min() and image.max() <= 1
        sizes.setdefault(acdc_patient(name), set()).add(image.shape)
        # slice_K is slice K - 1 of the frame's volume in data/
        frame, k = re.fullmatch(r"(.+)_slice_(\d+)", name).groups()
        with h5py.File(root / "data" / f"{frame}.h5", "r") as f:
            np.testing.assert_array_equal(f["image"][int(k) - 1], image)
    assert all(len(s) == 1 for s in sizes.values())  # one size a patient ...
    assert len({next(iter(s)) for s in sizes.values()}) == 6  # ... differing between patients
    assert set(np.unique(np.concatenate([y.ravel() for _, y in layout.slices]))) == {0, 1, 2, 3}
    for volume in layout.val + layout.test:
        assert volume.image.ndim == 3 and volume.image.shape == volume.label.shape
        assert volume.image.dtype == np.float32 and volume.label.dtype == np.int64
        assert set(np.unique(volume.label)) == {0, 1, 2, 3}
        assert volume.spacing == (4.0, 4.0, 4.0)


def test_la_fixture_reads_back_in_file_order(written):
    root = written["la"]
    layout = read_ua_mt_la(root)
    assert [v.name for v in layout.train] == _lines(root / "train.list")
    assert [v.name for v in layout.test] == _lines(root / "test.list")
    assert len(layout.train) == 6 and len(layout.test) == 2
    for volume in layout.train + layout.test:
        assert re.fullmatch(r"[A-Z0-9]{20}", volume.name)
        assert (root / "2018LA_Seg_Training Set" / volume.name / "mri_norm2.h5").is_file()
        assert volume.image.shape == volume.label.shape and volume.image.ndim == 3
        assert all(n <= m for n, m in zip(volume.image.shape, (56, 60, 40)))
        assert volume.image.dtype == np.float32 and volume.label.dtype == np.int64
        assert set(np.unique(volume.label)) == {0, 1}
        assert abs(volume.image.mean()) < 1e-4 and abs(volume.image.std() - 1) < 1e-4
        assert volume.spacing is None


def test_la_fixture_has_volumes_smaller_than_a_crop(written):
    layout = read_ua_mt_la(written["la"])
    for split in (layout.train, layout.test):
        small = [v.name for v in split if any(n < c for n, c in zip(v.image.shape, CROP))]
        assert small, f"no volume smaller than a {CROP} crop"


def test_fixtures_are_deterministic_and_the_cli_writes_them(written, tmp_path, capsys):
    from examples.bual_demo.fixtures import main

    for layout in ("acdc", "la"):
        assert main([layout, str(tmp_path / layout)]) == 0
        assert _files(tmp_path / layout) == _files(written[layout])
    out = capsys.readouterr().out
    assert "60 training slices" in out and "6 training and 2 test cases" in out


def test_fixture_writers_refuse_bad_counts(tmp_path, capsys):
    from examples.bual_demo.fixtures import main, write_ssl4mis_acdc, write_ua_mt_la

    with pytest.raises(ValueError, match="`val_patients` must be >= 1, got 0"):
        write_ssl4mis_acdc(tmp_path, val_patients=0)
    with pytest.raises(ValueError, match="at most 100 patients"):
        write_ssl4mis_acdc(tmp_path, train_patients=99)
    with pytest.raises(ValueError, match="`folder` must be one of"):
        write_ua_mt_la(tmp_path, folder="LA")
    assert main(["la", str(tmp_path), "--test-cases", "0"]) == 2
    assert "`test_cases` must be >= 1, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------ labeled slices


def _names(frames: dict[str, int]) -> list[str]:
    """Slice names of ``{"patientNNN_frameMM": slices}``, in that order."""
    return [f"{frame}_slice_{k}" for frame, n in frames.items() for k in range(1, n + 1)]


def test_acdc_labeled_slices_counts_the_first_patients_in_file_order():
    names = _names({"patient099_frame01": 3, "patient099_frame02": 2, "patient007_frame01": 4,
                    "patient007_frame02": 4, "patient050_frame01": 1})  # fmt: skip
    assert acdc_patient(names[0]) == "patient099"
    assert [acdc_labeled_slices(names, n) for n in (1, 2, 3)] == [5, 13, 14]
    # interleaved patients: the labeled prefix stops before any slice of a later patient
    mixed = _names({"patient001_frame01": 2, "patient002_frame01": 2, "patient001_frame02": 2})
    assert acdc_labeled_slices(mixed, 1) == 2


def test_acdc_labeled_slices_takes_ssl4mis_table_for_its_full_list():
    names = _names({f"patient{p:03d}_frame{f:02d}": 9 for p in range(1, 74) for f in (1, 2)})
    names = names[:1312]  # 73 synthetic patients of 18 slices, cut to SSL4MIS's length
    for patients, slices in ACDC_PATIENTS_TO_SLICES.items():
        assert acdc_labeled_slices(names, patients) == slices
    assert acdc_labeled_slices(names, 5) == 5 * 18  # not in the table: counted
    assert acdc_labeled_slices(names[:-1], 3) == 3 * 18  # not SSL4MIS's list: counted


@pytest.mark.parametrize("patients", [0, -1, 3])
def test_acdc_labeled_slices_refuses_other_patient_counts(patients):
    names = _names({"patient001_frame01": 2, "patient002_frame01": 2})
    with pytest.raises(
        ValueError, match=rf"`--labeled-cases` must be between 1 and 2 .*got {patients}"
    ):
        acdc_labeled_slices(names, patients)


# ------------------------------------------------------------------------------ reader errors


def _h5(path: Path, image: np.ndarray, label: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"] = image
        if label is not None:
            f["label"] = label


def _tiny_acdc(root: Path) -> Path:
    """Two training slices, one validation and one test volume in SSL4MIS's layout."""
    for k in (1, 2):
        _h5(
            root / "data" / "slices" / f"patient001_frame01_slice_{k}.h5",
            np.full((6, 5), k, np.float32),
            np.arange(30, dtype=np.uint8).reshape(6, 5) % 4,
        )
    for name in ("patient002_frame01", "patient003_frame01"):
        _h5(root / "data" / f"{name}.h5", np.zeros((2, 6, 5), np.float32),
            np.ones((2, 6, 5), np.uint8))  # fmt: skip
    (root / "train_slices.list").write_text(
        "patient001_frame01_slice_2\n\n  patient001_frame01_slice_1  \n"
    )
    (root / "val.list").write_text("patient002_frame01\n")
    (root / "test.list").write_text("patient003_frame01")
    return root


def _tiny_la(root: Path, folder: str = "2018LA_Seg_Training Set") -> Path:
    for name in ("CASEA", "CASEB"):
        _h5(root / folder / name / "mri_norm2.h5", np.zeros((4, 5, 3), np.float32),
            (np.arange(60).reshape(4, 5, 3) % 2).astype(np.uint8))  # fmt: skip
    (root / "train.list").write_text("CASEB\n")
    (root / "test.list").write_text("CASEA\n")
    return root


def test_tiny_layouts_read_back(tmp_path):
    acdc = read_ssl4mis_acdc(_tiny_acdc(tmp_path / "acdc"), spacing=(10, 1.5, 1.5))
    assert acdc.slice_names == ["patient001_frame01_slice_2", "patient001_frame01_slice_1"]
    assert [float(x[0, 0]) for x, _ in acdc.slices] == [2.0, 1.0]
    assert acdc.test[0].spacing == (10.0, 1.5, 1.5) and acdc.val[0].name == "patient002_frame01"
    la = read_ua_mt_la(_tiny_la(tmp_path / "la"))
    assert [v.name for v in la.train] == ["CASEB"] and la.test[0].label.dtype == np.int64
    with pytest.raises(ValueError, match="`spacing` must be None"):
        read_ua_mt_la(tmp_path / "la", spacing=(1.0, 0.0, 1.0))


def test_la_accepts_the_folder_without_a_space_and_refuses_both(tmp_path):
    root = _tiny_la(tmp_path, "2018LA_Seg_Training_Set")
    assert [v.name for v in read_ua_mt_la(root).test] == ["CASEA"]
    _tiny_la(tmp_path, "2018LA_Seg_Training Set")
    with pytest.raises(DataError, match=r"both .*2018LA_Seg_Training Set and .*_Training_Set"):
        read_ua_mt_la(root)


Break = Callable[[Path], None]


def _write(rel: str, text: str) -> Break:
    def write(root: Path) -> None:
        (root / rel).write_text(text)

    return write


def _remove(rel: str) -> Break:
    return lambda root: (root / rel).unlink()


def _replace(rel: str, image: np.ndarray, label: np.ndarray | None = None) -> Break:
    return lambda root: _h5(root / rel, image, label)


SLICE = "data/slices/patient001_frame01_slice_1.h5"
VOLUME = "data/patient003_frame01.h5"
Z2 = np.zeros((6, 5), np.float32)
Z3 = np.zeros((2, 6, 5), np.float32)

ACDC_ERRORS = {
    "missing list": (_remove("val.list"), r"missing list file .*val\.list"),
    "empty list": (_write("train_slices.list", " \n\n"), r"train_slices\.list lists no cases"),
    "missing slice": (_write("train_slices.list", "patient009_frame01_slice_1\n"),
                      r"missing file .*slices/patient009_frame01_slice_1\.h5 \(listed in "
                      r".*train_slices\.list\)"),
    "not hdf5": (_write(SLICE, "not an HDF5 file"),
                 r"slices/patient001_frame01_slice_1\.h5 is not a readable HDF5 file"),
    "missing dataset": (_replace(VOLUME, Z3), r"patient003_frame01\.h5: missing dataset 'label'"),
    "shape mismatch": (_replace(SLICE, Z2, np.zeros((6, 4), np.uint8)),
                       r"slice_1\.h5: image shape \(6, 5\) does not match label shape"),
    "3D slice": (_replace(SLICE, Z3, np.zeros((2, 6, 5), np.uint8)),
                 r"slice_1\.h5: expected a 2D slice \(H, W\), got .* \(2, 6, 5\)"),
    "2D volume": (_replace(VOLUME, Z2, np.zeros((6, 5), np.uint8)),
                  r"patient003_frame01\.h5: expected a 3D volume"),
    "label 4": (_replace(SLICE, Z2, np.full((6, 5), 4, np.uint8)),
                r"slice_1\.h5: labels must be class ids \{0 background, 1 right ventricle, "
                r"2 myocardium, 3 left ventricle\}, found values \{4\}"),
    "label -1": (_replace(VOLUME, Z3, np.full((2, 6, 5), -1, np.int16)),
                 r"frame01\.h5: labels must be class ids .* found values \{-1\}"),
    "label 0.5": (_replace(SLICE, Z2, np.full((6, 5), 0.5, np.float32)),
                  r"slice_1\.h5: labels must be class ids .* found values \{0\.5\}"),
    "NaN image": (_replace(SLICE, np.full((6, 5), np.nan, np.float32), np.zeros((6, 5), np.uint8)),
                  r"slice_1\.h5: the image contains NaN"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ACDC_ERRORS))
def test_acdc_reader_errors_name_the_file(tmp_path, case):
    root = _tiny_acdc(tmp_path)
    breaks, message = ACDC_ERRORS[case]
    breaks(root)
    with pytest.raises(DataError, match=message):
        read_ssl4mis_acdc(root)


def test_acdc_reader_refuses_a_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"missing folder .*nope \(SSL4MIS's ACDC folder"):
        read_ssl4mis_acdc(tmp_path / "nope")


LA_CASE = "2018LA_Seg_Training Set/CASEA/mri_norm2.h5"
LA_ERRORS = {
    "missing list": (_remove("train.list"), r"missing list file .*train\.list"),
    "empty list": (_write("test.list", ""), r"test\.list lists no cases"),
    "missing case": (_write("test.list", "CASEC\n"),
                     r"missing file .*CASEC/mri_norm2\.h5 \(listed in .*test\.list\)"),
    "not hdf5": (_write(LA_CASE, ""), r"CASEA/mri_norm2\.h5 is not a readable HDF5 file"),
    "label 2": (_replace(LA_CASE, np.zeros((4, 5, 3), np.float32), np.full((4, 5, 3), 2)),
                r"CASEA/mri_norm2\.h5: labels must be class ids \{0 background, 1 left "
                r"atrium\}, found values \{2\}"),
    "2D": (_replace(LA_CASE, np.zeros((4, 5), np.float32), np.zeros((4, 5), np.uint8)),
           r"CASEA/mri_norm2\.h5: expected a 3D volume"),
    "no folder": (lambda root: (root / "2018LA_Seg_Training Set").rename(root / "cases"),
                  r"missing folder .*2018LA_Seg_Training Set \(or 2018LA_Seg_Training_Set\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LA_ERRORS))
def test_la_reader_errors_name_the_file(tmp_path, case):
    root = _tiny_la(tmp_path)
    breaks, message = LA_ERRORS[case]
    breaks(root)
    with pytest.raises(DataError, match=message):
        read_ua_mt_la(root)
