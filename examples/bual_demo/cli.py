"""The trainer's command line: the flags (``build_parser``), their checks (``check_args``,
every one before any data is read) and the data they describe (``load_data``).

Shared by ``python -m examples.bual_demo`` and ``python -m examples.bual_demo.diagnose`` (which
rebuilds the comparison's data from the same data flags), so neither imports the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import ALL_METHODS, METHODS
from .data import (
    DataError,
    SlabSplit,
    cases_data,
    mni_data,
    read_h5_dir,
    read_nifti_dir,
)
from .protocol_data import acdc_data, la_data
from .train import (
    AMPS,
    DEVICES,
    LR_SCHEDULES,
    OPTIMIZERS,
    UNCERTAINTIES,
    TrainConfig,
    resolve_device,
)

#: The budgets of the MNI comparison (the demo shows the pipeline; the full budget is the one
#: to quote) and of the two published protocols (``--ssl4mis-acdc``, ``--ssl4mis-la``): their
#: iterations, seeds and output folder.
BUDGETS: dict[str, dict[str, Any]] = {
    "demo": {"iterations": 200, "seeds": 2, "out": "runs/demo"},
    "full": {"iterations": 600, "seeds": 3, "out": "runs/full"},
    "acdc": {"iterations": 30000, "seeds": 1, "out": "runs/acdc"},
    "la": {"iterations": 6000, "seeds": 1, "out": "runs/la"},
}

#: What each protocol sets where the flags are left out: SSL4MIS's ACDC
#: (``train_uncertainty_aware_mean_teacher_2D.py`` and ``train_acdc_unet_semi_seg.sh``) and
#: UA-MT's LA (``train_LA_meanteacher_certainty_unlabel.py``). Their consistency ramps (200
#: "epochs" of 150 iterations, 40 of 150) are their whole budgets: ``--rampup 1``.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "acdc": {"labeled_cases": 7, "patch_size": (256, 256), "labeled_batch": 12,
             "unlabeled_batch": 12, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9,
             "weight_decay": 1e-4, "lr_schedule": "poly", "base": 16, "levels": 5,
             "ema_decay": 0.99, "consistency": 0.1, "rampup": 1.0, "ce_dice_weight": 0.5,
             "eval_every": 200, "checkpoint_every": 200},
    "la": {"labeled_cases": 16, "patch_size": (112, 112, 80), "labeled_batch": 2,
           "unlabeled_batch": 2, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9,
           "weight_decay": 1e-4, "lr_schedule": "step", "base": 16, "ema_decay": 0.99,
           "consistency": 0.1, "rampup": 1.0, "ce_dice_weight": 0.5, "eval_every": 200,
           "checkpoint_every": 200},
}  # fmt: skip


def protocol(args: argparse.Namespace) -> Optional[str]:
    """"acdc" (``--ssl4mis-acdc``), "la" (``--ssl4mis-la``) or None (MNI, NIfTI, HDF5)."""
    if getattr(args, "ssl4mis_acdc", None):
        return "acdc"
    return "la" if getattr(args, "ssl4mis_la", None) else None


def budget_name(args: argparse.Namespace) -> str:
    """The key of the data's budget in ``BUDGETS``."""
    return protocol(args) or ("full" if args.full else "demo")


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """The iterations, seeds and output folder the flags leave to the data's budget."""
    return BUDGETS[budget_name(args)]

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
    "labeled_cases": (lambda v: v >= 1, ">= 1"),
    "patch_size": (lambda v: all(s >= 1 for s in v), "numbers >= 1"),
    "batch": (lambda v: v >= 2, ">= 2 (labeled + unlabeled images)"),
    # training (TrainConfig)
    "labeled_batch": (lambda v: v >= 1, ">= 1"),
    "unlabeled_batch": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "base": (lambda v: v >= 1, ">= 1"),
    "levels": (lambda v: v >= 1, ">= 1"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "consistency": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "rampup": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "teacher_noise": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "mc_passes": (lambda v: v >= 2 and v % 2 == 0, "even and >= 2 (two passes per forward)"),
    "ce_dice_weight": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "bual_alpha": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "bual_beta": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "bual_high_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "bual_low_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "eval_every": (lambda v: v >= 1, ">= 1"),
    "log_every": (lambda v: v >= 1, ">= 1"),
    "checkpoint_every": (lambda v: v >= 1, ">= 1"),
}
CHOICES = {"bual_uncertainty": UNCERTAINTIES, "amp": AMPS, "optimizer": OPTIMIZERS,
           "lr_schedule": LR_SCHEDULES}
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
                   help="HDF5 data (--h5-dir, --ssl4mis-acdc, --ssl4mis-la): the voxel size in mm "
                   "along the files' axes (for --h5-dir slices first; "
                   "for 2D slice files the distance between slices, then rows, columns), which "
                   "HDF5 files do not store; scaled with --size. Without it HD95 and ASD are "
                   "in voxels of the resized slices. NIfTI headers give their own; the MNI "
                   "template is 1 mm")  # fmt: skip
    g.add_argument("--ssl4mis-acdc", type=Path, metavar="ROOT",
                   help="SSL4MIS's ACDC layout and protocol: ROOT/train_slices.list, val.list, "
                   "test.list, ROOT/data/slices/NAME.h5 (training slices) and ROOT/data/NAME.h5 "
                   "(volumes); a 2D U-Net on --patch-size slices (default 256 256), batch 24 "
                   "with 12 labeled, SGD, 30000 iterations, 1 seed (every training flag "
                   "overrides its default)")  # fmt: skip
    g.add_argument("--ssl4mis-la", type=Path, metavar="ROOT",
                   help="UA-MT's LA layout and protocol: ROOT/train.list, ROOT/test.list, "
                   "ROOT/2018LA_Seg_Training Set/NAME/mri_norm2.h5 (or ..._Training_Set); a "
                   "V-Net on random --patch-size crops (default 112 112 80), batch 4 with 2 "
                   "labeled, SGD, 6000 iterations, 1 seed, sliding-window test with strides "
                   "18, 18, 4")  # fmt: skip
    g.add_argument("--labeled-cases", type=int, metavar="N",
                   help="--ssl4mis-acdc: the labeled slices are those of the first N patients "
                   "of train_slices.list (SSL4MIS's table: 3 -> 68 slices, 7 -> 136, ...; "
                   "default 7); --ssl4mis-la: the first N cases of train.list (default 16, "
                   "UA-MT's 16 of 80)")  # fmt: skip
    g.add_argument("--patch-size", type=int, nargs="+", metavar="P",
                   help="--ssl4mis-acdc: H W of the training slices and of inference (default "
                   "256 256); --ssl4mis-la: the X Y Z crop (default 112 112 80); multiples of "
                   "16 (the networks halve them four times)")  # fmt: skip
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
    t = p.add_argument_group("training (defaults from SSL4MIS / UA-MT where they exist; "
                             "--ssl4mis-acdc and --ssl4mis-la set their protocols' own)")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("iterations", "device"):  # --iterations: the budget's; --device above
            continue
        value = getattr(defaults, field.name)
        kind = float if field.name.endswith("ratio") else type(value) if value is not None else str
        rule = RULES.get(field.name)
        own = [f"{name} {PROTOCOLS[name][field.name]}" for name in PROTOCOLS
               if PROTOCOLS[name].get(field.name, value) != value]  # fmt: skip
        note = f"; {', '.join(own)}" if own else ""
        # None: left to the data's protocol (resolved by parse_args)
        t.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None,
                       choices=CHOICES.get(field.name),
                       help=HELP.get(field.name, "") + f" {rule[1] if rule else ''} "
                       f"(default {value}{note})".lstrip())  # fmt: skip
        if field.name == "unlabeled_batch":
            sizes = [f"{n} {c['labeled_batch'] + c['unlabeled_batch']}"
                     for n, c in PROTOCOLS.items()]  # fmt: skip
            t.add_argument("--batch", type=int, help="images per step, labeled + unlabeled: "
                           "the unlabeled batch is BATCH - --labeled-batch (SSL4MIS's "
                           f"batch_size; default {defaults.labeled_batch + value}; "
                           f"{', '.join(sizes)})")  # fmt: skip
    return p


def resolve_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the training flags left out with the protocol's values (``PROTOCOLS``), else
    ``TrainConfig``'s; ``--batch`` sets the unlabeled batch."""
    if getattr(args, "batch", None) is not None and args.unlabeled_batch is not None:
        parser.error("argument --batch: give --batch or --unlabeled-batch, not both")
    own = PROTOCOLS.get(protocol(args) or "", {})
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("iterations", "device"):  # the budget's (cli.budget); --device's own
            continue
        if getattr(args, field.name) is None:
            setattr(args, field.name, own.get(field.name, getattr(defaults, field.name)))
    for name in ("labeled_cases", "patch_size"):
        if getattr(args, name, None) is None and name in own:
            setattr(args, name, own[name])
    if getattr(args, "batch", None) is not None:
        if args.batch <= args.labeled_batch:
            parser.error(f"argument --batch: must exceed --labeled-batch ({args.labeled_batch}) "
                         f"to leave unlabeled images in each step, got {args.batch}")  # fmt: skip
        args.unlabeled_batch = args.batch - args.labeled_batch


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check of the flags, in one place, before any data is read: a bad value ends the
    program through ``parser.error`` (exit status 2, one line naming the flag)."""
    for name, (valid, expected) in RULES.items():
        value = getattr(args, name, None)
        if value is not None and not valid(value):
            parser.error(f"argument --{name.replace('_', '-')}: must be {expected}, got {value}")
    name = protocol(args)
    step = 2 ** (args.levels - 1)  # the U-Net halves the slice levels - 1 times
    if name is None and any(side < step or side % step for side in args.size):
        parser.error(
            f"argument --size: both sides must be positive multiples of 2 ** (--levels - 1) = "
            f"{step} (--levels {args.levels}), got {args.size[0]} {args.size[1]}"
        )
    sources = [flag for flag in ("nifti_dir", "h5_dir", "ssl4mis_acdc", "ssl4mis_la")
               if getattr(args, flag, None)]  # fmt: skip
    if len(sources) > 1:
        parser.error(f"argument --{sources[0].replace('_', '-')}: give one data source, got "
                     + " and ".join("--" + f.replace("_", "-") for f in sources))  # fmt: skip
    if args.ignore_label is not None and not (args.nifti_dir or args.h5_dir):
        parser.error("argument --ignore-label: applies to --nifti-dir / --h5-dir labels only")
    if getattr(args, "spacing", None) is not None and not (args.h5_dir or name):
        parser.error("argument --spacing: applies to HDF5 data only (--h5-dir, --ssl4mis-acdc, "
                     "--ssl4mis-la); NIfTI headers give the voxel size; the MNI template is "
                     "1 mm")  # fmt: skip
    for flag in ("labeled_cases", "patch_size"):
        if getattr(args, flag, None) is not None and name is None:
            parser.error(f"argument --{flag.replace('_', '-')}: applies to --ssl4mis-acdc / "
                         "--ssl4mis-la only")  # fmt: skip
    if name is not None:
        dims = len(PROTOCOLS[name]["patch_size"])
        multiple = 2 ** (args.levels - 1) if name == "acdc" else 16
        if len(args.patch_size) != dims or any(s % multiple for s in args.patch_size):
            parser.error(f"argument --patch-size: {'--ssl4mis-' + name} needs {dims} numbers, "
                         f"multiples of {multiple}, got {' '.join(map(str, args.patch_size))}")
    if not (args.nifti_dir or args.h5_dir or name):
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
    """The trainer's flags, parsed, completed with the protocol's defaults
    (``resolve_defaults``) and checked (``check_args``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_defaults(parser, args)
    check_args(parser, args)
    return args


def train_config(
    args: argparse.Namespace, iterations: int, stored: Optional[dict[str, Any]] = None
) -> TrainConfig:
    """The runs' ``TrainConfig``: the flags' values (the device resolved), or those of a run
    folder's ``config.json`` (``stored``, for ``--report-only``: where the folder was trained,
    the CPU before ``--device`` existed; a field the folder predates reads its default)."""
    defaults = dataclasses.asdict(TrainConfig())
    device = stored["train"].get("device", "cpu") if stored else resolve_device(args.device)
    return TrainConfig(iterations=iterations, device=device, **{
        f.name: stored["train"].get(f.name, defaults[f.name]) if stored else getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in ("iterations", "device")})  # fmt: skip


def slabs(args: argparse.Namespace) -> SlabSplit:
    """The MNI slabs of the flags."""
    return SlabSplit(tuple(args.train_slab), tuple(args.val_slab), tuple(args.test_slab),
                     args.gap)  # fmt: skip


def load_data(args: argparse.Namespace) -> Any:
    """The data the flags describe: ``SliceData`` (MNI, ``--nifti-dir``, ``--h5-dir``),
    ``protocol_data.ACDCData`` or ``protocol_data.LAData``."""
    spacing = tuple(args.spacing) if getattr(args, "spacing", None) else None
    if protocol(args) == "acdc":
        return acdc_data(args.ssl4mis_acdc, args.labeled_cases, tuple(args.patch_size), spacing)
    if protocol(args) == "la":
        return la_data(args.ssl4mis_la, args.labeled_cases, tuple(args.patch_size), spacing)
    size = tuple(args.size)
    if args.nifti_dir:
        cases = read_nifti_dir(args.nifti_dir)
        return cases_data(cases, labeled=args.labeled, size=size, gap=args.gap,
                          ignore_label=args.ignore_label,
                          description=f"NIfTI folder {args.nifti_dir}")  # fmt: skip
    if args.h5_dir:
        cases = read_h5_dir(args.h5_dir)
        return cases_data(cases, labeled=args.labeled, size=size, gap=args.gap,
                          spacing=spacing, ignore_label=args.ignore_label,
                          description=f"HDF5 folder {args.h5_dir}")  # fmt: skip
    return mni_data(labeled=args.labeled, size=size, downsample=args.downsample, split=slabs(args),
                    corruption=args.corruption, data_seed=args.data_seed)  # fmt: skip
