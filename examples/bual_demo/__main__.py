"""Command line: ``python -m examples.bual_demo [--full] [--out DIR] ...``.

Runs every method for every seed with the same data, iterations and initial weights, then
writes ``results.md``, ``results.json`` and ``figures/*.png`` under ``--out``. An interrupted
comparison resumes from its checkpoints when started again with the same command.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import queue as queue_module
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import ABLATIONS

# the flags and the data (shared with diagnose.py)
from .cli import BUDGETS, budget_name, load_data, parse_args, train_config
from .data import DataError
from .diagnose import diagnose
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
from .train import TrainConfig, init_worker, run_one, worker_job

#: Relative cost of one iteration (measured, 1 thread): longest jobs are scheduled first.
COST = {"uamt": 0.33, "mean_teacher": 0.15, "bual": 0.15, "full": 0.12, "supervised": 0.075,
        **{m: 0.15 for m in ABLATIONS}}  # fmt: skip

def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _run_pool(
    jobs: list[tuple[str, int]], data: Any, cfg: TrainConfig, out: Path,
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
    jobs: list[tuple[str, int]], total: int, data: Any, cfg: TrainConfig, out: Path,
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
    name = budget_name(args)
    own = BUDGETS[name]
    iterations = args.iterations if args.iterations is not None else own["iterations"]
    seeds = list(range(args.seeds if args.seeds is not None else own["seeds"]))
    out: Path = args.out or Path(own["out"])
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
    cfg = train_config(args, iterations, stored)
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
        f"({name} budget), {torch.get_num_threads()} "
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
        where = ("in mm (the voxel size, scaled with any in-plane resize)" if unit == "mm" else
                 f"in voxels {data.voxels} (voxel size unknown; --spacing gives it)")
        header = (f"Per-volume test metrics: Dice, Jaccard, 95% Hausdorff distance (HD95) and "
                  f"average surface distance (ASD), mean ± sample std over seeds {seeds}; "
                  f"{iterations} iterations per run for every method. Each test volume "
                  f"({data.inference}) is scored whole, per class, with "
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
        if name == "demo":
            header = ("**Demonstration budget** (reduced iterations): shows the pipeline, not "
                      "converged results; run with `--full` for those.\n\n" + header)  # fmt: skip
        elif iterations < own["iterations"]:
            header = (f"**Reduced budget** ({iterations} of the {name} protocol's "
                      f"{own['iterations']} iterations): shows the pipeline, not results "
                      "to compare with the papers.\n\n" + header)  # fmt: skip
        md, js = write_report(out, results, data.class_names, header, config, unit)
        paths = figures(out, results, dirs)
        print(f"\n{md.read_text()}")
        print(f"Finished in {(time.perf_counter() - start) / 60:.1f} min.")
        print(f"Table: {md} and {js}")
        print("Figures: " + ", ".join(str(p) for p in paths))
        if not args.no_diagnostics and world == 1:
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
