"""CUDA checks of the fused path: equal to the CPU reference and free of host synchronisation.

Skipped on machines without CUDA; ``benchmarks/gpu_check.sh`` runs them on a GPU machine under
``torch.cuda.set_sync_debug_mode("error")``, where any synchronising call raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bual_losses import RatioSchedule, bidirectional_loss, region_ce_dice_loss, region_dice_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


OPTIONS: list[dict[str, Any]] = [
    {},
    {"include_background": False, "squared_pred": True},
    {"batch": True, "class_weight": torch.tensor([0.5, 1.0, 2.0, 1.5])},
    {"ignore_index": 255},
    {"reduction": "sum", "smooth_nr": 0.0, "smooth_dr": 0.0},
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("spatial", [(33, 40), (9, 10, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 2, 4])  # binary and C = 2: the two-class engine
def test_fused_on_cuda_matches_cpu_reference_without_sync(
    options: dict[str, Any], spatial: tuple[int, ...], dtype: torch.dtype, channels: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    k = max(channels, 2)
    logits = torch.randn(3, channels, *spatial, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, k, (3, *spatial), generator=gen)
    if "class_weight" in options:
        options = {**options, "class_weight": options["class_weight"][:k]}
    if "ignore_index" in options:
        labels[:, 0] = 255
    weight = torch.rand(3, *spatial, generator=gen, dtype=torch.float64)
    cpu_opts = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    ref_logits = logits.to(dtype).double().requires_grad_()
    ref = region_ce_dice_loss(ref_logits, labels, weight, impl="reference", **cpu_opts)
    ref.backward()

    cuda_opts = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    z = logits.to(dtype).cuda().requires_grad_()
    y, w = labels.cuda(), weight.float().cuda()
    with no_host_sync():
        loss = region_ce_dice_loss(z, y, w, impl="fused", **cuda_opts)
        loss.backward()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), **tol)
    assert z.grad is not None
    torch.testing.assert_close(z.grad.double().cpu(), ref_logits.grad, **tol)


BIDIRECTIONAL_OPTIONS: list[dict[str, Any]] = [
    {"temperature": None},
    {"temperature": 0.1},
    {
        "alpha": 2.0,
        "beta": 0.2,
        "ignore_index": 255,
        "class_weight": torch.tensor([1.0, 2, 0.5, 1]),
    },
    {"high_threshold": RatioSchedule(0.2), "low_threshold": RatioSchedule(0.3, per_sample=False)},
    {"squared_pred": True, "batch": True, "include_background": False},
]


@pytest.mark.parametrize("options", BIDIRECTIONAL_OPTIONS)
def test_bidirectional_on_cuda_matches_cpu_without_sync(options: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(1)
    zl = torch.randn(2, 4, 32, 32, generator=gen)
    y = torch.randint(0, 4, (2, 32, 32), generator=gen)
    if "ignore_index" in options:
        y[:, 0] = 255
    zu = torch.randn(3, 4, 32, 32, generator=gen)
    zt = torch.randn(3, 4, 32, 32, generator=gen)
    kwargs: dict[str, Any] = dict(step=150, total_steps=300, **options)
    # tensors given as options travel to the device before the no-sync block (a host copy)
    cuda_kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    cpu = [t.clone().requires_grad_() for t in (zl, zu)]
    ref = bidirectional_loss(cpu[0], y, cpu[1], zt, impl="reference", **kwargs)
    ref.backward()
    cuda = [t.cuda().requires_grad_() for t in (zl, zu)]
    y_cuda, zt_cuda = y.cuda(), zt.cuda()
    with no_host_sync():
        loss, parts = bidirectional_loss(
            cuda[0], y_cuda, cuda[1], zt_cuda, impl="fused", return_parts=True, **cuda_kwargs
        )
        loss.backward()
    torch.testing.assert_close(loss.cpu(), ref.detach(), rtol=1e-4, atol=1e-5)
    for got, want in zip(cuda, cpu):
        assert got.grad is not None and want.grad is not None
        torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=1e-4, atol=1e-5)
    assert all(isinstance(t, torch.Tensor) and t.is_cuda for t in parts)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_per_class_dice_terms_on_cuda_match_cpu(reduction: str) -> None:
    """region_dice_loss(reduction="none") returns per-class terms: the accelerator engine takes
    their gradient in backward (the only case it does not precompute)."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 16, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (3, 16, 16), generator=gen)
    cotangent = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    ref_z = logits.clone().requires_grad_()
    ref = region_dice_loss(ref_z, labels, impl="reference", reduction=reduction)
    (ref * (cotangent if reduction == "none" else 1.0)).sum().backward()
    z = logits.cuda().requires_grad_()
    with no_host_sync():
        out = region_dice_loss(z, labels.cuda(), reduction=reduction)
        (out * (cotangent.cuda() if reduction == "none" else 1.0)).sum().backward()
    torch.testing.assert_close(out.cpu(), ref.detach())
    assert z.grad is not None
    torch.testing.assert_close(z.grad.cpu(), ref_z.grad)
