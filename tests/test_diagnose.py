"""Test of the example's diagnostics (examples/bual_demo/diagnose.py) on a tiny finished run."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("examples.bual_demo")
pytest.importorskip("scipy")
pytest.importorskip("matplotlib")
from examples.bual_demo.data import SliceData  # noqa: E402
from examples.bual_demo.diagnose import ESTIMATORS, SCALARS, diagnose  # noqa: E402
from examples.bual_demo.train import Run, TrainConfig  # noqa: E402


def _synthetic() -> SliceData:
    """Concentric blobs with noise: three classes, as the MNI slices."""
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


def test_diagnose_tiny_run(tmp_path):
    torch.set_num_threads(1)
    data = _synthetic()
    cfg = TrainConfig(iterations=3, base=8, mc_passes=2, eval_every=3, checkpoint_every=3)
    methods, seeds = ["supervised", "bual"], [0, 1]
    for method in methods:
        for seed in seeds:
            Run(method, seed, data, cfg, tmp_path / "runs" / f"{method}_seed{seed}").train()
    config = {"train": dataclasses.asdict(cfg), "seeds": seeds, "methods": methods,
              "data": data.summary(), "world_size": 1}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))

    diagnose(tmp_path, data, passes=2, log=lambda *a: None)

    result = json.loads((tmp_path / "diagnostics.json").read_text())
    assert set(result) >= {"config", "settings", "summary", "runs", "figure_reports"}
    assert list(result["summary"]) == methods
    for method in methods:
        assert [r["seed"] for r in result["runs"][method]] == seeds
        for name in ESTIMATORS:
            entry = result["summary"][method][name]
            assert set(entry) == set(SCALARS)
            for run in result["runs"][method]:
                auroc = run[name]["auroc"]
                assert auroc is not None and math.isfinite(auroc) and 0.0 <= auroc <= 1.0
    table = (tmp_path / "diagnostics.md").read_text()
    assert "| Method | Uncertainty |" in table and "MC-dropout entropy" in table
    for name in ("error_detection_report", "error_overlay", "error_rate_vs_ratio"):
        path = tmp_path / "figures" / f"{name}.png"
        assert path.is_file() and path.stat().st_size > 1000
