"""Guide: choosing an uncertainty estimator (entropy vs MC dropout vs ensembles), cost and quality.

Trains a tiny segmentation network (and, for the ensemble, a few independently initialised
copies) on synthetic 2D images, then on held-out images measures for each estimator

* its **cost**: forward passes and wall time per batch, relative to one plain forward;
* its **quality** as a detector of pseudo-label errors: AUROC, average precision and the
  error rate of the pseudo-labels in the 10 % most uncertain voxels and in the other 90 %
  (``bual_losses.diagnostics.error_detection_report``),

and finally feeds the chosen map to ``bidirectional_loss``. Timings are printed, never
asserted: they depend on the machine. Run it longer for meaningful quality numbers:

    python examples/guides/uncertainty_estimators.py --steps 150
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch import nn

from bual_losses import (
    bidirectional_loss,
    ensemble_uncertainty,
    entropy_map,
    mc_dropout_uncertainty,
    region_ce_dice_loss,
)
from bual_losses.diagnostics import error_detection_report


def make_model(num_classes: int = 3, p: float = 0.2) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Dropout2d(p),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Dropout2d(p),
        nn.Conv2d(16, num_classes, 1),
    )


def synthetic(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two nested discs with blurred, noisy boundaries: errors concentrate at the edges."""
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    c = size / 2 + (torch.rand(n, 2, generator=gen) - 0.5) * size / 3
    r = ((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2).sqrt()
    y = (r < 0.35 * size).long() + (r < 0.18 * size).long()
    return y.float()[:, None] / 2 + 0.35 * torch.randn(n, 1, size, size, generator=gen), y


def train(model: nn.Module, steps: int, size: int, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x, y = synthetic(8, size, gen)
        loss = region_ce_dice_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    """Result and best-of-``repeats`` wall time in ms (the minimum resists a busy machine)."""
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best * 1e3


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per model")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--passes", type=int, default=8, help="MC-dropout passes T (UA-MT: 8)")
    parser.add_argument("--members", type=int, default=4, help="ensemble members")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (best is kept)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    members = [train(make_model(), args.steps, args.size, seed=k) for k in range(args.members)]
    model = members[0]
    x, y = synthetic(8, args.size, torch.Generator().manual_seed(123))

    # --8<-- [start:estimators]
    # 1 pass: normalised entropy of the prediction itself (the library's default)
    def entropy() -> torch.Tensor:
        with torch.no_grad():
            return entropy_map(model(x), from_logits=True, normalize=True)

    # T passes with dropout on (BatchNorm frozen) + UA-MT's clipped input noise
    def mc_dropout() -> torch.Tensor:
        est = mc_dropout_uncertainty(
            model, x, passes=args.passes, noise_std=0.1, noise_clip=0.2, normalize=True
        )
        return est.predictive_entropy  # or est.mutual_information (epistemic part)

    # K independently trained models (here: on the same data, different seeds)
    def ensemble() -> torch.Tensor:
        with torch.no_grad():  # members are evaluated one at a time by the generator
            est = ensemble_uncertainty((m(x) for m in members), normalize=True)
        return est.predictive_entropy

    # --8<-- [end:estimators]

    with torch.no_grad():
        logits = model(x)
        _, base_ms = timed(lambda: model(x), args.repeats)
        # every map is judged on the same pseudo-labels: the argmax of `model`, which is what
        # the loss uses on unlabeled images (the teacher's prediction)
        estimators = {
            "entropy (1 pass)": (entropy, 1),
            f"MC dropout (T={args.passes})": (mc_dropout, args.passes),
            f"ensemble (K={args.members})": (ensemble, args.members),
        }
        results: dict[str, dict[str, float]] = {}
        print(
            f"{'estimator':<22}{'passes':>7}{'ms':>9}{'x cost':>8}{'AUROC':>8}{'AP':>7}"
            f"{'err top 10%':>13}{'err rest':>10}"
        )
        for name, (fn, passes) in estimators.items():
            u, ms = timed(fn, args.repeats)
            # error rate of the pseudo-labels in the 10 % most uncertain voxels and in the rest
            rep = error_detection_report(logits, y, from_logits=True, uncertainty=u, ratios=0.1)
            row = {
                "passes": passes,
                "ms": ms,
                "relative_cost": ms / base_ms,
                "auroc": float(rep["auroc"]),
                "average_precision": float(rep["average_precision"]),
                "error_rate_top10": float(rep["ratio_error_rate_high"]),
                "error_rate_rest": float(rep["ratio_error_rate_low"]),
            }
            results[name] = row
            print(
                f"{name:<22}{passes:>7}{ms:>9.2f}{row['relative_cost']:>8.1f}"
                f"{row['auroc']:>8.3f}{row['average_precision']:>7.3f}"
                f"{row['error_rate_top10']:>13.2%}{row['error_rate_rest']:>10.2%}"
            )

    # any map in [0, 1] plugs into the loss; the default thresholds assume that scale
    student = make_model()
    x_l, y_l = synthetic(2, args.size, torch.Generator().manual_seed(7))
    x_u, _ = synthetic(2, args.size, torch.Generator().manual_seed(8))
    # --8<-- [start:plug]
    teacher = model  # e.g. the EMA teacher
    with torch.no_grad():
        teacher_logits = teacher(x_u)
    est = mc_dropout_uncertainty(
        teacher, x_u, passes=8, noise_std=0.1, noise_clip=0.2, normalize=True
    )
    loss = bidirectional_loss(
        student(x_l),
        y_l,
        student(x_u),
        teacher_logits,
        step=100,
        total_steps=1000,
        unlabeled_uncertainty=est.predictive_entropy,  # instead of the 1-pass entropy
    )
    # --8<-- [end:plug]
    loss.backward()
    print(f"bidirectional_loss with the MC-dropout map: {loss.item():.4f}")
    return results


if __name__ == "__main__":
    main()
