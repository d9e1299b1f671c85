"""The two published protocols in the example trainer (issue 14, items 2, 3 and 5): SSL4MIS's
ACDC (``--ssl4mis-acdc``) and UA-MT's LA (``--ssl4mis-la``) on fixture folders written in their
exact layouts (``examples/bual_demo/fixtures.py``), their defaults, flags, sampling and
schedules. The readers and fixtures themselves: tests/test_protocols.py; the networks and the
inference: tests/test_inference.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("h5py")
pytest.importorskip("scipy")
from examples.bual_demo import METHODS
from examples.bual_demo.__main__ import main
from examples.bual_demo.cli import PROTOCOLS, budget, load_data, parse_args
from examples.bual_demo.data import DataError, mni_dir
from examples.bual_demo.protocol_data import (
    LAData,
    _pad_to,
    ssl4mis_augment,
    ua_mt_crop,
)
from examples.bual_demo.train import LR_STEP, Run, TrainConfig

try:
    mni_dir()
    HAVE_MNI = True
except DataError:
    HAVE_MNI = False
needs_mni = pytest.mark.skipif(not HAVE_MNI, reason="the fixtures are cut from nilearn's MNI")


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from examples.bual_demo.fixtures import write_ssl4mis_acdc, write_ua_mt_la

    base = tmp_path_factory.mktemp("protocols")
    return {"acdc": write_ssl4mis_acdc(base / "acdc"), "la": write_ua_mt_la(base / "la")}


# the must-show commands, with an output folder
MUST_SHOW = {
    "acdc": ["--labeled-cases", "2", "--iterations", "10", "--seeds", "1", "--patch-size", "64",
             "64", "--device", "cpu"],
    "la": ["--labeled-cases", "2", "--iterations", "6", "--seeds", "1", "--patch-size", "48",
           "48", "32", "--device", "cpu"],
}  # fmt: skip


@needs_mni
@pytest.mark.slow
@pytest.mark.parametrize("name", ["acdc", "la"])
def test_must_show_command_writes_per_volume_tables(
    name: str, roots: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / name
    flag = "--ssl4mis-acdc" if name == "acdc" else "--ssl4mis-la"
    assert main([flag, str(roots[name]), *MUST_SHOW[name], "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    train = config["train"]
    # the protocol's defaults where the command leaves them out
    for key in ("labeled_batch", "unlabeled_batch", "lr", "optimizer", "lr_schedule"):
        assert train[key] == PROTOCOLS[name][key], key
    assert train["iterations"] == int(MUST_SHOW[name][3])
    results = json.loads((out / "results.json").read_text())
    assert list(results["runs"]) == list(METHODS)
    test_names = [line.strip() for line in (roots[name] / "test.list").read_text().split()]
    classes = 3 if name == "acdc" else 1
    for method, runs in results["runs"].items():
        (run,) = runs
        assert run["unit"] == "voxels"  # HDF5 stores no voxel size and none was given
        # one entry per test volume of test.list, each scored per class
        assert [c["case"] for c in run["cases"]] == test_names
        for case in run["cases"]:
            for metric in ("dice", "jaccard", "hd95", "asd"):
                assert len(case[metric]) == classes, (method, metric)
        for metric in ("dice", "jaccard"):
            assert all(v is None or 0 <= v <= 1 for v in run[metric])
        # a volume's mean is the mean of its cases (classes present in both here)
        dice = np.mean([c["dice"] for c in run["cases"]], axis=0)
        np.testing.assert_allclose(run["dice"], dice)
    md = (out / "results.md").read_text()
    for column in ("Dice mean", "Jaccard mean", "HD95 mean (voxels)", "ASD mean (voxels)"):
        assert column in md
    assert "**Reduced budget**" in md
    assert "distances in voxels of the volumes as stored" in md
    assert (out / "diagnostics.md").is_file()


# ------------------------------------------------------------------------------ flags


def test_protocol_defaults_apply_unless_a_flag_overrides_them() -> None:
    acdc = parse_args(["--ssl4mis-acdc", "x"])
    assert (acdc.labeled_batch, acdc.unlabeled_batch, acdc.lr, acdc.optimizer) == (
        12, 12, 0.01, "sgd")  # fmt: skip
    assert (acdc.momentum, acdc.weight_decay, acdc.lr_schedule, acdc.levels) == (
        0.9, 1e-4, "poly", 5)  # fmt: skip
    assert (acdc.labeled_cases, tuple(acdc.patch_size)) == (7, (256, 256))
    la = parse_args(["--ssl4mis-la", "x"])
    assert (la.labeled_batch, la.unlabeled_batch, la.lr_schedule, la.labeled_cases) == (
        2, 2, "step", 16)  # fmt: skip
    assert tuple(la.patch_size) == (112, 112, 80)
    assert acdc.ce_dice_weight == la.ce_dice_weight == 0.5  # their 0.5 (CE + Dice)
    mni = parse_args([])
    assert mni.ce_dice_weight == 1.0  # MONAI's DiceCELoss
    assert mni.iterations is None and acdc.iterations is None  # left to the budget
    assert [budget(a)["iterations"] for a in (mni, acdc, la)] == [200, 30000, 6000]
    defaults = TrainConfig()
    assert (mni.labeled_batch, mni.lr, mni.optimizer, mni.levels) == (
        defaults.labeled_batch, defaults.lr, defaults.optimizer, defaults.levels)  # fmt: skip
    own = parse_args(["--ssl4mis-acdc", "x", "--lr", "0.05", "--batch", "8", "--labeled-batch",
                      "3", "--optimizer", "adam"])  # fmt: skip
    assert (own.lr, own.labeled_batch, own.unlabeled_batch, own.optimizer) == (
        0.05, 3, 5, "adam")  # fmt: skip


BAD = [
    (["--ssl4mis-acdc", "x", "--patch-size", "64", "64", "32"], "--patch-size"),
    (["--ssl4mis-la", "x", "--patch-size", "48", "48"], "--patch-size"),
    (["--ssl4mis-la", "x", "--patch-size", "48", "48", "30"], "--patch-size"),
    (["--ssl4mis-acdc", "x", "--patch-size", "40", "40"], "--patch-size"),  # 16 | side (5 levels)
    (["--patch-size", "64", "64"], "--patch-size"),  # the MNI data has --size
    (["--labeled-cases", "3"], "--labeled-cases"),
    (["--ssl4mis-acdc", "x", "--labeled-cases", "0"], "--labeled-cases"),
    (["--ssl4mis-acdc", "x", "--ssl4mis-la", "y"], "--ssl4mis-la"),
    (["--h5-dir", "x", "--ssl4mis-la", "y"], "--ssl4mis-la"),
    (["--ssl4mis-la", "x", "--batch", "2"], "--batch"),  # leaves no unlabeled image
    (["--ssl4mis-la", "x", "--batch", "4", "--unlabeled-batch", "2"], "--batch"),
    (["--ssl4mis-la", "x", "--optimizer", "rmsprop"], "--optimizer"),
    (["--ssl4mis-la", "x", "--momentum", "1"], "--momentum"),
    (["--ssl4mis-la", "x", "--ignore-label", "255"], "--ignore-label"),
]


@pytest.mark.parametrize(("flags", "named"), BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_protocol_flags_exit_2_naming_the_flag(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


@needs_mni
def test_more_labeled_cases_than_the_layout_holds_is_a_data_error(
    roots: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for flag, root, n in (("--ssl4mis-acdc", roots["acdc"], "6"),
                          ("--ssl4mis-la", roots["la"], "6")):  # fmt: skip
        code = main([flag, str(root), "--labeled-cases", n, "--out", str(tmp_path / flag)])
        assert code == 2
        assert "--labeled-cases" in capsys.readouterr().err


# ------------------------------------------------------------------------------ sampling


@needs_mni
def test_acdc_labeled_slices_are_the_first_patients_and_draws_are_patch_sized(
    roots: dict[str, Path],
) -> None:
    args = parse_args(["--ssl4mis-acdc", str(roots["acdc"]), "--labeled-cases", "2",
                       "--patch-size", "32", "32"])  # fmt: skip
    data = load_data(args)
    names = (roots["acdc"] / "train_slices.list").read_text().split()
    patients = [name.split("_frame")[0] for name in names]
    first_two = list(dict.fromkeys(patients))[:2]  # in the order of the list, not sorted
    n = sum(p in first_two for p in patients)
    assert patients[:n] == sorted(patients[:n], key=first_two.index)  # they lead the list
    assert len(data.labeled_x) == n and len(data.unlabeled_x) == len(names) - n
    g = torch.Generator().manual_seed(0)
    for pool in ("labeled", "unlabeled", "all"):
        x, y = data.draw(pool, 5, g)
        assert x.shape == (5, 1, 32, 32) and y.shape == (5, 32, 32)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
    # test volumes keep their own size: scored there, as SSL4MIS does
    assert all(v.image.shape == v.label.shape and v.image.shape[1:] != (32, 32)
               for v in data.volumes("test"))  # fmt: skip


def test_ssl4mis_augment_moves_image_and_label_together() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 16, 16) + 0.1  # never 0 inside: the rotation's fill is 0
    y = (x[:, 0] > 0.6).long() + (x[:, 0] > 0.9).long()
    xa, ya = ssl4mis_augment(x, y, g)
    # nearest sampling at the same points: the label is still the image's threshold, the
    # zero fill of a rotation is background in both
    expected = (xa[:, 0] > 0.6).long() + (xa[:, 0] > 0.9).long()
    assert torch.equal(ya, expected)
    changed = [not torch.equal(a, b) for a, b in zip(xa, x)]
    assert 0.6 < np.mean(changed) < 0.9  # 3/4 of the slices are moved (rot/flip or rotation)


def test_ua_mt_padding_and_crops_worked_by_hand() -> None:
    # UA-MT pads every axis by max((patch - size) // 2 + 3, 0) once any axis is <= the patch,
    # with Python's floor division: an axis up to 5 voxels LARGER than the patch is padded too
    v = np.ones((10, 20, 6), np.float32)
    # (8 - 10) // 2 + 3 = 2, (8 - 20) // 2 + 3 = -3 -> 0, (8 - 6) // 2 + 3 = 4
    assert _pad_to(v, (8, 8, 8)).shape == (14, 20, 14)
    # 10 <= 10 triggers it: (0 // 2 + 3) = 3, 0, (4 - 6) // 2 + 3 = 2
    assert _pad_to(v, (10, 8, 4)).shape == (16, 20, 10)
    assert _pad_to(v, (8, 8, 4)).shape == (10, 20, 6)  # larger everywhere: untouched
    image = np.arange(10 * 20 * 6, dtype=np.float32).reshape(10, 20, 6)
    label = (image % 3 == 0).astype(np.uint8)
    ci, cl = ua_mt_crop(image, label, (4, 8, 2), None)  # CenterCrop: round((s - p) / 2)
    np.testing.assert_array_equal(ci, image[3:7, 6:14, 2:4])
    np.testing.assert_array_equal(cl, label[3:7, 6:14, 2:4])
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        ri, rl = ua_mt_crop(image, label, (4, 8, 2), g)
        assert ri.shape == (4, 8, 2)
        np.testing.assert_array_equal(rl, (ri % 3 == 0))  # the label follows its image


@needs_mni
def test_la_draws_pad_small_volumes_and_keep_labels_aligned(roots: dict[str, Path]) -> None:
    args = parse_args(["--ssl4mis-la", str(roots["la"]), "--labeled-cases", "2",
                       "--patch-size", "48", "48", "32"])  # fmt: skip
    data = load_data(args)
    assert isinstance(data, LAData)
    assert len(data.labeled) == 2 and len(data.unlabeled) == 4
    small = [v for v in data.labeled + data.unlabeled + data.test
             if any(s < p for s, p in zip(v.image.shape, (48, 48, 32)))]  # fmt: skip
    assert small  # the fixture holds volumes smaller than the crop
    g = torch.Generator().manual_seed(0)
    for pool in ("labeled", "unlabeled", "all"):
        x, y = data.draw(pool, 4, g)
        assert x.shape == (4, 1, 48, 48, 32) and y.shape == (4, 48, 48, 32)
        assert set(y.unique().tolist()) <= {0, 1}
    # the same rotation / flip / crop on both: a padded voxel is background with image 0
    assert torch.all(y[x[:, 0] == 0] == 0)
    assert data.volumes("val") == []  # UA-MT has no validation set


# ------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize(("schedule", "steps", "expected"), [
    ("step", [0, LR_STEP - 1, LR_STEP, 2 * LR_STEP + 5], [1.0, 1.0, 0.1, 0.01]),
    ("poly", [0, 5000, 9000], [1.0, 0.5**0.9, 0.1**0.9]),
])  # fmt: skip
def test_lr_schedules(schedule: str, steps: list[int], expected: list[float], tmp_path) -> None:
    from tests.test_examples import _tiny_data

    cfg = TrainConfig(iterations=10000, lr=1.0, lr_schedule=schedule, optimizer="sgd", base=4)
    run = Run("supervised", 0, _tiny_data(), cfg, tmp_path)
    got = []
    for step in steps:
        run.step = step
        got.append(run._lr())
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert isinstance(run.opt, torch.optim.SGD)
    assert run.opt.defaults["momentum"] == 0.9


@pytest.mark.parametrize("method", ["supervised", "mean_teacher", "uamt", "bual", "full"])
def test_ce_dice_weight_scales_every_ce_dice_loss(method: str, tmp_path) -> None:
    """SSL4MIS and UA-MT train on 0.5 (CE + Dice): the protocols' ``ce_dice_weight`` halves
    the labeled loss of every method (and BUAL's pseudo-label loss, a CE + Dice too)."""
    from tests.test_examples import _tiny_data

    data = _tiny_data()
    logs = {}
    for w in (1.0, 0.5):
        cfg = TrainConfig(iterations=4, base=4, mc_passes=2, ce_dice_weight=w)
        logs[w] = Run(method, 0, data, cfg, tmp_path / str(w)).train_step()
    assert logs[0.5]["sup"] == pytest.approx(0.5 * logs[1.0]["sup"], rel=1e-5)
    if method == "bual":
        assert logs[0.5]["cons"] == pytest.approx(0.5 * logs[1.0]["cons"], rel=1e-5)
    elif "cons" in logs[1.0]:  # the softmax-MSE consistency is not a CE + Dice: unchanged
        assert logs[0.5]["cons"] == pytest.approx(logs[1.0]["cons"], rel=1e-5)
