"""What the methods' step losses share: the teacher's noisy input, the
unlabeled half of a semi-supervised step, UA-MT's MC-dropout estimate and the pseudo-label
diagnostics."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch

from bual_losses import mc_dropout_uncertainty
from bual_losses.pseudo import pseudo_labels

if TYPE_CHECKING:
    from ..train import Run


def teacher_input(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    # drawn on the CPU from the run's generator (the same numbers on every device)
    noise = torch.randn(x.shape, generator=generator) * std
    return x + noise.clamp(-2 * std, 2 * std).to(x.device)


def annotated(y: torch.Tensor, ignore_index: Optional[int]) -> torch.Tensor:
    """The voxels with a label (all but ``ignore_index``)."""
    return torch.ones_like(y, dtype=torch.bool) if ignore_index is None else y != ignore_index


@dataclasses.dataclass
class SemiBatch:
    """One semi-supervised step's batches and logits, all on the run's device."""

    xl: torch.Tensor  # labeled images and labels
    yl: torch.Tensor
    xu: torch.Tensor  # unlabeled images; yu: their hidden labels (diagnostics only)
    yu: torch.Tensor
    zl: torch.Tensor  # student logits on the labeled / unlabeled images
    zu: torch.Tensor
    zt: torch.Tensor  # teacher logits on the (noisy) unlabeled images
    lam: float  # the consistency weight of this step


def semi_batch(run: Run, xl: torch.Tensor, yl: torch.Tensor, log: dict[str, float]) -> SemiBatch:
    """Draw and augment the unlabeled batch (on the CPU, from the run's generator), run the
    student on both batches and the teacher on the noisy unlabeled one; logs ``lambda``."""
    assert run.teacher is not None
    cfg, g, dev = run.cfg, run.generator, run.device
    xu, yu = run.data.draw("unlabeled", cfg.unlabeled_batch, g)
    xu, yu = xu.to(dev), yu.to(dev)
    logits = run.model(torch.cat([xl, xu]))
    zl, zu = logits[: len(xl)], logits[len(xl) :]
    with torch.no_grad():
        zt = run.teacher(teacher_input(xu, cfg.teacher_noise, g))
    lam = float(run.lam(run.step))
    log["lambda"] = lam
    return SemiBatch(xl, yl, xu, yu, zl, zu, zt, lam)


def mc_entropy(run: Run, xu: torch.Tensor) -> torch.Tensor:
    """UA-MT's uncertainty of the teacher on ``xu``: normalised MC-dropout predictive entropy
    (``mc_passes`` noisy passes, two per forward)."""
    assert run.teacher is not None
    cfg = run.cfg
    est = mc_dropout_uncertainty(
        run.teacher, xu, passes=cfg.mc_passes, noise_std=cfg.teacher_noise,
        noise_clip=2 * cfg.teacher_noise, batch_repeats=2, normalize=True,
    )  # fmt: skip
    return est.predictive_entropy


@torch.no_grad()
def log_pseudo_label_error(
    run: Run, batch: SemiBatch, trusted: torch.Tensor, log: dict[str, float]
) -> None:
    """Diagnostics from the hidden labels (never used for training): the pseudo-label error,
    overall and where the method trusts the teacher."""
    mask = annotated(batch.yu, run.data.ignore_index)
    wrong = (pseudo_labels(batch.zt) != batch.yu) & mask
    trusted = trusted & mask
    log["pl_error"] = (wrong.sum() / mask.sum().clamp_min(1)).item()
    log["pl_error_trusted"] = ((wrong & trusted).sum() / trusted.sum().clamp_min(1)).item()
