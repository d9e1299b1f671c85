"""Tests of the example trainer (examples/bual_demo): training steps, data errors, DDP (the
metrics: tests/test_metrics.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

bual_demo = pytest.importorskip("examples.bual_demo")
pytest.importorskip("scipy")
from examples.bual_demo import ALL_METHODS  # noqa: E402
from examples.bual_demo.data import (  # noqa: E402
    DataError,
    SlabSplit,
    SliceData,
    augment,
    cases_data,
    read_h5_dir,
    read_nifti_dir,
)
from examples.bual_demo.train import Run, TrainConfig  # noqa: E402

TINY = ["--size", "32", "32", "--downsample", "4", "--train-slab", "60", "70",
        "--val-slab", "72", "74", "--test-slab", "76", "78", "--gap", "1"]  # fmt: skip


def _tiny_data() -> SliceData:
    """A tiny crop of the MNI template when nilearn is installed, else synthetic blobs."""
    try:
        from examples.bual_demo.data import mni_data

        return mni_data(labeled=2, size=(32, 32), downsample=4,
                        split=SlabSplit((60, 70), (72, 74), (76, 78), 1))  # fmt: skip
    except DataError:
        pass
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ys, xs = [], []
    for _ in range(14):
        cy, cx = 12 + 8 * torch.rand(2, generator=g)
        r = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        y = (r < 11).long() + (r < 6).long()
        ys.append(y)
        xs.append(y.float()[None] / 2 + 0.1 * torch.randn(1, 32, 32, generator=g))
    x, y = torch.stack(xs), torch.stack(ys)
    return SliceData(x[:2], y[:2], x[2:8], y[2:8], x[8:10], y[8:10], x[10:], y[10:],
                     ("bg", "a", "b"), (1.0, 1.0, 1.0), "synthetic")  # fmt: skip


@pytest.fixture(scope="module")
def tiny() -> SliceData:
    torch.set_num_threads(1)
    return _tiny_data()


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_trains_and_labeled_loss_decreases(method, tiny, tmp_path):
    from bual_losses import region_ce_dice_loss

    cfg = TrainConfig(iterations=8, lr=3e-3, labeled_batch=2, unlabeled_batch=2, base=8,
                      mc_passes=2, eval_every=4, rampup=0.25)  # fmt: skip
    run = Run(method, 0, tiny, cfg, tmp_path)

    def labeled_loss() -> float:
        run.student.eval()
        with torch.no_grad():
            return region_ce_dice_loss(run.student(tiny.labeled_x), tiny.labeled_y).item()

    before = labeled_loss()
    logs = [run.train_step() for _ in range(cfg.iterations)]
    after = labeled_loss()
    for log in logs:
        assert all(math.isfinite(v) for v in log.values()), log
    if method not in ("supervised", "full"):
        assert "cons" in logs[-1] and logs[-1]["lambda"] > 0
    # what each BUAL variant changes shows in its regions (issue 13's ablation)
    high = [log["high_fraction"] for log in logs if "high_fraction" in log]
    low = [log["low_fraction"] for log in logs if "low_fraction" in log]
    if method in ("bual", "bual_soft", "bual_unlabeled"):  # the defaults: both regions alive
        assert all(0 < f < 1 for f in high + low), (high, low)
    if method == "bual_labeled":  # every pseudo-label trusted
        assert low == [1.0] * len(logs)
    if method == "bual_ratio":
        assert high == pytest.approx([0.1] * len(logs), abs=0.01)
        assert low == pytest.approx([0.8] * len(logs), abs=0.01)
    assert after < before, (before, after)


def test_paired_comparison_worked_by_hand():
    """Differences +1, +2, +3 (n = 3): mean 2, sample std 1, t(0.975, 2) = 4.3027, half width
    4.3027 / sqrt(3) = 2.4841; all 8 sign patterns, |mean| >= 2 only for all + or all -: p =
    2/8."""
    from examples.bual_demo.report import paired

    got = paired([1.0, 2.0, 3.0])
    assert got["mean"] == 2.0 and got["n"] == 3 and got["positive"] == 3
    assert got["ci95"] == pytest.approx([2.0 - 2.4841, 2.0 + 2.4841], abs=1e-4)
    assert got["p"] == pytest.approx(0.25)
    assert paired([1.0, -1.0, 2.0, -2.0])["p"] == pytest.approx(1.0)
    assert paired([0.5])["mean"] is None  # one seed: no interval


def test_run_is_repeatable_and_resumes_exactly(tiny, tmp_path):
    cfg = TrainConfig(iterations=4, base=8, mc_passes=2, checkpoint_every=2, eval_every=2)
    straight = Run("bual", 3, tiny, cfg, tmp_path / "a")
    straight.train()
    # interrupted after 2 steps (the checkpoint), then resumed by a new process-like object
    first = Run("bual", 3, tiny, TrainConfig(**{**cfg.__dict__, "iterations": 4}), tmp_path / "b")
    first.train_step()
    first.train_step()
    first.save()
    resumed = Run("bual", 3, tiny, cfg, tmp_path / "b")
    resumed.train()
    for a, b in zip(straight.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.equal(a, b)


def test_augment_keeps_labels_aligned():
    x = torch.zeros(3, 1, 24, 24)
    x[:, :, 6:18, 8:14] = 1.0
    y = (x[:, 0] > 0.5).long()
    xa, ya = augment(x, y, torch.Generator().manual_seed(0), noise=0.0)
    assert ya is not None and ya.shape == y.shape and ya.dtype == torch.long
    inside = xa[:, 0][ya == 1].mean()
    outside = xa[:, 0][ya == 0].mean()
    assert inside > 0.5 > outside


# ------------------------------------------------------------------------------ data errors


def _write_nifti(path: Path, array: np.ndarray) -> None:
    nib = pytest.importorskip("nibabel")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def test_nifti_folder_reads_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        label = rng.integers(0, 3, (16, 16, 6)).astype(np.uint8)
        _write_nifti(tmp_path / "images" / f"case{i}_0000.nii.gz",
                     rng.normal(size=(16, 16, 6)).astype(np.float32))  # fmt: skip
        _write_nifti(tmp_path / "labels" / f"case{i}.nii.gz", label)
    cases = read_nifti_dir(tmp_path)
    assert [c[0] for c in cases] == ["case0", "case1", "case2"]
    data = cases_data(cases, labeled=2, size=(16, 16), description="t", gap=0)
    assert data.num_classes == 3 and len(data.labeled_x) == 2 and len(data.test_x) == 6
    assert data.labeled_x.shape[1:] == (1, 16, 16) and data.labeled_y.dtype == torch.long


def test_nifti_errors(tmp_path):
    with pytest.raises(DataError, match="missing folder"):
        read_nifti_dir(tmp_path)
    image = np.zeros((8, 8, 4), np.float32)
    _write_nifti(tmp_path / "images" / "a.nii.gz", image)
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError, match=r"missing label for .*a\.nii\.gz"):
        read_nifti_dir(tmp_path)
    _write_nifti(tmp_path / "labels" / "a.nii.gz", np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(DataError, match=r"image shape \(8, 8, 4\) does not match label shape"):
        read_nifti_dir(tmp_path)
    _write_nifti(tmp_path / "labels" / "a.nii.gz", np.full((8, 8, 4), 0.5, np.float32))
    with pytest.raises(DataError, match="labels must be integers"):
        read_nifti_dir(tmp_path)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(DataError, match="no NIfTI images"):
        read_nifti_dir(empty)


def test_h5_folder_and_errors(tmp_path):
    h5py = pytest.importorskip("h5py")
    with pytest.raises(DataError, match="missing folder"):
        read_h5_dir(tmp_path / "nope")
    with pytest.raises(DataError, match=r"no \*.h5 files"):
        read_h5_dir(tmp_path)
    for s in range(3):
        with h5py.File(tmp_path / f"patient001_frame01_slice_{s}.h5", "w") as f:
            f["image"] = np.full((12, 10), s, np.float32)
            f["label"] = np.ones((12, 10), np.uint8)
    cases = read_h5_dir(tmp_path)
    assert len(cases) == 1 and cases[0][0] == "patient001_frame01"
    assert cases[0][1].shape == (3, 12, 10) and [c[0, 0] for c in cases[0][1]] == [0, 1, 2]
    bad = tmp_path / "bad"
    bad.mkdir()
    with h5py.File(bad / "x_slice_1.h5", "w") as f:
        f["image"] = np.zeros((12, 10), np.float32)
        f["label"] = np.zeros((12, 11), np.uint8)
    with pytest.raises(DataError, match="does not match label shape"):
        read_h5_dir(bad)
    with h5py.File(bad / "x_slice_1.h5", "w") as f:
        f["image"] = np.zeros((12, 10), np.float32)
        f["label"] = np.full((12, 10), 1.5, np.float32)
    with pytest.raises(DataError, match="labels must be integers"):
        read_h5_dir(bad)
    with h5py.File(bad / "x_slice_1.h5", "w") as f:
        f["image"] = np.zeros((12, 10), np.float32)
    with pytest.raises(DataError, match="missing dataset 'label'"):
        read_h5_dir(bad)


def test_cli_reports_data_errors(tmp_path, capsys):
    from examples.bual_demo.__main__ import main

    assert main(["--nifti-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "missing folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ DDP


@pytest.mark.distributed
def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    pytest.importorskip("nibabel")
    if importlib.util.find_spec("nilearn") is None:
        pytest.skip("the MNI template ships in the nilearn wheel (pip install --no-deps nilearn)")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", "-m", "examples.bual_demo", *TINY, "--methods", "bual",
           "--seeds", "1", "--iterations", "3", "--base", "8", "--mc-passes", "2",
           "--out", str(out)]  # fmt: skip
    # own process group, so that a hang kills the launcher *and* both ranks
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-5000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    states = [torch.load(out / "runs" / "bual_seed0" / f"checkpoint_rank{r}.pt",
                         weights_only=True) for r in (0, 1)]  # fmt: skip
    assert states[0]["step"] == states[1]["step"] == 3
    for key in ("student", "teacher"):
        for name, a in states[0][key].items():
            assert torch.equal(a, states[1][key][name]), f"{key}.{name} differs between ranks"
    assert (out / "results.md").is_file()
