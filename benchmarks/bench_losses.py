r"""Speed and memory of the region CE + Dice loss, ``bidirectional_loss`` and the composable path.

Usage (from the repository root)::

    python benchmarks/bench_losses.py                # CPU, 2 threads: results/cpu-<date>.md
    python benchmarks/bench_losses.py --device cuda  # adds the large 3D shape
    python benchmarks/bench_losses.py --quick --out /tmp/quick.md  # smoke test, tiny shapes

What is measured, per shape, each in its own fresh process (``--start-method``); the region loss
(section ``loss``):

* ``monai``: ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels[:, None])``,
  what users run today (no region weight);
* ``reference``: ``region_ce_dice_loss(logits, labels, weight, impl="reference")``;
* ``reference+compile``: the same function wrapped in ``torch.compile`` (compilation happens in
  one extra call before the warm-ups and is not timed; a compile failure becomes a row saying so);
* ``fused``: ``region_ce_dice_loss(logits, labels, weight, impl="fused")``;
* ``floor``: ``logits.neg()`` under ``torch.no_grad()``: one read of the logits and one write of
  a fresh logits-size tensor (as a gradient is), the memory-traffic floor of any loss + backward.

``weight`` is a random float region weight of shape ``(B, *S)``; labels are int64 ``(B, *S)``.
One timed run is ``loss = f(...); loss.backward()`` (for the floor: ``logits.neg()``), with
``logits.grad = None`` before it (outside the timer). Times: median, min and inter-quartile range
of all timed runs: ``--rounds`` interleaved rounds (default 9) of ``--repeats`` runs (default 5)
after ``--warmup`` runs, each round a fresh process (``time.perf_counter``; CUDA events +
synchronize on CUDA), with the Python garbage collector off while timing.

Peak extra memory is measured in one extra, untimed run after the warm-ups: the peak of the bytes
allocated by torch *during* forward + backward beyond what existed before (logits, labels,
weight and the model already allocated), so it includes the gradient ``logits.grad``.

* **CPU** (``--cpu-memory profiler``, the default): torch has no CPU allocator statistics
  (``torch.cpu`` offers no ``memory_allocated`` / ``max_memory_allocated``), but the profiler with
  ``profile_memory=True`` makes c10's CPU allocator report every allocation and free made while
  it is on (``[memory]`` events with a signed byte count). Sorted by time, their running sum is
  the bytes allocated since the run started; its maximum is the peak. This counts exactly the
  tensors torch allocates (no sampling, no allocator or page-cache noise, frees of older blocks
  ignored); it misses memory outside c10's allocator (oneDNN scratch buffers, malloc inside
  third-party kernels, Python objects). Check: the floor reads 1.00 x logits bytes. The
  profiler only runs in this extra run, never while timing.
  ``--cpu-memory rss`` instead samples the resident set size (``/proc/self/statm``) from a
  thread every ~0.2 ms and reports max minus the value before the run: it sees everything the
  process touches but depends on the C allocator (glibc reuses freed heap pages, so it can
  under-read) and can miss short peaks; use it as a cross-check. (Measured here: for the same
  runs it read 0.3x to 1x of the profiler's bytes for the reference loss, and 6 to 32 MiB for
  MC dropout where the profiler read 29.3 MiB every time.)
* **CUDA**: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` after
  ``torch.cuda.reset_peak_memory_stats()`` (caching-allocator bookkeeping: exact).

``bidirectional_loss``, the call users make (section ``bidirectional``), per shape: the batch is
split ``B_l = B // 2`` labeled and ``B_u = B - B_l`` unlabeled (at least 1 each): student logits
``zl`` ``(B_l, C, *S)`` and ``zu`` ``(B_u, C, *S)`` (both requiring grad), int64 labels ``y``,
teacher logits ``zt`` (no grad). One timed run is forward + backward of

* ``plain``: ``DiceCELoss(to_onehot_y=True, softmax=True)(zl, y[:, None])
  + 0.1 * DiceCELoss(...)(zu, zt.argmax(1, keepdim=True))``, the pseudo-labels computed under
  ``torch.no_grad()`` inside the timed step: what users write today;
* ``bidirectional``: ``bidirectional_loss(zl, y, zu, zt, step=15000, total_steps=30000)`` with
  every default (halfway through UA-MT's ramp: threshold 0.82 of the normalised entropy,
  consistency weight 0.029; the table notes give the region fractions);
* ``bidirectional-reference``: the same with ``impl="reference"``.

Peak extra memory is divided by the bytes of both halves' logits (``zl`` + ``zu``).

The composable path (section ``composable``), per shape, on the whole batch as labeled:

* ``composable``: ``u = entropy_map(z.detach(), from_logits=True)``, ``weight = 1.0 + 1.0 *
  high_uncertainty_mask(u, 0.5)``, ``region_ce_dice_loss(z, y, weight)`` (as the quickstart);
* ``naive``: the same maths in plain eager torch: softmax, normalised entropy and the weight under
  ``no_grad``, weighted CE ``(w * ce).sum() / w.sum()`` and weighted soft Dice per sample and class
  from ``p`` and ``one_hot(y)`` (smoothing 1e-5), mean.

MC dropout (section ``mc``): peak extra memory (and time) of
``bual_losses.uncertainty.mc_dropout_uncertainty(model, x, passes=T)`` for T = 2, 8, 16 on a
tiny U-Net with dropout (defined here) in eval mode, each T in a fresh process; the estimator
streams, so peak(16) / peak(2) must stay within 10 %.

Fresh processes: with ``--start-method forkserver`` (the default) one server process imports
torch, MONAI and bual_losses once (no tensors, no torch thread pool, no CUDA; also
``torch._inductor``, which the profiler's first start imports for seconds) and every measurement
is a new process forked from it, so each starts from the same clean state and nothing (allocator
state, peak counters, compiled code, warm caches) leaks from one variant to the next; ``spawn``
starts each from a new interpreter (slower, same isolation). ``torch.compile`` runs with
``compile_threads = 1`` so no compile-worker pool stays alive while timing. ``--quick`` compiles
with the ``aot_eager`` backend (dynamo + AOTAutograd, forward and backward graphs, no code
generation) so that a smoke run does not spend a minute in a cold inductor compile; pass
``--compile-backend inductor`` to smoke-test inductor too.

Output: a Markdown table per section and shape (variant, median / min / IQR ms, peak extra MiB,
peak / logits bytes, time ratios: vs reference, MONAI and the floor; vs ``plain``; vs ``naive``),
the MC-dropout table and one verdict line per target, computed from the numbers: fused <= 0.45 x
reference time and <= 0.8 x MONAI time; fused peak extra <= 1.5 x logits bytes; default
``bidirectional_loss`` <= 0.5 x ``plain`` time and peak extra <= 1.5 x the logits of both halves;
``composable`` <= 0.6 x ``naive`` time; MC dropout peak(16) / peak(2) within 10 %. Printed and
written to ``--out`` (default ``benchmarks/results/<device>-<date>.md``; ``--quick`` runs get a
``-quick`` suffix). ``--json`` also writes the raw measurements. ``--sections
loss,bidirectional,composable,mc`` (default: all) and ``--variants`` select what runs.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402  (after the path above)

VARIANTS = ("monai", "reference", "reference+compile", "fused", "floor")
BIDIRECTIONAL_VARIANTS = ("plain", "bidirectional", "bidirectional-reference")
COMPOSABLE_VARIANTS = ("naive", "composable")
MC_PASSES = (2, 8, 16)
# bidirectional_loss(..., step=BIDI_STEP, total_steps=BIDI_TOTAL): halfway through UA-MT's ramp,
# the default threshold is 0.82 (normalised entropy) and lambda 0.1 * exp(-5 * 0.5 ** 2)
BIDI_STEP, BIDI_TOTAL = 15000, 30000
COMPOSABLE_TAU = 0.5


class Section(NamedTuple):
    """One table per shape: its variants, ratio columns and a pair that must agree."""

    title: str
    variants: tuple[str, ...]
    vs: tuple[str, ...]  # "vs X" columns: median time of the row / median time of X
    same: tuple[str, str]  # these two variants compute the same loss
    loss_note: str


SECTIONS: dict[str, Section] = {
    "loss": Section(
        "",
        VARIANTS,
        ("reference", "monai", "floor"),
        ("fused", "reference"),
        "MONAI has no region weight",
    ),
    "bidirectional": Section(
        "bidirectional_loss, ",
        BIDIRECTIONAL_VARIANTS,
        ("plain",),
        ("bidirectional", "bidirectional-reference"),
        "`plain` has no regions and a fixed 0.1 consistency weight",
    ),
    "composable": Section(
        "composable path, ", COMPOSABLE_VARIANTS, ("naive",), ("composable", "naive"), "equal maths"
    ),
}
SECTION_NAMES = (*SECTIONS, "mc")
MIB = 1 << 20

# name -> (title, (B, C, *S)); "cuda_only" shapes run only with --device cuda
SHAPES: dict[str, tuple[str, tuple[int, ...]]] = {
    "acdc-2d": ("ACDC-like 2D", (24, 4, 256, 256)),
    "la-3d": ("LA-like 3D", (4, 2, 112, 112, 80)),
    "large-3d": ("large 3D (CUDA only)", (2, 4, 160, 160, 128)),
}
QUICK_SHAPES: dict[str, tuple[int, ...]] = {
    "acdc-2d": (2, 4, 32, 32),
    "la-3d": (1, 2, 16, 16, 8),
    "large-3d": (1, 4, 16, 16, 16),
}
CUDA_ONLY = ("large-3d",)
MC_INPUT = (4, 1, 128, 128)
MC_QUICK_INPUT = (2, 1, 32, 32)
MC_CLASSES = 4

TARGETS = {
    "fused_vs_reference": 0.45,
    "fused_vs_monai": 0.8,
    "fused_peak_vs_logits": 1.5,
    "bidirectional_vs_plain": 0.5,
    "bidirectional_peak_vs_logits": 1.5,
    "composable_vs_naive": 0.6,
    "mc_flat": 0.10,
}

# on a GPU (issue #12): launch-bound, so the default path must beat MONAI by 2x and the compiled
# reference; the accelerator engine may hold up to 3x the logits; bidirectional_loss (both
# branches) at most 1.5x one MONAI DiceCELoss on the whole batch
CUDA_TARGETS = {
    "fused_vs_monai": 0.5,
    "fused_vs_compiled": 1.0,
    "fused_peak_vs_logits": 3.0,
    "bidirectional_vs_monai": 1.5,
}

# imported once by the forkserver; torch._inductor is also what the profiler's first start imports
PRELOAD = [
    "torch",
    "torch.profiler",
    "torch._inductor.config",
    "bual_losses.losses",
    "bual_losses.fused",
    "bual_losses.uncertainty",
]


# ============================================================================================
# child side: one measurement per process


def _tiny_unet(classes: int) -> Any:
    """A two-level U-Net (16/32 channels) with BatchNorm and two Dropout2d layers."""
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )

    class TinyUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc1, self.enc2 = block(1, 16), block(16, 32)
            self.pool = nn.MaxPool2d(2)
            self.drop_mid, self.drop_out = nn.Dropout2d(0.5), nn.Dropout2d(0.3)
            self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
            self.dec = block(32, 16)
            self.head = nn.Conv2d(16, classes, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e1 = self.enc1(x)
            e2 = self.drop_mid(self.enc2(self.pool(e1)))
            d = self.dec(torch.cat([self.up(e2), e1], dim=1))
            return self.head(self.drop_out(d))

    return TinyUNet()


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _peak_profiler(run: Callable[[], Any]) -> int:
    """Peak of the running sum of c10 CPU allocations/frees recorded by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())  # stable: equal stamps keep their recorded order
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss(run: Callable[[], Any]) -> int:
    """Max RSS sampled from a thread during ``run`` minus RSS before it."""
    gc.collect()
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = run()
        peak[0] = max(peak[0], _rss_bytes())
        del out
    finally:
        done.set()
        sampler.join()
    return max(0, peak[0] - base)


def _peak_cuda(run: Callable[[], Any]) -> int:
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def _measure(
    step: Callable[[], Any], reset: Callable[[], None], task: dict[str, Any]
) -> dict[str, Any]:
    """Warm-ups, one untimed peak-memory run, then the timed runs."""
    import torch

    device = task["device"]
    # everything imported or built so far is permanent: later gc.collect() calls stay cheap
    gc.freeze()
    p0 = time.perf_counter()
    for _ in range(task["warmup"]):
        reset()
        out = step()
        del out
    _sync(device)

    p1 = time.perf_counter()
    reset()
    gc.collect()
    if device == "cuda":
        peak = _peak_cuda(step)
    elif task["cpu_memory"] == "rss":
        peak = _peak_rss(step)
    else:
        peak = _peak_profiler(step)

    p2 = time.perf_counter()
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(task["repeats"]):
            reset()
            if device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                out = step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = step()
                times.append((time.perf_counter() - t0) * 1e3)
            del out
    finally:
        gc.enable()
    phases = {"warmup": p1 - p0, "memory": p2 - p1, "timed": time.perf_counter() - p2}
    return {"times_ms": times, "peak_bytes": int(peak), "phase_s": phases}


def _split(batch: int) -> tuple[int, int]:
    """Labeled and unlabeled batch sizes of the bidirectional section (at least 1 each)."""
    labeled = max(1, batch // 2)
    return labeled, max(1, batch - labeled)


def _loss_fn(variant: str, x: dict[str, Any], task: dict[str, Any], notes: list[str]) -> Any:
    """The loss of ``variant`` as a closure over the inputs ``x``; ``None`` for the floor."""
    import torch

    if variant in ("monai", "plain"):
        from monai.losses import DiceCELoss

        monai_loss = DiceCELoss(to_onehot_y=True, softmax=True)
        if variant == "monai":
            labels1 = x["labels"][:, None]
            return lambda: monai_loss(x["logits"], labels1)

        def plain() -> torch.Tensor:
            with torch.no_grad():
                pseudo = x["zt"].argmax(1, keepdim=True)
            return monai_loss(x["zl"], x["y"][:, None]) + 0.1 * monai_loss(x["zu"], pseudo)

        return plain

    if variant in ("bidirectional", "bidirectional-reference"):
        from bual_losses import bidirectional_loss

        opts: dict[str, Any] = {"impl": "reference"} if variant == "bidirectional-reference" else {}
        return lambda **kw: bidirectional_loss(
            x["zl"], x["y"], x["zu"], x["zt"], step=BIDI_STEP, total_steps=BIDI_TOTAL, **opts, **kw
        )

    if variant == "composable":
        from bual_losses import entropy_map, high_uncertainty_mask, region_ce_dice_loss

        def composable() -> torch.Tensor:
            u = entropy_map(x["logits"].detach(), from_logits=True)
            weight = 1.0 + 1.0 * high_uncertainty_mask(u, COMPOSABLE_TAU)
            return region_ce_dice_loss(x["logits"], x["labels"], weight)

        return composable

    if variant == "naive":
        import math

        import torch.nn.functional as F

        def naive() -> torch.Tensor:
            z, y = x["logits"], x["labels"]
            p = z.softmax(1)
            with torch.no_grad():
                u = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(z.shape[1])
                w = 1 + (u > COMPOSABLE_TAU).float()
            ce = (w * F.cross_entropy(z, y, reduction="none")).sum() / w.sum()
            g = F.one_hot(y, z.shape[1]).movedim(-1, 1).to(p.dtype)
            w = w[:, None]
            dims = tuple(range(2, z.ndim))
            inter = (w * p * g).sum(dims)
            dice = 1 - (2 * inter + 1e-5) / ((w * p).sum(dims) + (w * g).sum(dims) + 1e-5)
            return ce + dice.mean()

        return naive

    if variant in ("reference", "fused", "reference+compile"):
        from bual_losses.losses import region_ce_dice_loss

        impl = "fused" if variant == "fused" else "reference"

        def region(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return region_ce_dice_loss(z, y, w, impl=impl)

        fn = region
        if variant == "reference+compile":
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = 1
            try:
                fn = torch.compile(region, backend=task["compile_backend"])
            except Exception as exc:
                raise RuntimeError(f"torch.compile failed: {type(exc).__name__}: {exc}") from exc
            notes.append(f"torch.compile backend: {task['compile_backend']}")
        return lambda: fn(x["logits"], x["labels"], x["weight"])

    if variant == "floor":
        return None
    raise ValueError(f"unknown variant {variant!r}")


def _loss_task(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    device, variant = task["device"], task["variant"]
    shape = tuple(task["shape"])
    bsz, channels, spatial = shape[0], shape[1], shape[2:]
    g = torch.Generator().manual_seed(task["seed"])

    def logits(b: int, grad: bool = True) -> torch.Tensor:
        return torch.randn((b, channels, *spatial), generator=g).to(device).requires_grad_(grad)

    def labels(b: int) -> torch.Tensor:
        return torch.randint(0, channels, (b, *spatial), generator=g).to(device)

    if task["section"] == "bidirectional":
        b_l, b_u = _split(bsz)
        x = {"zl": logits(b_l), "y": labels(b_l), "zu": logits(b_u), "zt": logits(b_u, False)}
        leaves = [x["zl"], x["zu"]]
    else:
        x = {"logits": logits(bsz), "labels": labels(bsz)}
        x["weight"] = torch.rand((bsz, *spatial), generator=g).to(device)
        leaves = [x["logits"]]
    notes: list[str] = []
    loss_fn = _loss_fn(variant, x, task, notes)

    if loss_fn is None:

        def step() -> Any:
            with torch.no_grad():
                return x["logits"].neg()

    else:

        def step() -> Any:
            loss = loss_fn()
            loss.backward()
            return loss.detach()

    def reset() -> None:
        for leaf in leaves:
            leaf.grad = None

    if variant == "reference+compile":
        # compile errors surface at the first call: report them as such
        try:
            reset()
            step()
        except Exception as exc:
            raise RuntimeError(f"torch.compile failed: {type(exc).__name__}: {exc}") from exc
        from torch._dynamo.utils import counters

        graphs_before = counters["stats"]["unique_graphs"]

    res = _measure(step, reset, task)

    if variant == "reference+compile":
        breaks = sum(counters["graph_break"].values())
        graphs = counters["stats"]["unique_graphs"]
        notes.append(f"compiled graphs: {graphs}, graph breaks: {breaks}")
        if graphs != graphs_before:
            notes.append(f"recompiled after the first call ({graphs_before} -> {graphs} graphs)")
    if loss_fn is not None:
        reset()
        with torch.no_grad():
            res["loss"] = float(loss_fn())
    # untimed: how large the regions of the measured call are
    if variant == "bidirectional":
        with torch.no_grad():
            _, parts = loss_fn(return_parts=True)
        notes.append(
            f"step {BIDI_STEP} of {BIDI_TOTAL}: labeled high fraction "
            f"{float(parts.labeled_high_fraction):.3f}, unlabeled low fraction "
            f"{float(parts.unlabeled_low_fraction):.3f}, consistency weight "
            f"{float(parts.consistency_weight):.4f}"
        )
    elif variant == "composable":
        from bual_losses import entropy_map

        u = entropy_map(x["logits"].detach(), from_logits=True)
        high = float((u > COMPOSABLE_TAU).float().mean())
        notes.append(f"high-uncertainty fraction (u > {COMPOSABLE_TAU}): {high:.3f}")
    res["logits_bytes"] = sum(leaf.numel() * leaf.element_size() for leaf in leaves)
    res["notes"] = notes
    return res


def _mc_task(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bual_losses.uncertainty import mc_dropout_uncertainty

    device, passes = task["device"], task["passes"]
    torch.manual_seed(task["seed"])
    model = _tiny_unet(MC_CLASSES).to(device).eval()
    x = torch.randn(tuple(task["shape"]), generator=torch.Generator().manual_seed(1)).to(device)

    def step() -> Any:
        return mc_dropout_uncertainty(model, x, passes=passes)

    res = _measure(step, lambda: None, task)
    b, _, *spatial = task["shape"]
    numel = b * MC_CLASSES
    for s in spatial:
        numel *= s
    res["logits_bytes"] = numel * 4
    res["notes"] = []
    return res


def _info_task(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    import bual_losses

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "bual_losses": bual_losses.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except Exception as exc:  # reported in the header, the monai row shows the error
        info["monai"] = f"not importable ({type(exc).__name__})"
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        info["cpu_capability"] = "?"
    if task["device"] == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _child(task: dict[str, Any], conn: Any) -> None:
    """Entry point of every measurement process; stdout/stderr go to ``task['log']``."""
    log = open(task["log"], "w")  # kept open until the process ends
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        import torch

        torch.set_num_threads(task["threads"])
        kind = task["kind"]
        if kind == "info":
            res = _info_task(task)
        elif kind == "loss":
            res = _loss_task(task)
        else:
            res = _mc_task(task)
        res["ok"] = True
    except BaseException as exc:
        res = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    sys.stdout.flush()
    sys.stderr.flush()
    conn.send(res)
    conn.close()


# ============================================================================================
# parent side: schedule processes, summarise, format


def _run_in_process(ctx: Any, task: dict[str, Any], timeout: float) -> dict[str, Any]:
    fd, log = tempfile.mkstemp(prefix="bual-bench-", suffix=".log")
    os.close(fd)
    task = {**task, "log": log}
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(task, send), daemon=True)
    proc.start()
    send.close()
    res: Optional[dict[str, Any]] = None

    def receive(wait: float) -> Optional[dict[str, Any]]:
        try:
            return recv.recv() if recv.poll(wait) else None
        except EOFError:  # the process ended without sending
            return None

    try:
        res = receive(timeout)
        timed_out = res is None and proc.is_alive()
        proc.join(10 if res is not None else 0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if res is None:
            tail = Path(log).read_text(errors="replace")[-2000:]
            why = (
                f"timed out after {timeout:g} s"
                if timed_out
                else f"process died (exit code {proc.exitcode})"
            )
            res = {"ok": False, "error": why, "traceback": tail}
    finally:
        recv.close()
        os.unlink(log)
    return res


def _summary(times: list[float]) -> dict[str, float]:
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return {"median": statistics.median(times), "min": min(times), "iqr": q3 - q1}


def _fmt(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    a = abs(x)
    digits = 1 if a >= 100 else 2 if a >= 1 else 3 if a >= 0.01 else 4
    return f"{x:.{digits}f}{unit}"


def _cell(text: str, limit: int = 140) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ratio(a: Optional[dict[str, Any]], b: Optional[dict[str, Any]]) -> Optional[float]:
    if not a or not b or not a.get("ok") or not b.get("ok"):
        return None
    return a["stats"]["median"] / b["stats"]["median"]


def _git() -> str:
    return git_commit()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def _header(
    args: argparse.Namespace, info: dict[str, Any], started: datetime.datetime, load: str
) -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    memory = (
        "CUDA caching allocator: max_memory_allocated() - memory_allocated() after "
        "reset_peak_memory_stats()"
        if args.device == "cuda"
        else "torch profiler (profile_memory=True): peak running sum of the c10 CPU "
        "allocator's alloc/free events during the run"
        if args.cpu_memory == "profiler"
        else "RSS sampled from /proc/self/statm every ~0.2 ms, max minus before the run"
    )
    timer = "CUDA events" if args.device == "cuda" else "time.perf_counter"
    lines = [
        f"# bual_losses loss benchmark: {args.device}, {started:%Y-%m-%d}",
        "",
    ]
    if args.quick:
        lines += ["> **Quick smoke run** (tiny shapes, few repeats): the numbers mean nothing.", ""]
    lines += [
        f"- command: `{command}`",
        f"- date: {started:%Y-%m-%d %H:%M:%S %Z}".rstrip(),
        f"- git commit: {_git()}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores ({usable} usable), "
        f"{platform.system()} {platform.release()}, CPU capability {info.get('cpu_capability')}",
        f"- load average (1, 5, 15 min) at start: {load}",
    ]
    if args.device == "cuda":
        lines.append(f"- device: {info.get('device_name', '?')} (CUDA {info.get('cuda', '?')})")
    else:
        lines.append("- device: cpu")
    lines += [
        f"- python {info.get('python')}, torch {info.get('torch')}, monai {info.get('monai')}, "
        f"bual_losses {info.get('bual_losses')}; torch threads: {args.threads}",
        f"- timing: forward + backward, median / min / IQR of {args.rounds} interleaved rounds x "
        f"{args.repeats} runs after {args.warmup} warm-ups ({timer}); every round of every "
        f"variant in a fresh process ({args.start_method})",
        f"- peak extra memory: {memory}; beyond logits, labels and weight, gradient included",
        "- `floor`: `logits.neg()` without autograd (one read + one write of logits-size); "
        "region weight: random float (B, *S) for reference / compile / fused, none for MONAI; "
        f"`reference+compile`: torch.compile backend {args.compile_backend}",
        "- ratios: median time of the row / median time of the named variant; "
        "peak / logits: peak extra bytes / logits bytes",
    ]
    if "bidirectional" in args.sections:
        lines.append(
            "- `bidirectional_loss` tables: batch split B_l = B // 2 labeled, the rest "
            "unlabeled; `plain`: `DiceCELoss(zl, y) + 0.1 * DiceCELoss(zu, argmax(zt))`; "
            f"`bidirectional(-reference)`: defaults (impl auto / reference), step {BIDI_STEP} "
            f"of total_steps {BIDI_TOTAL}; peak / logits: of both halves (zl + zu)"
        )
    if "composable" in args.sections:
        lines.append(
            "- composable-path tables: `entropy_map` -> `high_uncertainty_mask(u, "
            f"{COMPOSABLE_TAU})` -> `region_ce_dice_loss(z, y, 1 + mask)` vs the same maths "
            "in plain eager torch (`naive`)"
        )
    return "\n".join(lines)


def _shape_table(
    section: str, name: str, shape: tuple[int, ...], rows: dict[str, dict[str, Any]]
) -> str:
    spec = SECTIONS[section]
    if section == "bidirectional":
        b_l, b_u = _split(shape[0])
        what = f"labeled {(b_l, *shape[1:])} + unlabeled {(b_u, *shape[1:])}"
        logits_mb = 4 * _numel(shape[1:]) * (b_l + b_u) / MIB
    else:
        what, logits_mb = f"logits {tuple(shape)}", 4 * _numel(shape) / MIB
    vs = "".join(f" vs {v} |" for v in spec.vs)
    lines = [
        f"## {spec.title}{SHAPES[name][0]}: {what} float32 ({_fmt(logits_mb)} MiB)",
        "",
        f"| variant | median ms | min ms | IQR ms | peak extra MiB | peak / logits |{vs}",
        "|---|" + "--:|" * (5 + len(spec.vs)),
    ]
    notes = []
    for variant in rows:
        r = rows[variant]
        if not r.get("ok"):
            dashes = " - |" * (4 + len(spec.vs))
            lines.append(f"| `{variant}` | failed: {_cell(r['error'])} |{dashes}")
            continue
        s = r["stats"]
        ratios = "".join(f" {_fmt(_ratio(r, rows.get(v)))} |" for v in spec.vs)
        lines.append(
            f"| `{variant}` | {_fmt(s['median'])} | {_fmt(s['min'])} | {_fmt(s['iqr'])} "
            f"| {_fmt(r['peak_bytes'] / MIB)} | {_fmt(r['peak_bytes'] / r['logits_bytes'])} "
            f"|{ratios}"
        )
        notes += [f"`{variant}`: {n}" for n in r.get("notes", [])]
    losses = [f"`{v}` {r['loss']:.6g}" for v, r in rows.items() if r.get("ok") and "loss" in r]
    if losses:
        notes.append(f"loss values (same inputs; {spec.loss_note}): " + ", ".join(losses))
    a, b = (rows.get(v, {}) for v in spec.same)
    if "loss" in a and "loss" in b:
        rel = abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-12)
        if rel > 1e-4:
            notes.append(f"**{spec.same[0]} and {spec.same[1]} losses differ by {rel:.2e}**")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def _mc_table(shape: tuple[int, ...], rows: dict[int, dict[str, Any]]) -> str:
    lines = [
        f"## MC-dropout uncertainty: tiny U-Net, input {tuple(shape)}, {MC_CLASSES} classes",
        "",
        "`mc_dropout_uncertainty(model, x, passes=T)` on an eval-mode 2-level U-Net with "
        "BatchNorm and two Dropout2d layers; peak extra memory includes the activations of one "
        "forward and the returned estimate.",
        "",
        "| passes | median ms | min ms | IQR ms | peak extra MiB | peak / one-pass logits "
        "| peak vs passes=2 |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    base = rows.get(MC_PASSES[0], {})
    for passes, r in rows.items():
        if not r.get("ok"):
            lines.append(f"| {passes} | failed: {_cell(r['error'])} | - | - | - | - | - |")
            continue
        s = r["stats"]
        vs = r["peak_bytes"] / base["peak_bytes"] if base.get("ok") and base["peak_bytes"] else None
        lines.append(
            f"| {passes} | {_fmt(s['median'])} | {_fmt(s['min'])} | {_fmt(s['iqr'])} "
            f"| {_fmt(r['peak_bytes'] / MIB)} | {_fmt(r['peak_bytes'] / r['logits_bytes'])} "
            f"| {_fmt(vs)} |"
        )
    return "\n".join(lines)


def _verdict(label: str, target: str, values: list[tuple[str, Optional[float]]], ok: Any) -> str:
    missing = [name for name, v in values if v is None]
    shown = ", ".join(f"{name} {v:.3f}" for name, v in values if v is not None)
    if not values or len(missing) == len(values):
        return f"- N/A {label} ({target}): not measured"
    status = "PASS" if not missing and all(ok(v) for _, v in values) else "FAIL"
    extra = f"; not measured: {', '.join(missing)}" if missing else ""
    return f"- {status} {label} ({target}): {shown}{extra}"


def _time_ratios(
    rows: dict[str, dict[str, dict[str, Any]]], variant: str, base: str
) -> list[tuple[str, Optional[float]]]:
    """Per shape: median time of ``variant`` / median time of ``base`` (where both ran)."""
    return [(s, _ratio(r[variant], r[base])) for s, r in rows.items() if variant in r and base in r]


def _peaks(
    rows: dict[str, dict[str, dict[str, Any]]], variant: str
) -> list[tuple[str, Optional[float]]]:
    """Per shape: peak extra bytes of ``variant`` / its logits bytes."""
    return [
        (s, r[variant]["peak_bytes"] / r[variant]["logits_bytes"] if r[variant].get("ok") else None)
        for s, r in rows.items()
        if variant in r
    ]


def _verdicts(
    rows: dict[str, dict[str, dict[str, dict[str, Any]]]],
    mc_rows: dict[int, dict[str, Any]],
    device: str = "cpu",
) -> str:
    t = dict(TARGETS)
    loss, bidi, comp = (rows.get(s, {}) for s in ("loss", "bidirectional", "composable"))
    gpu_checks = []
    if device == "cuda":
        t.update({f"cuda_{k}": v for k, v in CUDA_TARGETS.items()})
        bidi_vs_monai = [
            (s, _ratio(bidi[s].get("bidirectional"), loss[s].get("monai")))
            for s in bidi
            if s in loss
        ]
        gpu_checks = [
            (
                "GPU: fused time vs MONAI",
                "cuda_fused_vs_monai",
                _time_ratios(loss, "fused", "monai"),
            ),
            (
                "GPU: fused time vs compiled reference",
                "cuda_fused_vs_compiled",
                _time_ratios(loss, "fused", "reference+compile"),
            ),
            (
                "GPU: fused peak extra / logits bytes",
                "cuda_fused_peak_vs_logits",
                _peaks(loss, "fused"),
            ),
            (
                "GPU: bidirectional_loss time vs one MONAI DiceCELoss (whole batch)",
                "cuda_bidirectional_vs_monai",
                bidi_vs_monai,
            ),
        ]
    checks = [
        ("fused time vs reference", "fused_vs_reference", _time_ratios(loss, "fused", "reference")),
        ("fused time vs MONAI", "fused_vs_monai", _time_ratios(loss, "fused", "monai")),
        ("fused peak extra / logits bytes", "fused_peak_vs_logits", _peaks(loss, "fused")),
        (
            "bidirectional_loss time vs plain MONAI",
            "bidirectional_vs_plain",
            _time_ratios(bidi, "bidirectional", "plain"),
        ),
        (
            "bidirectional_loss peak extra / logits bytes of both halves",
            "bidirectional_peak_vs_logits",
            _peaks(bidi, "bidirectional"),
        ),
        (
            "composable path time vs naive eager",
            "composable_vs_naive",
            _time_ratios(comp, "composable", "naive"),
        ),
        *gpu_checks,
    ]
    mc: list[tuple[str, Optional[float]]] = []
    lo, hi = mc_rows.get(MC_PASSES[0]), mc_rows.get(MC_PASSES[-1])
    if lo is not None and hi is not None:
        good = lo.get("ok") and hi.get("ok") and lo["peak_bytes"] > 0
        mc.append(
            (
                f"peak({MC_PASSES[-1]}) / peak({MC_PASSES[0]})",
                hi["peak_bytes"] / lo["peak_bytes"] if good else None,
            )
        )
    lines = ["## Verdicts (computed from the numbers above)", ""]
    lines += [
        _verdict(label, f"<= {t[key]}", values, lambda v, limit=t[key]: v <= limit)
        for label, key, values in checks
    ]
    lines.append(
        _verdict(
            "MC-dropout memory flat in passes",
            f"within {t['mc_flat']:.0%}",
            mc,
            lambda v: abs(v - 1) <= t["mc_flat"],
        )
    )
    return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _names(text: str, allowed: Any, what: str, p: argparse.ArgumentParser) -> list[str]:
    """The comma-separated names in ``text``, all in ``allowed`` (else a usage error)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        p.error(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return names


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Forward + backward time and peak extra memory of the region CE + Dice "
        "loss (fused, reference, compiled reference) against MONAI and a memory-traffic floor, "
        "plus MC-dropout memory vs passes. Every measurement runs in a fresh process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each run")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed runs per round (default 5; quick 2)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compile here)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats: a smoke test")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds of fresh processes per variant (default 9; quick 1)",
    )
    p.add_argument("--out", type=Path, default=None, help="Markdown output file")
    p.add_argument("--json", type=Path, default=None, help="also write raw results as JSON")
    p.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated subset of {','.join(SHAPES)} (large-3d on CUDA only)",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTION_NAMES),
        help="comma-separated subset: loss (region loss variants), bidirectional "
        "(bidirectional_loss vs plain MONAI), composable (public pieces vs naive eager), "
        "mc (MC dropout)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of the selected sections' variants (default: all); "
        "a section left without variants is skipped",
    )
    p.add_argument("--no-mc", action="store_true", help="skip the MC-dropout measurements")
    p.add_argument(
        "--cpu-memory",
        choices=("profiler", "rss"),
        default="profiler",
        help="CPU peak-memory method (see the module docstring)",
    )
    p.add_argument(
        "--start-method",
        choices=("forkserver", "spawn"),
        default="forkserver",
        help="how each fresh measurement process starts",
    )
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend of reference+compile (default inductor; with --quick "
        "aot_eager, which traces forward and backward but skips code generation)",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.rounds is None:
        args.rounds = 1 if args.quick else 9
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.quick else "inductor"
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    sections = _names(args.sections, SECTION_NAMES, "sections", p)
    everything = [v for spec in SECTIONS.values() for v in spec.variants]
    variants = (
        everything if args.variants is None else _names(args.variants, everything, "variants", p)
    )
    # section -> its selected variants, in table order
    args.variants = {
        name: [v for v in spec.variants if v in variants]
        for name, spec in SECTIONS.items()
        if name in sections
    }
    args.variants = {name: vs for name, vs in args.variants.items() if vs}
    args.sections = [*args.variants] + (["mc"] if "mc" in sections and not args.no_mc else [])
    if not args.sections:
        p.error("--sections / --variants / --no-mc leave nothing to run")
    default_shapes = [s for s in SHAPES if args.device == "cuda" or s not in CUDA_ONLY]
    shapes = default_shapes if args.shapes is None else _names(args.shapes, SHAPES, "shapes", p)
    if args.device != "cuda" and any(s in CUDA_ONLY for s in shapes):
        p.error(f"shapes {list(CUDA_ONLY)} run on --device cuda only")
    args.shapes = shapes
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    started = datetime.datetime.now().astimezone()
    if args.out is None:
        suffix = "-quick" if args.quick else ""
        name = f"{args.device}-{started:%Y-%m-%d}{suffix}.md"
        args.out = REPO / "benchmarks" / "results" / name

    ctx = mp.get_context(args.start_method)
    if args.start_method == "forkserver":
        selected = {v for vs in args.variants.values() for v in vs}
        ctx.set_forkserver_preload(
            PRELOAD + (["monai.losses"] if {"monai", "plain"} & selected else [])
        )
    base = {
        "device": args.device,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "cpu_memory": args.cpu_memory,
        "compile_backend": args.compile_backend,
        "seed": args.seed,
    }

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    load_start = _loadavg()
    # the first process also starts the forkserver (imports): give it time
    info = _run_in_process(ctx, {**base, "kind": "info"}, max(args.timeout, 600))
    if not info.get("ok"):
        log(f"cannot start a measurement process: {info['error']}\n{info.get('traceback', '')}")
        return 2
    if args.device == "cuda" and not info["cuda_available"]:
        log("--device cuda: torch.cuda.is_available() is False in this environment")
        return 2

    shape_of = QUICK_SHAPES if args.quick else {k: v[1] for k, v in SHAPES.items()}
    mc_shape = MC_QUICK_INPUT if args.quick else MC_INPUT
    # Rounds: every variant runs once per round, in a fresh process each time, and the rounds
    # are interleaved, so a burst of load from a noisy neighbour hits all variants alike
    # instead of whichever happened to run then; each row pools the timings of all rounds.
    # Measured here: such bursts last tens of seconds and can double one variant's times for a
    # whole round, so the default takes many short rounds (9 x 5 runs): a burst then holds a
    # small share of a row's runs, below what moves its median.
    jobs: list[tuple[str, dict[str, Any]]] = [
        (
            f"{section} {shape} {variant} (round {rnd + 1}/{args.rounds})",
            {
                "kind": "loss",
                "section": section,
                "name": shape,
                "variant": variant,
                "shape": shape_of[shape],
            },
        )
        for section, variants in args.variants.items()
        for shape in args.shapes
        for rnd in range(args.rounds)
        for variant in variants
    ]
    if "mc" in args.sections:
        jobs += [
            (f"mc-dropout passes={p}", {"kind": "mc", "passes": p, "shape": mc_shape})
            for p in MC_PASSES
        ]
    # section -> shape -> variant -> result
    loss_rows: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
        section: {shape: {} for shape in args.shapes} for section in args.variants
    }
    mc_rows: dict[int, dict[str, Any]] = {}
    for i, (label, job) in enumerate(jobs, 1):
        t0 = time.perf_counter()
        r = _run_in_process(ctx, {**base, **job, "shape": list(job["shape"])}, args.timeout)
        r["process_s"] = time.perf_counter() - t0
        if r.get("ok"):
            r["stats"] = _summary(r["times_ms"])
            s = r["stats"]
            what = f"median {_fmt(s['median'])} ms, peak {_fmt(r['peak_bytes'] / MIB)} MiB"
        else:
            what = f"FAILED: {r['error'][:200]}"
        log(f"[{i}/{len(jobs)}] {label}: {what} ({r['process_s']:.1f} s)")
        if job["kind"] == "loss":
            rows = loss_rows[job["section"]][job["name"]]
            previous = rows.get(job["variant"])
            if previous is not None and previous.get("ok") and r.get("ok"):
                r["times_ms"] = previous["times_ms"] + r["times_ms"]
                r["peak_bytes"] = max(previous["peak_bytes"], r["peak_bytes"])
                r["stats"] = _summary(r["times_ms"])
            if previous is None or r.get("ok") or not previous.get("ok"):
                rows[job["variant"]] = r
        else:
            mc_rows[job["passes"]] = r

    parts = [_header(args, info, started, load_start)]
    parts += [
        _shape_table(section, s, shape_of[s], rows)
        for section, by_shape in loss_rows.items()
        for s, rows in by_shape.items()
    ]
    if mc_rows:
        parts.append(_mc_table(mc_shape, mc_rows))
    parts.append(_verdicts(loss_rows, mc_rows, args.device))
    failures = [
        f"{section} {s} {v}: {r['error']}\n{r.get('traceback', '')}"
        for section, by_shape in loss_rows.items()
        for s, rows in by_shape.items()
        for v, r in rows.items()
        if not r.get("ok")
    ] + [
        f"mc passes={p}: {r['error']}\n{r.get('traceback', '')}"
        for p, r in mc_rows.items()
        if not r.get("ok")
    ]
    wall = time.perf_counter() - t_start
    parts.append(f"_load average (1, 5, 15 min) at end: {_loadavg()}; wall time {wall:.0f} s_")
    report = "\n\n".join(parts) + "\n"
    print(report)
    for f in failures:
        log(f"---- failure ----\n{f.rstrip()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    log(f"wrote {args.out}")
    if args.json is not None:
        raw = {"info": info, "args": {k: str(v) for k, v in vars(args).items()}}
        raw.update(loss_rows)  # "loss", "bidirectional", "composable"
        raw["mc_dropout"] = {str(k): v for k, v in mc_rows.items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw, indent=1, default=str))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
