"""Tables (Markdown, JSON) and figures from the finished runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

LABELS = {
    "supervised": "Supervised only (labeled slices)",
    "mean_teacher": "Mean teacher (MSE consistency)",
    "uamt": "UA-MT (MC-dropout entropy mask)",
    "bual": "BUAL (`bidirectional_loss`)",
    "full": "Fully supervised (upper bound)",
    "bual_uamt": "BUAL, UA-MT thresholds (the former default)",
    "bual_ratio": "BUAL, ratio regions (top 10% / 20%)",
    "bual_labeled": "BUAL, labeled emphasis only",
    "bual_unlabeled": "BUAL, unlabeled selection only",
    "bual_soft": "BUAL, soft regions (T = 0.05)",
}
COLORS = dict(zip(LABELS, ["C0", "C1", "C2", "C3", "C7", "C4", "C5", "C6", "C8", "C9"]))
SEMI_LOGGED = ("mean_teacher", "uamt", "bual", "bual_uamt", "bual_ratio", "bual_labeled",
               "bual_unlabeled", "bual_soft")  # fmt: skip
#: The per-volume metrics of a run (``metrics.evaluate``), per class, summarised over seeds.
METRICS = ("dice", "jaccard", "hd95", "asd", "assd")
#: Table column names and number formats.
NAMES = {"dice": "Dice", "jaccard": "Jaccard", "hd95": "HD95", "asd": "ASD", "assd": "ASSD"}
FORMATS = {"dice": "{:.3f} ± {:.3f}", "jaccard": "{:.3f} ± {:.3f}", "hd95": "{:.2f} ± {:.2f}",
           "asd": "{:.2f} ± {:.2f}", "assd": "{:.2f} ± {:.2f}"}  # fmt: skip


def _stats(values: Any) -> dict[str, Any]:
    """Mean and sample std (n - 1) over seeds; NaN (a class that is n/a) becomes ``None``."""
    a = np.asarray(values, dtype=float)
    if np.isnan(a).any():
        return {"mean": None, "std": None, "values": [None] * len(a)}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "values": a.tolist()}  # fmt: skip


def _per_class(runs: list[dict[str, Any]], metric: str) -> np.ndarray:
    """``(runs, classes)`` of one metric, None (n/a) -> NaN. A run without the metric (a
    result written before it existed) is n/a throughout."""
    width = max(len(r.get("dice", [])) for r in runs)
    rows = [r.get(metric) or [None] * width for r in runs]
    return np.asarray(rows, dtype=float).reshape(len(runs), width)


def _class_means(runs: list[dict[str, Any]], metric: str) -> np.ndarray:
    """Per run, the mean over the classes that are not n/a (``None`` in ``evaluate``)."""
    per_class = _per_class(runs, metric)
    if np.isnan(per_class).all(axis=1).any():
        return np.full(len(runs), np.nan)
    return np.nanmean(per_class, axis=1)


def summarize(results: dict[str, list[dict[str, Any]]], class_names: tuple[str, ...]) -> dict:
    """Per method: mean and sample std (n - 1) over seeds of every metric (each run's value is
    already the mean over its test volumes). A class absent from the test labels is n/a
    (``None``) and left out of the means over classes."""
    summary: dict[str, Any] = {}
    for method, runs in results.items():
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        for metric in METRICS:
            per_class = _per_class(runs, metric)  # (seeds, classes)
            for c, name in enumerate(class_names[1:]):
                entry[f"{metric}/{name}"] = _stats(per_class[:, c])
            entry[f"{metric}/mean"] = _stats(_class_means(runs, metric))
        if "supervised" in results and method != "supervised":
            base = dict(zip([r["seed"] for r in results["supervised"]],
                            _class_means(results["supervised"], "dice")))  # fmt: skip
            means = _class_means(runs, "dice")
            diff = [float(m - base[r["seed"]]) for r, m in zip(runs, means) if r["seed"] in base]
            if diff:
                entry["dice/mean minus supervised"] = _stats(diff)
        entry["seconds_per_iteration"] = float(np.mean([r["seconds_per_iteration"] for r in runs]))
        entry["seconds"] = float(np.sum([r["seconds"] for r in runs]))
        summary[method] = entry
    return summary


def _cell(e: dict[str, Any], key: str, metric: str) -> str:
    v = e.get(key)
    return "n/a" if not v or v["mean"] is None else FORMATS[metric].format(v["mean"], v["std"])


def markdown_table(summary: dict[str, Any], class_names: tuple[str, ...], unit: str = "mm") -> str:
    """The main table: Dice and HD95 per class and their class means, the class means of
    Jaccard and ASD, the paired Δ Dice and the speed (per-class Jaccard and ASD:
    ``class_table``)."""
    names = list(class_names[1:])
    head = (["Method"] + [f"Dice {n}" for n in names] + ["Dice mean", "Jaccard mean"]
            + [f"HD95 {n} ({unit})" for n in names] + [f"HD95 mean ({unit})",
            f"ASD mean ({unit})", "Δ Dice mean vs supervised (paired by seed)",
            "s / iter"])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, e in summary.items():
        cells = [LABELS.get(method, method)]
        cells += [_cell(e, f"dice/{n}", "dice") for n in [*names, "mean"]]
        cells.append(_cell(e, "jaccard/mean", "jaccard"))
        cells += [_cell(e, f"hd95/{n}", "hd95") for n in [*names, "mean"]]
        cells.append(_cell(e, "asd/mean", "asd"))
        d = e.get("dice/mean minus supervised")
        cells.append("" if not d else "n/a" if d["mean"] is None
                     else f"{d['mean']:+.3f} ± {d['std']:.3f}")  # fmt: skip
        cells.append(f"{e['seconds_per_iteration']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def class_table(summary: dict[str, Any], class_names: tuple[str, ...], unit: str = "mm") -> str:
    """Jaccard and ASD per class (the main table has them as class means only)."""
    names = list(class_names[1:])
    head = (["Method"] + [f"Jaccard {n}" for n in names]
            + [f"ASD {n} ({unit})" for n in names])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, e in summary.items():
        cells = [LABELS.get(method, method)]
        cells += [_cell(e, f"{metric}/{n}", metric) for metric in ("jaccard", "asd")
                  for n in names]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(diff: Any) -> dict[str, Any]:
    """A paired comparison over seeds: the mean difference, its 95% confidence interval
    (Student t, n - 1 degrees of freedom), the exact two-sided sign-flip permutation p-value
    (every one of the 2^n sign patterns; with n = 5 the smallest possible p is 2/32 = 0.0625)
    and the number of seeds where the difference is positive."""
    from itertools import product

    from scipy import stats

    d = np.asarray(diff, dtype=float)
    n = len(d)
    if n < 2 or np.isnan(d).any():
        return {"n": n, "mean": None, "ci95": None, "p": None, "positive": None}
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n))
    observed = abs(d.mean())
    flips = np.array(list(product((1.0, -1.0), repeat=n)))
    p = float(np.mean(np.abs((flips * d).mean(axis=1)) >= observed - 1e-12))
    return {"n": n, "mean": float(d.mean()), "ci95": [float(d.mean() - half),
            float(d.mean() + half)], "p": p, "positive": int((d > 0).sum())}  # fmt: skip


def _last_third(runs: list[dict[str, Any]], key: str) -> Optional[float]:
    """The mean of a logged quantity over the last third of training, over seeds."""
    values = []
    for r in runs:
        log = r["history"]["log"]
        tail = [e[key] for e in log if e["step"] > 2 * log[-1]["step"] / 3 and key in e]
        values += tail
    return float(np.mean(values)) if values else None


def comparison(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method, paired by seed: the differences of mean Dice and mean HD95 against
    supervised-only and against UA-MT, the final validation Dice, the region fractions and the
    teacher's pseudo-label error (all / trusted voxels) over the last third of training."""
    out: dict[str, Any] = {}
    for method, runs in results.items():
        entry: dict[str, Any] = {}
        for base in ("supervised", "uamt"):
            if base not in results or base == method:
                continue
            ref = {r["seed"]: r for r in results[base]}
            pairs = [(r, ref[r["seed"]]) for r in runs if r["seed"] in ref]
            for metric in ("dice", "hd95"):
                a = _class_means([p[0] for p in pairs], metric) if pairs else np.array([])
                b = _class_means([p[1] for p in pairs], metric) if pairs else np.array([])
                entry[f"{metric} vs {base}"] = paired(a - b)
        last = [r["history"]["val"][-1]["dice"] for r in runs if r["history"]["val"]]
        # none when the data has no validation set (UA-MT's LA): n/a in the table
        entry["validation dice"] = float(np.mean(last)) if last else None
        for key in ("high_fraction", "low_fraction", "pl_error", "pl_error_trusted"):
            entry[key] = _last_third(runs, key)
        out[method] = entry
    return out


def _paired_cell(p: Optional[dict[str, Any]], fmt: str) -> str:
    if not p or p["mean"] is None:
        return ""
    lo, hi = p["ci95"]
    return (f"{fmt.format(p['mean'])} [{fmt.format(lo)}, {fmt.format(hi)}], "
            f"p = {p['p']:.3f}, {p['positive']}/{p['n']} > 0")  # fmt: skip


def comparison_table(comp: dict[str, Any], unit: str = "mm") -> str:
    """The paired comparison as Markdown (Dice in points of 0-1 Dice, HD95 in ``unit``)."""
    head = ["Method", "Δ Dice vs supervised", f"Δ HD95 vs supervised ({unit})",
            "Δ Dice vs UA-MT", f"Δ HD95 vs UA-MT ({unit})", "val Dice",
            "labeled high / unlabeled low, last third",
            "pseudo-label error all / trusted, last third"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    for method, e in comp.items():
        cells = [LABELS.get(method, method)]
        for key, fmt in (("dice vs supervised", "{:+.3f}"), ("hd95 vs supervised", "{:+.2f}"),
                         ("dice vs uamt", "{:+.3f}"), ("hd95 vs uamt", "{:+.2f}")):  # fmt: skip
            cells.append(_paired_cell(e.get(key), fmt))
        val = e["validation dice"]
        cells.append("n/a" if val is None else f"{val:.3f}")
        cells.append(f"{pct(e['high_fraction'])} / {pct(e['low_fraction'])}")
        cells.append(f"{pct(e['pl_error'])} / {pct(e['pl_error_trusted'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out: Path,
    results: dict[str, list[dict[str, Any]]],
    class_names: tuple[str, ...],
    header: str,
    config: dict[str, Any],
    unit: str = "mm",
) -> tuple[Path, Path]:
    """``results.md`` (``header``, the main table, per-class Jaccard / ASD, the paired
    comparison) and ``results.json``; distances in ``unit``."""
    summary = summarize(results, class_names)
    table = markdown_table(summary, class_names, unit)
    table += ("\n\nJaccard and ASD per class (the class means are in the table above):\n\n"
              + class_table(summary, class_names, unit))  # fmt: skip
    comp = comparison(results)
    if any(len(runs) > 1 for runs in results.values()):
        table += (
            "\n\n**Paired by seed** (the same seed: the same initial weights and batches): "
            "mean difference of the class-mean Dice / HD95, [95% confidence interval, Student "
            "t], exact two-sided sign-flip permutation p-value, seeds with a positive "
            "difference. val Dice: mean over seeds of the last validation-slab Dice (for "
            "choosing defaults; the test slab is not used for that). Region fractions and the "
            "teacher's pseudo-label error (hidden labels) over the last third of training.\n\n"
            + comparison_table(comp, unit)
        )
    md = out / "results.md"
    md.write_text(f"{header}\n\n{table}\n")
    js = out / "results.json"
    js.write_text(json.dumps({"config": config, "summary": summary, "paired": comp,
                              "runs": {m: [{k: v for k, v in r.items() if k != "history"}
                                           for r in rs] for m, rs in results.items()}},
                             indent=1))  # fmt: skip
    return md, js


def figures(out: Path, results: dict[str, list[dict[str, Any]]], run_dirs: dict) -> list[Path]:
    """Training curves, region fractions / pseudo-label errors, and example slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    colors = COLORS

    # 1. training curves: loss and validation Dice, every seed
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method, runs in results.items():
        for i, r in enumerate(runs):
            log, val = r["history"]["log"], r["history"]["val"]
            kw = dict(color=colors.get(method), alpha=0.8, label=method if i == 0 else None)
            axes[0].plot([e["step"] for e in log], [e["sup"] for e in log], **kw)
            if any("cons" in e for e in log):
                axes[1].plot([e["step"] for e in log], [e["cons"] for e in log], **kw)
            axes[2].plot([e["step"] for e in val], [e["dice"] for e in val], **kw)
    for ax, title in zip(axes, ["labeled loss (CE + Dice)", "unlabeled / consistency loss",
                                "validation Dice (class mean)"]):  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_yscale("symlog", linthresh=1e-3)
    fig.tight_layout()
    paths.append(folder / "training_curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    # 2. regions over training: fractions, thresholds, pseudo-label error in the trusted region
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method in SEMI_LOGGED:
        for i, r in enumerate(results.get(method, [])):
            log = r["history"]["log"]
            steps = [e["step"] for e in log]
            kw = dict(color=colors[method], alpha=0.8)
            if "low_fraction" in log[0]:
                axes[0].plot(
                    steps,
                    [e["low_fraction"] for e in log],
                    label=f"{method}: unlabeled low (trusted)" if i == 0 else None,
                    **kw,
                )
            if "high_fraction" in log[0]:
                axes[0].plot(steps, [e["high_fraction"] for e in log], ls="--",
                             label=f"{method}: labeled high (emphasised)" if i == 0 else None,
                             **kw)  # fmt: skip
            if "threshold" in log[0]:
                axes[1].plot(
                    steps, [e["threshold"] for e in log], label=method if i == 0 else None, **kw
                )
            axes[2].plot(
                steps,
                [e["pl_error"] for e in log],
                ls=":",
                label=f"{method}: all voxels" if i == 0 else None,
                **kw,
            )
            # no trusted voxel, no error to show: NaN leaves a gap in the line
            trusted = [np.nan if e.get("low_fraction", 1.0) == 0 else e["pl_error_trusted"]
                       for e in log]  # fmt: skip
            axes[2].plot(
                steps,
                trusted,
                label=f"{method}: trusted voxels" if i == 0 else None,
                **kw,
            )
    axes[0].set_title("region fractions")
    axes[1].set_title("uncertainty threshold (normalised entropy)")
    axes[2].set_title("teacher pseudo-label error (hidden labels)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "regions.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    # 3. example test slice per method (first seed)
    methods = [m for m in results if (run_dirs[m] / "example.npz").is_file()]
    if methods:
        fig, axes = plt.subplots(len(methods), 5, figsize=(13, 2.8 * len(methods)), squeeze=False)
        for row, method in zip(axes, methods):
            ex = np.load(run_dirs[method] / "example.npz")
            u, thr = ex["uncertainty"], float(ex["threshold"])
            high = u > thr
            wrong = ex["pred"] != ex["label"]
            row[0].imshow(ex["image"], cmap="gray")
            row[1].imshow(ex["label"], cmap="viridis", vmin=0, vmax=2, interpolation="nearest")
            row[2].imshow(ex["pred"], cmap="viridis", vmin=0, vmax=2, interpolation="nearest")
            row[2].contour(wrong, levels=[0.5], colors="r", linewidths=0.5)
            im = row[3].imshow(u, cmap="magma", vmin=0, vmax=1)
            fig.colorbar(im, ax=row[3], fraction=0.04)
            overlay = np.zeros((*u.shape, 4))
            overlay[high] = (1.0, 0.0, 0.0, 0.7)  # high: red
            overlay[~high] = (0.0, 0.8, 0.0, 0.25)  # low: green tint
            row[4].imshow(ex["image"], cmap="gray")
            row[4].imshow(overlay, interpolation="nearest")
            row[4].contour(wrong, levels=[0.5], colors="yellow", linewidths=0.4)
            titles = ["image", "label", "prediction (red: errors)", "MC-dropout entropy",
                      f"high {high.mean():.1%} (red) / low, tau={thr:.2f}"]  # fmt: skip
            for ax, title in zip(row, titles):
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(title, fontsize=9)
            row[0].set_ylabel(method)
        fig.tight_layout()
        paths.append(folder / "examples.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
