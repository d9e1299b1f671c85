"""Run folders: what the trainer writes into ``--out``, how it marks them, what it may delete,
and how it reads a checkpoint back without executing anything.

Run folders travel (shared checkpoints, a colleague's ``runs/full``), so:

* a checkpoint is read with ``torch.load(weights_only=True)``: only tensors, numbers, strings
  and the containers of those are rebuilt; a file that needs anything else (an arbitrary pickled
  object, which could run code) is refused with one line naming it;
* ``--fresh`` deletes a folder only if the trainer made it: its ``config.json`` carries
  [`FORMAT`][] and it holds nothing but what the trainer writes (``RUN_LAYOUT``). Anything else
  (a user file, an unknown folder, a link) and it refuses, deleting nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT = "bual_demo.run/1"
"""The tag the trainer writes into the ``config.json`` of every run folder it creates."""

# what the trainer writes: top-level files and folders, and the files inside those folders
_TOP_FILES = {"config.json", "config.tmp", "results.md", "results.json", "diagnostics.md",
              "diagnostics.json"}  # fmt: skip
_FIGURE = re.compile(r"[\w-]+\.png")
_RUN = re.compile(r"[a-z_]+_seed\d+")
_RUN_FILE = re.compile(r"checkpoint(_rank\d+)?\.(pt|tmp)|result\.(json|tmp)|example\.npz")
RUN_LAYOUT = (
    "config.json, results.md/json, diagnostics.md/json, figures/*.png and "
    "runs/<method>_seed<N>/{checkpoint*.pt, result.json, example.npz}"
)


def run_folder(out: Path, method: str, seed: int) -> Path:
    """The folder of one run (``method`` x ``seed``) inside the comparison folder ``out``: the
    one place the ``runs/<method>_seed<N>`` layout is spelled (``_RUN`` recognises it)."""
    return out / "runs" / f"{method}_seed{seed}"


class RunFolderError(Exception):
    """A run folder (or a file in it) that the trainer will not use or delete."""


class DamagedCheckpoint(RunFolderError):
    """A checkpoint that is empty, truncated or not a checkpoint at all: damage, not a threat
    (it asks to rebuild nothing but plain data), so resuming starts its run afresh with a
    warning. ``str(err)`` adds the way out; ``err.args[0]`` is the file and what is wrong."""

    def __str__(self) -> str:
        return f"{self.args[0]}. Delete it (or rerun with --fresh) to start that run afresh."


def tagged(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the trainer's format tag, as written to ``config.json``."""
    return {"format": FORMAT, **config}


def warn(message: str) -> None:
    """One line on stderr, for what the trainer repairs by itself."""
    print(f"warning: {message}", file=sys.stderr)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and ``os.replace``: whoever reads ``path`` (a
    resumed comparison after a crash) finds the old file or the new one, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_config(out: Path) -> Optional[dict[str, Any]]:
    """The ``config.json`` of the run folder ``out``, or None if it has none.

    Raises ``RunFolderError`` naming the file when it is not a configuration of this trainer
    (empty, truncated, another program's JSON): the runs beside it can then not be checked
    against the flags.
    """
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        reason = "not a configuration of this trainer"
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        config, reason = None, f"{type(err).__name__}: {str(err)[:100]}"
    if not (isinstance(config, dict) and isinstance(config.get("train"), dict)
            and "data" in config):  # fmt: skip
        raise RunFolderError(
            f"{path} is unreadable ({reason}), so the runs in {out} cannot be checked against "
            f"these flags; delete {path.name} to continue them under the current flags, or "
            "choose another --out."
        )
    return config


#: What a finished run's ``result.json`` holds at least (per-volume Dice, Jaccard, HD95, ASD;
#: a result of the former per-slice metrics lacks Jaccard and ASD and is evaluated again).
_RESULT_KEYS = ("method", "seed", "dice", "jaccard", "hd95", "asd", "seconds_per_iteration",
                "history")


def read_result(path: Path) -> Optional[dict[str, Any]]:
    """A finished run's ``result.json``; None if there is none, or (with a warning naming it)
    if it is unreadable: the run then counts as unfinished, and training evaluates it again
    from its final checkpoint."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        result = None
    if not isinstance(result, dict):
        warn(f"{path} is unreadable (empty, truncated or foreign); that run counts as "
             "unfinished.")  # fmt: skip
        return None
    missing = [k for k in _RESULT_KEYS if k not in result]
    if missing:
        warn(f"{path} lacks {', '.join(missing)} (an earlier trainer's result, or foreign); "
             "that run is evaluated again from its final checkpoint.")  # fmt: skip
        return None
    return result


def _foreign(out: Path) -> Optional[str]:
    """The first entry of ``out`` the trainer did not write, or None."""
    for entry in sorted(out.iterdir()):
        if entry.is_symlink():
            return f"{entry} is a link"
        if entry.is_file() and entry.name in _TOP_FILES:
            continue
        if entry.is_dir() and entry.name == "figures":
            bad = [p for p in entry.iterdir() if p.is_symlink() or not p.is_file()
                   or not _FIGURE.fullmatch(p.name)]  # fmt: skip
            if bad:
                return str(bad[0])
            continue
        if entry.is_dir() and entry.name == "runs":
            for run in sorted(entry.iterdir()):
                if run.is_symlink() or not run.is_dir() or not _RUN.fullmatch(run.name):
                    return str(run)
                bad = [p for p in run.iterdir() if p.is_symlink() or not p.is_file()
                       or not _RUN_FILE.fullmatch(p.name)]  # fmt: skip
                if bad:
                    return str(bad[0])
            continue
        return str(entry)
    return None


def check_deletable(out: Path) -> None:
    """Raise ``RunFolderError`` unless ``out`` is a run folder made by the trainer and holds
    only what the trainer writes."""
    if out.is_symlink() or not out.is_dir():
        raise RunFolderError(f"{out} is not a folder.")
    config = out / "config.json"
    try:
        tag = json.loads(config.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        tag = None
    if tag != FORMAT:
        raise RunFolderError(
            f"{out} was not made by this trainer ({config} has no format tag {FORMAT!r}); "
            "delete it yourself if you mean to, or choose another --out."
        )
    foreign = _foreign(out)
    if foreign is not None:
        raise RunFolderError(
            f"{out} holds {foreign}, which the trainer does not write (it writes only "
            f"{RUN_LAYOUT}); move it away or choose another --out."
        )


def delete_run_folder(out: Path) -> None:
    """``--fresh``: delete ``out`` after ``check_deletable``; the only deletion the trainer does."""
    check_deletable(out)
    shutil.rmtree(out)


def _reason(err: BaseException) -> tuple[str, bool]:
    """Why a checkpoint did not load, in a few words (torch's message suggests loading it
    unsafely, which is the one thing not to do with a file of unknown origin), and whether the
    file is merely damaged: unreadable bytes (empty, truncated, not a zip or pickle) rather than
    a pickle that asks for a global, a class or a call outside plain data."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it pickles {found.group(1)}, which is not plain data and could run code", False
    refused = re.search(r"WeightsUnpickler error:\s*(.*)", text)
    if refused:
        if refused.group(1).startswith("Unsupported operand"):
            return "it is not a torch checkpoint (corrupt, truncated or foreign)", True
        return "it asks for more than plain data (a foreign or crafted file)", False
    if "Weights only load failed" in text:
        return "it is not a torch checkpoint of plain data (corrupt, truncated or foreign)", False
    first = text.strip().splitlines()
    return (first[0][:200] if first else type(err).__name__), True


def load_checkpoint(path: Path, map_location: Any = None) -> dict[str, Any]:
    """A checkpoint the trainer wrote, read without unpickling arbitrary objects.

    Raises ``DamagedCheckpoint`` for a file that is empty, truncated or not a checkpoint, and
    ``RunFolderError`` for one that pickles anything but plain data (a crafted file).
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            AttributeError) as err:  # fmt: skip
        reason, damaged = _reason(err)
        if damaged:
            raise DamagedCheckpoint(f"{path} does not load as a checkpoint: {reason}") from None
        raise RunFolderError(
            f"{path} does not load as a plain checkpoint (tensors, numbers, strings, lists, "
            f"dicts): {reason}. Delete it (or rerun with --fresh) to start that run afresh."
        ) from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{path} is not a checkpoint of this trainer (not a dict)")
    return state
