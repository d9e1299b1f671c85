r"""Speed and memory of the region CE + Dice loss: fused vs reference vs MONAI vs a traffic floor.

Usage (from the repository root)::

    python benchmarks/bench_losses.py                # CPU, 2 threads: results/cpu-<date>.md
    python benchmarks/bench_losses.py --device cuda  # adds the large 3D shape
    python benchmarks/bench_losses.py --quick --out /tmp/quick.md  # smoke test, tiny shapes

What is measured, per shape, each in its own fresh process (``--start-method``):

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

MC dropout: peak extra memory (and time) of
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

Output: a Markdown table per shape (variant, median / min / IQR ms, peak extra MiB, peak /
logits bytes, time ratios vs reference, MONAI and the floor), the MC-dropout table and one
verdict line per target, computed from the numbers: fused <= 0.45 x reference time and
<= 0.8 x MONAI time; fused peak extra <= 1.5 x logits bytes; MC dropout peak(16) / peak(2)
within 10 %. Printed and written to ``--out`` (default ``benchmarks/results/<device>-<date>.md``;
``--quick`` runs get a ``-quick`` suffix). ``--json`` also writes the raw measurements.
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
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

VARIANTS = ("monai", "reference", "reference+compile", "fused", "floor")
MC_PASSES = (2, 8, 16)
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
    "mc_flat": 0.10,
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


def _loss_task(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    device, variant = task["device"], task["variant"]
    shape = tuple(task["shape"])
    bsz, channels, spatial = shape[0], shape[1], shape[2:]
    g = torch.Generator().manual_seed(task["seed"])
    logits = torch.randn(shape, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, channels, (bsz, *spatial), generator=g).to(device)
    weight = torch.rand((bsz, *spatial), generator=g).to(device)
    notes: list[str] = []

    if variant == "monai":
        from monai.losses import DiceCELoss

        monai_loss = DiceCELoss(to_onehot_y=True, softmax=True)
        labels1 = labels[:, None]

        def loss_fn() -> torch.Tensor:
            return monai_loss(logits, labels1)

    elif variant in ("reference", "fused", "reference+compile"):
        from bual_losses.losses import region_ce_dice_loss

        impl = "fused" if variant == "fused" else "reference"

        def plain(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return region_ce_dice_loss(z, y, w, impl=impl)

        fn = plain
        if variant == "reference+compile":
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = 1
            try:
                fn = torch.compile(plain, backend=task["compile_backend"])
            except Exception as exc:
                raise RuntimeError(f"torch.compile failed: {type(exc).__name__}: {exc}") from exc
            notes.append(f"torch.compile backend: {task['compile_backend']}")

        def loss_fn() -> torch.Tensor:
            return fn(logits, labels, weight)

    elif variant == "floor":
        loss_fn = None
    else:
        raise ValueError(f"unknown variant {variant!r}")

    if loss_fn is None:

        def step() -> Any:
            with torch.no_grad():
                return logits.neg()

    else:

        def step() -> Any:
            loss = loss_fn()
            loss.backward()
            return loss.detach()

    def reset() -> None:
        logits.grad = None

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
    res["logits_bytes"] = logits.numel() * logits.element_size()
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
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return "unknown (not a git checkout)"
    return f"{head} (with uncommitted changes)" if dirty else head


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
    return "\n".join(lines)


def _shape_table(name: str, shape: tuple[int, ...], rows: dict[str, dict[str, Any]]) -> str:
    title = SHAPES[name][0]
    logits_mb = 4 * _numel(shape) / MIB
    lines = [
        f"## {title}: logits {tuple(shape)} float32 ({_fmt(logits_mb)} MiB)",
        "",
        "| variant | median ms | min ms | IQR ms | peak extra MiB | peak / logits "
        "| vs reference | vs monai | vs floor |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    notes = []
    for variant in rows:
        r = rows[variant]
        if not r.get("ok"):
            lines.append(
                f"| `{variant}` | failed: {_cell(r['error'])} | - | - | - | - | - | - | - |"
            )
            continue
        s = r["stats"]
        lines.append(
            f"| `{variant}` | {_fmt(s['median'])} | {_fmt(s['min'])} | {_fmt(s['iqr'])} "
            f"| {_fmt(r['peak_bytes'] / MIB)} | {_fmt(r['peak_bytes'] / r['logits_bytes'])} "
            f"| {_fmt(_ratio(r, rows.get('reference')))} | {_fmt(_ratio(r, rows.get('monai')))} "
            f"| {_fmt(_ratio(r, rows.get('floor')))} |"
        )
        notes += [f"`{variant}`: {n}" for n in r.get("notes", [])]
    losses = [f"`{v}` {r['loss']:.6g}" for v, r in rows.items() if r.get("ok") and "loss" in r]
    if losses:
        notes.append("loss values (same inputs; MONAI has no region weight): " + ", ".join(losses))
    ref, fused = rows.get("reference", {}), rows.get("fused", {})
    if "loss" in ref and "loss" in fused:
        rel = abs(fused["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
        if rel > 1e-4:
            notes.append(f"**fused and reference losses differ by {rel:.2e} (relative)**")
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


def _verdicts(
    loss_rows: dict[str, dict[str, dict[str, Any]]], mc_rows: dict[int, dict[str, Any]]
) -> str:
    t = TARGETS
    vs_ref, vs_monai, peak = [], [], []
    for shape, rows in loss_rows.items():
        fused = rows.get("fused")
        if fused is None:
            continue
        if "reference" in rows:
            vs_ref.append((shape, _ratio(fused, rows["reference"])))
        if "monai" in rows:
            vs_monai.append((shape, _ratio(fused, rows["monai"])))
        ok = fused.get("ok")
        peak.append((shape, fused["peak_bytes"] / fused["logits_bytes"] if ok else None))
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
    lines = [
        "## Verdicts (computed from the numbers above)",
        "",
        _verdict(
            "fused time vs reference",
            f"<= {t['fused_vs_reference']}",
            vs_ref,
            lambda v: v <= t["fused_vs_reference"],
        ),
        _verdict(
            "fused time vs MONAI",
            f"<= {t['fused_vs_monai']}",
            vs_monai,
            lambda v: v <= t["fused_vs_monai"],
        ),
        _verdict(
            "fused peak extra / logits bytes",
            f"<= {t['fused_peak_vs_logits']}",
            peak,
            lambda v: v <= t["fused_peak_vs_logits"],
        ),
        _verdict(
            "MC-dropout memory flat in passes",
            f"within {t['mc_flat']:.0%}",
            mc,
            lambda v: abs(v - 1) <= t["mc_flat"],
        ),
    ]
    return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


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
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
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
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.variants = [v for v in VARIANTS if v in variants]
    default_shapes = [s for s in SHAPES if args.device == "cuda" or s not in CUDA_ONLY]
    shapes = default_shapes if args.shapes is None else args.shapes.split(",")
    shapes = [s.strip() for s in shapes if s.strip()]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
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
        ctx.set_forkserver_preload(
            PRELOAD + ([] if "monai" not in args.variants else ["monai.losses"])
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
            f"{shape} {variant} (round {rnd + 1}/{args.rounds})",
            {"kind": "loss", "name": shape, "variant": variant, "shape": shape_of[shape]},
        )
        for shape in args.shapes
        for rnd in range(args.rounds)
        for variant in args.variants
    ]
    if not args.no_mc:
        jobs += [
            (f"mc-dropout passes={p}", {"kind": "mc", "passes": p, "shape": mc_shape})
            for p in MC_PASSES
        ]
    loss_rows: dict[str, dict[str, dict[str, Any]]] = {shape: {} for shape in args.shapes}
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
            rows = loss_rows[job["name"]]
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
    parts += [_shape_table(s, shape_of[s], rows) for s, rows in loss_rows.items()]
    if mc_rows:
        parts.append(_mc_table(mc_shape, mc_rows))
    parts.append(_verdicts(loss_rows, mc_rows))
    failures = [
        f"{s} {v}: {r['error']}\n{r.get('traceback', '')}"
        for s, rows in loss_rows.items()
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
        raw["loss"] = loss_rows
        raw["mc_dropout"] = {str(k): v for k, v in mc_rows.items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw, indent=1, default=str))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
