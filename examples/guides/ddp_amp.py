"""Guide: DistributedDataParallel + automatic mixed precision with bual_losses, on CPU.

Each rank holds a shard of the labeled and unlabeled batch; ``sync_dist=True`` makes every rank
compute the loss of the whole (concatenated) batch, and the forward runs under
``torch.autocast`` (bfloat16 on CPU, float16 + ``GradScaler`` on CUDA: see
docs/distributed.md). The script starts its own ranks on CPU with the gloo backend:

    python examples/guides/ddp_amp.py --world-size 2 --steps 20
    torchrun --nproc_per_node=2 examples/guides/ddp_amp.py --steps 20   # same, via torchrun

and checks at the end that the loss value is identical on all ranks.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from bual_losses import BidirectionalLoss


def make_model(num_classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Dropout2d(0.1),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, num_classes, 1),
    )


def shard(rank: int, world: int, step: int, size: int) -> tuple[torch.Tensor, ...]:
    """This rank's part of a global batch (ranks may hold different numbers of images)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    n_l, n_u = 2 + rank % 2, 3  # uneven shards on purpose: sync_dist handles them
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = size / 2 + (torch.rand(n, 2, generator=gen) - 0.5) * size / 3
        r = ((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2).sqrt()
        y = (r < 0.35 * size).long() + (r < 0.15 * size).long()
        return y.float()[:, None] / 2 + 0.2 * torch.randn(n, 1, size, size, generator=gen), y

    x_l, y_l = draw(n_l)
    x_u, _ = draw(n_u)
    return x_l, y_l, x_u


def train(rank: int, world: int, init_method: str, args: argparse.Namespace) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    torch.set_num_threads(1)

    # --8<-- [start:ddp]
    student = DDP(make_model())
    teacher = copy.deepcopy(student.module).requires_grad_(False)
    loss_fn = BidirectionalLoss(total_steps=args.total_steps, sync_dist=True)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    amp_dtype = torch.bfloat16  # CPU autocast; on CUDA use float16 with a GradScaler

    for step in range(args.steps):
        x_l, y_l, x_u = shard(rank, world, step, args.size)
        with torch.autocast("cpu", dtype=amp_dtype):
            logits_l, logits_u = student(x_l), student(x_u)  # bfloat16 logits
            with torch.no_grad():
                teacher_u = teacher(x_u)
            loss, parts = loss_fn(logits_l, y_l, logits_u, teacher_u, step=step, return_parts=True)
        # the loss is float32: statistics are accumulated in float32 under autocast
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks
        optimizer.step()
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.module.parameters()):
                t.lerp_(s, 1 - min(1 - 1 / (step + 1), 0.99))
        # --8<-- [end:ddp]
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            # already global: identical on every rank, no extra all-reduce for logging
            trusted = parts.unlabeled_low_fraction.item()
            print(
                f"step {step:3d}  loss {loss.item():.4f} ({loss.dtype}, logits "
                f"{logits_l.dtype})  trusted {trusted:.1%}"
            )

    values = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(values, loss.detach().float().reshape(1))
    assert all(torch.equal(v, values[0]) for v in values), values
    if rank == 0:
        print(f"{world} rank(s): loss identical on every rank ({values[0].item():.6f})")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--total-steps", type=int, default=1000, help="ramp length")
    parser.add_argument("--world-size", type=int, default=2, help="CPU ranks to start")
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)

    if "RANK" in os.environ:  # started by torchrun: one process per rank already
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        init = f"tcp://127.0.0.1:{_free_port()}" if os.name != "nt" else f"file://{tmp}/rdzv"
        if args.world_size == 1:
            train(0, 1, init, args)
        else:
            mp.spawn(train, args=(args.world_size, init, args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
