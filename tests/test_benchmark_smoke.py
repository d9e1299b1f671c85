"""Smoke test of the benchmark harness: ``bench_losses.py --quick`` runs and writes every row."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_losses.py"
VARIANTS = ("monai", "reference", "reference+compile", "fused", "floor")
# table title prefix -> (variants, number of "vs X" columns)
TABLES = {
    "": (VARIANTS, 3),
    "bidirectional_loss, ": (("plain", "bidirectional", "bidirectional-reference"), 1),
    "composable path, ": (("naive", "composable"), 1),
}
VERDICTS = (
    "fused time vs reference",
    "fused time vs MONAI",
    "fused peak extra / logits bytes",
    "bidirectional_loss time vs plain MONAI",
    "bidirectional_loss peak extra / logits bytes of both halves",
    "composable path time vs naive eager",
    "MC-dropout memory flat in passes",
)
# torch.compile may legitimately fail on a machine without a working C++ toolchain: the harness
# then reports the failure in the row instead of crashing.
MAY_FAIL = {"reference+compile"}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _sections(text: str) -> dict[str, list[str]]:
    """Markdown ``## `` sections -> their table rows (lines starting with ``|``)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:]
            out[current] = []
        elif current is not None and line.startswith("|"):
            out[current].append(line)
    return out


@pytest.mark.slow
def test_quick_benchmark_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "quick.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert text.strip() in proc.stdout  # the table is also printed

    sections = _sections(text)
    for prefix, (variants, ratios) in TABLES.items():
        tables = [s for s in sections if s.startswith(f"{prefix}ACDC-like 2D")]
        tables += [s for s in sections if s.startswith(f"{prefix}LA-like 3D")]
        assert len(tables) == 2, (prefix, list(sections))
        for name in tables:
            rows = {_cells(r)[0].strip("`"): _cells(r) for r in sections[name][2:]}
            assert list(rows) == list(variants), (name, list(rows))
            for variant, cells in rows.items():
                assert len(cells) == 6 + ratios, cells
                if variant not in MAY_FAIL:
                    float(cells[1])  # a measured median, not "failed: ..."
            if "floor" in rows:
                assert rows["floor"][5] == "1.00"  # peak / logits of logits.neg(): the check
    assert "differ by" not in text  # fused == reference, composable == naive, both impls agree
    assert text.count("labeled high fraction") == 2  # bidirectional: regions reported per shape

    mc = [s for s in sections if s.startswith("MC-dropout")]
    assert len(mc) == 1, list(sections)
    assert [_cells(r)[0] for r in sections[mc[0]][2:]] == ["2", "8", "16"]

    verdicts = re.findall(r"^- (?:PASS|FAIL) (.+?) \(", text, flags=re.M)
    assert verdicts == list(VERDICTS), text
