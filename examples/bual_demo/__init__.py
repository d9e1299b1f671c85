"""Example semi-supervised trainer for ``bual_losses`` on real MRI (MNI ICBM152 2009a).

Compares supervised-only, mean teacher, UA-MT, BUAL (``bidirectional_loss``) and a fully
supervised upper bound on the same data, seeds and iteration budget. Run it with::

    python -m examples.bual_demo --help

It uses only the public API of ``bual_losses``.
"""

__all__ = ["ABLATIONS", "ALL_METHODS", "METHODS"]

#: The compared methods, in table order (the default comparison).
METHODS = ("supervised", "mean_teacher", "uamt", "bual", "full")
#: BUAL variants for the ablation (``--methods ...``): what each direction and default buys.
ABLATIONS = ("bual_uamt", "bual_ratio", "bual_labeled", "bual_unlabeled", "bual_soft")
ALL_METHODS = METHODS + ABLATIONS
