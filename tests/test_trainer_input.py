"""The example trainer refuses bad input with a message instead of a wrong table or a traceback
(issue 15, items 5-7): flags, users' files, run folders, label values, absent classes, the split
of one volume, the normalisation and the example slice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import examples.bual_demo.__main__ as cli
from examples.bual_demo import runfolder
from examples.bual_demo.__main__ import main
from examples.bual_demo.data import DataError, cases_data
from examples.bual_demo.diagnose import main as diagnose_main
from examples.bual_demo.runfolder import DamagedCheckpoint, RunFolderError, load_checkpoint
from tests.test_examples import TINY

RUN = [*TINY, "--methods", "supervised", "full", "--seeds", "1", "--iterations", "2",
       "--workers", "1", "--no-diagnostics"]  # fmt: skip

# ------------------------------------------------------------------------------ flags

BAD_FLAGS = [
    (["--seeds", "0"], "--seeds"),
    (["--iterations", "0"], "--iterations"),  # was silently the budget's 200
    (["--labeled", "0"], "--labeled"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--eval-every", "0"], "--eval-every"),
    (["--log-every", "0"], "--log-every"),
    (["--workers", "0"], "--workers"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--lr", "nan"], "--lr"),
    (["--bual-beta", "2"], "--bual-beta"),
    (["--bual-low-ratio", "-0.1"], "--bual-low-ratio"),
    (["--bual-uncertainty", "mcdropout"], "--bual-uncertainty"),
    (["--size", "30", "32"], "--size"),  # 30 is not divisible by 2 ** (3 - 1)
    (["--size", "48", "32", "--levels", "6"], "--size"),  # 48 is not divisible by 2 ** 5
    (["--size", "0", "32"], "--size"),
    (["--mc-passes", "3"], "--mc-passes"),  # UA-MT's estimate runs two passes per forward
    (["--nifti-dir", "a", "--h5-dir", "b"], "--nifti-dir"),
    (["--val-slab", "100", "120"], "--train-slab/--val-slab/--test-slab"),
    (["--report-only", "--fresh"], "--fresh"),
    (["--ignore-label", "255"], "--ignore-label"),  # the MNI labels have no unannotated voxels
    (["--h5-dir", "x", "--ignore-label", "-1"], "--ignore-label"),
    (["--spacing", "1", "1", "1"], "--spacing"),  # the MNI template's voxel size is known
    (["--nifti-dir", "x", "--spacing", "1", "1", "1"], "--spacing"),  # so are the headers'
    (["--h5-dir", "x", "--spacing", "5", "0", "1"], "--spacing"),
    (["--h5-dir", "x", "--spacing", "5", "nan", "1"], "--spacing"),
]


@pytest.mark.parametrize(("flags", "named"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_stop_before_any_data_with_status_2_and_one_line(
    flags: list[str], named: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:  # fmt: skip
    def no_data(*args: object) -> None:
        raise AssertionError("data were loaded before the flags were checked")

    monkeypatch.setattr(cli, "load_data", no_data)
    with pytest.raises(SystemExit) as info:
        main([*flags, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m examples.bual_demo: error: argument " + named), last
    assert not (tmp_path / "out").exists()


def test_good_flags_pass_the_checks() -> None:
    args = cli.parse_args(["--size", "64", "32", "--levels", "4", "--ema-decay", "0",
                           "--bual-uncertainty", "mc", "--iterations", "1",
                           "--seeds", "1"])  # fmt: skip
    assert args.iterations == 1 and args.seeds == 1 and args.bual_uncertainty == "mc"


def test_the_help_states_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--ema-decay EMA_DECAY in [0, 1) (default 0.99)" in out
    assert "--bual-uncertainty {entropy,mc}" in out
    assert "divisible by 2 ** (--levels - 1)" in out


def test_diagnose_checks_the_data_flags_the_same_way(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from examples.bual_demo.diagnose import main as diagnose_main

    with pytest.raises(SystemExit) as info:
        diagnose_main(["--run-dir", str(tmp_path), "--size", "30", "32"])
    assert info.value.code == 2
    assert "argument --size" in capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------ users' files


def _nifti(path: Path, array: np.ndarray) -> None:
    nib = pytest.importorskip("nibabel")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    h5py = pytest.importorskip("h5py")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label


def _data_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``main`` prints for a data error (exit status 2, no traceback)."""
    assert main([*argv, "--size", "16", "16"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_a_text_file_named_nii_gz_is_named(tmp_path: Path, capsys) -> None:
    label = np.zeros((16, 16, 6), np.uint8)
    _nifti(tmp_path / "labels" / "case.nii.gz", label)
    fake = tmp_path / "images" / "case.nii.gz"
    fake.parent.mkdir()
    fake.write_text("this is not an image")
    err = _data_error(["--nifti-dir", str(tmp_path)], capsys)
    assert f"{fake} is not a readable NIfTI file" in err
    # a truncated one (the first half of a real file) likewise
    _nifti(fake, np.ones((16, 16, 6), np.float32))
    fake.write_bytes(fake.read_bytes()[: fake.stat().st_size // 2])
    assert f"{fake} is not a readable NIfTI file" in _data_error(["--nifti-dir", str(tmp_path)],
                                                                  capsys)  # fmt: skip


def test_a_non_hdf5_file_is_named(tmp_path: Path, capsys) -> None:
    fake = tmp_path / "case_slice_1.h5"
    fake.write_text("not HDF5")
    assert f"{fake} is not a readable HDF5 file" in _data_error(["--h5-dir", str(tmp_path)], capsys)


def _ssl4mis_acdc(folder: Path) -> None:
    """SSL4MIS's ACDC layout: 3D volumes on top, the same data as 2D slices in slices/."""
    rng = np.random.default_rng(0)
    for case in ("patient001_frame01", "patient002_frame01", "patient003_frame01"):
        image = rng.normal(size=(5, 16, 16)).astype(np.float32)
        label = rng.integers(0, 3, (5, 16, 16)).astype(np.uint8)
        _h5(folder / f"{case}.h5", image, label)
        for z in range(5):
            _h5(folder / "slices" / f"{case}_slice_{z}.h5", image[z], label[z])


def test_h5_dir_reads_the_top_level_only(tmp_path: Path) -> None:
    from examples.bual_demo.data import DataError, read_h5_dir

    _ssl4mis_acdc(tmp_path)
    cases = read_h5_dir(tmp_path)  # was: volumes and slices/ together, 10 slices per case
    assert [len(c[1]) for c in cases] == [5, 5, 5]
    cases = read_h5_dir(tmp_path / "slices")
    assert [c[0] for c in cases] == ["patient001_frame01", "patient002_frame01",
                                     "patient003_frame01"] and len(cases[0][1]) == 5  # fmt: skip
    # only subfolders hold files: say where they are
    (tmp_path / "nested").mkdir()
    (tmp_path / "slices").rename(tmp_path / "nested" / "slices")
    with pytest.raises(DataError, match=r"subfolders are not read; found some in .*slices"):
        read_h5_dir(tmp_path / "nested")
    # a volume and slices of the same case side by side: refused, naming both
    (tmp_path / "nested" / "slices" / "patient001_frame01.h5").write_bytes(
        (tmp_path / "patient001_frame01.h5").read_bytes()
    )
    with pytest.raises(DataError, match=r"patient001_frame01 mixes a 3D volume .* and 2D slices"):
        read_h5_dir(tmp_path / "nested" / "slices")


# ------------------------------------------------------------------------------ run folders


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    """A finished tiny comparison (supervised and fully supervised, one seed)."""
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out)]) == 0
    return out


def test_a_damaged_checkpoint_restarts_its_run_and_the_comparison_goes_on(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    damaged = finished / "runs" / "supervised_seed0" / "checkpoint.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # truncated
    for run in ("supervised_seed0", "full_seed0"):
        (finished / "runs" / run / "result.json").unlink()
    assert main([*RUN, "--out", str(finished)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {damaged} does not load as a checkpoint" in err, err
    assert "supervised seed 0 starts afresh" in err and "Traceback" not in err
    assert load_checkpoint(damaged)["step"] == 2
    for run in ("supervised_seed0", "full_seed0"):
        assert (finished / "runs" / run / "result.json").is_file()


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04", "tail"])
def test_damage_is_told_apart_from_a_crafted_pickle(tmp_path: Path, content: object) -> None:
    path = tmp_path / "checkpoint.pt"
    if content == "tail":  # a real checkpoint missing its last bytes
        torch.save({"step": 1, "w": torch.ones(100)}, path)
        content = path.read_bytes()[:-20]
    assert isinstance(content, bytes)
    path.write_bytes(content)
    with pytest.raises(DamagedCheckpoint) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "afresh" in str(info.value)
    torch.save({"step": 0, "student": Path.cwd()}, path)  # pickles pathlib: not plain data
    with pytest.raises(RunFolderError) as info:
        load_checkpoint(path)
    assert not isinstance(info.value, DamagedCheckpoint) and "could run code" in str(info.value)


@pytest.mark.parametrize("content", ["", '{"format": "bual_demo.run/1", "train": {', "[1, 2]"])
def test_an_unreadable_config_json_is_named(
    finished: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = finished / "config.json"
    config.write_text(content)
    capsys.readouterr()
    assert main([*RUN, "--out", str(finished)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config} is unreadable") and err.count("\n") == 1, err
    assert diagnose_main(["--run-dir", str(finished), *TINY]) == 2
    assert f"{config} is unreadable" in capsys.readouterr().err


def test_config_json_is_replaced_atomically(
    finished: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = finished / "config.json"
    before = config.read_text()

    def crash(src: object, dst: object) -> None:
        raise OSError("killed between the write and the rename")

    monkeypatch.setattr(runfolder.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        main([*RUN, "--out", str(finished)])
    assert config.read_text() == before  # the old file, whole
    monkeypatch.undo()
    assert main([*RUN, "--out", str(finished)]) == 0  # the leftover config.tmp is harmless
    runfolder.check_deletable(finished)


def test_an_unreadable_result_json_is_evaluated_again(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = finished / "runs" / "full_seed0" / "result.json"
    good = json.loads(result.read_text())
    result.write_text(result.read_text()[:40])
    capsys.readouterr()
    assert main([*RUN, "--out", str(finished), "--report-only"]) == 1  # no whole seed yet
    assert f"warning: {result} is unreadable" in capsys.readouterr().err
    assert main([*RUN, "--out", str(finished)]) == 0
    assert json.loads(result.read_text())["dice"] == good["dice"]  # the same final checkpoint


# ------------------------------------------------------------------------------ label values


def _cases(values: tuple[int, ...], n: int = 3, z: int = 8, seed: int = 0) -> list:
    """``n`` cases of nested squares labelled with ``values`` (outermost first)."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        label = np.zeros((z, 16, 16), np.int64)
        for k, v in enumerate(values):
            label[:, 2 * k : 16 - 2 * k, 2 * k : 16 - 2 * k] = v
        image = label / max(values) + 0.1 * rng.normal(size=label.shape)
        cases.append((f"case{i}", image.astype(np.float32), label))
    return cases


def test_label_values_become_contiguous_classes() -> None:
    from examples.bual_demo.data import cases_data

    data = cases_data(_cases((0, 1, 5)), labeled=2, size=(16, 16), description="t", gap=0)
    assert data.num_classes == 3  # was 6, three of them never present
    assert data.class_names == ("background", "label 1", "label 5")
    assert "label values 0, 1, 5 -> classes 0..2" in data.summary()
    assert int(data.test_y.max()) == 2 and data.ignore_index is None
    # 255 without --ignore-label: one more class, named and printed, not 256 classes
    data = cases_data(_cases((0, 1, 2, 255)), labeled=2, size=(16, 16), description="t", gap=0)
    assert data.class_names[-1] == "label 255" and data.num_classes == 4
    assert "label values 0, 1, 2, 255 -> classes 0..3" in data.summary()
    # ACDC-like labels 0..3: nothing to say
    data = cases_data(_cases((0, 1, 2, 3)), labeled=2, size=(16, 16), description="t", gap=0)
    assert data.description == "t" and data.class_names[1:] == ("label 1", "label 2", "label 3")


def test_ignore_label_is_left_out_of_training_and_metrics(tmp_path: Path) -> None:
    from examples.bual_demo.data import cases_data
    from examples.bual_demo.metrics import evaluate_case
    from examples.bual_demo.train import Run, TrainConfig

    data = cases_data(_cases((255, 0, 1, 5)), labeled=2, size=(16, 16), description="t",
                      gap=0, ignore_label=255)  # fmt: skip
    assert data.class_names == ("background", "label 1", "label 5")
    assert data.ignore_index == 3 and "label 255 ignored" in data.summary()
    assert (data.labeled_y == 3).any() and int(data.labeled_y.max()) == 3
    cfg = TrainConfig(iterations=2, base=4, levels=2, mc_passes=2)
    for method in ("supervised", "uamt", "bual"):
        run = Run(method, 0, data, cfg, tmp_path / method)
        log = run.train_step()
        assert all(np.isfinite(v) for v in log.values()), (method, log)
    # scoring: a prediction of class 1 on the ignored ring costs nothing
    target = data.test_y.numpy()
    hit = np.where(target == 3, 1, target)
    assert evaluate_case(hit, target, 3, ignore_index=3)["dice"] == [1.0, 1.0]
    assert evaluate_case(hit, target, 3)["dice"][0] < 0.9  # without it: false positives


def test_labels_that_look_like_an_image_are_refused() -> None:
    from examples.bual_demo.data import DataError, cases_data

    cases = _cases((0, 1))
    cases[1] = ("scan", cases[1][1], np.arange(16 * 16 * 8).reshape(8, 16, 16) % 200)
    with pytest.raises(DataError, match=r"200 distinct values \(case scan: 200.*an image"):
        cases_data(cases, labeled=2, size=(16, 16), description="t", gap=0)
    with pytest.raises(DataError, match="single value"):
        cases_data(_cases((0, 255)), labeled=2, size=(16, 16), description="t", ignore_label=255)


def test_ignore_label_through_the_command_line(tmp_path: Path, capsys) -> None:
    for name, _, label in _cases((255, 0, 2)):
        _nifti(tmp_path / "data" / "images" / f"{name}.nii.gz",
               (label.transpose(1, 2, 0) % 7).astype(np.float32))  # fmt: skip
        _nifti(tmp_path / "data" / "labels" / f"{name}.nii.gz",
               label.transpose(1, 2, 0).astype(np.uint8))  # fmt: skip
    argv = ["--nifti-dir", str(tmp_path / "data"), "--ignore-label", "255", "--size", "16", "16",
            "--methods", "supervised", "--seeds", "1", "--iterations", "2", "--workers", "1",
            "--base", "4", "--levels", "2", "--labeled", "1", "--gap", "0", "--no-diagnostics",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "label values 0, 2 -> classes 0..1; label 255 ignored" in out
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    assert set(summary["supervised"]) >= {"dice/label 2", "hd95/label 2"}


# ------------------------------------------------------------------------------ absent classes


def test_a_class_absent_from_the_test_labels_is_n_a_and_left_out_of_the_mean() -> None:
    from examples.bual_demo.metrics import evaluate_case
    from examples.bual_demo.report import markdown_table, summarize

    target = np.zeros((4, 12, 12), np.int64)
    target[:, 2:8, 2:8] = 1  # class 1 everywhere, class 2 nowhere
    pred = target.copy()
    pred[:, 2:5, 2:8] = 0  # half of class 1 found: Dice 2/3
    metrics = evaluate_case(pred, target, 3)
    assert metrics["dice"] == [pytest.approx(2 / 3), None]  # was [0.667, 1.0]
    assert metrics["hd95"][1] is None  # was 0.0
    # a class present in some slices only: scored over the volume
    target[0] = 0
    assert evaluate_case(target, target, 2)["dice"] == [1.0]
    names = ("background", "a", "b")
    results = {m: [{"seed": s, "dice": metrics["dice"], "hd95": metrics["hd95"],
                    "seconds_per_iteration": 0.1, "seconds": 1.0} for s in (0, 1)]
               for m in ("supervised", "bual")}  # fmt: skip
    summary = summarize(results, names)
    assert summary["bual"]["dice/mean"]["mean"] == pytest.approx(2 / 3)  # was 0.833
    assert summary["bual"]["dice/b"]["mean"] is None
    assert summary["bual"]["dice/mean minus supervised"]["mean"] == 0.0
    row = markdown_table(summary, names).splitlines()[-1].split(" | ")
    assert row[1:4] == ["0.667 ± 0.000", "n/a", "0.667 ± 0.000"], row
    json.dumps(summary, allow_nan=False)  # no NaN in results.json


# ------------------------------------------------------------------------------ users' volumes


def test_one_volume_is_normalised_with_one_scale() -> None:
    from examples.bual_demo.data import normalize_volume

    rng = np.random.default_rng(0)
    volume = np.abs(rng.normal(0, 2, (10, 40, 40)))  # background noise
    volume[:, 5:35, 5:35] += 100  # tissue filling most slices ...
    volume[4] = np.abs(rng.normal(0, 2, (40, 40)))
    volume[4, 20:22, 20:22] += 100  # ... and a slice whose object covers 0.25% of it
    x = normalize_volume(volume)
    assert x[4, 20:22, 20:22].min() > 0.9 and x[4, :10, :10].max() < 0.1
    # per-slice percentiles made that slice noise: its 99th percentile is background
    lo, hi = np.percentile(volume[4], [1, 99])
    assert ((volume[4, :10, :10] - lo) / (hi - lo)).max() > 0.5
    # the foreground is what lies above the volume's minimum: zero padding changes nothing
    scaled = []
    for pad in (20, 60):
        padded = np.pad(volume + 50, ((0, 0), (pad, pad), (pad, pad)))
        scaled.append(normalize_volume(padded)[:, pad:-pad, pad:-pad])
    assert np.allclose(scaled[0], scaled[1], atol=1e-6)
    assert scaled[0][0, 5:35, 5:35].mean() > 0.9 and scaled[0][:, :5].mean() < 0.1
    assert normalize_volume(np.full((3, 4, 4), 7.0)).max() == 0.0


def _one_volume(z: int, rows: range, seed: int = 0) -> list:
    """One volume: class 1 in every slice, class 2 only in the slices ``rows``."""
    (case,) = _cases((0, 1), n=1, z=z, seed=seed)
    label = case[2].copy()
    label[list(rows), 6:10, 6:10] = 2
    return [("vol", case[1] + label, label)]


def test_one_volume_split_gives_every_split_every_class() -> None:
    from examples.bual_demo.data import cases_data, split_volume

    cases = _one_volume(60, range(25, 36))
    data = cases_data(cases, labeled=2, size=(16, 16), description="t")
    for y in (torch.cat([data.labeled_y, data.unlabeled_y]), data.val_y, data.test_y):
        assert set(y.unique().tolist()) == {0, 1, 2}  # was: no class 2 in validation or test
    assert "3 interleaved blocks" in data.summary()
    parts, n_blocks = split_volume("vol", torch.from_numpy(cases[0][2]), ("b", "l1", "l2"), 3)
    assert n_blocks == 3
    z = [np.asarray(p) for p in parts]
    for a in range(3):  # different splits never come closer than the gap
        for b in range(a + 1, 3):
            assert np.abs(z[a][:, None] - z[b][None, :]).min() > 3
    # an object in a single slice cannot be in three splits: say so
    with pytest.raises(DataError, match=r"case vol: cannot split .*label 2 occupies slices 30\)"):
        cases_data(_one_volume(60, range(30, 31)), labeled=2, size=(16, 16), description="t",
                   ignore_label=None)  # fmt: skip


@pytest.mark.parametrize("z", [31, 35, 39])
def test_one_volume_of_31_to_39_slices(z: int, tmp_path: Path) -> None:
    from examples.bual_demo.data import cases_data, read_nifti_dir

    (name, image, label) = _one_volume(z, range(z))[0]
    _nifti(tmp_path / "images" / f"{name}.nii.gz", image.transpose(1, 2, 0))
    _nifti(tmp_path / "labels" / f"{name}.nii.gz", label.transpose(1, 2, 0).astype(np.uint8))
    data = cases_data(read_nifti_dir(tmp_path), labeled=2, size=(16, 16), description="t")
    assert min(len(data.val_x), len(data.test_x), len(data.unlabeled_x)) >= 1  # was a crash
    with pytest.raises(DataError, match=f"one volume of {z} slices is too few .* --gap 20"):
        cases_data(read_nifti_dir(tmp_path), labeled=2, size=(16, 16), description="t", gap=20)


def test_the_example_slice_has_foreground(tmp_path: Path) -> None:
    from examples.bual_demo.data import example_slice
    from examples.bual_demo.train import Run, TrainConfig

    labels = torch.zeros(9, 8, 8, dtype=torch.long)
    labels[1, 2:4, 2:4] = 1
    labels[6, 2:4, 2:4] = 1
    labels[7, 2:4, 2:4] = 1
    labels[7, 5:7, 5:7] = 2
    assert example_slice(labels, 3) == 7  # both classes; the middle slice 4 is empty
    labels[7] = 0
    assert example_slice(labels, 3) == 6  # one class: the nearest to the middle
    data = cases_data(_cases((0, 1, 2)), labeled=2, size=(16, 16), description="t", gap=0)
    data.test_y[len(data.test_y) // 2] = 0  # the middle test slice shows nothing
    run = Run("supervised", 0, data, TrainConfig(iterations=1, base=4, levels=2, mc_passes=2),
              tmp_path)  # fmt: skip
    run.test()
    assert np.load(tmp_path / "example.npz")["label"].max() == 2


def test_several_cases_say_which_split_lacks_a_class() -> None:
    cases = _cases((0, 1, 5))
    name, image, label = cases[-1]  # the test case
    cases[-1] = (name, image, np.where(label == 5, 1, label))
    data = cases_data(cases, labeled=2, size=(16, 16), description="t", gap=0)
    assert "the test cases hold no label 5: n/a in the table" in data.summary()
    assert data.num_classes == 3


# ------------------------------------------------------------------------------ devices (issue 14)

DEVICE_FLAGS = [
    (["--amp", "fp16", "--device", "cpu"], "--amp"),  # CPU autocast supports bf16 only
    (["--amp", "fp32"], "--amp"),
    (["--device", "tpu"], "--device"),
]
if not torch.cuda.is_available():
    DEVICE_FLAGS.append((["--device", "cuda"], "--device"))
    DEVICE_FLAGS.append((["--amp", "fp16"], "--amp"))  # auto resolves to the CPU here


@pytest.mark.parametrize(("flags", "named"), DEVICE_FLAGS,
                         ids=[" ".join(f) for f, _ in DEVICE_FLAGS])  # fmt: skip
def test_bad_device_flags_exit_2_naming_the_flag(
    flags: list[str], named: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:  # fmt: skip
    test_bad_flags_stop_before_any_data_with_status_2_and_one_line(
        flags, named, monkeypatch, capsys, tmp_path
    )


def _results(out: Path, methods: tuple[str, ...]) -> dict[str, dict]:
    return {m: json.loads((out / "runs" / f"{m}_seed0" / "result.json").read_text())
            for m in methods}  # fmt: skip


DEVICE_RUN = [*TINY, "--methods", "supervised", "bual", "--seeds", "1", "--iterations", "2",
              "--workers", "1", "--no-diagnostics", "--mc-passes", "2"]  # fmt: skip


def test_bf16_autocast_on_the_cpu_trains_supervised_and_bual_to_finite_metrics(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bf16"
    assert main([*DEVICE_RUN, "--device", "cpu", "--amp", "bf16", "--out", str(out)]) == 0
    for m, result in _results(out, ("supervised", "bual")).items():
        values = [v for v in (*result["dice"], *result["hd95"]) if v is not None]
        assert values and all(np.isfinite(values)), (m, result["dice"], result["hd95"])
        assert all(np.isfinite(e["loss"]) for e in result["history"]["log"]), m
    train = json.loads((out / "config.json").read_text())["train"]
    assert (train["device"], train["amp"]) == ("cpu", "bf16")
    assert "Trained on cpu, mixed precision (--amp) bf16" in (out / "results.md").read_text()


def test_amp_none_on_the_cpu_equals_the_default_run_exactly(tmp_path: Path) -> None:
    default, explicit = tmp_path / "default", tmp_path / "none"
    assert main([*DEVICE_RUN, "--out", str(default)]) == 0
    assert main([*DEVICE_RUN, "--device", "cpu", "--amp", "none", "--out", str(explicit)]) == 0
    a, b = _results(default, ("supervised", "bual")), _results(explicit, ("supervised", "bual"))
    for m in a:
        for key in ("dice", "jaccard", "hd95", "asd"):
            assert a[m][key] == b[m][key], (m, key)
        assert a[m]["history"]["log"] == b[m]["history"]["log"], m


def test_a_folder_written_before_device_and_amp_resumes_with_their_defaults(
    finished: Path,
) -> None:
    path = finished / "config.json"
    config = json.loads(path.read_text())
    del config["train"]["amp"], config["train"]["device"]
    path.write_text(json.dumps(config))
    assert main([*RUN, "--out", str(finished)]) == 0  # amp "none": the same configuration
    assert main([*RUN, "--amp", "bf16", "--out", str(finished)]) == 2  # another one


def test_a_checkpoint_resumes_with_its_grad_scaler_state(tmp_path: Path) -> None:
    """fp16 runs need CUDA; on the CPU the scaler is off and its (absent) state is harmless."""
    from examples.bual_demo.train import Run, TrainConfig
    from tests.test_examples import _tiny_data

    data = _tiny_data()
    cfg = TrainConfig(iterations=2, base=8, mc_passes=2, checkpoint_every=1)
    run = Run("supervised", 0, data, cfg, tmp_path)
    run.train_step()
    run.save()
    state = load_checkpoint(run.checkpoint_path)
    assert state["scaler"] is None and state["cuda_rng"] is None
    again = Run("supervised", 0, data, cfg, tmp_path)
    assert again.load() and again.step == 1
    if torch.cuda.is_available():
        cfg16 = TrainConfig(iterations=2, base=8, mc_passes=2, amp="fp16", device="cuda")
        run16 = Run("supervised", 0, data, cfg16, tmp_path / "fp16")
        run16.train_step()
        run16.save()
        scale = run16.scaler.get_scale()
        back = Run("supervised", 0, data, cfg16, tmp_path / "fp16")
        assert back.load() and back.scaler.get_scale() == scale
