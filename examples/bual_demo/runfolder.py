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
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT = "bual_demo.run/1"
"""The tag the trainer writes into the ``config.json`` of every run folder it creates."""

# what the trainer writes: top-level files and folders, and the files inside those folders
_TOP_FILES = {"config.json", "results.md", "results.json", "diagnostics.md", "diagnostics.json"}
_FIGURE = re.compile(r"[\w-]+\.png")
_RUN = re.compile(r"[a-z_]+_seed\d+")
_RUN_FILE = re.compile(r"checkpoint(_rank\d+)?\.(pt|tmp)|result\.(json|tmp)|example\.npz")
RUN_LAYOUT = (
    "config.json, results.md/json, diagnostics.md/json, figures/*.png and "
    "runs/<method>_seed<N>/{checkpoint*.pt, result.json, example.npz}"
)


class RunFolderError(Exception):
    """A run folder (or a file in it) that the trainer will not use or delete."""


def tagged(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the trainer's format tag, as written to ``config.json``."""
    return {"format": FORMAT, **config}


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


def _reason(err: BaseException) -> str:
    """Why a checkpoint did not load, in a few words (torch's message suggests loading it
    unsafely, which is the one thing not to do with a file of unknown origin)."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it pickles {found.group(1)}, which is not plain data and could run code"
    if "WeightsUnpickler error" in text or "Weights only load failed" in text:
        return "it is not a torch checkpoint of plain data (corrupt, truncated or foreign)"
    first = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()
    return first[0][:200] if first else type(err).__name__


def load_checkpoint(path: Path, map_location: Any = None) -> dict[str, Any]:
    """A checkpoint the trainer wrote, read without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        raise RunFolderError(
            f"{path} does not load as a plain checkpoint (tensors, numbers, strings, lists, "
            f"dicts): {_reason(err)}. Delete it (or rerun with --fresh) to start that run afresh."
        ) from None
    if not isinstance(state, dict):
        raise RunFolderError(f"{path} is not a checkpoint of this trainer (not a dict).")
    return state
