"""Run folders are never unpickled blindly, and ``--fresh`` deletes only what the trainer made
(examples/bual_demo/runfolder.py)."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch

from examples.bual_demo.__main__ import main
from examples.bual_demo.diagnose import main as diagnose_main
from examples.bual_demo.runfolder import (
    FORMAT,
    RunFolderError,
    check_deletable,
    load_checkpoint,
)
from tests.test_examples import ROOT, TINY

RUN = [*TINY, "--methods", "supervised", "--seeds", "1", "--iterations", "2", "--workers", "1"]


class _Touch:
    """Unpickling this runs ``Path.touch(marker)``: code execution from a data file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (self.marker,))


def _crafted_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"step": 0, "student": _Touch(marker)}, path)


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A finished tiny run (supervised, one seed), as the trainer leaves it."""
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out), "--no-diagnostics"]) == 0
    return out


def test_the_crafted_checkpoint_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    """Guards the tests below: loading it the old, unsafe way creates the marker."""
    marker = tmp_path / "pwned"
    _crafted_checkpoint(tmp_path / "c.pt", marker)
    unsafe = {"weights_only": False}
    torch.load(tmp_path / "c.pt", **unsafe)
    assert marker.exists()


def test_resume_and_diagnose_never_unpickle_a_crafted_checkpoint(
    run_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = run_folder.parent / "pwned"
    folder = run_folder / "runs" / "supervised_seed0"
    checkpoint = folder / "checkpoint.pt"
    assert checkpoint.is_file()
    _crafted_checkpoint(checkpoint, marker)
    # diagnose reads every finished run's checkpoint
    assert diagnose_main(["--run-dir", str(run_folder), *TINY]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "afresh" in err and err.count("\n") == 1, err
    assert not marker.exists()
    # resuming reads the checkpoint of an unfinished run: the comparison stops cleanly
    (folder / "result.json").unlink()
    assert main([*RUN, "--out", str(run_folder), "--no-diagnostics"]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "--fresh" in err, err
    assert not marker.exists()


def test_fresh_refuses_a_folder_the_trainer_did_not_make(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert main([*RUN, "--out", str(out), "--fresh"]) == 2
    assert (out / "notes.txt").read_text() == "precious"
    # an untagged config.json (an older trainer, or anyone's) is not enough either
    (out / "config.json").write_text(json.dumps({"train": {}}))
    with pytest.raises(RunFolderError, match="no format tag"):
        check_deletable(out)


def test_fresh_refuses_a_run_folder_holding_a_user_file(run_folder: Path) -> None:
    user_file = run_folder / "runs" / "supervised_seed0" / "my_notes.txt"
    user_file.write_text("precious")
    assert main([*RUN, "--out", str(run_folder), "--fresh"]) == 2
    assert user_file.read_text() == "precious"
    user_file.unlink()
    (run_folder / "my_folder").mkdir()
    with pytest.raises(RunFolderError, match="my_folder"):
        check_deletable(run_folder)


def test_fresh_refuses_links(run_folder: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_text("not the trainer's")
    (run_folder / "figures").mkdir(exist_ok=True)
    (run_folder / "figures" / "link.png").symlink_to(elsewhere)
    with pytest.raises(RunFolderError, match=r"link\.png"):
        check_deletable(run_folder)


def test_fresh_deletes_a_run_folder_the_trainer_made(run_folder: Path) -> None:
    config = json.loads((run_folder / "config.json").read_text())
    assert config["format"] == FORMAT
    (run_folder / "figures").mkdir(exist_ok=True)
    stale = run_folder / "figures" / "stale.png"  # a name the trainer may write
    stale.write_bytes(b"old")
    check_deletable(run_folder)
    assert main([*RUN, "--out", str(run_folder), "--fresh", "--no-diagnostics"]) == 0
    assert not stale.exists()
    assert (run_folder / "runs" / "supervised_seed0" / "result.json").is_file()


def test_report_only_never_deletes(run_folder: Path) -> None:
    before = sorted(p.relative_to(run_folder) for p in run_folder.rglob("*"))
    with pytest.raises(SystemExit) as info:  # a flag error: before anything is read
        main([*RUN, "--out", str(run_folder), "--report-only", "--fresh"])
    assert info.value.code == 2
    assert sorted(p.relative_to(run_folder) for p in run_folder.rglob("*")) == before


def test_no_checkpoint_is_loaded_with_weights_only_false_anywhere() -> None:
    sources = [
        path
        for folder in ("bual_losses", "examples", "tests", "benchmarks", "docs")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".md", ".sh") and path.is_file()
    ]
    needle = "weights_only" + "=False"  # spelled apart: this file holds no such call either
    offenders = [str(p.relative_to(ROOT)) for p in sources if needle in p.read_text()]
    assert len(sources) > 50 and not offenders, offenders


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated"])
def test_unreadable_checkpoints_name_the_file_and_the_way_out(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(RunFolderError, match="afresh") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "weights_only" not in str(info.value)


def test_report_only_takes_the_folders_own_configuration(
    run_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15: `--report-only --out F` alone reports F's runs (it said "another
    configuration; use --fresh", which then deleted them); only the data flags are needed."""
    before = {p: p.stat().st_mtime_ns for p in run_folder.rglob("*") if p.is_file()}
    # TINY holds only data flags: methods, seeds and iterations come from the folder
    assert main([*TINY, "--out", str(run_folder), "--report-only", "--no-diagnostics"]) == 0
    report = capsys.readouterr().out
    assert "Supervised only" in report and "2 iterations per run" in report
    for path, stamp in before.items():  # runs and config untouched (the report is rewritten)
        if "runs" in path.parts or path.name == "config.json":
            assert path.stat().st_mtime_ns == stamp, path


def test_report_only_names_a_folder_without_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*TINY, "--out", str(tmp_path / "none"), "--report-only"]) == 2
    assert "holds no config.json" in capsys.readouterr().err
