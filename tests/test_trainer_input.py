"""The example trainer refuses bad input with a message instead of a wrong table or a traceback
(issue 15, items 5-7): flags, users' files, run folders, label values, absent classes, the split
of one volume, the normalisation and the example slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import examples.bual_demo.__main__ as cli
from examples.bual_demo.__main__ import main
from tests.test_examples import TINY

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
    (["--nifti-dir", "a", "--h5-dir", "b"], "--nifti-dir"),
    (["--val-slab", "100", "120"], "--train-slab/--val-slab/--test-slab"),
    (["--report-only", "--fresh"], "--fresh"),
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
                           "--bual-uncertainty", "mc", "--iterations", "1", "--seeds", "1"])  # fmt: skip
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
