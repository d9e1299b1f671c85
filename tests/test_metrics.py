"""The trainer's per-volume metrics (examples/bual_demo/metrics.py): cases worked by hand, a
brute-force oracle, and MONAI's surface-distance metrics where the definitions agree."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("scipy")
from examples.bual_demo.metrics import (  # noqa: E402
    asd,
    assd,
    diagonal,
    dice,
    evaluate,
    evaluate_case,
    hd95,
    jaccard,
    surface_distances,
    surface_metrics,
)


def _brute(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances by comparing every pair of surface voxels (no EDT)."""
    from scipy import ndimage

    def surface(m):
        st = ndimage.generate_binary_structure(m.ndim, 1)
        edge = m & ~ndimage.binary_erosion(m, structure=st, border_value=0)
        return np.argwhere(edge) * np.asarray(spacing, float)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)


# ------------------------------------------------------------------------------ by hand


def _line_and_outlier() -> tuple[np.ndarray, np.ndarray]:
    reference = np.zeros((8, 12), bool)
    reference[2, 0:10] = True
    pred = reference.copy()
    pred[6, 0] = True
    return pred, reference


def test_a_line_and_an_outlier_worked_by_hand() -> None:
    """2D, spacing (1.5, 2.0) mm (rows, columns).

    Reference R: row 2, columns 0..9 (10 voxels). Prediction P: R plus one voxel at (6, 0).
    A one-voxel-thick line has no interior, so every voxel is surface: ∂R = R, ∂P = P.

    * Dice = 2 |P ∩ R| / (|P| + |R|) = 2 * 10 / (11 + 10) = 20/21; Jaccard = 10/11.
    * d(P → R): the 10 line voxels are on ∂R (0); the outlier's nearest ∂R voxel is (2, 0),
      4 rows away: 4 * 1.5 = 6 mm. So d(P → R) = [0 x 10, 6]. d(R → P) = [0 x 10].
    * HD95 (MedPy): the 21 pooled values sorted are [0 x 20, 6]; NumPy's 95th percentile sits
      at rank 0.95 * 20 = 19, a 0: HD95 = 0 mm (the one outlier is under 5% of the surface).
    * ASD = mean d(P → R) = 6/11 mm; ASSD = (6/11 + 0) / 2 = 3/11 mm.
    * MONAI's HD95 is the larger directed percentile instead: d(P → R) sorted has rank
      0.95 * 10 = 9.5 between 0 and 6, so 3 mm; MONAI's symmetric ASD is the pooled mean
      6/21 = 2/7 mm, not 3/11.
    """
    pred, reference = _line_and_outlier()
    sp = (1.5, 2.0)
    assert dice(pred, reference) == pytest.approx(20 / 21)
    assert jaccard(pred, reference) == pytest.approx(10 / 11)
    to_r, to_p = surface_distances(pred, reference, sp)
    np.testing.assert_allclose(np.sort(to_r), [0.0] * 10 + [6.0])
    np.testing.assert_allclose(to_p, [0.0] * 10)
    assert hd95(pred, reference, sp) == 0.0
    assert asd(pred, reference, sp) == pytest.approx(6 / 11)
    assert assd(pred, reference, sp) == pytest.approx(3 / 11)
    # the other direction: ASD is one-directional, the rest symmetric
    assert asd(reference, pred, sp) == 0.0
    assert assd(reference, pred, sp) == pytest.approx(3 / 11)
    assert hd95(reference, pred, sp) == 0.0


def test_a_block_inside_a_square_worked_by_hand() -> None:
    """2D, spacing (2.0, 1.0) mm (rows, columns): the row spacing decides the distances.

    Reference R: the 3 x 3 square rows 1..3, columns 1..3; its centre (2, 2) has all four
    neighbours inside, so ∂R is the other 8 voxels. Prediction P: rows 2..3, columns 1..3, two
    rows thick, so every voxel of it is surface (6 voxels).

    * Dice = 2 * 6 / (6 + 9) = 0.8; Jaccard = 6 / 9 = 2/3.
    * d(P → R): (2, 1), (2, 3) and row 3 lie on ∂R (0); (2, 2) is 1 column (1 mm) from (2, 1):
      [0, 1, 0, 0, 0, 0], mean 1/6.
    * d(R → P): row 1's three voxels are 1 row = 2 mm above row 2 of P; the other five lie on
      ∂P: [2, 2, 2, 0, 0, 0, 0, 0], mean 6/8 = 3/4.
    * HD95: 14 pooled values sorted [0 x 10, 1, 2, 2, 2]; rank 0.95 * 13 = 12.35 lies between
      two 2s: 2 mm. ASD = 1/6 mm; ASSD = (1/6 + 3/4) / 2 = 11/24 mm.
    """
    reference = np.zeros((6, 6), bool)
    reference[1:4, 1:4] = True
    pred = np.zeros((6, 6), bool)
    pred[2:4, 1:4] = True
    sp = (2.0, 1.0)
    assert dice(pred, reference) == pytest.approx(0.8)
    assert jaccard(pred, reference) == pytest.approx(2 / 3)
    to_r, to_p = surface_distances(pred, reference, sp)
    np.testing.assert_allclose(to_r, [0, 1, 0, 0, 0, 0])  # C order: (2,1) (2,2) (2,3) row 3
    np.testing.assert_allclose(to_p, [2, 2, 2, 0, 0, 0, 0, 0])
    m = surface_metrics(pred, reference, sp)
    assert m == pytest.approx({"hd95": 2.0, "asd": 1 / 6, "assd": 11 / 24})
    # isotropic pixels: row 1 is 1 pixel from P, HD95 of [0 x 10, 1, 1, 1, 1] is 1
    assert hd95(pred, reference) == pytest.approx(1.0)


def test_a_cube_shifted_by_one_slice_worked_by_hand() -> None:
    """3D, spacing (2.5, 1.0, 0.5) mm (slice, row, column).

    Reference R: the 2 x 2 x 2 cube at slices 1..2, rows 1..2, columns 1..2; prediction P: the
    same cube one slice later (slices 2..3). Two voxels thick, both are surface everywhere.

    * Dice = 2 * 4 / (8 + 8) = 0.5 (they share slice 2); Jaccard = 4 / 12 = 1/3.
    * d(P → R): slice 2 lies on ∂R (0), slice 3 is one slice (2.5 mm) from slice 2:
      [0 x 4, 2.5 x 4]; d(R → P) the same by symmetry.
    * HD95: 16 values [0 x 8, 2.5 x 8], rank 0.95 * 15 = 14.25: 2.5 mm.
      ASD = ASSD = 1.25 mm. With 1 mm voxels everything at 1 voxel: HD95 1, ASD 0.5.
    """
    reference = np.zeros((5, 4, 4), bool)
    reference[1:3, 1:3, 1:3] = True
    pred = np.roll(reference, 1, axis=0)
    sp = (2.5, 1.0, 0.5)
    assert dice(pred, reference) == 0.5
    assert jaccard(pred, reference) == pytest.approx(1 / 3)
    assert surface_metrics(pred, reference, sp) == pytest.approx(
        {"hd95": 2.5, "asd": 1.25, "assd": 1.25}
    )
    assert surface_metrics(pred, reference) == pytest.approx({"hd95": 1.0, "asd": 0.5,
                                                             "assd": 0.5})  # fmt: skip


def test_empty_masks_follow_the_documented_rules() -> None:
    """Reference empty: n/a (nan), never 1.0. Prediction empty, reference not (a missed
    structure): Dice 0, Jaccard 0, distances the diagonal of the array in mm,
    sqrt((4 * 1.5)^2 + (5 * 2)^2) = sqrt(136), or ``empty_value``."""
    a = np.zeros((4, 5), bool)
    a[1, 1] = True
    empty = np.zeros_like(a)
    sp = (1.5, 2.0)
    for pred in (a, empty):
        assert math.isnan(dice(pred, empty)) and math.isnan(jaccard(pred, empty))
        assert all(math.isnan(v) for v in surface_metrics(pred, empty, sp).values())
    assert dice(empty, a) == 0.0 and jaccard(empty, a) == 0.0
    assert diagonal(a.shape, sp) == pytest.approx(math.sqrt(136))
    missed = dict.fromkeys(("hd95", "asd", "assd"), math.sqrt(136))
    assert surface_metrics(empty, a, sp) == pytest.approx(missed)
    assert hd95(empty, a, sp, empty_value=99.0) == 99.0
    assert surface_metrics(a, a, sp) == {"hd95": 0.0, "asd": 0.0, "assd": 0.0}
    with pytest.raises(ValueError, match="`pred` is empty"):
        surface_distances(empty, a)


def test_bad_arguments_name_the_argument() -> None:
    a = np.ones((3, 4), bool)
    with pytest.raises(ValueError, match=r"same shape, got \(3, 4\) and \(4, 3\)"):
        hd95(a, a.T)
    with pytest.raises(ValueError, match=r"must be 2 finite numbers > 0.*\(1.0, 1.0, 1.0\)"):
        hd95(a, a, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"`spacing` must be .*got \(0.0, 1.0\)"):
        asd(a, a, (0.0, 1.0))


def test_edt_on_the_cropped_box_equals_brute_force() -> None:
    """The distance transforms run on the bounding box of P | R plus one voxel; on random
    blobs (touching the array's edge too) they equal all-pairs distances on the whole array."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for shape, sp in (((30, 26), (1.5, 0.7)), ((9, 20, 17), (3.0, 0.8, 1.1))):
        for _ in range(4):
            a = ndimage.binary_opening(rng.random(shape) < 0.3) | (rng.random(shape) < 0.01)
            b = ndimage.binary_dilation(a, iterations=2) & (rng.random(shape) < 0.8)
            b[(0,) * len(shape)] = True  # a surface voxel on the array's corner
            to_b, to_a = surface_distances(a, b, sp)
            ref_b, ref_a = _brute(a, b, sp)
            np.testing.assert_allclose(to_b, ref_b, rtol=1e-12)
            np.testing.assert_allclose(to_a, ref_a, rtol=1e-12)


# ------------------------------------------------------------------------------ MONAI


def _random_pairs():
    """Random mask pairs in 2D and 3D with anisotropic spacing: blobs, shifted and eroded
    copies, isolated voxels, masks that touch the array's edge."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    for shape, sp in (((40, 36), (1.5, 0.7)), ((12, 28, 24), (4.0, 0.9, 1.3)),
                      ((7, 16, 16), (10.0, 1.25, 1.25))):  # fmt: skip
        for k in range(4):
            smooth = ndimage.gaussian_filter(rng.random(shape), 2.0)
            ref = smooth > np.quantile(smooth, 0.6)
            pred = np.roll(ref, k, axis=-1) ^ (rng.random(shape) < 0.02)
            if k == 3:
                pred = ndimage.binary_erosion(ref, iterations=1) | (rng.random(shape) < 0.003)
            yield pred, ref, sp


def _monai(fn, pred, ref, sp, **kwargs) -> float:
    import torch

    one_hot = [torch.from_numpy(m[None, None].astype(np.float32)) for m in (pred, ref)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(*one_hot, include_background=True, spacing=list(sp), **kwargs)
    return float(out.item())


def test_agrees_with_monai_where_the_definitions_agree() -> None:
    """MONAI 1.x's surfaces are the same (binary erosion XOR mask, cross structuring element,
    outside = background) and its distances the same (exact Euclidean with ``spacing``), so:

    * ``asd`` == ``compute_average_surface_distance(symmetric=False)`` (both pred -> ref);
    * each directed 95th percentile == ``compute_hausdorff_distance(percentile=95,
      directed=True)`` with the arguments in that order, and the maximum (percentile 100 of
      the pooled set) == the Hausdorff distance ``percentile=None``;
    * ``assd`` == the mean of MONAI's two directed ASDs.

    Where they differ: MONAI's HD95 (``directed=False``) is the larger of the two directed
    percentiles, ours (MedPy's) the percentile of the pooled set; MONAI's ``symmetric=True``
    ASD is the mean of the pooled set, ours (MedPy's ASSD) the mean of the two means. Both are
    checked against those formulas here, from our directed sets.
    """
    pytest.importorskip("monai")
    from monai.metrics import compute_average_surface_distance as m_asd
    from monai.metrics import compute_hausdorff_distance as m_hd

    for pred, ref, sp in _random_pairs():
        to_r, to_p = surface_distances(pred, ref, sp)
        both = np.concatenate([to_r, to_p])
        ours = surface_metrics(pred, ref, sp)
        assert ours["asd"] == pytest.approx(_monai(m_asd, pred, ref, sp, symmetric=False),
                                            rel=1e-5)  # fmt: skip
        assert ours["assd"] == pytest.approx(
            (_monai(m_asd, pred, ref, sp) + _monai(m_asd, ref, pred, sp)) / 2, rel=1e-5
        )
        p_r = _monai(m_hd, pred, ref, sp, percentile=95, directed=True)
        p_p = _monai(m_hd, ref, pred, sp, percentile=95, directed=True)
        assert np.percentile(to_r, 95) == pytest.approx(p_r, rel=1e-5)
        assert np.percentile(to_p, 95) == pytest.approx(p_p, rel=1e-5)
        assert both.max() == pytest.approx(_monai(m_hd, pred, ref, sp), rel=1e-5)
        # where they differ, each side's own formula from the same distances
        assert _monai(m_hd, pred, ref, sp, percentile=95) == pytest.approx(max(p_r, p_p),
                                                                          rel=1e-5)  # fmt: skip
        assert ours["hd95"] == pytest.approx(np.percentile(both, 95))
        assert _monai(m_asd, pred, ref, sp, symmetric=True) == pytest.approx(both.mean(),
                                                                            rel=1e-5)  # fmt: skip


def test_monai_differs_on_the_hand_case() -> None:
    """The line-and-outlier case: MONAI's HD95 3 mm and symmetric ASD 2/7 mm where MedPy's
    definitions (ours) give 0 and ASSD 3/11 (see the hand-worked test)."""
    pytest.importorskip("monai")
    from monai.metrics import compute_average_surface_distance as m_asd
    from monai.metrics import compute_hausdorff_distance as m_hd

    pred, reference = _line_and_outlier()
    sp = (1.5, 2.0)
    assert _monai(m_hd, pred, reference, sp, percentile=95) == pytest.approx(3.0)
    assert hd95(pred, reference, sp) == 0.0
    assert _monai(m_asd, pred, reference, sp, symmetric=True) == pytest.approx(2 / 7)
    assert assd(pred, reference, sp) == pytest.approx(3 / 11)
    assert _monai(m_asd, pred, reference, sp) == pytest.approx(asd(pred, reference, sp))


# ------------------------------------------------------------------------------ per case


def test_evaluate_scores_whole_cases_per_class() -> None:
    """Two cases, classes 1 and 2. Case a holds both, case b only class 1.

    Case a (3 slices, spacing (2.5, 1, 0.5)): class 1 the cube of the 3D hand case predicted
    one slice late (Dice 0.5, HD95 2.5, ASD 1.25); class 2 a single voxel found exactly (all
    0 / 1). Case b (spacing None: voxels): class 1 found exactly; class 2 absent from the
    reference but predicted: n/a for b, so class 2's mean is case a's alone (not 1.0, not 0).
    """
    ref_a = np.zeros((5, 4, 4), np.int64)
    ref_a[1:3, 1:3, 1:3] = 1
    pred_a = np.roll(ref_a, 1, axis=0)
    ref_a[4, 0, 0] = pred_a[4, 0, 0] = 2
    ref_b = np.zeros((3, 6, 6), np.int64)
    ref_b[:, 1:4, 1:4] = 1
    pred_b = ref_b.copy()
    pred_b[0, 5, 5] = 2  # a false positive of a class the case does not hold
    out = evaluate([("a", pred_a, ref_a, (2.5, 1.0, 0.5)), ("b", pred_b, ref_b, None)], 3)
    a, b = out["cases"]
    assert a["case"] == "a" and a["spacing"] == [2.5, 1.0, 0.5] and b["spacing"] is None
    assert a["dice"] == [0.5, 1.0] and a["hd95"] == [2.5, 0.0] and a["asd"] == [1.25, 0.0]
    assert b["dice"] == [1.0, None] and b["jaccard"] == [1.0, None] and b["asd"] == [0.0, None]
    assert out["dice"] == [0.75, 1.0] and out["jaccard"] == [pytest.approx(2 / 3), 1.0]
    assert out["hd95"] == [1.25, 0.0] and out["asd"] == [0.625, 0.0]
    # a class absent from every case: n/a
    assert evaluate([("b", pred_b, ref_b, None)], 3)["dice"] == [1.0, None]


def test_a_one_slice_case_is_scored_as_2d() -> None:
    """An axis of length 1 is dropped (with its spacing): a (1, H, W) case scores as the
    (H, W) image, not as a slab whose two faces make every voxel surface."""
    ref = np.zeros((6, 6), np.int64)
    ref[1:4, 1:4] = 1
    pred = np.zeros((6, 6), np.int64)
    pred[2:4, 1:4] = 1
    flat = evaluate_case(pred[None], ref[None], 2, (5.0, 2.0, 1.0))
    assert flat["hd95"] == [pytest.approx(2.0)] and flat["asd"] == [pytest.approx(1 / 6)]


def test_ignored_voxels_count_for_no_mask() -> None:
    ref = np.zeros((4, 8, 8), np.int64)
    ref[:, 2:6, 2:6] = 1
    ref[:, 0, :] = 9  # unannotated
    pred = np.where(ref == 9, 1, ref)  # class 1 predicted on the unannotated row
    assert evaluate_case(pred, ref, 2, ignore_index=9)["dice"] == [1.0]
    assert evaluate_case(pred, ref, 2, ignore_index=9)["hd95"] == [0.0]
    assert evaluate_case(pred, ref, 2)["dice"][0] < 0.9  # without it: false positives


# ------------------------------------------------------------------------------ in the trainer


def _volume(z: int, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (Z, 20, 24) volume: class 1 a box, class 2 a smaller box inside it."""
    label = np.zeros((z, 20, 24), np.int64)
    label[1 : z - 1, 4 + shift : 16 + shift, 4:20] = 1
    label[2 : z - 2, 8 + shift : 12 + shift, 8:16] = 2
    image = (label / 2 + 0.05 * np.random.default_rng(z + shift).normal(size=label.shape))
    return image.astype(np.float32), label


def _write_nifti(path: Path, array: np.ndarray, zooms, unit: str = "mm") -> None:
    nib = pytest.importorskip("nibabel")
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, np.diag([*zooms, 1.0]))
    img.header.set_xyzt_units(xyz=unit)
    nib.save(img, str(path))


def test_nifti_voxel_size_comes_from_the_header_and_follows_the_resize(tmp_path: Path) -> None:
    """Voxels of 0.8 x 0.9 x 3 mm (X, Y, Z): the slices (Z, X, Y) of 20 x 24 px resized to
    10 x 12 px have voxels of 3 x 1.6 x 1.8 mm (slice, row, column). A header in microns is
    converted to mm; cases of different voxel sizes each keep their own."""
    from examples.bual_demo.data import cases_data, read_nifti_dir

    for i, (zooms, unit) in enumerate([((0.8, 0.9, 3.0), "mm")] * 3
                                      + [((800.0, 900.0, 3000.0), "micron")]):  # fmt: skip
        image, label = _volume(8, shift=i % 2)
        xyz = (1, 2, 0)  # (Z, X, Y) -> (X, Y, Z) as on disk
        _write_nifti(tmp_path / "images" / f"c{i}.nii.gz", image.transpose(xyz), zooms, unit)
        _write_nifti(tmp_path / "labels" / f"c{i}.nii.gz", label.transpose(xyz).astype(np.uint8),
                     zooms, unit)  # fmt: skip
    cases = read_nifti_dir(tmp_path)
    assert [c[3] for c in cases] == [pytest.approx((3.0, 0.8, 0.9))] * 4
    data = cases_data(cases, labeled=2, size=(10, 12), description="t", gap=0)
    (volume,) = data.test_volumes  # 4 cases: one test case, whole
    assert volume.name == "c3" and (volume.start, volume.stop) == (0, 8)
    assert volume.spacing == pytest.approx((3.0, 1.6, 1.8)) and data.unit == "mm"
    assert "1 volume scored whole, voxels 3 x 1.6 x 1.8 mm (slice x row x column)" in (
        data.summary()
    )
    assert "(1x1 mm" not in data.summary()  # the former claim for any NIfTI
    # 8 cases, two test cases of other voxel sizes: each keeps its own, the summary a range
    cases = [*cases[:3], *((f"x{k}", *_volume(8), (3.0, 0.8, 0.9)) for k in range(3)),
             ("y", *_volume(8), (2.0, 0.8, 0.9)), ("z", *_volume(8), (3.0, 0.4, 0.9))]  # fmt: skip
    data = cases_data(cases, labeled=2, size=(10, 12), description="t", gap=0)
    assert [v.name for v in data.test_volumes] == ["y", "z"]
    assert [v.spacing for v in data.test_volumes] == [pytest.approx((2.0, 1.6, 1.8)),
                                                       pytest.approx((3.0, 0.8, 1.8))]  # fmt: skip
    assert data.spacing is None and "voxels 2..3 x 0.8..1.6 x 1.8 mm" in data.summary()


def test_h5_voxel_size_is_given_or_unknown(tmp_path: Path) -> None:
    """HDF5 files store no voxel size: --spacing gives it (scaled with the resize), else the
    distances are in voxels and the summary says so."""
    from examples.bual_demo.data import cases_data

    cases = [(f"p{i}", *_volume(8, shift=i % 2)) for i in range(3)]
    data = cases_data(cases, labeled=2, size=(40, 12), description="t", gap=0)
    assert data.unit == "voxels" and data.test_volumes[0].spacing is None
    assert "voxel size unknown (HD95 and ASD in voxels)" in data.summary()
    data = cases_data(cases, labeled=2, size=(40, 12), description="t", gap=0,
                      spacing=(10.0, 1.5, 1.5))  # fmt: skip
    assert data.test_volumes[0].spacing == pytest.approx((10.0, 0.75, 3.0))
    assert data.unit == "mm"


def test_one_volume_gives_one_test_volume_per_slab() -> None:
    """A single case split into 3 interleaved blocks has 3 test slabs: 3 volumes, each a run
    of consecutive slices, named by their slices; never one volume that glues them."""
    from examples.bual_demo.data import cases_data

    label = np.zeros((60, 16, 16), np.int64)
    label[:, 2:14, 2:14] = 1
    label[25:36, 6:10, 6:10] = 2
    image = label / 2 + 0.1 * np.random.default_rng(0).normal(size=label.shape)
    data = cases_data([("vol", image.astype(np.float32), label, (2.0, 1.0, 1.0))], labeled=2,
                      size=(16, 16), description="t")  # fmt: skip
    assert "3 interleaved blocks" in data.summary()
    names = [v.name for v in data.test_volumes]
    assert len(names) == 3 and all(n.startswith("vol slices ") for n in names), names
    assert sum(v.stop - v.start for v in data.test_volumes) == len(data.test_x)
    for v in data.test_volumes:
        z0, z1 = map(int, v.name.split()[-1].split(".."))
        assert z1 - z0 + 1 == v.stop - v.start


def test_mni_test_slab_is_one_volume_in_mm() -> None:
    """The template is 1 mm isotropic; downsampled by 4 its 233 x 197 (Y x X) slices become
    58 x 49 px, so 233 / 58 and 197 / 49 mm; the slabs are 1 mm apart."""
    from examples.bual_demo.data import DataError, SlabSplit, mni_data

    try:
        data = mni_data(labeled=2, size=(32, 32), downsample=4,
                        split=SlabSplit((60, 70), (72, 74), (76, 79), 1))  # fmt: skip
    except DataError:
        pytest.skip("nilearn's MNI template is not installed")
    (volume,) = data.test_volumes
    assert volume.name == "test slab z 76..78" and (volume.start, volume.stop) == (0, 3)
    assert volume.spacing == pytest.approx((1.0, 233 / 58, 197 / 49))
    assert "voxels 1 x 4.02 x 4.02 mm (slice x row x column)" in data.summary()


def test_slice_data_refuses_a_spacing_of_two_numbers() -> None:
    import torch

    from examples.bual_demo.data import SliceData, SliceVolume

    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`spacing` must be None .* three numbers > 0.*\(1.0, "
                       r"1.0\)"):  # fmt: skip
        SliceData(x, y, x, y, x, y, x, y, ("bg", "a"), (1.0, 1.0), "t")
    with pytest.raises(ValueError, match=r"cut the 4 test slices .* got \[\(0, 2\), \(3, 4\)\]"):
        SliceData(x, y, x, y, x, y, x, y, ("bg", "a"), None, "t",
                  test_volumes=(SliceVolume("a", 0, 2, None), SliceVolume("b", 3, 4, None)))
    with pytest.raises(ValueError, match="mix known and unknown"):
        SliceData(x, y, x, y, x, y, x, y, ("bg", "a"), None, "t",
                  test_volumes=(SliceVolume("a", 0, 2, None),
                                SliceVolume("b", 2, 4, (1.0, 1.0, 1.0))))  # fmt: skip


def test_the_run_scores_each_test_volume_whole(tmp_path: Path) -> None:
    """10 cases -> 2 test cases: the run's result holds both, per class, and the per-class
    values are the means over them (the prediction stacked back into each volume)."""
    from examples.bual_demo.data import cases_data
    from examples.bual_demo.train import Run, TrainConfig, predict

    cases = [(f"p{i}", *_volume(6, shift=i % 2), (5.0, 1.0, 1.25)) for i in range(10)]
    data = cases_data(cases, labeled=2, size=(16, 16), description="t", gap=0)
    assert [v.name for v in data.test_volumes] == ["p8", "p9"]
    run = Run("supervised", 0, data, TrainConfig(iterations=1, base=4, levels=2, mc_passes=2),
              tmp_path)  # fmt: skip
    result = run.test()
    assert result["unit"] == "mm"
    assert [c["case"] for c in result["cases"]] == ["p8", "p9"]
    assert result["cases"][0]["spacing"] == pytest.approx([5.0, 1.25, 1.875])
    pred = predict(run.student, data.test_x).argmax(1).numpy()
    target = data.test_y.numpy()
    first = evaluate_case(pred[:6], target[:6], 3, (5.0, 1.25, 1.875))
    for metric in ("dice", "jaccard", "hd95", "asd"):
        assert result["cases"][0][metric] == pytest.approx(first[metric])
        means = [np.mean([c[metric][k] for c in result["cases"]]) for k in range(2)]
        assert result[metric] == pytest.approx(means)


def test_validation_dice_is_the_mean_over_validation_volumes() -> None:
    """20 cases -> 2 validation cases, each a volume: the validation Dice is the mean of each
    one's class-mean Dice, not the Dice of their slices pooled."""
    import torch

    from examples.bual_demo.data import cases_data
    from examples.bual_demo.train import TrainConfig, build_model, predict, validate

    cases = [(f"p{i}", *_volume(6, shift=i % 2), (5.0, 1.0, 1.25)) for i in range(20)]
    data = cases_data(cases, labeled=2, size=(16, 16), description="t", gap=0)
    assert [v.name for v in data.val_volumes] == ["p14", "p15"]
    assert [v.name for v in data.volumes("val")] == ["p14", "p15"]
    torch.manual_seed(0)
    model = build_model(data.network, data.num_classes, TrainConfig(base=4, levels=2))
    pred = predict(model, data.val_x).argmax(1).numpy()
    target = data.val_y.numpy()
    per_volume = []
    for v in data.val_volumes:
        p, t = pred[v.start : v.stop], target[v.start : v.stop]
        dice = [2 * ((p == c) & (t == c)).sum() / ((p == c).sum() + (t == c).sum())
                for c in (1, 2) if (t == c).any()]  # fmt: skip
        per_volume.append(np.mean(dice))
    assert validate(model, data) == pytest.approx(np.mean(per_volume))


def _h5_folder(folder: Path) -> None:
    h5py = pytest.importorskip("h5py")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        image, label = _volume(8, shift=i % 2)
        with h5py.File(folder / f"p{i}.h5", "w") as f:
            f["image"], f["label"] = image, label


TINY_RUN = ["--methods", "supervised", "--seeds", "1", "--iterations", "2", "--workers", "1",
            "--no-diagnostics", "--base", "4", "--levels", "2"]  # fmt: skip


def test_the_tables_say_the_unit(tmp_path: Path, capsys) -> None:
    """--h5-dir without --spacing: HD95 and ASD in voxels, said in the header and the columns;
    with --spacing: in mm. Both tables carry per-volume Dice, Jaccard, HD95 and ASD."""
    import json

    from examples.bual_demo.__main__ import main

    _h5_folder(tmp_path / "h5")
    common = ["--h5-dir", str(tmp_path / "h5"), "--size", "16", "16", "--labeled", "1",
              "--gap", "0", *TINY_RUN]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "vox")]) == 0
    md = (tmp_path / "vox" / "results.md").read_text()
    assert "distances in voxels of the resized slices (voxel size unknown" in md
    assert "HD95 mean (voxels)" in md and "ASD mean (voxels)" in md and "Jaccard mean" in md
    assert "Jaccard label 1 | Jaccard label 2 | ASD label 1 (voxels)" in md
    assert main([*common, "--spacing", "10", "1.5", "1.5", "--out", str(tmp_path / "mm")]) == 0
    md = (tmp_path / "mm" / "results.md").read_text()
    assert "distances in mm (the voxel size" in md and "HD95 mean (mm)" in md
    assert "voxels 10 x 1.88 x 2.25 mm (slice x row x column)" in md  # 20 x 24 -> 16 x 16
    run = json.loads((tmp_path / "mm" / "results.json").read_text())["runs"]["supervised"][0]
    assert set(run) >= {"dice", "jaccard", "hd95", "asd", "assd", "unit", "cases"}
    assert run["unit"] == "mm" and [c["case"] for c in run["cases"]] == ["p2"]
    summary = json.loads((tmp_path / "mm" / "results.json").read_text())["summary"]
    assert set(summary["supervised"]) >= {f"{m}/{c}" for m in ("dice", "jaccard", "hd95", "asd")
                                          for c in ("label 1", "label 2", "mean")}  # fmt: skip


def test_a_result_of_the_per_slice_metrics_is_evaluated_again(tmp_path: Path, capsys) -> None:
    """A result.json without Jaccard and ASD (the former per-slice metrics) is not tabulated:
    the run is evaluated again, per volume, from its final checkpoint."""
    import json

    from examples.bual_demo.__main__ import main

    _h5_folder(tmp_path / "h5")
    argv = ["--h5-dir", str(tmp_path / "h5"), "--size", "16", "16", "--labeled", "1", "--gap",
            "0", *TINY_RUN, "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    path = tmp_path / "out" / "runs" / "supervised_seed0" / "result.json"
    new = json.loads(path.read_text())
    old = {k: v for k, v in new.items() if k not in ("jaccard", "asd", "assd", "unit", "cases")}
    path.write_text(json.dumps(old))
    capsys.readouterr()
    assert main(argv) == 0
    assert f"warning: {path} lacks jaccard, asd" in capsys.readouterr().err
    assert json.loads(path.read_text()) == new
