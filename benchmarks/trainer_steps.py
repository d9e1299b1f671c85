"""Seconds per training iteration of every method in the two published protocols, at their own
sizes: SSL4MIS's ACDC (a 5-level 2D U-Net, 24 slices of 256 x 256 per step, 12 labeled) and
UA-MT's LA (V-Net, 4 crops of 112 x 112 x 80, 2 labeled), what the README's "per 1000
iterations" comes from.

    python benchmarks/trainer_steps.py                      # CPU, 2 threads, every method
    python benchmarks/trainer_steps.py --device cuda --amp bf16 --steps 20

The data are the fixture folders of ``examples.bual_demo.fixtures`` (written to a temporary
folder): the LA crops of volumes smaller than the patch are padded as UA-MT pads them, and ACDC
slices are zoomed to the patch, so a step costs what it costs on the real data sets. Each method
runs ``--warmup`` steps first (allocator, cuDNN autotuning), then ``--steps`` timed ones; every
method of a protocol is timed in the same process, one after the other, so only their ratios
carry over between machines (and on a noisy machine, only within one run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.provenance import git_commit
from examples.bual_demo import METHODS
from examples.bual_demo.cli import BUDGETS, load_data, parse_args, train_config
from examples.bual_demo.fixtures import write_ssl4mis_acdc, write_ua_mt_la
from examples.bual_demo.train import Run

FLAGS = {"acdc": "--ssl4mis-acdc", "la": "--ssl4mis-la"}
WRITERS = {"acdc": write_ssl4mis_acdc, "la": write_ua_mt_la}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_protocol(name: str, root: Path, args: argparse.Namespace) -> list[tuple[str, float]]:
    """(method, median seconds per iteration) for every method of ``args.methods``."""
    flags = [FLAGS[name], str(root), "--device", args.device, "--amp", args.amp,
             "--labeled-cases", "2"]  # fmt: skip
    run_args = parse_args(flags)
    data = load_data(run_args)
    cfg = train_config(run_args, BUDGETS[name]["iterations"])
    rows = []
    for method in args.methods:
        with tempfile.TemporaryDirectory() as folder:
            run = Run(method, 0, data, cfg, Path(folder))
            for _ in range(args.warmup):
                run.train_step()
            times = []
            for _ in range(args.steps):
                _sync(cfg.device)
                start = time.perf_counter()
                run.train_step()
                _sync(cfg.device)
                times.append(time.perf_counter() - start)
        rows.append((method, statistics.median(times)))
        print(f"{name} {method}: {rows[-1][1]:.3f} s / iteration", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--protocols", nargs="+", default=list(FLAGS), choices=list(FLAGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"CPU, {args.threads} threads")  # fmt: skip
    lines = [
        f"# Training iterations of the two protocols ({device}, --amp {args.amp})",
        "",
        f"`python benchmarks/trainer_steps.py --device {args.device} --amp {args.amp} "
        f"--steps {args.steps} --warmup {args.warmup} --threads {args.threads}` at commit "
        f"{git_commit()}, torch {torch.__version__}: the median of {args.steps} timed steps "
        f"after {args.warmup} untimed, each protocol at its own patch and batch.",
        "",
        "| protocol | method | s / iteration | min / 1000 iterations | h / full budget |",
        "|---|---|--:|--:|--:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.protocols:
            root = WRITERS[name](Path(tmp) / name)
            budget = BUDGETS[name]["iterations"]
            for method, seconds in time_protocol(name, root, args):
                minutes, hours = seconds * 1000 / 60, seconds * budget / 3600
                lines.append(f"| {name} ({budget} it.) | {method} | {seconds:.3f} | "
                             f"{minutes:.1f} | {hours:.1f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
