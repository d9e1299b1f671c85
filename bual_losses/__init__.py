"""bual_losses: bidirectional uncertainty-aware region losses for semi-supervised segmentation."""

__version__ = "0.1.0"

__all__: list[str] = []
