r"""Launch counts of the losses: every ATen op of one forward + backward, counted on ``meta``.

Usage (from the repository root)::

    python benchmarks/launches.py  # every shape and variant -> benchmarks/results/launches.md
    python benchmarks/launches.py --shapes la-3d --variants fused,monai --out /tmp/launches.md

What a loss costs on an accelerator is mostly how many kernels it launches, how many bytes those
kernels move and whether it waits for the device. All three are counted here deterministically
and without a GPU: one measured step (``loss = f(...); loss.backward()``) runs under a
``TorchDispatchMode`` that records every ATen op reaching the dispatcher, forward and backward
(the autograd engine's ops included), on the ``meta`` device: tensors have shapes, dtypes and
strides but no data, so nothing is computed and the largest shapes cost nothing. ``meta`` is not
``cpu``, so the library takes the code path it takes on a GPU. Inputs (float32 logits with
``requires_grad``, int64 labels, a float region weight) are built before the counted step.

Every op falls in one category, checked in this order:

* **sync**: the host waits for the device: ``_local_scalar_dense`` (what ``.item()``,
  ``bool(t)``, ``int(t)`` reach), ``is_nonzero``, ``equal``, ``allclose``, ops whose output size
  depends on the data (``nonzero``, ``masked_select``, ``unique``, ``bincount``,
  ``repeat_interleave(Tensor)`` without ``output_size``, ``index`` / ``index_put_`` with a
  boolean mask) and copies from a device to the CPU. ``meta`` cannot compute them, so the
  counter returns a dummy result: ``0`` / ``0.0`` / ``False`` for a scalar, ``False`` for a
  comparison and an empty (size-0) tensor for a data-dependent size; on ``cpu`` they run for real.
* **view**: the result aliases an input and no kernel runs: ``OpOverload.is_view``, any return
  whose schema alias annotation is not a write (``view``, ``expand``, ``permute``, ``slice``,
  ``select``, ``detach``, ``alias``, ``lift_fresh``, ...), and ``_unsafe_view``,
  ``_reshape_alias`` and the in-place metadata ops (``as_strided_``, ``squeeze_``,
  ``unsqueeze_``, ``t_``, ``transpose_``, ``detach_``, ``set_``), plus metadata queries
  (``sym_size``, ``is_same_size``, ...).
* **allocation**: allocates without writing: ``empty``, ``empty_strided``, ``empty_like``,
  ``empty_permuted``, ``new_empty``, ``new_empty_strided``, ``resize_``, ``resize_as_``.
  (``zeros``, ``full``, ``ones_like`` write memory: they are kernels.) On CUDA an allocation is
  a caching-allocator call, not a launch, but it is host work per op, so it is budgeted.
* **kernel**: every other op.

The budgeted quantity is **non-view ops** = kernels + allocations (both also reported apart).

**Bytes moved** of a kernel or sync op = bytes read + bytes written, where

* read = the tensors passed as inputs (every tensor argument except ``out=`` arguments, whose
  old values are not read), and written = the returned tensors plus every argument the schema
  marks as mutated (``out=`` arguments, ``self`` of an in-place op); so an in-place op counts
  its tensor once read and once written, an ``out=`` op counts its output once; except that
  in-place ops that only overwrite (``fill_``, ``zero_``, ``copy_``, ``masked_fill_``,
  ``scatter_``, the random fills) do not read ``self``, and ``gather`` / ``scatter_`` /
  ``nll_loss`` touch one element of their source / destination per index (per target), not the
  whole tensor (a reducing ``scatter_add_`` / ``scatter_(..., reduce=...)`` reads and writes
  each element it touches);
* in each set, tensors are grouped by storage: distinct views of one storage (different offset,
  sizes or strides) add up, a view passed twice counts once, and the total per storage is
  capped at the storage's size; a view's bytes are its element size times the product of its
  sizes over the dimensions with a non-zero stride (a broadcast ``expand`` is read once).

This is the ideal traffic of each kernel taken alone (no caching between kernels, reads of a
broadcast operand counted once); views and allocations move nothing. The report gives it as a
multiple of the logits' bytes (for the bidirectional variants, of both halves' logits).

**Peak extra memory**: the largest number of bytes held, at any op of the step, by the storages
that ops of the step created (forward, backward and the gradient ``logits.grad`` itself). Every
tensor an op returns is looked at: a storage that none of the op's tensor arguments uses and that
is not tracked yet is a new allocation of its ``nbytes``; the counter keeps a weak reference to
it (``StorageWeakRef``: the storage's own reference count, whoever holds it, Python, autograd's
saved tensors or the engine's buffers) and, after each op, sums the bytes of the tracked
storages that are still alive. Views share their base's storage and count once; inputs built
before the step (logits, labels, weight) are never counted. It is deterministic and needs no
device (``meta`` storages have sizes but no data); it sees the tensors that ops return, not
workspace memory a kernel allocates internally (none of the ops here does except inside library
kernels such as cuBLAS, which the CUDA caching allocator does not count either). Reported over
the logits' bytes (both halves for the bidirectional rows), like the bytes moved.

``reference+compile`` cannot run on ``meta``: it compiles the reference loss with
``torch.compile`` (inductor, C++ backend) on CPU tensors of a small shape with the same channel
count and rank (the number of generated kernels does not depend on the sizes) and counts, in the
generated forward and backward wrappers, the calls of generated kernels plus extern / ATen
fallback calls (kernels), the ``empty_strided`` calls (allocations) and ``.item()`` /
``_local_scalar_dense`` (syncs). The C++ backend normally writes every loop nest of a graph into
one C++ function; here it is made to emit one function per fused scheduler node, which is the
unit Triton launches as one kernel. The count approximates a GPU build (Triton may split a large
reduction in two, and fuses slightly differently); views, bytes and memory are not counted
(``n/a``).
While compiling, the library skips its value checks (eager runs them: about 20 small kernels).

Budgets (``BUDGETS``): the default path of ``region_ce_dice_loss`` and of ``bidirectional_loss``
(ops, views, bytes moved, host syncs and peak extra memory), checked at every shape by
``tests/test_launches.py`` and by the verdict lines of the report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import re
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional
from unittest import mock

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402  (after the path above)

KERNEL, ALLOCATION, VIEW, SYNC = "kernel", "allocation", "view", "sync"

# name -> (B, C, *S), float32 logits
SHAPES: dict[str, tuple[int, ...]] = {
    "acdc-2d": (24, 4, 256, 256),
    "la-3d": (4, 2, 112, 112, 80),
    "large-3d": (2, 4, 160, 160, 128),
}
OP_LIST_SHAPE = "acdc-2d"


class Budget(NamedTuple):
    """Upper bounds for one forward + backward (``bytes_ratio``: bytes moved / logits bytes;
    ``peak_ratio``: peak extra memory / logits bytes, the gradient included)."""

    non_view: int
    views: int
    bytes_ratio: float
    syncs: int = 0
    peak_ratio: float = math.inf


# variant -> budget; both are the default path (impl="auto")
BUDGETS: dict[str, Budget] = {
    "fused": Budget(non_view=40, views=60, bytes_ratio=25.0, syncs=0, peak_ratio=3.0),
    "bidirectional": Budget(non_view=100, views=120, bytes_ratio=50.0, syncs=0, peak_ratio=3.0),
}

#: Where the default path misses its budget, measured: (shape, variant) -> (the bound the tests
#: keep instead, so that it cannot get worse unnoticed, and why). The report still says FAIL.
KNOWN_MISSES: dict[tuple[str, str], tuple[Budget, str]] = {}


# ============================================================================================
# the counter


class Op(NamedTuple):
    """One recorded op.

    ``stage`` is the autograd node running it in the backward pass, else ``"forward"`` (which
    includes the seed gradient that ``backward()`` creates before the engine starts).
    """

    name: str
    category: str
    bytes: int
    stage: str
    live: int = 0  # bytes held by the step's storages right after the op


class Counts(NamedTuple):
    """What one measured step dispatched; ``None`` where a variant cannot count it."""

    kernels: int
    allocations: int
    views: Optional[int]
    syncs: int
    bytes: Optional[int]
    ops: tuple[Op, ...] = ()
    logits_bytes: int = 0
    note: str = ""
    peak: Optional[int] = None  # peak extra memory (bytes)

    @property
    def non_view(self) -> int:
        """The budgeted quantity: kernels + allocation-only ops."""
        return self.kernels + self.allocations

    @property
    def bytes_ratio(self) -> float:
        """Bytes moved over the logits' bytes (NaN when either is unknown)."""
        if self.bytes is None or not self.logits_bytes:
            return math.nan
        return self.bytes / self.logits_bytes

    @property
    def peak_ratio(self) -> float:
        """Peak extra memory over the logits' bytes (NaN when either is unknown)."""
        if self.peak is None or not self.logits_bytes:
            return math.nan
        return self.peak / self.logits_bytes


_VIEW_NAMES = frozenset(
    {
        "_unsafe_view",
        "_reshape_alias",
        "as_strided_",
        "squeeze_",
        "unsqueeze_",
        "t_",
        "transpose_",
        "detach_",
        "set_",
        # metadata queries: nothing runs on the device
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "is_same_size",
    }
)
_ALLOCATION_NAMES = frozenset(
    {
        "empty",
        "empty_strided",
        "empty_like",
        "empty_permuted",
        "new_empty",
        "new_empty_strided",
        "resize_",
        "resize_as_",
    }
)
_SYNC_NAMES = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "equal",
        "allclose",
        "nonzero",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "bincount",
    }
)
_MASK_INDEX_NAMES = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
_MASK_DTYPES = (torch.bool, torch.uint8)


def _bound(func: Any, args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    """(schema argument, value) pairs of one call."""
    schema_args = func._schema.arguments
    pairs = list(zip(schema_args, args))
    pairs += [(a, kwargs[a.name]) for a in schema_args if a.name in kwargs]
    return pairs


def _is_cpu_copy(func: Any, args: tuple, kwargs: dict) -> bool:
    name = func.overloadpacket.__name__
    if name == "_to_copy":
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and not _on_cpu(args[0])
    if name == "copy_":
        return _on_cpu(args[0]) and not _on_cpu(args[1])
    return False


def _on_cpu(t: Any) -> bool:
    return not isinstance(t, torch.Tensor) or t.device.type == "cpu"


def _mask_indices(func: Any, args: tuple) -> bool:
    if func.overloadpacket.__name__ not in _MASK_INDEX_NAMES or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES for i in args[1])


def classify(func: Any, args: tuple = (), kwargs: Optional[dict] = None) -> str:
    """The category of one op call: ``"sync"``, ``"view"``, ``"allocation"`` or ``"kernel"``."""
    kwargs = kwargs or {}
    name = func.overloadpacket.__name__
    if name in _SYNC_NAMES or _mask_indices(func, args) or _is_cpu_copy(func, args, kwargs):
        return SYNC
    if func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return SYNC
    if func.is_view or name in _VIEW_NAMES:
        return VIEW
    if any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
        return VIEW
    if name in _ALLOCATION_NAMES:
        return ALLOCATION
    return KERNEL


def _extent(t: torch.Tensor) -> int:
    """Bytes addressed by a view: element size x sizes over the dimensions with a stride."""
    n = t.element_size()
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n


def _storage(t: torch.Tensor) -> tuple[Any, int]:
    try:
        storage = t.untyped_storage()
        return storage._cdata, storage.nbytes()
    except (RuntimeError, NotImplementedError):  # no storage (e.g. sparse): the tensor itself
        return id(t), _extent(t)


def traffic(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of a set of tensors: distinct views add up, capped at their storage's size."""
    views: dict[Any, set[tuple]] = defaultdict(set)
    extents: dict[tuple, int] = {}
    caps: dict[Any, int] = {}
    for t in tensors:
        key, cap = _storage(t)
        view = (key, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        views[key].add(view)
        extents[view] = _extent(t)
        caps[key] = cap
    return sum(min(caps[k], sum(extents[v] for v in vs)) for k, vs in views.items())


#: In-place ops that overwrite ``self`` without reading it.
_WRITE_ONLY = {"fill_", "zero_", "copy_", "masked_fill_", "index_fill_", "scatter_", "uniform_",
               "normal_", "random_", "bernoulli_"}  # fmt: skip


def op_bytes(func: Any, args: tuple, kwargs: dict, result: Any) -> int:
    """Bytes read + bytes written by one op (the rule of the module docstring)."""
    name = func.overloadpacket.__name__
    bound = _bound(func, args, kwargs)
    read: list[torch.Tensor] = []
    written = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
    for arg, value in bound:
        tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
        is_self_written = arg.alias_info is not None and arg.alias_info.is_write
        if not arg.is_out and not (is_self_written and name in _WRITE_ONLY):
            read += tensors
        if arg.is_out or is_self_written:
            written += tensors
    total = traffic(read) + traffic(written)
    if name in ("gather", "scatter_", "scatter_add_", "nll_loss_forward", "nll_loss2d_forward"):
        # they touch one element of the source (gather, nll_loss: the target's) / of the
        # destination (scatter_) per index, not the whole tensor; a reducing scatter
        # (scatter_add_, scatter_ with ``reduce``) reads and writes the elements it touches
        values = dict((arg.name, value) for arg, value in bound)
        index = values["target" if name.startswith("nll") else "index"]
        touched = index.numel() * values["self"].element_size()
        whole = traffic([values["self"]])
        reducing = name == "scatter_add_" or (name == "scatter_" and "reduce" in kwargs)
        if not reducing:
            total -= whole - min(whole, touched)
        else:  # counted above: written whole (scatter_), read and written whole (scatter_add_)
            counted = whole if name == "scatter_" else 2 * whole
            total -= counted - 2 * min(whole, touched)
    return total


def _scalar_dummy(t: torch.Tensor) -> Any:
    if t.dtype == torch.bool:
        return False
    if t.is_complex():
        return 0j
    return 0.0 if t.is_floating_point() else 0


def _without_masks(indices: Sequence[Any]) -> list[Any]:
    """Each boolean mask of ``k`` dims replaced by ``k`` empty long indices (no element hit)."""
    out: list[Any] = []
    for i in indices:
        if isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES:
            out += [i.new_empty((0,), dtype=torch.long)] * max(i.dim(), 1)
        else:
            out.append(i)
    return out


def _sync_dummy(func: Any, args: tuple, kwargs: dict) -> Any:
    """A stand-in result for a sync op that ``meta`` cannot compute (data-dependent sizes: 0)."""
    name = func.overloadpacket.__name__
    x = args[0] if args else None
    if name == "_local_scalar_dense":
        return _scalar_dummy(x)
    if name in ("is_nonzero", "equal", "allclose"):
        return False
    if name == "nonzero":
        return x.new_empty((0, x.dim()), dtype=torch.long)
    if name == "masked_select":
        return x.new_empty((0,))
    if name in ("_unique", "_unique2", "unique_consecutive"):
        parts = (x.new_empty((0,)), x.new_zeros(x.shape, dtype=torch.long))
        return parts if name == "_unique" else (*parts, x.new_zeros((0,), dtype=torch.long))
    if name == "bincount":
        size = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
        weights = kwargs.get("weights", args[1] if len(args) > 1 else None)
        dtype = torch.long if weights is None else torch.double
        return x.new_zeros((size,), dtype=dtype)
    if func is torch.ops.aten.repeat_interleave.Tensor:
        return x.new_empty((0,), dtype=torch.long)
    if _mask_indices(func, args):
        return func(args[0], _without_masks(args[1]), *args[2:], **kwargs)
    if name == "_to_copy":
        dtype = kwargs.get("dtype") or x.dtype
        return torch.zeros(x.shape, dtype=dtype, device="cpu")
    if name == "copy_":
        return x
    raise NotImplementedError(f"launches: no stand-in result for the sync op {func} on meta.")


def _storage_key(t: torch.Tensor) -> Optional[int]:
    try:
        return int(t.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError):  # no storage (e.g. sparse)
        return None


class LiveStorages:
    """The storages created by the ops of one step, held by weak references, and their peak.

    ``add(args, result)`` registers each storage an op returns that none of its tensor
    arguments uses (a new allocation); ``live()`` is the bytes of those still alive. A storage
    dies when nothing holds it any more (Python, autograd's saved tensors, the engine): its
    reference count, not a Python object's, decides.
    """

    def __init__(self) -> None:
        self._tracked: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def add(self, args: Any, result: Any) -> int:
        """Register what one op allocated; returns the live bytes after it."""
        used = {_storage_key(t) for t in tree_leaves(args) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(result):
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            if key is None or key in used:
                continue
            known = self._tracked.get(key)
            if known is not None and not known[0].expired():
                continue  # a view (or an in-place result) of a storage made earlier
            storage = t.untyped_storage()
            self._tracked[key] = (StorageWeakRef(storage), storage.nbytes())
        live = self.live()
        self.peak = max(self.peak, live)
        return live

    def live(self) -> int:
        """Bytes of the tracked storages still alive (dead ones are forgotten)."""
        for key in [k for k, (ref, _) in self._tracked.items() if ref.expired()]:
            del self._tracked[key]
        return sum(n for _, n in self._tracked.values())


class LaunchCounter(TorchDispatchMode):
    """Records every op that reaches the dispatcher, with its category, bytes moved and the
    bytes alive after it (``LiveStorages``).

    Syncs that the tensors' device cannot run (``meta``) return a stand-in result instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.storages = LiveStorages()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None
    ) -> Any:
        kwargs = kwargs or {}
        category = classify(func, args, kwargs)
        if category == SYNC:
            try:
                result = func(*args, **kwargs)
            except (RuntimeError, NotImplementedError):
                result = _sync_dummy(func, args, kwargs)
        else:
            result = func(*args, **kwargs)
        moved = op_bytes(func, args, kwargs, result) if category in (KERNEL, SYNC) else 0
        live = self.storages.add((args, kwargs), result)
        node = torch._C._current_autograd_node()
        stage = "forward" if node is None else node.name()
        self.ops.append(Op(str(func).removeprefix("aten."), category, moved, stage, live))
        return result


def summarize(ops: Sequence[Op], logits_bytes: int = 0, peak: Optional[int] = None) -> Counts:
    """Counts of a recorded op list (``peak``: the peak extra memory, if measured)."""
    n = {c: sum(op.category == c for op in ops) for c in (KERNEL, ALLOCATION, VIEW, SYNC)}
    return Counts(
        kernels=n[KERNEL],
        allocations=n[ALLOCATION],
        views=n[VIEW],
        syncs=n[SYNC],
        bytes=sum(op.bytes for op in ops),
        ops=tuple(ops),
        logits_bytes=logits_bytes,
        peak=peak,
    )


def count(fn: Callable[..., Any], *args: Any) -> Counts:
    """Run ``fn(*args)`` under a ``LaunchCounter`` and count what it dispatched and the peak of
    the memory its ops allocated (and, for inputs on a GPU, the kernels the profiler sees the
    device run: ``note``)."""
    counter = LaunchCounter()
    with counter:
        fn(*args)
    counts = summarize(counter.ops, peak=counter.storages.peak)
    if _DEVICE == "cuda":
        counts = counts._replace(note=f"CUDA kernels (profiler): {cuda_kernels(fn, *args)}")
    return counts


_DEVICE = "meta"  # where main() builds the inputs (--device)


def cuda_kernels(fn: Callable[..., Any], *args: Any) -> int:
    """Kernels (and memcpy / memset) the CUDA device runs for one ``fn(*args)``, counted by the
    profiler after one warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def budget_violations(counts: Counts, budget: Budget) -> list[str]:
    """The bounds of ``budget`` that ``counts`` exceeds (empty: within budget)."""
    checks = [
        ("non-view ops", counts.non_view, budget.non_view),
        ("views", counts.views, budget.views),
        ("bytes / logits bytes", counts.bytes_ratio, budget.bytes_ratio),
        ("syncs", counts.syncs, budget.syncs),
        ("peak memory / logits bytes", counts.peak_ratio, budget.peak_ratio),
    ]
    return [
        f"{what} {_num(value)} > {_num(limit)}"
        for what, value, limit in checks
        if value is None or not value <= limit
    ]


def _num(x: Any) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def format_ops(counts: Counts) -> str:
    """The op list as a Markdown table (index, stage, op, category, bytes, live bytes)."""
    lines = [
        "| # | stage | op | category | bytes | x logits | live after, x logits |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: |",
    ]
    logits = counts.logits_bytes or 1
    for i, op in enumerate(counts.ops, 1):
        size = _size(op.bytes)
        ratio = f"{op.bytes / logits:.3f}" if op.bytes else ""
        live = f"{op.live / logits:.3f}"
        lines.append(
            f"| {i} | {op.stage} | `{op.name}` | {op.category} | {size} | {ratio} | {live} |"
        )
    return "\n".join(lines)


# ============================================================================================
# the variants: each builds its inputs, then counts one `loss = f(...); loss.backward()`


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _inputs(shape: Sequence[int], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 logits (B, C, *S) with grad, int64 labels (B, *S), float weight (B, *S)."""
    torch.manual_seed(0)
    b, c, *spatial = shape
    logits = torch.randn(tuple(shape), device=device, requires_grad=True)
    labels = torch.randint(0, c, (b, *spatial), device=device)
    weight = torch.rand((b, *spatial), device=device)
    return logits, labels, weight


def _halves(
    shape: Sequence[int], device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student labeled logits, labels, student unlabeled logits and teacher logits (no grad)."""
    b, c, *spatial = shape
    b_l = max(1, b // 2)
    b_u = max(1, b - b_l)
    zl, labels, _ = _inputs((b_l, c, *spatial), device)
    zu = torch.randn((b_u, c, *spatial), device=device, requires_grad=True)
    zt = torch.randn((b_u, c, *spatial), device=device)
    return zl, labels, zu, zt


def monai(shape: Sequence[int], device: str = "meta") -> Counts:
    """``monai.losses.DiceCELoss(softmax=True, to_onehot_y=True)``: no region weight."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    logits, labels, _ = _inputs(shape, device)

    def step() -> None:
        loss = loss_fn(logits, labels[:, None])
        loss.backward()

    return count(step)._replace(logits_bytes=_nbytes(logits))


def _region(impl: str) -> Callable[..., Counts]:
    def variant(shape: Sequence[int], device: str = "meta") -> Counts:
        from bual_losses import region_ce_dice_loss

        logits, labels, weight = _inputs(shape, device)

        def step() -> None:
            loss = region_ce_dice_loss(logits, labels, weight, impl=impl)
            loss.backward()

        return count(step)._replace(logits_bytes=_nbytes(logits))

    variant.__doc__ = f'``region_ce_dice_loss(logits, labels, weight, impl="{impl}")``.'
    return variant


reference = _region("reference")
fused = _region("auto")  # the default path


def _bidirectional(impl: str) -> Callable[..., Counts]:
    def variant(shape: Sequence[int], device: str = "meta") -> Counts:
        from bual_losses import bidirectional_loss

        zl, labels, zu, zt = _halves(shape, device)

        def step() -> None:
            loss = bidirectional_loss(zl, labels, zu, zt, step=100, total_steps=1000, impl=impl)
            loss.backward()

        return count(step)._replace(logits_bytes=_nbytes(zl, zu))

    variant.__doc__ = f'``bidirectional_loss(zl, y, zu, zt, step=100, impl="{impl}")``.'
    return variant


bidirectional = _bidirectional("auto")  # the default path
bidirectional_reference = _bidirectional("reference")


def monai_plain_bidirectional(shape: Sequence[int], device: str = "meta") -> Counts:
    """``DiceCELoss`` on the labeled half + 0.1 x ``DiceCELoss`` against teacher pseudo-labels."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    zl, labels, zu, zt = _halves(shape, device)

    def step() -> None:
        pseudo = zt.argmax(1, keepdim=True)
        loss = loss_fn(zl, labels[:, None]) + 0.1 * loss_fn(zu, pseudo)
        loss.backward()

    return count(step)._replace(logits_bytes=_nbytes(zl, zu))


_KERNEL_CALL = re.compile(r"^\s*(?:cpp_fused_\w+|triton_\w+)(?:\.run)?\(", re.MULTILINE)
_EXTERN_CALL = re.compile(r"\b(?:extern_kernels|torch\.ops\.aten|aten)\.\w+(?:\.\w+)?\(")
_ALLOC_CALL = re.compile(r"\bempty_strided(?:_cpu|_cuda|_xpu)?\(")
_SYNC_CALL = re.compile(r"\.item\(\)|_local_scalar_dense|\.tolist\(\)")


def _call_bodies(code: str) -> list[str]:
    """The ``call`` functions of one generated wrapper module."""
    bodies = []
    for match in re.finditer(r"^( *)def call\(.*\n((?:\1 .*\n|\s*\n)*)", code, re.MULTILINE):
        bodies.append(match.group(2))
    return bodies


def reference_compile(shape: Sequence[int], device: str = "meta") -> Counts:
    """Kernels of the reference loss under ``torch.compile`` (inductor, CPU, a small shape).

    ``device`` is ignored: inductor cannot compile for ``meta``.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.codegen.cpp import CppScheduling
    from torch._inductor.utils import run_and_get_code

    from bual_losses import region_ce_dice_loss

    side = 16 if len(shape) <= 4 else 8
    small = (2, shape[1], *[side] * (len(shape) - 2))
    logits, labels, weight = _inputs(small, "cpu")

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return region_ce_dice_loss(logits, labels, weight, impl="reference")

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, dynamic=False)

    def step() -> None:
        loss = compiled(logits, labels, weight)
        loss.backward()

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(inductor_config.patch(fx_graph_cache=False, compile_threads=1))
        stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        # one C++ function per fused scheduler node (the unit Triton launches), not per graph
        stack.enter_context(mock.patch.object(CppScheduling, "ready_to_flush", lambda self: True))
        _, codes = run_and_get_code(step)
    seconds = time.perf_counter() - start
    torch._dynamo.reset()
    bodies = [body for code in codes for body in _call_bodies(code)]
    if not bodies:
        raise RuntimeError("no generated wrapper code was captured")
    kernels = sum(len(_KERNEL_CALL.findall(b)) + len(_EXTERN_CALL.findall(b)) for b in bodies)
    note = (
        f"inductor C++ on CPU {small}, {len(bodies)} graphs (forward + backward), "
        f"compiled in {seconds:.0f} s; views, bytes and memory not counted"
    )
    return Counts(
        kernels=kernels,
        allocations=sum(len(_ALLOC_CALL.findall(b)) for b in bodies),
        views=None,
        syncs=sum(len(_SYNC_CALL.findall(b)) for b in bodies),
        bytes=None,
        note=note,
    )


VARIANTS: dict[str, Callable[..., Counts]] = {
    "monai": monai,
    "reference": reference,
    "reference+compile": reference_compile,
    "fused": fused,
    "bidirectional": bidirectional,
    "bidirectional-reference": bidirectional_reference,
    "monai-plain-bidirectional": monai_plain_bidirectional,
}


# ============================================================================================
# the report


def _versions() -> str:
    try:
        import monai as monai_pkg

        monai_version = monai_pkg.__version__
    except ImportError:
        monai_version = "not installed"
    commit = git_commit("bual_losses", length=7)
    return f"torch {torch.__version__}, MONAI {monai_version}, bual_losses at commit {commit}"


def _verdict(counts: Counts, budget: Budget) -> str:
    checks = [
        ("non-view", counts.non_view, budget.non_view, ""),
        ("views", counts.views, budget.views, ""),
        ("bytes", counts.bytes_ratio, budget.bytes_ratio, "x"),
        ("syncs", counts.syncs, budget.syncs, ""),
        ("peak memory", counts.peak_ratio, budget.peak_ratio, "x"),
    ]
    return ", ".join(
        f"{what} {_num(value)}{unit} {'<=' if value is not None and value <= limit else '>'} "
        f"{_num(limit)}{unit}"
        for what, value, limit, unit in checks
    )


def _row(name: str, result: Any) -> str:
    if isinstance(result, str):
        return f"| {name} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | {result} |"
    c: Counts = result
    ratio = "n/a" if math.isnan(c.bytes_ratio) else f"{c.bytes_ratio:.2f}"
    peak = "n/a" if math.isnan(c.peak_ratio) else f"{c.peak_ratio:.2f}"
    return (
        f"| {name} | {c.kernels} | {c.allocations} | {c.non_view} | {_num(c.views)} "
        f"| {c.syncs} | {ratio} | {peak} | {c.note} |"
    )


def report(results: dict[str, dict[str, Any]], seconds: float) -> str:
    """Markdown: a table per shape, budget verdicts, the op lists of the budgeted variants."""
    lines = [
        "# Launch counts: one forward + backward",
        "",
        f"Generated by `benchmarks/launches.py` on {datetime.date.today()} with {_versions()} "
        f"in {seconds:.0f} s. Every ATen op that reaches the dispatcher during "
        "`loss = f(...); loss.backward()` is recorded by a `TorchDispatchMode` on the `meta` "
        "device (no compute; the library's non-CPU path, as on a GPU). Non-view = kernels + "
        "allocation-only ops; bytes = ideal reads + writes of every kernel; peak memory = the "
        "most bytes held at once by the storages the step's ops allocated (the gradient "
        "included); both over the logits' bytes (both halves for the bidirectional rows). "
        "Method: the module docstring.",
    ]
    for shape_name, rows in results.items():
        lines += [
            "",
            f"## {shape_name} {SHAPES[shape_name]}",
            "",
            "| variant | kernels | allocation-only | non-view total | views | syncs "
            "| bytes / logits | peak memory / logits | note |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        lines += [_row(name, result) for name, result in rows.items()]
    budgeted = [s for s, rows in results.items() if any(n in rows for n in BUDGETS)]
    if budgeted:
        lines += ["", "## Budgets", ""]
    for shape_name in budgeted:
        rows = results[shape_name]
        for name, budget in BUDGETS.items():
            if name not in rows:
                continue
            result = rows[name]
            if isinstance(result, str):
                lines.append(f"- {shape_name} `{name}`: FAIL ({result})")
                continue
            bad = budget_violations(result, budget)
            lines.append(
                f"- {shape_name} `{name}`: {'FAIL' if bad else 'PASS'}: {_verdict(result, budget)}"
            )
            if bad and (shape_name, name) in KNOWN_MISSES:
                lines.append(f"  (known: {KNOWN_MISSES[shape_name, name][1]})")
    # the op lists of the budgeted variants at the ACDC shape, and of every recorded miss
    listed = [(OP_LIST_SHAPE, name) for name in BUDGETS] + list(KNOWN_MISSES)
    for shape_name, name in listed:
        result = results.get(shape_name, {}).get(name)
        if isinstance(result, Counts):
            lines += [
                "",
                f"## Op list: `{name}` at {shape_name} {SHAPES[shape_name]}",
                "",
                format_ops(result),
            ]
    return "\n".join(lines) + "\n"


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"`--{what}` must be a comma-separated list of {', '.join(known)}; got {text!r}."
        )
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "launches.md",
        help="Markdown report (default: benchmarks/results/launches.md)",
    )
    parser.add_argument(
        "--shapes",
        type=lambda s: _names(s, list(SHAPES), "shapes"),
        default=list(SHAPES),
        help=f"comma-separated, of {','.join(SHAPES)} (default: all)",
    )
    parser.add_argument(
        "--variants",
        type=lambda s: _names(s, list(VARIANTS), "variants"),
        default=list(VARIANTS),
        help=f"comma-separated, of {','.join(VARIANTS)} (default: all)",
    )
    parser.add_argument(
        "--device",
        choices=["meta", "cuda"],
        default="meta",
        help="meta (default: counts without data) or cuda (the same counts on a GPU, plus the "
        "kernels the profiler sees there, in the note column)",
    )
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])

    global _DEVICE
    _DEVICE = args.device
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for shape_name in args.shapes:
        results[shape_name] = {}
        for name in args.variants:
            try:
                results[shape_name][name] = VARIANTS[name](SHAPES[shape_name], args.device)
            except Exception as exc:  # a failing variant becomes a row saying why
                results[shape_name][name] = f"failed: {type(exc).__name__}: {exc}".replace(
                    "|", "/"
                ).splitlines()[0]
    text = report(results, time.perf_counter() - start)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
