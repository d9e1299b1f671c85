"""bual_losses: bidirectional uncertainty-aware region losses for semi-supervised segmentation.

Pseudo-label errors concentrate where a model is uncertain. On labeled data the
high-uncertainty region is weighted up; on unlabeled data only the teacher's low-uncertainty
region is trusted. See [`bidirectional_loss`][bual_losses.bidirectional.bidirectional_loss].
"""

from .bidirectional import BidirectionalParts, bidirectional_loss
from .diagnostics import ErrorDetectionAccumulator, ErrorDetectionReport, error_detection_report
from .losses import (
    SSL4MIS_DICE,
    RegionStats,
    region_ce_dice_loss,
    region_ce_loss,
    region_dice_loss,
)
from .modules import BidirectionalLoss, RegionCEDiceLoss
from .pseudo import pseudo_labels
from .regions import (
    UncertaintyWeight,
    high_uncertainty_mask,
    low_uncertainty_mask,
    ratio_threshold,
    region_fraction,
    resolve_threshold,
    soft_uncertainty_weight,
    valid_mask,
)
from .schedules import (
    RatioSchedule,
    RelativeThreshold,
    Schedule,
    as_schedule,
    constant_schedule,
    cosine_rampdown,
    cosine_schedule,
    linear_rampup,
    linear_schedule,
    rampup_schedule,
    ratio_schedule,
    relative_threshold,
    sigmoid_rampup,
    uamt_threshold_schedule,
)
from .uncertainty import (
    UncertaintyEstimate,
    ensemble_uncertainty,
    entropy_map,
    mc_dropout_uncertainty,
)

__version__ = "0.1.0"

__all__ = [
    "SSL4MIS_DICE",
    "BidirectionalLoss",
    "BidirectionalParts",
    "ErrorDetectionAccumulator",
    "ErrorDetectionReport",
    "RatioSchedule",
    "RegionCEDiceLoss",
    "RegionStats",
    "RelativeThreshold",
    "Schedule",
    "UncertaintyEstimate",
    "UncertaintyWeight",
    "as_schedule",
    "bidirectional_loss",
    "constant_schedule",
    "cosine_rampdown",
    "cosine_schedule",
    "ensemble_uncertainty",
    "entropy_map",
    "error_detection_report",
    "high_uncertainty_mask",
    "linear_rampup",
    "linear_schedule",
    "low_uncertainty_mask",
    "mc_dropout_uncertainty",
    "pseudo_labels",
    "rampup_schedule",
    "ratio_schedule",
    "ratio_threshold",
    "region_ce_dice_loss",
    "region_ce_loss",
    "region_dice_loss",
    "region_fraction",
    "relative_threshold",
    "resolve_threshold",
    "sigmoid_rampup",
    "soft_uncertainty_weight",
    "uamt_threshold_schedule",
    "valid_mask",
]
