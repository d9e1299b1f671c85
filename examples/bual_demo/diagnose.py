"""Pseudo-label diagnostics of every method's final teacher on the unlabeled slab.

``python -m examples.bual_demo.diagnose --run-dir runs/full [data options]``

For each method and seed of a finished comparison this loads the final teacher (the EMA model
for mean teacher, UA-MT and BUAL; the model itself for supervised and fully supervised
training), predicts the unlabeled slices (whose labels are hidden from training and read here
only for evaluation) and asks how well two uncertainty maps find the wrong pseudo-labels
(``argmax`` of the teacher):

* ``entropy``: normalised entropy of the teacher's softmax (the library's default map);
* ``mc_dropout``: MC-dropout predictive entropy (``mc_dropout_uncertainty``, 8 passes,
  normalised).

Each map feeds an ``ErrorDetectionAccumulator(from_logits=True)`` batch by batch. Writes
``diagnostics.md`` and ``diagnostics.json`` into the run folder (mean ± sample std over seeds
of AUROC, average precision, ECE, retention AUC and its oracle, error rates inside / outside
the high-uncertainty region) and three figures into ``<run-dir>/figures/``:
``error_detection_report.png`` (BUAL's teacher, first seed, entropy), ``error_overlay.png``
(one unlabeled slice) and ``error_rate_vs_ratio.png``.

The data are rebuilt with the trainer's own data options (the same defaults and flags as
``python -m examples.bual_demo``; give the flags the comparison was run with) and checked
against the ``data`` line of the run's ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from bual_losses import ErrorDetectionAccumulator, entropy_map, mc_dropout_uncertainty
from bual_losses.pseudo import pseudo_labels

from .cli import load_data, parse_args
from .data import DataError, example_slice, example_view
from .report import LABELS
from .runfolder import RunFolderError, load_checkpoint, read_config, run_folder
from .train import TrainConfig, build_model, resolve_device

ESTIMATORS = ("entropy", "mc_dropout")
ESTIMATOR_LABELS = {"entropy": "teacher entropy", "mc_dropout": "MC-dropout entropy"}
#: Reported threshold tau on the normalised entropy: UA-MT's threshold at the start of its
#: schedule (0.75 of the maximum), and the reported ratio r of most uncertain voxels.
THRESHOLD = 0.75
RATIO = 0.1
THRESHOLDS = [i / 20 for i in range(21)]  # contains THRESHOLD
RATIOS = [i / 20 for i in range(21)]  # contains 0.1
SCALARS = (
    "error_rate",
    "auroc",
    "average_precision",
    "ece",
    "retention_auc",
    "oracle_retention_auc",
    "error_rate_high",
    "error_rate_low",
    "high_fraction",
    "ratio_error_rate_high",
    "ratio_error_rate_low",
)


def load_teacher(folder: Path, method: str, data: Any, cfg: TrainConfig) -> nn.Module:
    """The final teacher of one run: the EMA weights where the run has them, else the model."""
    state = load_checkpoint(folder / "checkpoint.pt", map_location="cpu")
    if state["step"] != cfg.iterations:
        raise RuntimeError(f"{folder}: checkpoint at step {state['step']}, not {cfg.iterations}.")
    model = build_model(data.network, data.num_classes, cfg)
    weights = state["teacher"] if state.get("teacher") is not None else state["student"]
    model.load_state_dict(weights)
    return model.eval()


def _accumulator(ignore_index: Optional[int]) -> ErrorDetectionAccumulator:
    return ErrorDetectionAccumulator(from_logits=True, thresholds=THRESHOLDS, ratios=RATIOS,
                                     ignore_index=ignore_index)  # fmt: skip


@torch.no_grad()
def teacher_reports(
    teacher: nn.Module, data: Any, *, passes: int, seed: int, batch: int = 8
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Reports of both maps over the unlabeled slab, plus the maps themselves for the figures."""
    torch.manual_seed(seed)  # the dropout masks of the MC passes
    accs = {name: _accumulator(data.ignore_index) for name in ESTIMATORS}
    logits_all, maps = [], {name: [] for name in ESTIMATORS}
    x, y = data.unlabeled_x, data.unlabeled_y
    device = next(teacher.parameters()).device
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].long().to(device)
        logits = teacher.eval()(xb)
        u = {
            "entropy": entropy_map(logits, from_logits=True, normalize=True),
            "mc_dropout": mc_dropout_uncertainty(
                teacher, xb, passes=passes, normalize=True
            ).predictive_entropy,
        }
        for name in ESTIMATORS:
            accs[name].update(logits, yb, uncertainty=u[name])
            maps[name].append(u[name].cpu())
        logits_all.append(logits.cpu())
    reports = {name: acc.compute() for name, acc in accs.items()}
    arrays = {"logits": torch.cat(logits_all)}
    arrays.update({name: torch.cat(m) for name, m in maps.items()})
    return reports, arrays


def _at(report: dict[str, Any], key: str, grid_key: str, value: float) -> float:
    grid = np.asarray(report[grid_key], dtype=float)
    (index,) = np.flatnonzero(np.isclose(grid, value))
    return float(np.asarray(report[key], dtype=float)[index])


def scalars(report: dict[str, Any]) -> dict[str, Optional[float]]:
    """The reported numbers of one report (NaN as ``None``)."""
    out: dict[str, float] = {}
    for key in ("error_rate", "auroc", "average_precision", "ece", "retention_auc",
                "oracle_retention_auc"):  # fmt: skip
        out[key] = float(report[key])
    for key in ("error_rate_high", "error_rate_low", "high_fraction"):
        out[key] = _at(report, key, "thresholds", THRESHOLD)
    for key in ("ratio_error_rate_high", "ratio_error_rate_low"):
        out[key] = _at(report, key, "ratios", RATIO)
    return {k: (None if math.isnan(v) else v) for k, v in out.items()}


def _mean_std(values: list[Optional[float]]) -> dict[str, Optional[float]]:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(a):
        return {"mean": None, "std": None}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def markdown(summary: dict[str, Any], seeds: list[int], header: str) -> str:
    def cell(entry: dict[str, Any], key: str, digits: int = 3) -> str:
        v = entry[key]
        if v["mean"] is None:
            return "n/a"
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    lines = [
        header,
        "",
        "| Method | Uncertainty | Pseudo-label error | AUROC | AP | ECE | Retention AUC "
        f"(oracle) | Error in u > {THRESHOLD:g} / u ≤ {THRESHOLD:g} (share above) | "
        f"Error in top {100 * RATIO:g}% / rest |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, entry in summary.items():
        for name in ESTIMATORS:
            e = entry[name]
            oracle = e["oracle_retention_auc"]["mean"]
            high = e["high_fraction"]["mean"]
            cells = [
                LABELS.get(method, method),
                ESTIMATOR_LABELS[name],
                cell(e, "error_rate"),
                cell(e, "auroc"),
                cell(e, "average_precision"),
                cell(e, "ece"),
                f"{cell(e, 'retention_auc')} ({oracle:.3f})" if oracle is not None else "n/a",
                f"{cell(e, 'error_rate_high')} / {cell(e, 'error_rate_low')} ({100 * high:.1f}%)"
                if high is not None
                else "n/a",
                f"{cell(e, 'ratio_error_rate_high')} / {cell(e, 'ratio_error_rate_low')}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figures(
    out: Path, report: Any, arrays: dict[str, torch.Tensor], data: Any, dpi: int = 100
) -> list[Path]:
    """The three figures of one run (normally BUAL's first seed, teacher entropy)."""
    from bual_losses.plotting import (
        plot_error_detection_report,
        plot_error_overlay,
        plot_error_rate_vs_threshold,
    )

    out.mkdir(parents=True, exist_ok=True)
    names = list(data.class_names)
    paths = []
    fig = plot_error_detection_report(report, per_class=True, class_names=names)
    paths.append(out / "error_detection_report.png")
    fig.savefig(paths[-1], dpi=dpi)
    fig = plot_error_rate_vs_threshold(report, sweep="ratio", per_class=True, class_names=names)
    fig.set_size_inches(6.4, 4.5)
    paths.append(out / "error_rate_vs_ratio.png")
    fig.savefig(paths[-1], dpi=dpi)
    # an unlabeled slice with foreground (example_slice), the high region at the top-RATIO
    # threshold
    k = example_slice(data.unlabeled_y, data.num_classes)
    label, image, pred, u = example_view(
        data.unlabeled_y[k].long(), data.num_classes, data.unlabeled_x[k, 0],
        pseudo_labels(arrays["logits"][k], dim=0), arrays["entropy"][k],
    )  # fmt: skip
    tau = _at(report, "ratio_thresholds", "ratios", RATIO)
    fig = plot_error_overlay(
        image, label, pred, u,
        threshold=round(tau, 3), ignore_index=data.ignore_index, num_classes=data.num_classes,
        figsize=(15.0, 3.6),
    )  # fmt: skip
    paths.append(out / "error_overlay.png")
    fig.savefig(paths[-1], dpi=dpi)
    return paths


def diagnose(
    run_dir: Path, data: Any, *, passes: int = 8, figure_method: str = "bual",
    log: Any = print,
) -> dict[str, Any]:  # fmt: skip
    """Diagnostics of every finished run under ``run_dir``; writes the table, JSON, figures."""
    config = read_config(run_dir)
    if config is None:
        raise RunFolderError(f"{run_dir} has no config.json: not a comparison's run folder.")
    if config["data"] != data.summary():
        raise DataError(
            f"{run_dir} was trained on other data:\n  run:   {config['data']}\n  "
            f"built: {data.summary()}\ngive the data options the comparison was run with."
        )
    cfg = TrainConfig(**config["train"])
    device = resolve_device("auto")  # the teachers on a GPU when there is one
    methods, seeds = config["methods"], config["seeds"]
    if figure_method not in methods:
        figure_method = methods[0]
    runs: dict[str, list[dict[str, Any]]] = {}
    figure_input = None
    for method in methods:
        runs[method] = []
        for seed in seeds:
            folder = run_folder(run_dir, method, seed)
            teacher = load_teacher(folder, method, data, cfg).to(device)
            reports, arrays = teacher_reports(teacher, data, passes=passes, seed=seed)
            entry = {"seed": seed, **{n: scalars(r) for n, r in reports.items()}}
            runs[method].append(entry)
            if method == figure_method and figure_input is None:
                figure_input = (reports["entropy"], arrays, reports)
            log(
                f"{method} seed {seed}: error {entry['entropy']['error_rate']:.4f}, AUROC "
                f"entropy {entry['entropy']['auroc']:.3f}, MC {entry['mc_dropout']['auroc']:.3f}"
            )
    summary = {
        method: {
            name: {key: _mean_std([r[name][key] for r in rs]) for key in SCALARS}
            for name in ESTIMATORS
        }
        for method, rs in runs.items()
    }
    header = (
        f"Pseudo-label diagnostics of each method's final teacher (EMA model for mean teacher, "
        f"UA-MT and BUAL; the model itself otherwise) after {cfg.iterations} iterations, on the "
        f"{len(data.unlabeled_x)} unlabeled images (labels hidden from training, used here "
        f"only for evaluation). Pseudo-label = teacher argmax; uncertainty = normalised entropy "
        f"of the teacher's softmax, or MC-dropout predictive entropy ({passes} passes, "
        f"normalised). Mean ± sample std over seeds {seeds}. AUROC / AP: the uncertainty as a "
        f"detector of wrong pseudo-labels (0.5 / the error rate = chance). Retention AUC: area "
        f"under the share of errors caught vs share of voxels flagged (random 0.5; the oracle in "
        f"brackets). Error in u > τ / u ≤ τ: pseudo-label error rate inside / outside the "
        f"high-uncertainty region at τ = {THRESHOLD:g} (UA-MT's initial threshold), with the "
        f"share of voxels above τ; top {100 * RATIO:g}%: the same for the {100 * RATIO:g}% most "
        f"uncertain voxels.\n\nData: {data.summary()}."
    )
    md = markdown(summary, seeds, header)
    (run_dir / "diagnostics.md").write_text(md)
    assert figure_input is not None
    report, arrays, reports = figure_input
    result = {
        "config": config,
        "settings": {
            "mc_passes": passes,
            "threshold": THRESHOLD,
            "ratio": RATIO,
            "estimators": list(ESTIMATORS),
            "figure_run": f"{figure_method}_seed{seeds[0]}",
        },
        "summary": summary,
        "runs": runs,
        "figure_reports": {n: r.to_dict() for n, r in reports.items()},
    }
    (run_dir / "diagnostics.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    paths = figures(run_dir / "figures", report, arrays, data)
    log(md)
    written = [run_dir / "diagnostics.md", run_dir / "diagnostics.json", *paths]
    log("Written: " + ", ".join(str(p) for p in written))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m examples.bual_demo.diagnose",
        description="Pseudo-label error detection of each method's final teacher on the "
        "unlabeled slab. Data options as for python -m examples.bual_demo (see its --help).",
    )
    p.add_argument("--run-dir", type=Path, required=True, help="output folder of a comparison")
    p.add_argument("--mc-passes", type=int, default=8, help="MC-dropout passes (default 8)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args, rest = p.parse_known_args(argv)
    data_args = parse_args(rest)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    start = time.perf_counter()
    try:
        data = load_data(data_args)
        diagnose(args.run_dir, data, passes=args.mc_passes)
    except (DataError, FileNotFoundError, RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Finished in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
