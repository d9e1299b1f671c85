"""``sync_dist``: two gloo ranks on CPU against one process on the concatenated batch.

One spawned run (two processes, started once for the whole file) computes every case on its
shard with ``sync_dist=True`` and, for the no-op check, again with ``sync_dist=False``, counting
the collectives it calls. The parent computes each case in one process on the concatenated
batch and compares:

* global values (losses, batch thresholds, region fractions): equal on every rank and equal to
  the single-process value (float64, tolerance 1e-10; order-statistic thresholds exactly);
* per-rank values (``reduction="none"``, masks, per-sample thresholds): the rank's rows of the
  single-process value;
* gradients: each rank's gradient w.r.t. its logits is ``R`` times the rows of the
  single-process gradient (DDP's average over ``R`` ranks then gives the single-process one);
  per-rank losses (``reduction="none"``) give exactly the rows.

Ranks hold different batch sizes: 2 and 3 labeled samples, 3 and 1 unlabeled ones.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from bual_losses import (
    BidirectionalLoss,
    RatioSchedule,
    RegionCEDiceLoss,
    RelativeThreshold,
    bidirectional_loss,
    high_uncertainty_mask,
    low_uncertainty_mask,
    ratio_threshold,
    region_ce_dice_loss,
    region_ce_loss,
    region_dice_loss,
    region_fraction,
    resolve_threshold,
    soft_uncertainty_weight,
)
from bual_losses.distributed import (
    all_gather_variable,
    all_reduce_sum,
    global_mean,
    resolve_group,
)
from bual_losses.engines import use_engine

pytestmark = pytest.mark.distributed

WORLD = 2
#: rows of the concatenated batch held by each rank, per input group
SPLITS = {"l": (2, 3), "u": (3, 1)}
GRAD_KEYS = ("logits", "binary_logits", "zl", "zu")
F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
SPAWN_TIMEOUT_S = 120.0

Inputs = dict[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# the data: one concatenated batch, sharded by rows


def full_data() -> dict[str, tuple[str, torch.Tensor]]:
    """Every input as ``(split group, concatenated tensor)``; deterministic."""
    g = torch.Generator().manual_seed(1234)
    b_l, b_u = sum(SPLITS["l"]), sum(SPLITS["u"])
    shape = (6, 5)
    labels = torch.randint(0, 3, (b_l, *shape), generator=g)
    ignored = labels.clone()
    ignored[torch.rand(ignored.shape, generator=g) < 0.2] = 255
    u = torch.rand(b_l, 7, 4, generator=g, dtype=F64)
    return {
        "logits": ("l", 2 * torch.randn(b_l, 3, *shape, generator=g, dtype=F64)),
        "labels": ("l", labels),
        "ignored": ("l", ignored),
        "weight": ("l", 2 * torch.rand(b_l, *shape, generator=g, dtype=F64)),
        "binary_logits": ("l", torch.randn(b_l, 1, *shape, generator=g, dtype=F64)),
        "soft": ("l", torch.rand(b_l, 1, *shape, generator=g, dtype=F64)),
        "u": ("l", u),
        "u_ties": ("l", torch.round(4 * u) / 4),  # many ties at the ratio boundary
        "zl": ("l", 1.5 * torch.randn(b_l, 3, *shape, generator=g, dtype=F64)),
        "y": ("l", labels),
        "zu": ("u", 1.5 * torch.randn(b_u, 3, *shape, generator=g, dtype=F64)),
        "zt": ("u", 1.5 * torch.randn(b_u, 3, *shape, generator=g, dtype=F64)),
    }


def rows(split: str, rank: int) -> slice:
    sizes = SPLITS[split]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def shard(rank: int) -> Inputs:
    return {k: t[rows(split, rank)] for k, (split, t) in full_data().items()}


def concatenated() -> Inputs:
    return {k: t for k, (_, t) in full_data().items()}


# --------------------------------------------------------------------------------------------
# the cases: f(inputs, sync_dist) -> outputs. Output keys "l:..." / "u:..." are per-rank rows
# of that split; other keys are global. "loss" is back-propagated (summed if not 0-d).


class Case(NamedTuple):
    fn: Callable[[Inputs, Any], Outputs]
    grad_factor: int = WORLD  # rank gradient = factor x rows of the single-process gradient


def _ce_dice(impl: str, batch: bool) -> Case:
    def fn(x: Inputs, sync: Any) -> Outputs:
        loss = region_ce_dice_loss(
            x["logits"], x["labels"], x["weight"], batch=batch, impl=impl, sync_dist=sync
        )
        return {"loss": loss}

    return Case(fn)


def _ce_dice_options(x: Inputs, sync: Any) -> Outputs:
    loss = region_ce_dice_loss(
        x["logits"],
        x["ignored"],
        x["weight"],
        ignore_index=255,
        class_weight=[0.5, 1.0, 2.0],
        include_background=False,
        squared_pred=True,
        lambda_ce=0.7,
        lambda_dice=1.3,
        reduction="sum",
        sync_dist=sync,
    )
    return {"loss": loss}


def _binary_soft(x: Inputs, sync: Any) -> Outputs:
    loss = region_ce_dice_loss(
        x["binary_logits"], x["soft"], x["weight"], batch=True, smooth_dr=0.0, sync_dist=sync
    )
    return {"loss": loss}


def _ce_and_dice_alone(x: Inputs, sync: Any) -> Outputs:
    ce = region_ce_loss(x["logits"], x["labels"], x["weight"], impl="reference", sync_dist=sync)
    dice_mean = region_dice_loss(x["logits"], x["labels"], x["weight"], sync_dist=sync)
    dice_sum = region_dice_loss(
        x["logits"], x["labels"], x["weight"], batch=True, reduction="sum", sync_dist=sync
    )
    return {
        "loss": ce + dice_mean + dice_sum,
        "ce": ce,
        "dice_mean": dice_mean,
        "dice_sum": dice_sum,
    }


def _per_sample_none(x: Inputs, sync: Any) -> Outputs:
    loss = region_ce_dice_loss(
        x["logits"], x["labels"], x["weight"], reduction="none", sync_dist=sync
    )
    return {"loss": loss, "l:loss": loss}


def _module(x: Inputs, sync: Any) -> Outputs:
    loss_fn = RegionCEDiceLoss(batch=True, squared_pred=True, sync_dist=sync)
    return {"loss": loss_fn(x["logits"], x["labels"], x["weight"])}


def _ratios(x: Inputs, sync: Any) -> Outputs:
    u, ties = x["u"], x["u_ties"]
    batch_ratio = RatioSchedule(0.4, per_sample=False)
    high = high_uncertainty_mask(u, batch_ratio, step=0, sync_dist=sync)
    low = low_uncertainty_mask(ties, batch_ratio, step=0, sync_dist=sync)
    soft = soft_uncertainty_weight(u, batch_ratio, temperature=0.1, step=0, sync_dist=sync)
    return {
        "threshold": ratio_threshold(u, 0.3, per_sample=False, sync_dist=sync),
        "threshold_tensor_ratio": ratio_threshold(
            u, torch.tensor(0.55, dtype=F64), per_sample=False, sync_dist=sync
        ),
        "threshold_ties": ratio_threshold(ties, 0.5, per_sample=False, sync_dist=sync),
        "threshold_all": ratio_threshold(u, 1.0, per_sample=False, sync_dist=sync),
        "threshold_none": ratio_threshold(u, 0.0, per_sample=False, sync_dist=sync),
        "threshold_schedule": resolve_threshold(u, batch_ratio, step=0, sync_dist=sync),
        "l:threshold_per_sample": ratio_threshold(u, 0.3, per_sample=True, sync_dist=sync),
        "l:high": high,
        "l:low": low,
        "l:soft": soft,
        "high_fraction": region_fraction(high, sync_dist=sync),
        "soft_fraction": region_fraction(soft, sync_dist=sync),
        "l:per_sample_fraction": region_fraction(high, per_sample=True, sync_dist=sync),
    }


def _parts(
    loss: torch.Tensor, parts: Any, local_low: bool = False, local_high: bool = False
) -> Outputs:
    """The parts as outputs; per-sample thresholds are rows of this rank's labeled (``l:``) or
    unlabeled (``u:``) images."""
    out = {"loss": loss}
    for name, value in parts._asdict().items():
        prefix = ""
        if local_low and name == "low_threshold":
            prefix = "u:"
        elif local_high and name == "high_threshold":
            prefix = "l:"
        out[prefix + name] = value
    return out


def _bidirectional_defaults(impl: str) -> Case:
    def fn(x: Inputs, sync: Any) -> Outputs:
        loss, parts = bidirectional_loss(
            x["zl"], x["y"], x["zu"], x["zt"],
            step=2000, total_steps=3000, impl=impl, return_parts=True, sync_dist=sync,
        )  # fmt: skip
        # the default thresholds are each image's own mean uncertainty: per sample, per rank
        return _parts(loss, parts, local_low=True, local_high=True)

    return Case(fn)


def _bidirectional_ratio(impl: str) -> Case:
    def fn(x: Inputs, sync: Any) -> Outputs:
        loss, parts = bidirectional_loss(
            x["zl"], x["y"], x["zu"], x["zt"],
            step=10, total_steps=100,
            high_threshold=RatioSchedule(0.3, per_sample=False),
            low_threshold=RatioSchedule(0.6, per_sample=False),
            alpha=2.0, beta=0.1, batch=True, squared_pred=True, consistency_weight=0.5,
            impl=impl, return_parts=True, sync_dist=sync,
        )  # fmt: skip
        return _parts(loss, parts)

    return Case(fn)


def _bidirectional_relative_batch(x: Inputs, sync: Any) -> Outputs:
    """Thresholds relative to the batch's mean uncertainty: the global batch's with sync."""
    loss, parts = bidirectional_loss(
        x["zl"], x["y"], x["zu"], x["zt"], step=10, total_steps=100,
        high_threshold=RelativeThreshold(1.0, per_sample=False),
        low_threshold=RelativeThreshold(1.5, per_sample=False),
        consistency_weight=1.0, return_parts=True, sync_dist=sync,
    )  # fmt: skip
    return _parts(loss, parts)


def _bidirectional_soft_per_sample_low(x: Inputs, sync: Any) -> Outputs:
    loss, parts = bidirectional_loss(
        x["zl"], x["y"], x["zu"], x["zt"],
        step=10, total_steps=100,
        high_threshold=0.8, low_threshold=RatioSchedule(0.5, per_sample=True),
        temperature=0.05, consistency_weight=1.0, return_parts=True, sync_dist=sync,
    )  # fmt: skip
    return _parts(loss, parts, local_low=True)


def _bidirectional_module(x: Inputs, sync: Any) -> Outputs:
    loss_fn = BidirectionalLoss(total_steps=3000, batch=True, sync_dist=sync)
    return {"loss": loss_fn(x["zl"], x["y"], x["zu"], x["zt"], step=2500)}


def _bidirectional_labeled_only(x: Inputs, sync: Any) -> Outputs:
    loss, parts = bidirectional_loss(
        x["zl"], x["y"], None, None, step=2000, total_steps=3000, return_parts=True, sync_dist=sync
    )
    return _parts(loss, parts, local_high=True)


def _on_the_accelerator_engine(case: Case) -> Case:
    """The same case on the accelerator engine (CPU tensors): its ``sync_dist`` path takes the
    finishing's gradient through the differentiable all-reduce inside its forward."""

    def fn(x: Inputs, sync: Any) -> Outputs:
        with use_engine("accelerator"):
            return case.fn(x, sync)

    return Case(fn, case.grad_factor)


CASES: dict[str, Case] = {
    "ce_dice_fused_batch": _ce_dice("fused", True),
    "ce_dice_accelerator_batch": _on_the_accelerator_engine(_ce_dice("fused", True)),
    "ce_dice_accelerator_per_sample": _on_the_accelerator_engine(_ce_dice("fused", False)),
    "ce_dice_options_sum_accelerator": _on_the_accelerator_engine(Case(_ce_dice_options)),
    "bidirectional_defaults_accelerator": _on_the_accelerator_engine(
        _bidirectional_defaults("fused")
    ),
    "bidirectional_ratio_accelerator": _on_the_accelerator_engine(_bidirectional_ratio("fused")),
    "ce_dice_fused_per_sample": _ce_dice("fused", False),
    "ce_dice_reference_batch": _ce_dice("reference", True),
    "ce_dice_reference_per_sample": _ce_dice("reference", False),
    "ce_dice_options_sum": Case(_ce_dice_options),
    "binary_soft_batch": Case(_binary_soft),
    "ce_and_dice_alone": Case(_ce_and_dice_alone),
    "reduction_none_per_rank": Case(_per_sample_none, grad_factor=1),
    "module": Case(_module),
    "ratios": Case(_ratios),
    "bidirectional_defaults_fused": _bidirectional_defaults("fused"),
    "bidirectional_defaults_reference": _bidirectional_defaults("reference"),
    "bidirectional_ratio_fused": _bidirectional_ratio("fused"),
    "bidirectional_ratio_reference": _bidirectional_ratio("reference"),
    "bidirectional_soft_per_sample_low": Case(_bidirectional_soft_per_sample_low),
    "bidirectional_relative_batch": Case(_bidirectional_relative_batch),
    "bidirectional_module": Case(_bidirectional_module),
    "bidirectional_labeled_only": Case(_bidirectional_labeled_only),
}

#: also run with an explicit ProcessGroup instead of True
GROUP_CASES = ("ce_dice_fused_per_sample", "ratios", "bidirectional_ratio_fused")

Result = tuple[Outputs, Outputs]  # (outputs, gradients)


def run_case(case: Case, inputs: Inputs, sync: Any) -> Result:
    leaves = {k: v.clone().requires_grad_(k in GRAD_KEYS) for k, v in inputs.items()}
    out = case.fn(leaves, sync)
    if "loss" in out:
        out["loss"].sum().backward()
    grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


# --------------------------------------------------------------------------------------------
# the spawned ranks


class _Counter:
    """Wraps the torch.distributed collectives that bual_losses uses, counting calls."""

    names = ("all_reduce", "all_gather")

    def __init__(self) -> None:
        self.calls = 0
        self.originals = {name: getattr(dist, name) for name in self.names}
        for name, original in self.originals.items():
            setattr(dist, name, self._wrap(original))

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        return counted


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Conv2d(3, 3, 3, padding=1).to(F64)


def ddp_step(model: torch.nn.Module, x: Inputs, sync: Any) -> dict[str, torch.Tensor]:
    """One training step's gradients: student logits from the model, a frozen teacher."""
    with torch.no_grad():
        teacher = x["zt"] + 0.5 * x["zu"]
    loss = bidirectional_loss(
        model(x["zl"]), x["y"], model(x["zu"]), teacher,
        step=2000, total_steps=3000, batch=True,
        high_threshold=RatioSchedule(0.3, per_sample=False), sync_dist=sync,
    )  # fmt: skip
    loss.backward()
    grads = {n.removeprefix("module."): p.grad for n, p in model.named_parameters()}
    return {"loss": loss.detach(), **grads}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        counter = _Counter()
        inputs = shard(rank)
        synced = {name: run_case(case, inputs, True) for name, case in CASES.items()}
        synced_calls = counter.calls
        group = {name: run_case(CASES[name], inputs, dist.group.WORLD) for name in GROUP_CASES}
        counter.calls = 0
        local = {name: run_case(case, inputs, False) for name, case in CASES.items()}
        result = {
            "synced": synced,
            "group": group,
            "local": local,
            "synced_calls": synced_calls,
            "local_calls": counter.calls,
            # the helpers on a tensor that differs per rank, unequal first dims
            "gathered": all_gather_variable(torch.arange(rank + 2.0).reshape(-1, 1), True),
            "reduced": all_reduce_sum(torch.tensor([rank + 1.0]), True),
            "mean": global_mean(torch.tensor(float(rank + 1)), 2 * rank + 1, True),
            # a DistributedDataParallel model: its averaged gradients
            "ddp": ddp_step(DistributedDataParallel(tiny_model()), inputs, True),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_ranks(out_dir: Path) -> list[dict[str, Any]]:
    context = mp.start_processes(
        _worker,
        args=(WORLD, _free_port(), str(out_dir)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the {WORLD} spawned ranks did not finish in {SPAWN_TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return spawn_ranks(tmp_path_factory.mktemp("ranks"))
    # Under pytest-xdist the ranks are spawned once for all workers (the shared parent of the
    # workers' temporary directories holds the results; a file lock makes the others wait).
    from filelock import FileLock  # a dependency of torch

    shared = tmp_path_factory.getbasetemp().parent / "bual_distributed_ranks"
    with FileLock(os.fspath(shared) + ".lock"):
        if not (shared / "done").is_file():
            shared.mkdir(exist_ok=True)
            result = spawn_ranks(shared)
            (shared / "done").touch()
            return result
    return [torch.load(shared / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict[str, Result]:
    """Every case in this process, on the concatenated batch, without synchronisation."""
    data = concatenated()
    return {name: run_case(case, data, False) for name, case in CASES.items()}


# --------------------------------------------------------------------------------------------
# comparisons


def _split_of(key: str) -> Optional[str]:
    return key.split(":", 1)[0] if ":" in key else None


def _assert_equalish(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    # ratio thresholds are order statistics: exact; relative ones are means, summed per rank
    if want.dtype == torch.bool or ("threshold" in what and "relative" not in what):
        assert torch.equal(got, want), f"{what}: {got} != {want}"
    elif want.dtype == torch.float32:  # fractions of soft/hard masks are float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=what)
    else:
        torch.testing.assert_close(got, want, **TOL, msg=what)


def check_case(name: str, per_rank: list[Result], reference: Result) -> None:
    want_out, want_grad = reference
    for rank, (out, grads) in enumerate(per_rank):
        assert out.keys() == want_out.keys()
        for key, want in want_out.items():
            split = _split_of(key)
            if key == "loss" and CASES[name].grad_factor == 1:
                split = "l"
            if split is not None:
                want = want[rows(split, rank)]
            elif rank > 0:  # global values are bitwise identical on every rank
                assert torch.equal(out[key], per_rank[0][0][key]), f"{name}/{key}"
            _assert_equalish(out[key], want, f"{name}/{key} rank {rank}")
        assert grads.keys() == want_grad.keys(), name
        for key, want in want_grad.items():
            split = full_data()[key][0]
            expected = CASES[name].grad_factor * want[rows(split, rank)]
            _assert_equalish(grads[key], expected, f"{name}/grad {key} rank {rank}")


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith(("bid", "ratios"))])
def test_region_losses_equal_the_concatenated_batch(
    name: str, ranks: list[dict[str, Any]], single: dict[str, Result]
) -> None:
    check_case(name, [r["synced"][name] for r in ranks], single[name])


def test_ratio_thresholds_masks_and_fractions_are_global(
    ranks: list[dict[str, Any]], single: dict[str, Result]
) -> None:
    check_case("ratios", [r["synced"]["ratios"] for r in ranks], single["ratios"])
    # the batch thresholds really depend on the other rank: per-rank values differ
    local = [r["local"]["ratios"][0]["threshold"] for r in ranks]
    assert not torch.equal(local[0], local[1])


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("bidirectional")])
def test_bidirectional_loss_end_to_end(
    name: str, ranks: list[dict[str, Any]], single: dict[str, Result]
) -> None:
    check_case(name, [r["synced"][name] for r in ranks], single[name])
    out = single[name][0]
    for key in ("labeled_high_fraction", "unlabeled_low_fraction"):
        if key in out and name != "bidirectional_labeled_only":  # a non-trivial region
            assert 0.0 < float(out[key]) < 1.0, f"{name}/{key} = {float(out[key])}"


def test_explicit_process_group_equals_true(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        for name in GROUP_CASES:
            (out_true, grad_true), (out_group, grad_group) = r["synced"][name], r["group"][name]
            for key in out_true:
                assert torch.equal(out_true[key], out_group[key]), f"{name}/{key}"
            for key in grad_true:
                assert torch.equal(grad_true[key], grad_group[key]), f"{name}/grad {key}"


def test_sync_dist_false_in_a_process_group_is_per_rank_and_calls_no_collective(
    ranks: list[dict[str, Any]],
) -> None:
    assert all(r["local_calls"] == 0 for r in ranks)
    assert all(r["synced_calls"] > 0 for r in ranks)
    # without synchronisation the global statistics are per rank, and the losses differ
    for name in (
        "ce_dice_fused_batch",
        "ce_dice_reference_per_sample",
        "bidirectional_ratio_fused",
    ):
        for r in ranks:
            assert not torch.allclose(r["local"][name][0]["loss"], r["synced"][name][0]["loss"])
    for rank, r in enumerate(ranks):
        inputs = shard(rank)
        for name, case in CASES.items():
            want_out, want_grad = run_case(case, inputs, False)
            got_out, got_grad = r["local"][name]
            for key in want_out:
                _assert_equalish(got_out[key], want_out[key], f"{name}/{key}")
            for key in want_grad:
                _assert_equalish(got_grad[key], want_grad[key], f"{name}/grad {key}")


def test_ddp_parameter_gradients_equal_the_single_process_ones(
    ranks: list[dict[str, Any]],
) -> None:
    want = ddp_step(tiny_model(), concatenated(), False)
    for r in ranks:
        assert r["ddp"].keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(r["ddp"][key], value, **TOL, msg=key)


def test_helpers_across_ranks(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        gathered = r["gathered"]
        assert [t.shape for t in gathered] == [(2, 1), (3, 1)]
        assert torch.equal(torch.cat(gathered).flatten(), torch.tensor([0.0, 1, 0, 1, 2]))
        assert torch.equal(r["reduced"], torch.tensor([3.0]))
        torch.testing.assert_close(r["mean"], torch.tensor(3.0 / 4.0))


# --------------------------------------------------------------------------------------------
# single process: errors and the no-op default


def _entry_points(sync: Any) -> list[Callable[[], Any]]:
    x = concatenated()
    ratio = RatioSchedule(0.5, per_sample=False)
    return [
        lambda: region_ce_dice_loss(x["logits"], x["labels"], sync_dist=sync),
        lambda: region_ce_loss(x["logits"], x["labels"], sync_dist=sync),
        lambda: region_dice_loss(x["logits"], x["labels"], sync_dist=sync),
        lambda: bidirectional_loss(x["zl"], x["y"], x["zu"], x["zt"], step=1, sync_dist=sync),
        lambda: RegionCEDiceLoss(sync_dist=sync)(x["logits"], x["labels"]),
        lambda: BidirectionalLoss(sync_dist=sync)(x["zl"], x["y"], None, None, step=1),
        lambda: ratio_threshold(x["u"], 0.5, per_sample=False, sync_dist=sync),
        lambda: resolve_threshold(x["u"], ratio, step=0, sync_dist=sync),
        lambda: high_uncertainty_mask(x["u"], ratio, step=0, sync_dist=sync),
        lambda: low_uncertainty_mask(x["u"], ratio, step=0, sync_dist=sync),
        lambda: soft_uncertainty_weight(x["u"], 0.5, temperature=0.1, sync_dist=sync),
        lambda: region_fraction(x["u"] > 0.5, sync_dist=sync),
        lambda: all_reduce_sum(x["u"], sync),
        lambda: all_gather_variable(x["u"], sync),
        lambda: global_mean(x["u"].sum(), x["u"].numel(), sync),
    ]


def test_sync_dist_true_without_process_group_raises() -> None:
    assert not dist.is_initialized()
    for call in _entry_points(True):
        with pytest.raises(RuntimeError, match=r"`sync_dist=True` needs an initialised"):
            call()


def test_sync_dist_of_the_wrong_type_raises() -> None:
    for bad in ("yes", 1, 0.0):
        with pytest.raises(TypeError, match=r"`sync_dist` must be False, True .* got"):
            region_ce_dice_loss(torch.zeros(1, 2, 3), torch.zeros(1, 3).long(), sync_dist=bad)
        with pytest.raises(TypeError, match="`sync_dist`"):
            RegionCEDiceLoss(sync_dist=bad)  # at construction
        with pytest.raises(TypeError, match="`sync_dist`"):
            BidirectionalLoss(sync_dist=bad)
        with pytest.raises(TypeError, match="`sync_dist`"):
            resolve_group(bad)


def test_modules_accept_sync_dist_before_the_group_exists() -> None:
    # Constructing is fine without a process group; only a call resolves it.
    RegionCEDiceLoss(sync_dist=True)
    BidirectionalLoss(sync_dist=True)


def test_sync_dist_false_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no collective may run with sync_dist=False")

    for name in ("all_reduce", "all_gather", "is_initialized", "get_world_size", "get_rank"):
        monkeypatch.setattr(dist, name, forbidden)
    assert resolve_group(False) is None and resolve_group(None) is None
    t = torch.arange(3.0)
    assert all_reduce_sum(t, False) is t
    gathered = all_gather_variable(t, False)
    assert len(gathered) == 1 and gathered[0] is t
    for call in _entry_points(False):
        call()  # nothing raises: no torch.distributed call at all
    data = concatenated()
    for name, case in CASES.items():
        out_false, grad_false = run_case(case, data, False)
        out_none, grad_none = run_case(case, data, None)
        for key in out_false:
            assert torch.equal(out_false[key], out_none[key]), f"{name}/{key}"
        for key in grad_false:
            assert torch.equal(grad_false[key], grad_none[key]), f"{name}/grad {key}"
    # and the default (no sync_dist argument) is bitwise the same as sync_dist=False
    x = data
    assert torch.equal(
        region_ce_dice_loss(x["logits"], x["labels"], x["weight"], batch=True),
        region_ce_dice_loss(x["logits"], x["labels"], x["weight"], batch=True, sync_dist=False),
    )
    assert torch.equal(
        bidirectional_loss(x["zl"], x["y"], x["zu"], x["zt"], step=5),
        bidirectional_loss(x["zl"], x["y"], x["zu"], x["zt"], step=5, sync_dist=False),
    )


def test_a_group_of_one_rank_needs_no_synchronisation(tmp_path: Path) -> None:
    store = dist.FileStore(os.fspath(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert resolve_group(True) is None
        x = concatenated()
        torch.testing.assert_close(
            region_ce_dice_loss(x["logits"], x["labels"], batch=True, sync_dist=True),
            region_ce_dice_loss(x["logits"], x["labels"], batch=True),
            rtol=0,
            atol=0,
        )
    finally:
        dist.destroy_process_group()
