"""Where a benchmark report comes from: the commit it measured (shared by the benchmark scripts)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit(*paths: str, length: int = 12) -> str:
    """The checkout's commit, marked when ``paths`` (default: anything) has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", f"--short={length}", "HEAD")
        dirty = git("status", "--porcelain", *paths)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    where = f"{', '.join(paths)} " if paths else ""
    return (
        f"{head} (with uncommitted changes{' in ' + where.strip() if where else ''})"
        if dirty
        else head
    )
