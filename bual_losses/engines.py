"""Which engine computes a region loss, and the one entrance that runs it.

Every region loss ([`region_ce_dice_loss`][bual_losses.losses.region_ce_dice_loss] and its
relatives, both branches of
[`bidirectional_loss`][bual_losses.bidirectional.bidirectional_loss], the modules) goes
through one private function here, which picks an engine by ``impl`` and the logits' device:

* ``"reference"`` (``impl="reference"``): plain eager ops, the oracle the others are tested
  against;
* ``"chunked"`` (``impl="fused"`` / ``"auto"`` on CPU, eager): [`bual_losses.fused`][], one
  autograd node walking the voxels in cache-sized chunks; peak memory near 1.3x the logits;
* ``"accelerator"`` (``impl="fused"`` / ``"auto"`` on CUDA, XPU, MPS, ``meta``, and on every
  device under ``torch.compile``, whose graphs then stay dynamic in the batch size): one
  closed-form autograd node over the whole tensor, shaped for kernel launches (a few dozen
  per loss, forward and backward); peak memory 2.25x the logits for four classes and 2.5x for
  two, the gradient included (label targets; more for the other targets and options).

All three compute the same statistics and finish them with the same code, so every option
means the same thing on every engine (the test suite checks values and gradients of each
against the reference, the accelerator engine on CPU tensors through
[`use_engine`][bual_losses.engines.use_engine]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, Optional

import torch

from . import _validation as V
from ._accelerator import accelerator_loss
from ._core import Finish, Options, RegionStats, check_result
from ._reference import reference_loss
from .fused import fused_loss
from .regions import UncertaintyWeight

__all__ = ["ENGINES", "select_engine", "use_engine"]

ENGINES = ("reference", "chunked", "accelerator")
"""The engine names: see the table above."""

_Engine = Callable[..., tuple[torch.Tensor, RegionStats, Optional[torch.Tensor]]]
_RUNNERS: dict[str, _Engine] = {
    "reference": reference_loss,
    "chunked": fused_loss,
    "accelerator": accelerator_loss,
}
_forced: Optional[str] = None


def select_engine(impl: str, device: torch.device) -> str:
    """The engine that ``impl`` runs on ``device``.

    Examples:
        >>> import torch
        >>> from bual_losses.engines import select_engine
        >>> select_engine("auto", torch.device("cpu")), select_engine("fused", torch.device("meta"))
        ('chunked', 'accelerator')
        >>> select_engine("reference", torch.device("cpu"))
        'reference'
    """
    if impl == "reference" or torch._C._are_functorch_transforms_active():
        # torch.func transforms (grad, vmap, jacrev, ...) differentiate through plain ops only:
        # the fused engines' nodes compute their gradients in closed form
        return "reference"
    if _forced is not None:
        return _forced
    if V.compiling():
        # under torch.compile the compiler fuses the whole-tensor engine itself, and the
        # chunked engine's Python loop would specialise the graph on the batch size
        return "accelerator"
    return "chunked" if device.type == "cpu" else "accelerator"


@contextlib.contextmanager
def use_engine(name: str) -> Iterator[None]:
    """Run ``impl="fused"`` / ``"auto"`` on engine ``name`` whatever the device, inside the block.

    A switch for testing and benchmarking (the test suite runs the accelerator engine on CPU
    tensors with it); ``impl="reference"`` is not affected. Not thread-safe: it sets a module
    variable.

    Args:
        name: ``"chunked"`` or ``"accelerator"``.

    Examples:
        >>> import torch
        >>> from bual_losses import region_ce_dice_loss
        >>> from bual_losses.engines import use_engine
        >>> z, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (2, 8, 8))
        >>> with use_engine("accelerator"):
        ...     fast = region_ce_dice_loss(z, y)
        >>> bool(torch.allclose(fast, region_ce_dice_loss(z, y, impl="reference")))
        True
    """
    global _forced
    V.require_choice(name, "name", ENGINES[1:])
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def region_loss(
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    region_weight: Optional[torch.Tensor],
    opts: Options,
    spec: Finish,
    *,
    impl: str,
    validate: bool,
    derived: Optional[UncertaintyWeight] = None,
    teacher: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the engine that ``impl`` picks for the logits' device: ``(loss, mass)``.

    ``derived`` multiplies the region weight by a weight derived from the normalised entropy of
    ``teacher`` (if given, else of the detached ``logits``) inside the engine; ``target=None``
    takes the teacher's pseudo-labels as the target, from the same pass. ``mass`` is the sum of
    the derived region indicator over the batch, 0-d (None without ``derived``).
    """
    run = _RUNNERS[select_engine(impl, logits.device)]
    loss, stats, mass = run(logits, target, region_weight, opts, spec, derived, teacher)
    if validate:
        check_result(loss, stats, spec, region_weight, teacher)
    return loss, mass
