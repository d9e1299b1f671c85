"""One training run (method x seed): the step of every method, checkpoints, evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bual_losses import (
    mc_dropout_uncertainty,
    rampup_schedule,
    relative_threshold,
    resolve_threshold,
    uamt_threshold_schedule,
)
from bual_losses.pseudo import pseudo_labels

from .data import Volume, example_view
from .inference import autocast
from .methods import BUAL, LOSSES, SEMI, bual_options
from .metrics import evaluate
from .model import SSL4MIS_DROPOUT, UNet2D, VNet, ema_update, make_teacher
from .runfolder import DamagedCheckpoint, load_checkpoint, read_result, warn, write_atomic

#: ``bual_uncertainty``: the library's entropy of the teacher, or UA-MT's MC-dropout estimate.
UNCERTAINTIES = ("entropy", "mc")
#: ``--device``: ``auto`` is CUDA when available, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
#: ``--amp``: mixed precision by autocast (fp16 also scales the loss: ``torch.amp.GradScaler``).
AMPS = ("none", "bf16", "fp16")
#: ``--optimizer``: Adam (the MNI comparison) or SGD with momentum (SSL4MIS and UA-MT).
OPTIMIZERS = ("adam", "sgd")
#: ``--lr-schedule``: SSL4MIS's poly decay ``(1 - t / T) ** 0.9`` or UA-MT's step decay (x0.1
#: every ``LR_STEP`` iterations).
LR_SCHEDULES = ("poly", "step")
LR_STEP = 2500


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; others unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; the same values for every method of a comparison."""

    iterations: int = 400
    labeled_batch: int = 2
    unlabeled_batch: int = 2
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" or "sgd" (SSL4MIS / UA-MT: SGD, momentum 0.9, wd 1e-4)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    lr_schedule: str = "poly"  # "poly" (SSL4MIS) or "step" (UA-MT: x0.1 every 2500 iterations)
    base: int = 16
    levels: int = 3
    ema_decay: float = 0.99
    consistency: float = 0.1  # peak lambda (SSL4MIS / UA-MT: 0.1)
    rampup: float = 1.0  # consistency ramp length as a fraction of the iterations (SSL4MIS: 1)
    teacher_noise: float = 0.1  # std of the teacher's input noise, clipped at 2 std (SSL4MIS)
    mc_passes: int = 8  # UA-MT's T
    # the weight of CE and of Dice in every CE + Dice loss: 1 = MONAI's DiceCELoss; SSL4MIS and
    # UA-MT train on 0.5 (CE + Dice)
    ce_dice_weight: float = 1.0
    bual_alpha: float = 1.0
    bual_beta: float = 0.0
    bual_uncertainty: str = "entropy"  # "entropy" (library default) or "mc" (UA-MT's estimate)
    bual_high_ratio: Optional[float] = None  # None: the method's threshold; r: top r is high
    bual_low_ratio: Optional[float] = None  # None: the method's threshold; r: top r dropped
    eval_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 50
    amp: str = "none"  # "none", "bf16" or "fp16" (autocast; fp16 with a GradScaler)
    # where the run trains ("cpu" / "cuda", resolved from --device auto); not part of a run
    # folder's identity: a folder may be resumed on the other device (checkpoints load on CPU)
    device: str = "cpu"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def build_model(network: str, num_classes: int, cfg: TrainConfig) -> nn.Module:
    """The data's network (``data.network``), built on the CPU: "unet2d" (the MNI comparison's
    U-Net), "ssl4mis-unet" (the same with SSL4MIS's dropout rates, ACDC) or "vnet" (UA-MT's
    V-Net, LA)."""
    if network == "vnet":
        return VNet(1, num_classes, cfg.base)
    dropout = None
    if network == "ssl4mis-unet" and cfg.levels <= len(SSL4MIS_DROPOUT):
        dropout = SSL4MIS_DROPOUT[: cfg.levels]
    return UNet2D(1, num_classes, cfg.base, cfg.levels, dropout=dropout)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)  # fmt: skip
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 16, amp: str = "none") -> torch.Tensor:
    """Eval-mode float32 logits on the CPU for ``(N, 1, H, W)`` images, in chunks on the
    model's device."""
    was = model.training
    model.eval()
    device = _device_of(model)
    with autocast(device, amp):
        out = torch.cat([model(x[i : i + batch].to(device)).float().cpu()
                         for i in range(0, len(x), batch)])  # fmt: skip
    model.train(was)
    return out


def _volume_dice(pred: np.ndarray, v: Volume, num_classes: int, ignore: Optional[int]) -> float:
    """The class-mean Dice of one volume; a class absent from its label is n/a, as in the test
    metrics (NaN when no class is present)."""
    annotated = np.ones(v.label.shape, bool) if ignore is None else v.label != ignore
    scores = []
    for c in range(1, num_classes):
        p, t = (pred == c) & annotated, v.label == c
        if t.any():
            scores.append(2 * (p & t).sum() / (p.sum() + t.sum()))
    return float(np.mean(scores)) if scores else math.nan


def validate(model: nn.Module, data: Any, amp: str = "none") -> Optional[float]:
    """The mean over the validation volumes of each one's class-mean Dice (None: the data has
    no validation set, as UA-MT's LA). Each volume is predicted as the test volumes are."""
    volumes = data.volumes("val")
    if not volumes:
        return None
    scores = [_volume_dice(data.predict_volume(model, v.image, amp), v, data.num_classes,
                           data.ignore_index) for v in volumes]  # fmt: skip
    present = [d for d in scores if not math.isnan(d)]
    return float(np.mean(present)) if present else math.nan


class Run:
    """A resumable training run of one method with one seed."""

    def __init__(self, method: str, seed: int, data: Any, cfg: TrainConfig, folder: Path) -> None:
        self.method, self.seed, self.data, self.cfg, self.folder = method, seed, data, cfg, folder
        self.rank, self.world = _world()
        self.device = torch.device(cfg.device)
        torch.manual_seed(seed)  # identical initial weights for every method of a seed
        # built on the CPU (the same initial weights on every device), then moved
        self.student = build_model(data.network, data.num_classes, cfg).to(self.device)
        self.teacher = make_teacher(self.student) if method in SEMI else None
        self.model: nn.Module = self.student
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(self.student)
        self.opt = build_optimizer(self.student, cfg)
        # fp16 needs loss scaling against underflowing gradients; bf16 and none do not
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.generator = torch.Generator().manual_seed(seed * 1000 + self.rank)
        torch.manual_seed(seed * 1000 + 1 + self.rank)  # dropout masks differ across ranks
        self.step = 0
        self.history: dict[str, list[Any]] = {"log": [], "val": []}
        self.seconds = 0.0
        ramp = cfg.rampup * cfg.iterations
        self.lam = rampup_schedule(cfg.consistency, ramp)
        self.threshold = uamt_threshold_schedule(cfg.iterations, base="normalized")
        # the pool of the step's first batch: the upper bound trains on every training image
        self.pool = "all" if method == "full" else "labeled"

    # ---------------------------------------------------------------------------- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        suffix = f"_rank{self.rank}" if self.world > 1 else ""
        return self.folder / f"checkpoint{suffix}.pt"

    def save(self) -> None:
        state = {
            "step": self.step,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "opt": self.opt.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "history": self.history,
            "seconds": self.seconds,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load(self) -> bool:
        """Resume from the checkpoint, if any. A damaged one (empty, truncated, not a
        checkpoint) is skipped with a warning and the run starts afresh; one that pickles more
        than plain data stops the comparison (``RunFolderError``)."""
        if not self.checkpoint_path.is_file():
            return False
        try:
            # on the CPU first: a checkpoint written on a GPU loads on a machine without one
            state = load_checkpoint(self.checkpoint_path, map_location="cpu")
        except DamagedCheckpoint as err:
            warn(f"{err.args[0]}; {self.method} seed {self.seed} starts afresh (its next "
                 "checkpoint replaces the file).")  # fmt: skip
            return False
        self.student.load_state_dict(state["student"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.opt.load_state_dict(state["opt"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        if self.scaler.is_enabled() and state.get("scaler"):  # absent: a run begun without fp16
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.history, self.seconds = state["step"], state["history"], state["seconds"]
        return True

    # ---------------------------------------------------------------------------- one step

    def _lr(self) -> float:
        cfg = self.cfg
        if cfg.lr_schedule == "step":  # UA-MT's LA
            return cfg.lr * 0.1 ** (self.step // LR_STEP)
        return cfg.lr * (1.0 - self.step / cfg.iterations) ** 0.9  # SSL4MIS's poly decay

    def train_step(self) -> dict[str, float]:
        cfg, g, t = self.cfg, self.generator, self.step
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        xl, yl = self.data.draw(self.pool, cfg.labeled_batch, g)
        log: dict[str, float] = {}
        self.model.train()
        with autocast(self.device, cfg.amp):
            loss = self._loss(xl, yl, log)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # unscaled unless fp16
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.world > 1:  # keep BatchNorm statistics identical on every rank
            for buf in self.student.buffers():
                if buf.is_floating_point():
                    dist.all_reduce(buf)
                    buf.div_(self.world)
        if self.teacher is not None:
            ema_update(self.teacher, self.student, t, self.cfg.ema_decay)
        log["loss"] = loss.item()
        self.step += 1
        return log

    def _loss(self, xl: torch.Tensor, yl: torch.Tensor, log: dict[str, float]) -> torch.Tensor:
        """The method's loss of one step (under the step's autocast; ``methods.LOSSES``); the
        batches are drawn and augmented on the CPU from the run's generator, then moved to the
        run's device."""
        xl, yl = xl.to(self.device), yl.to(self.device)
        return LOSSES[self.method](self, xl, yl, log)

    # ---------------------------------------------------------------------------- the loop

    def train(self, progress: Optional[Callable[[int], None]] = None) -> None:
        cfg = self.cfg
        if self.load() and progress is not None:
            progress(self.step)
        while self.step < cfg.iterations:
            start = time.perf_counter()
            log = self.train_step()
            self.seconds += time.perf_counter() - start
            if not all(math.isfinite(v) for v in log.values()):
                raise FloatingPointError(f"{self.method} seed {self.seed}: non-finite {log}")
            if self.step % cfg.log_every == 0 or self.step == 1:
                self.history["log"].append({"step": self.step, **log})
            if self.rank == 0 and (self.step % cfg.eval_every == 0 or self.step == cfg.iterations):
                d = validate(self.student, self.data, cfg.amp)
                if d is not None:
                    self.history["val"].append({"step": self.step, "dice": d})
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.iterations:
                self.save()
            if progress is not None:
                progress(1)

    # ---------------------------------------------------------------------------- test

    def _save_example(self) -> None:
        """``example.npz`` for the figures: the data's example image (a 2D slice, or a 3D crop
        shown at its slice with the most foreground classes), the student's prediction, its
        MC-dropout entropy and the high-region threshold the method's loss would draw there."""
        x, y = self.data.example()
        with torch.no_grad(), autocast(self.device, self.cfg.amp):
            est = mc_dropout_uncertainty(self.student.eval(), x.to(self.device),
                                         passes=self.cfg.mc_passes, normalize=True)  # fmt: skip
        u = est.predictive_entropy[0].float().cpu()
        pred = pseudo_labels(predict(self.student, x, amp=self.cfg.amp))[0]
        # the high region as the method's loss draws it on labeled data at the end of training
        # (BUAL's own threshold; UA-MT's for the other methods), over the whole example image
        default = relative_threshold() if self.method in BUAL else self.threshold  # library's
        high = bual_options(self.method, self.cfg).get("high_threshold", default)
        thr = float(resolve_threshold(u[None], high, step=self.cfg.iterations).mean())
        y, image, pred, u = example_view(y, self.data.num_classes, x[0, 0], pred, u)
        np.savez_compressed(self.folder / "example.npz", image=image.numpy(), label=y.numpy(),
                            pred=pred.numpy(), uncertainty=u.numpy(), threshold=thr)  # fmt: skip

    def test(self) -> dict[str, Any]:
        """Per-volume test metrics of the student (``metrics.evaluate``: every test volume
        scored whole, per class) plus what the figures need (one example slice)."""
        data, amp = self.data, self.cfg.amp
        volumes = data.volumes("test")
        metrics = evaluate([(v.name, data.predict_volume(self.student, v.image, amp), v.label,
                             v.spacing) for v in volumes], data.num_classes,
                           data.ignore_index)  # fmt: skip
        self._save_example()
        return {
            "method": self.method,
            "seed": self.seed,
            # per class: the mean over the test volumes that hold the class (None: n/a);
            # distances in `unit`
            "dice": metrics["dice"],
            "jaccard": metrics["jaccard"],
            "hd95": metrics["hd95"],
            "asd": metrics["asd"],
            "assd": metrics["assd"],
            "unit": data.unit,
            "cases": metrics["cases"],
            "seconds": self.seconds,
            "seconds_per_iteration": self.seconds / max(self.step, 1),
            "iterations": self.step,
            "history": self.history,
        }


def run_one(
    method: str, seed: int, data: Any, cfg: TrainConfig, folder: Path,
    progress: Optional[Callable[[int], None]] = None,
) -> Optional[dict[str, Any]]:  # fmt: skip
    """Train (or resume, or skip when finished) one run; rank 0 returns its result."""
    result_path = folder / "result.json"
    rank, world = _world()
    finished = read_result(result_path)  # every rank reads the same file: they agree
    if finished is not None:
        if progress is not None:
            progress(cfg.iterations)
        return finished if rank == 0 else None
    run = Run(method, seed, data, cfg, folder)
    run.train(progress)
    result = None
    if rank == 0:
        result = run.test()
        write_atomic(result_path, json.dumps(result))
    if world > 1:
        dist.barrier()
    return result


# ------------------------------------------------------------------------------- worker pool

_QUEUE: Any = None


def init_worker(queue: Any, threads: int) -> None:
    """Process-pool initializer: one torch thread per worker, progress through ``queue``."""
    global _QUEUE
    _QUEUE = queue
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _report(n: int) -> None:
    if _QUEUE is not None:
        _QUEUE.put(n)


def worker_job(
    method: str, seed: int, data: Any, cfg: TrainConfig, folder: Path
) -> Optional[dict[str, Any]]:
    """A run inside a pool worker (progress goes to the parent's bar)."""
    return run_one(method, seed, data, cfg, folder, _report)
