r"""``torch.distributed`` synchronisation of the global statistics of the losses and regions.

Under data parallelism (DDP) every rank sees a shard of the batch. Most of this library is
per-voxel or per-sample and needs nothing, but a few quantities are *global* statistics of the
batch, and computed per rank they silently change the loss:

* the CE normaliser $\sum_v w_v$ of region-weighted cross-entropy;
* batch Dice (``batch=True``), whose class sums run over the whole batch;
* the mean over samples of per-sample Dice when ranks hold different batch sizes;
* ratio thresholds over the batch (``RatioSchedule(..., per_sample=False)``);
* region fractions and the accumulators of diagnostics.

With ``sync_dist`` these are reduced over the ranks so that **every rank computes the value of
the single-process loss on the concatenated batch**. The reduction of the loss statistics is
differentiable: the backward of [`all_reduce_sum`][bual_losses.distributed.all_reduce_sum]
all-reduces the incoming gradient, so with $R$ ranks

$$
\frac{\partial L_r}{\partial z_r} = R\,\frac{\partial L}{\partial z_r}
\qquad\Longrightarrow\qquad
\frac{1}{R}\sum_r \frac{\partial L_r}{\partial \theta} = \frac{\partial L}{\partial \theta},
$$

i.e. after DDP averages the parameter gradients (it divides by ``R``) they equal the gradient
of the single-process loss on the concatenated batch. (Formally each rank back-propagates the
sum over ranks of the per-rank losses, which are all equal to ``L``.)

``sync_dist`` accepts ``False`` (the default: no synchronisation, no collective, no cost),
``True`` (the default process group) or a ``torch.distributed.ProcessGroup``. A process group
of size 1 needs no synchronisation and is treated as ``False``.

Every rank must make the same calls with the same options in the same order (the collectives
are matched by order), as with any DDP code. See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union, cast

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "SyncDist",
    "all_gather_variable",
    "all_reduce_sum",
    "check_sync_dist",
    "global_mean",
    "resolve_group",
]

SyncDist = Union[bool, "ProcessGroup", None]
"""What every ``sync_dist`` option accepts.

``False`` (or ``None``): no synchronisation; ``True``: the default process group; a
``ProcessGroup``: that group.
"""


def _is_process_group(value: Any) -> bool:
    group_type = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
    return group_type is not None and isinstance(value, group_type)


def check_sync_dist(sync_dist: Any) -> None:
    """Type check of a ``sync_dist`` option (metadata only; works before the group exists).

    Raises:
        TypeError: unless ``sync_dist`` is a bool, ``None`` or a ``ProcessGroup``.
    """
    if sync_dist is None or isinstance(sync_dist, bool) or _is_process_group(sync_dist):
        return
    raise TypeError(
        "`sync_dist` must be False, True (the default process group) or a "
        f"torch.distributed.ProcessGroup, got {type(sync_dist).__name__}."
    )


def resolve_group(sync_dist: SyncDist) -> Optional[ProcessGroup]:
    """The process group to synchronise over, or ``None`` for no synchronisation.

    ``False`` / ``None`` return ``None`` at once without touching ``torch.distributed``.
    ``True`` means the default (world) group. A group with a single rank also gives ``None``:
    its collectives would be identities.

    Args:
        sync_dist: ``False``, ``True`` or a ``torch.distributed.ProcessGroup``.

    Returns:
        The group, or ``None`` when nothing is to be synchronised.

    Raises:
        TypeError: for any other type.
        RuntimeError: for ``sync_dist=True`` (or a group) when ``torch.distributed`` is not
            available in this PyTorch build or no process group has been initialised.
        ValueError: for a group this rank does not belong to.

    Examples:
        >>> resolve_group(False) is None
        True
    """
    if sync_dist is None or sync_dist is False:
        return None
    check_sync_dist(sync_dist)
    if not dist.is_available():
        raise RuntimeError(
            "`sync_dist` asks for synchronisation across ranks, but this PyTorch build has no "
            "torch.distributed support; pass sync_dist=False."
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "`sync_dist=True` needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (as for DDP), or pass "
            "sync_dist=False for a single process."
        )
    group = dist.group.WORLD if sync_dist is True else sync_dist
    if dist.get_rank(group) < 0:
        raise ValueError(
            "`sync_dist` is a process group that this rank does not belong to; pass a group "
            "containing this rank, True (the default group) or False."
        )
    if dist.get_world_size(group) == 1:
        return None
    return group


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks as well."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Not wrapped in another autograd Function: double backward through the collective
        # is not supported (create_graph=True gives a first-order graph only).
        out = grad.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def all_reduce_sum(tensor: torch.Tensor, group: SyncDist) -> torch.Tensor:
    r"""Differentiable sum of ``tensor`` over the ranks of ``group`` (a new tensor).

    $$
    y = \sum_{r} x_r, \qquad
    \frac{\partial}{\partial x_r} = \sum_{r'} \bar y_{r'}
    $$

    The backward all-reduces the incoming gradient: when every rank computes the same function
    of ``y`` (a loss on global statistics), each rank receives ``R`` times the gradient of that
    function, which DDP's averaging turns back into the single-process gradient. Tensors that
    do not require grad (counts, accumulators of diagnostics) are simply summed.

    This is the helper for diagnostics accumulators: sum the per-rank counts or histograms with
    ``all_reduce_sum(counts, sync_dist)`` before normalising them.

    Args:
        tensor: any shape, on the device the backend expects (CUDA for NCCL, CPU for gloo);
            the same shape and dtype on every rank.
        group: anything ``sync_dist`` accepts (``False``/``None``, ``True``, a group).

    Returns:
        The sum over ranks, or ``tensor`` itself (no copy, no collective) when there is nothing
        to synchronise.

    Raises:
        RuntimeError: as [`resolve_group`][bual_losses.distributed.resolve_group] when
            ``group`` asks for a missing process group.

    Examples:
        >>> counts = torch.tensor([3.0, 1.0])
        >>> all_reduce_sum(counts, False)  # single process: unchanged
        tensor([3., 1.])
    """
    pg = resolve_group(group)
    if pg is None:
        return tensor
    return cast(torch.Tensor, _AllReduceSum.apply(tensor, pg))


def global_mean(total: torch.Tensor, count: int, group: SyncDist) -> torch.Tensor:
    r"""``sum_r total_r / sum_r count_r`` with one all-reduce, in the dtype of ``total``.

    The sums run in float64 (float32 on MPS) so that large voxel counts stay exact. Without
    synchronisation this is ``total / count``.

    Args:
        total: 0-d tensor, the local sum (e.g. of a region mask).
        count: the local number of summed elements.
        group: anything ``sync_dist`` accepts.

    Returns:
        A 0-d tensor: the mean over all ranks' elements.

    Examples:
        >>> global_mean(torch.tensor(3.0), 4, False)
        tensor(0.7500)
    """
    pg = resolve_group(group)
    if pg is None:
        return total / count
    wide = torch.float32 if total.device.type == "mps" else torch.float64
    pair = torch.stack(
        [total.to(wide), torch.full((), float(count), dtype=wide, device=total.device)]
    )
    pair = all_reduce_sum(pair, pg)
    return (pair[0] / pair[1]).to(total.dtype)


def all_gather_variable(tensor: torch.Tensor, group: SyncDist) -> list[torch.Tensor]:
    """Gather a tensor whose first dim may differ between ranks; one tensor per rank.

    The sizes of the first dim are exchanged first (one small collective and one host
    synchronisation, because the padded buffers are allocated from them), then every rank's
    tensor, zero-padded to the longest, is all-gathered and trimmed. The other dims and the
    dtype must agree across ranks; flatten first when they do not. No gradient flows through
    the result.

    Args:
        tensor: ``(N_r, *rest)`` on the device the backend expects.
        group: anything ``sync_dist`` accepts.

    Returns:
        ``[x_0, ..., x_{R-1}]`` in rank order, ``x_r`` of shape ``(N_r, *rest)``; ``[tensor]``
        when there is nothing to synchronise.

    Examples:
        >>> all_gather_variable(torch.arange(3), False)
        [tensor([0, 1, 2])]
    """
    pg = resolve_group(group)
    if pg is None:
        return [tensor]
    if tensor.ndim == 0:
        raise ValueError("`tensor` must have at least one dim to be gathered, got shape ().")
    world = dist.get_world_size(pg)
    x = tensor.detach().contiguous()
    size = torch.full((1,), x.shape[0], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=pg)
    counts = [int(n) for n in torch.cat(sizes).tolist()]
    longest = max(counts)
    rest = tuple(x.shape[1:])
    if longest == 0:
        return [x.new_empty((0, *rest)) for _ in counts]
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *rest))])
    out = [x.new_empty((longest, *rest)) for _ in range(world)]
    dist.all_gather(out, x, group=pg)
    return [part[:n] for part, n in zip(out, counts)]
