"""BUAL (``bidirectional_loss``) and its ablations: the same step with the options of
``bual_options``; the teacher's uncertainty is the library's entropy or, with
``--bual-uncertainty mc``, UA-MT's MC-dropout estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from bual_losses import bidirectional_loss, entropy_map, ratio_schedule, uamt_threshold_schedule

from .. import ABLATIONS
from ._base import log_pseudo_label_error, mc_entropy, semi_batch

if TYPE_CHECKING:
    from ..train import Run, TrainConfig

#: BUAL and its ablations: the methods of this module.
BUAL = ("bual", *ABLATIONS)


def bual_options(method: str, cfg: TrainConfig) -> dict[str, Any]:
    """The ``bidirectional_loss`` options of a BUAL method: ``bual`` keeps the library's
    defaults; the ablations change one thing each. ``--bual-high-ratio`` / ``--bual-low-ratio``
    override the thresholds of every variant."""
    w = cfg.ce_dice_weight
    options: dict[str, Any] = {"alpha": cfg.bual_alpha, "beta": cfg.bual_beta, "lambda_ce": w,
                               "lambda_dice": w}  # fmt: skip
    uamt = uamt_threshold_schedule(cfg.iterations, base="normalized")
    if method == "bual_uamt":  # the former default: UA-MT's 0.75 -> 1.0 of the max entropy
        options.update(high_threshold=uamt, low_threshold=uamt)
    elif method == "bual_ratio":  # fixed sizes: top 10 % emphasised, top 20 % distrusted
        options.update(high_threshold=ratio_schedule(0.1), low_threshold=ratio_schedule(0.2))
    elif method == "bual_labeled":  # the labeled emphasis alone: every pseudo-label trusted
        options.update(low_threshold=1.0)  # u <= 1 everywhere
    elif method == "bual_unlabeled":  # the unlabeled selection alone: no emphasis
        options.update(alpha=0.0)
    elif method == "bual_soft":  # soft regions: sigmoid((u - tau) / T)
        options.update(temperature=0.05)
    if cfg.bual_high_ratio is not None:
        options["high_threshold"] = ratio_schedule(cfg.bual_high_ratio)
    if cfg.bual_low_ratio is not None:
        options["low_threshold"] = ratio_schedule(cfg.bual_low_ratio)
    return options


def loss(run: Run, xl: torch.Tensor, yl: torch.Tensor, log: dict[str, float]) -> torch.Tensor:
    cfg, t = run.cfg, run.step
    b = semi_batch(run, xl, yl, log)
    kwargs = bual_options(run.method, cfg)
    if cfg.bual_uncertainty == "mc":
        kwargs["unlabeled_uncertainty"] = mc_entropy(run, b.xu)
    value, parts = bidirectional_loss(
        b.zl, b.yl, b.zu, b.zt, step=t, total_steps=cfg.iterations,
        consistency_weight=run.lam, ignore_index=run.data.ignore_index,
        return_parts=True, **kwargs,
    )  # fmt: skip
    log.update(
        sup=parts.labeled_loss.item(),
        cons=parts.unlabeled_loss.item(),
        high_fraction=parts.labeled_high_fraction.item(),
        low_fraction=parts.unlabeled_low_fraction.item(),
        threshold=parts.low_threshold.float().mean().item(),
    )
    u = kwargs.get("unlabeled_uncertainty")
    if u is None:
        u = entropy_map(b.zt, from_logits=True, normalize=True)
    thr = parts.low_threshold.reshape(-1, *([1] * (u.ndim - 1)))
    log_pseudo_label_error(run, b, u <= thr, log)
    return value
