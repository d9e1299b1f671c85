"""Command line: ``python -m examples.bual_demo [--full] [--out DIR] ...``.

Runs every method for every seed with the same data, iterations and initial weights, then
writes ``results.md``, ``results.json`` and ``figures/*.png`` under ``--out``. An interrupted
comparison resumes from its checkpoints when started again with the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import ABLATIONS, ALL_METHODS, METHODS
from .data import (
    DataError,
    SlabSplit,
    SliceData,
    cases_data,
    mni_data,
    read_h5_dir,
    read_nifti_dir,
)
from .report import figures, write_report
from .runfolder import (
    RunFolderError,
    delete_run_folder,
    read_config,
    read_result,
    run_folder,
    tagged,
    write_atomic,
)
from .train import (
    AMPS,
    DEVICES,
    UNCERTAINTIES,
    TrainConfig,
    init_worker,
    resolve_device,
    run_one,
    worker_job,
)

#: Relative cost of one iteration (measured, 1 thread): longest jobs are scheduled first.
COST = {"uamt": 0.33, "mean_teacher": 0.15, "bual": 0.15, "full": 0.12, "supervised": 0.075,
        **{m: 0.15 for m in ABLATIONS}}  # fmt: skip

#: The two budgets. The demo shows the pipeline; the full budget is the one to quote.
BUDGETS = {
    "demo": {"iterations": 200, "seeds": 2, "out": "runs/demo"},
    "full": {"iterations": 600, "seeds": 3, "out": "runs/full"},
}


#: The value rules of the flags, checked by ``check_args`` (flag name -> (valid?, a valid
#: value)). ``None`` (a flag left at a default of "none" / "the budget's") is always valid.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seeds": (lambda v: v >= 1, ">= 1"),
    "iterations": (lambda v: v >= 1, ">= 1"),
    "workers": (lambda v: v >= 1, ">= 1"),
    "threads": (lambda v: v >= 1, ">= 1"),
    "labeled": (lambda v: v >= 1, ">= 1"),
    "downsample": (lambda v: v >= 1, ">= 1"),
    "corruption": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "data_seed": (lambda v: v >= 0, ">= 0"),
    "gap": (lambda v: v >= 0, ">= 0"),
    "ignore_label": (lambda v: v >= 0, ">= 0"),
    "spacing": (lambda v: all(math.isfinite(s) and s > 0 for s in v), "three finite numbers > 0"),
    # training (TrainConfig)
    "labeled_batch": (lambda v: v >= 1, ">= 1"),
    "unlabeled_batch": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "base": (lambda v: v >= 1, ">= 1"),
    "levels": (lambda v: v >= 1, ">= 1"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "consistency": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "rampup": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "teacher_noise": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "mc_passes": (lambda v: v >= 2 and v % 2 == 0, "even and >= 2 (two passes per forward)"),
    "bual_alpha": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "bual_beta": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "bual_high_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "bual_low_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "eval_every": (lambda v: v >= 1, ">= 1"),
    "log_every": (lambda v: v >= 1, ">= 1"),
    "checkpoint_every": (lambda v: v >= 1, ">= 1"),
}
CHOICES = {"bual_uncertainty": UNCERTAINTIES, "amp": AMPS}
HELP = {"amp": "mixed precision: none (default, float32), bf16 (autocast to bfloat16; CPU or "
               "GPU) or fp16 (autocast to float16 with a GradScaler; CUDA only)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.bual_demo",
        description="Compare supervised, mean teacher, UA-MT, BUAL and fully supervised "
        "training on the same data, seeds and iteration budget.",
    )
    p.add_argument("--full", action="store_true",
                   help="full budget (3 seeds, 600 iterations; 15-90 min on 2 cores) instead of "
                   "the demonstration budget (2 seeds, 200 iterations; 5-12 min)")  # fmt: skip
    p.add_argument("--out", type=Path, help="output folder (default runs/demo or runs/full)")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(METHODS),
                   help="methods to compare (default: the first five; the bual_* variants are "
                   "the ablation of BUAL's defaults and directions)")
    p.add_argument("--seeds", type=int, help="number of seeds, >= 1 (seeds 0, 1, ...)")
    p.add_argument("--iterations", type=int, help="iterations per run (every method), >= 1")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where to train: auto (default) is CUDA when available, else the CPU. "
                   "A run folder may be resumed on the other device")  # fmt: skip
    p.add_argument(
        "--no-diagnostics",
        action="store_true",
        help="skip the pseudo-label error diagnostics of the final teachers "
        "(python -m examples.bual_demo.diagnose)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the runs of --out that have finished so far",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="runs trained in parallel, one process each (1 under torchrun)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per worker process. 1 is fastest on 2 shared "
        "cores: 2 threads per process measured 10x slower under contention",
    )
    g = p.add_argument_group("data")
    g.add_argument("--nifti-dir", type=Path, help="folder with images/*.nii.gz + "
                   "labels/*.nii.gz; each test case is scored as a volume, in mm from the "
                   "image headers' voxel size")  # fmt: skip
    g.add_argument("--h5-dir", type=Path, help="folder of SSL4MIS-style *.h5 (image, label); "
                   "each test case is scored as a volume (see --spacing)")  # fmt: skip
    g.add_argument("--ignore-label", type=int, metavar="V",
                   help="--nifti-dir / --h5-dir: voxels labelled V (e.g. 255) are unannotated: "
                   "left out of the losses and the metrics. Every other label value found is a "
                   "class; sorted values become classes 0, 1, ... (labels 0, 1, 5 -> 3 "
                   "classes), a mapping the data summary prints")  # fmt: skip
    g.add_argument("--spacing", type=float, nargs=3, metavar=("SLICE", "ROW", "COL"),
                   help="--h5-dir: the voxel size in mm along the files' axes (slices first; "
                   "for 2D slice files the distance between slices, then rows, columns), which "
                   "HDF5 files do not store; scaled with --size. Without it HD95 and ASD are "
                   "in voxels of the resized slices. NIfTI headers give their own; the MNI "
                   "template is 1 mm")  # fmt: skip
    g.add_argument("--labeled", type=int, default=2, help="number of labeled slices")
    g.add_argument("--size", type=int, nargs=2, default=(96, 112), metavar=("H", "W"),
                   help="--nifti-dir / --h5-dir: every slice is resized to H x W pixels (the "
                   "voxel size scaled to match); the MNI slices are cropped or padded to it; "
                   "both divisible by 2 ** (--levels - 1)")  # fmt: skip
    g.add_argument("--downsample", type=int, default=2, metavar="D",
                   help="MNI in-plane downsampling (1 mm pixels become about D mm)")  # fmt: skip
    g.add_argument(
        "--corruption",
        type=float,
        default=1.0,
        help="strength of the MNI acquisition corruption (0 = clean template)",
    )
    g.add_argument("--data-seed", type=int, default=0, help="seed of the corruption")
    g.add_argument("--gap", type=int, default=3,
                   help="slices left out on each side of a labeled slice")  # fmt: skip
    g.add_argument("--train-slab", type=int, nargs=2, default=(30, 110), metavar=("START", "STOP"))
    g.add_argument("--val-slab", type=int, nargs=2, default=(114, 121), metavar=("START", "STOP"))
    g.add_argument("--test-slab", type=int, nargs=2, default=(125, 150), metavar=("START", "STOP"),
                   help="MNI axial slabs [START, STOP); the test slab is one volume, scored "
                   "whole")  # fmt: skip
    t = p.add_argument_group("training (defaults from SSL4MIS / UA-MT where they exist)")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("iterations", "device"):  # --iterations: the budget's; --device above
            continue
        value = getattr(defaults, field.name)
        kind = float if field.name.endswith("ratio") else type(value) if value is not None else str
        rule = RULES.get(field.name)
        t.add_argument("--" + field.name.replace("_", "-"), type=kind, default=value,
                       choices=CHOICES.get(field.name),
                       help=HELP.get(field.name) or f"{rule[1] if rule else ''} "
                       f"(default {value})".lstrip())  # fmt: skip
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check of the flags, in one place, before any data is read: a bad value ends the
    program through ``parser.error`` (exit status 2, one line naming the flag)."""
    for name, (valid, expected) in RULES.items():
        value = getattr(args, name, None)
        if value is not None and not valid(value):
            parser.error(f"argument --{name.replace('_', '-')}: must be {expected}, got {value}")
    step = 2 ** (args.levels - 1)  # the U-Net halves the slice levels - 1 times
    if any(side < step or side % step for side in args.size):
        parser.error(
            f"argument --size: both sides must be positive multiples of 2 ** (--levels - 1) = "
            f"{step} (--levels {args.levels}), got {args.size[0]} {args.size[1]}"
        )
    if args.nifti_dir and args.h5_dir:
        parser.error("argument --nifti-dir: give either --nifti-dir or --h5-dir, not both")
    if args.ignore_label is not None and not (args.nifti_dir or args.h5_dir):
        parser.error("argument --ignore-label: applies to --nifti-dir / --h5-dir labels only")
    if getattr(args, "spacing", None) is not None and not args.h5_dir:
        parser.error("argument --spacing: applies to --h5-dir only (NIfTI headers give the "
                     "voxel size; the MNI template is 1 mm)")  # fmt: skip
    if not (args.nifti_dir or args.h5_dir):
        try:
            slabs(args).check()
        except DataError as err:
            parser.error(f"argument --train-slab/--val-slab/--test-slab: {err}")
    device = getattr(args, "device", "auto")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda asked for, but CUDA is not available here "
                     "(use --device cpu or auto)")  # fmt: skip
    if getattr(args, "amp", "none") == "fp16" and resolve_device(device) == "cpu":
        parser.error("argument --amp: fp16 needs a CUDA device (CPU autocast supports bf16 "
                     "only); use --amp bf16 or none on the CPU")  # fmt: skip
    if getattr(args, "fresh", False) and getattr(args, "report_only", False):
        parser.error("argument --fresh: --report-only never deletes; drop --fresh")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The trainer's flags, parsed and checked (``check_args``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def slabs(args: argparse.Namespace) -> SlabSplit:
    """The MNI slabs of the flags."""
    return SlabSplit(tuple(args.train_slab), tuple(args.val_slab), tuple(args.test_slab),
                     args.gap)  # fmt: skip


def load_data(args: argparse.Namespace) -> SliceData:
    size = tuple(args.size)
    if args.nifti_dir:
        cases = read_nifti_dir(args.nifti_dir)
        return cases_data(cases, labeled=args.labeled, size=size, gap=args.gap,
                          ignore_label=args.ignore_label,
                          description=f"NIfTI folder {args.nifti_dir}")  # fmt: skip
    if args.h5_dir:
        cases = read_h5_dir(args.h5_dir)
        spacing = tuple(args.spacing) if args.spacing else None
        return cases_data(cases, labeled=args.labeled, size=size, gap=args.gap,
                          spacing=spacing, ignore_label=args.ignore_label,
                          description=f"HDF5 folder {args.h5_dir}")  # fmt: skip
    return mni_data(labeled=args.labeled, size=size, downsample=args.downsample, split=slabs(args),
                    corruption=args.corruption, data_seed=args.data_seed)  # fmt: skip


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _run_pool(
    jobs: list[tuple[str, int]], data: SliceData, cfg: TrainConfig, out: Path,
    workers: int, threads: int, bar: tqdm,
) -> dict[tuple[str, int], dict[str, Any]]:  # fmt: skip
    """Train the jobs in ``workers`` spawned processes; progress arrives through a queue."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    done: dict[tuple[str, int], dict[str, Any]] = {}
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                             initargs=(progress, threads)) as pool:  # fmt: skip
        futures = {pool.submit(worker_job, m, s, data, cfg, run_folder(out, m, s)):
                   (m, s) for m, s in jobs}  # fmt: skip
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            try:
                while True:
                    bar.update(progress.get_nowait())
            except queue_module.Empty:
                pass
            for f in finished:
                done[futures[f]] = f.result()  # re-raises a worker's exception
                bar.set_description(f"{len(done)}/{len(jobs)} runs done")
    return done


def _train(
    jobs: list[tuple[str, int]], total: int, data: SliceData, cfg: TrainConfig, out: Path,
    workers: int, threads: int, rank: int,
) -> dict[tuple[str, int], dict[str, Any]]:  # fmt: skip
    """Train (or resume, or skip) every job: in this process or in a pool of workers."""
    done: dict[tuple[str, int], dict[str, Any]] = {}
    with tqdm(total=total, desc="all runs", unit="it", disable=rank != 0, dynamic_ncols=True,
              smoothing=0.05) as bar:  # fmt: skip
        if not jobs:
            pass
        elif workers == 1:
            for method, seed in jobs:
                bar.set_description(f"{method} seed {seed}")
                r = run_one(method, seed, data, cfg, run_folder(out, method, seed),
                            bar.update)  # fmt: skip
                if r is not None:
                    done[(method, seed)] = r
        else:
            done = _run_pool(jobs, data, cfg, out, workers, threads, bar)
    return done


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    budget = BUDGETS["full" if args.full else "demo"]
    iterations = args.iterations if args.iterations is not None else budget["iterations"]
    seeds = list(range(args.seeds if args.seeds is not None else budget["seeds"]))
    out: Path = args.out or Path(budget["out"])
    rank, world = _init_distributed()
    torch.set_num_threads(args.threads)
    workers = 1 if world > 1 else args.workers
    torch.use_deterministic_algorithms(True, warn_only=True)
    say = print if rank == 0 else (lambda *a, **k: None)

    stored: Optional[dict[str, Any]] = None
    if args.report_only:
        # the folder's own configuration is the one to report: the run's flags need not be
        # repeated (only the data flags, to load the same data for the figures)
        try:
            stored = read_config(out)
        except RunFolderError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if stored is None:
            print(f"error: --report-only: {out} holds no config.json, so no runs to report.",
                  file=sys.stderr)  # fmt: skip
            return 2
        seeds, args.methods = list(stored["seeds"]), list(stored["methods"])
        iterations = int(stored["train"]["iterations"])
    try:
        data = load_data(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if stored is not None and stored["data"] != data.summary():
        print(f"error: --report-only: {out} was trained on other data ({stored['data']}); "
              "give the data flags of that run.", file=sys.stderr)  # fmt: skip
        return 2
    defaults = dataclasses.asdict(TrainConfig())
    # --report-only reports where the folder was trained (before --device: the CPU)
    device = stored["train"].get("device", "cpu") if stored else resolve_device(args.device)
    # a folder written before a field existed reads that field's default (e.g. amp "none")
    cfg = TrainConfig(iterations=iterations, device=device, **{
        f.name: stored["train"].get(f.name, defaults[f.name]) if stored else getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in ("iterations", "device")})  # fmt: skip
    config: dict[str, Any] = {"train": dataclasses.asdict(cfg), "seeds": seeds,
                              "methods": args.methods, "data": data.summary(),
                              "world_size": world}  # fmt: skip
    if rank == 0 and stored is None:
        if args.fresh and out.exists():
            try:
                delete_run_folder(out)
            except RunFolderError as err:
                print(f"error: --fresh refuses: {err}", file=sys.stderr)
                return 2
        out.mkdir(parents=True, exist_ok=True)
        try:
            old = read_config(out)
        except RunFolderError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if old is not None:
            # the device is not part of a folder's identity: resuming on the other one is fine
            changed = [k for k, v in config["train"].items()
                       if k != "device" and old["train"].get(k, defaults[k]) != v]  # fmt: skip
            if changed or old["data"] != config["data"]:
                print(f"error: {out} holds runs with another configuration; use --fresh or "
                      "another --out.", file=sys.stderr)  # fmt: skip
                return 2
        write_atomic(out / "config.json", json.dumps(tagged(config), indent=1))
    if world > 1:
        dist.barrier()

    say(f"Data: {data.summary()}")
    say(f"Budget: {len(args.methods)} methods x {len(seeds)} seeds x {iterations} iterations "
        f"({'full' if args.full else 'demonstration'} budget), {torch.get_num_threads()} "
        f"thread(s) x {max(world, workers)} process(es); output {out}/")  # fmt: skip
    start = time.perf_counter()
    # seed by seed (complete seeds first, so --report-only has whole seeds to show), the
    # longest runs of a seed first so that the two workers finish together
    jobs = [(m, s) for s in seeds for m in sorted(args.methods, key=lambda m: -COST.get(m, 1))]
    total = len(jobs) * iterations
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if args.report_only:
        jobs, total = [], 0
        for method, seed in [(m, s) for s in seeds for m in args.methods]:
            result = read_result(run_folder(out, method, seed) / "result.json")
            if result is not None:
                done[(method, seed)] = result
        seeds = [s for s in seeds if all((m, s) in done for m in args.methods)]
        say(f"Finished seeds for every method: {seeds}")
        if not seeds:
            return 1
    try:
        done.update(_train(jobs, total, data, cfg, out, workers, args.threads, rank))
    except RunFolderError as err:  # a checkpoint that does not load safely: stop cleanly
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    dirs = {m: run_folder(out, m, seeds[0]) for m in args.methods}
    results = {m: [done[(m, s)] for s in seeds] for m in args.methods} if rank == 0 else {}
    if rank == 0:
        unit = data.unit
        where = ("in mm (the voxel size, scaled with the in-plane resize)" if unit == "mm" else
                 "in voxels of the resized slices (voxel size unknown; --spacing gives it)")
        header = (f"Per-volume test metrics: Dice, Jaccard, 95% Hausdorff distance (HD95) and "
                  f"average surface distance (ASD), mean ± sample std over seeds {seeds}; "
                  f"{iterations} iterations per run for every method. Each test volume (the "
                  "MNI test slab, a case of a NIfTI or HDF5 folder, a test slab of a single "
                  "case) is stacked back from its slices and scored whole, per class, with "
                  "MedPy's definitions (as SSL4MIS and UA-MT), then averaged over volumes: "
                  "HD95 is the 95th percentile of the surface distances in both directions "
                  "pooled, ASD the mean distance from the prediction's surface to the label's; "
                  f"distances {where}. A class missing from a volume's label is n/a for that "
                  "volume and left out of the means (n/a in the table when no test volume has "
                  "it); a class in the label but missing from the prediction scores Dice and "
                  "Jaccard 0 and HD95 and ASD the volume's diagonal. s / iter: wall-clock "
                  "seconds per training iteration of one "
                  f"worker ({args.threads} thread), which the machine's load inflates. "
                  f"Trained on {cfg.device}, mixed precision (--amp) {cfg.amp}."
                  f"\n\nData: {data.summary()}.")  # fmt: skip
        if not args.full:
            header = ("**Demonstration budget** (reduced iterations): shows the pipeline, not "
                      "converged results; run with `--full` for those.\n\n" + header)  # fmt: skip
        md, js = write_report(out, results, data.class_names, header, config, unit)
        paths = figures(out, results, dirs)
        print(f"\n{md.read_text()}")
        print(f"Finished in {(time.perf_counter() - start) / 60:.1f} min.")
        print(f"Table: {md} and {js}")
        print("Figures: " + ", ".join(str(p) for p in paths))
        if not args.no_diagnostics and world == 1:
            # imported here: diagnose imports this module's data options
            from .diagnose import diagnose

            print(
                "\nDiagnostics: does each final teacher's uncertainty find its pseudo-label errors?"
            )
            try:
                diagnose(out, data, passes=args.mc_passes)
            except RunFolderError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
