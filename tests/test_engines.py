"""The engine entrance: which engine runs, the package's import graph, and the closed-form
finishing gradient of the accelerator engine.

The equivalence of each engine with the reference is tested by the loss, fused, bidirectional
and module tests, which run on both fused engines (``tests/conftest.py``: ``fused_engine``).
"""

from __future__ import annotations

import ast
import copy
import itertools
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bual_losses
from bual_losses import (
    bidirectional_loss,
    ratio_schedule,
    region_ce_dice_loss,
    relative_threshold,
)
from bual_losses._core import Finish, Options, RegionStats, finish, finish_grad
from bual_losses.engines import ENGINES, select_engine, use_engine

PACKAGE = Path(bual_losses.__file__).parent


# --------------------------------------------------------------------------------------------
# 1. the import graph: no cycle, engines import only the core and the leaves


def _imports(path: Path) -> set[str]:
    """The package modules a module imports, lazy imports inside functions included."""
    module = f"bual_losses.{path.stem}" if path.stem != "__init__" else "bual_losses"
    package = "bual_losses"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith(package)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package  # every module lives at the package's top level
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith(package):
                continue
            if target == package:  # `from . import _validation`: the names are modules
                found |= {f"{package}.{alias.name}" for alias in node.names}
            else:
                found.add(target)
    found.discard(module)
    return {name for name in found if name != package}


def import_graph() -> dict[str, set[str]]:
    modules = {f"bual_losses.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "bual_losses.losses" in graph and graph["bual_losses.engines"]  # the parser works
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_lazy_imports_inside_functions_are_seen(tmp_path: Path) -> None:
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from .losses import region_ce_loss\n    return 1\n")
    assert _imports(source) == {"bual_losses.losses"}


@pytest.mark.parametrize("engine", ["bual_losses._reference", "bual_losses.fused",
                                    "bual_losses._accelerator"])  # fmt: skip
def test_engines_import_only_the_core_and_the_leaves(engine: str) -> None:
    """An engine sees the core (options, statistics, finishing) and the lower layers, never
    another engine, the entrance or the public losses built on it."""
    above = {
        "bual_losses.losses",
        "bual_losses.bidirectional",
        "bual_losses.modules",
        "bual_losses.engines",
        "bual_losses._reference",
        "bual_losses.fused",
        "bual_losses._accelerator",
    } - {engine}
    imported = import_graph()[engine]
    assert "bual_losses._core" in imported
    assert not imported & above, sorted(imported & above)


def test_losses_and_bidirectional_use_only_the_entrance() -> None:
    graph = import_graph()
    for module in ("bual_losses.losses", "bual_losses.bidirectional"):
        engines = {"bual_losses.fused", "bual_losses._accelerator", "bual_losses._reference"}
        assert "bual_losses.engines" in graph[module]
        assert not graph[module] & engines, module


# --------------------------------------------------------------------------------------------
# 2. the entrance


def test_select_engine_by_impl_and_device() -> None:
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert select_engine("auto", cpu) == select_engine("fused", cpu) == "chunked"
    assert select_engine("auto", meta) == select_engine("fused", meta) == "accelerator"
    assert select_engine("reference", meta) == "reference"
    with use_engine("accelerator"):
        assert select_engine("fused", cpu) == "accelerator"
        assert select_engine("reference", cpu) == "reference"
        with use_engine("chunked"):
            assert select_engine("auto", meta) == "chunked"
        assert select_engine("auto", cpu) == "accelerator"
    assert select_engine("auto", cpu) == "chunked"
    assert ENGINES == ("reference", "chunked", "accelerator")


def test_use_engine_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="`name` must be one of"), use_engine("reference"):
        pass


def test_meta_tensors_run_the_accelerator_engine_without_data() -> None:
    """The meta device takes the accelerator path (what the launch counts measure)."""
    z = torch.randn(2, 3, 8, 8, device="meta", requires_grad=True)
    y = torch.randint(0, 3, (2, 8, 8), device="meta")
    loss = region_ce_dice_loss(z, y, torch.rand(2, 8, 8, device="meta"))
    loss.backward()
    assert loss.device.type == "meta" and z.grad is not None and z.grad.shape == z.shape
    zu, zt = torch.randn(2, 3, 8, 8, device="meta", requires_grad=True), torch.randn_like(z)
    bidirectional_loss(z, y, zu, zt, step=10, total_steps=100).backward()
    assert zu.grad is not None


@pytest.mark.parametrize("engine", ["chunked", "accelerator"])
def test_fused_engines_refuse_higher_order_gradients_with_a_clear_message(engine: str) -> None:
    """Their backward is closed form (the accelerator's a product with a precomputed gradient):
    differentiating it again would be wrong, so create_graph=True names the way out."""
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 4))
    with use_engine(engine):
        loss = region_ce_dice_loss(z, y)
        (grad,) = torch.autograd.grad(loss, z, retain_graph=True)
        with pytest.raises(RuntimeError, match=r"create_graph=True.*impl='reference'"):
            torch.autograd.grad(loss, z, create_graph=True)
    (ref,) = torch.autograd.grad(region_ce_dice_loss(z, y, impl="reference"), z, create_graph=True)
    torch.testing.assert_close(grad, ref.detach())


# --------------------------------------------------------------------------------------------
# 3. finish_grad == autograd through finish


FINISH_KEYS = ("reduction", "batch", "include_background", "sigmoid", "class_weight", "smooth")
FINISH_VALUES = (
    ("mean", "sum", "none"), (False, True), (True, False), (False, True), (False, True), (1e-5, 0.0)
)  # fmt: skip
FINISH_OPTIONS = [
    dict(zip(FINISH_KEYS, v))
    for v in itertools.product(*FINISH_VALUES)
    if not (v[0] == "none" and v[1])  # batch Dice has no per-sample value
]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    lambdas=st.sampled_from([(1.0, 1.0), (0.3, 2.0), (0.0, 1.0), (1.0, 0.0)]),
    empty=st.booleans(),
)
@pytest.mark.parametrize("option", FINISH_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_finish_grad_equals_autograd_through_finish(
    option: dict[str, Any], seed: int, lambdas: tuple[float, float], empty: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    b, k = 3, 2 if option["sigmoid"] else 4

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen, dtype=torch.float64) * 5

    stats = RegionStats(rand(b), rand(b) + 0.5, rand(b, k), rand(b, k), rand(b, k))
    if empty:  # a term with nothing predicted and nothing to find (the empty policy)
        for t in (stats.inter, stats.pred, stats.ground):
            t[0, -1] = 0.0
    opts = Options(
        activation="sigmoid" if option["sigmoid"] else "softmax",
        kind="labels",
        class_weight=rand(k) if option["class_weight"] else None,
        ignore_index=None,
        include_background=option["include_background"],
        squared_pred=False,
        smooth_nr=option["smooth"],
        smooth_dr=option["smooth"],
        batch=option["batch"],
        eps=1e-8,
    )
    spec = Finish(*lambdas, option["reduction"])
    leaves = [s.clone().requires_grad_(name in ("ce_num", "inter", "pred"))
              for name, s in zip(RegionStats._fields, stats)]  # fmt: skip
    expected = finish(RegionStats(*leaves), opts, spec)
    wanted = [leaves[0], leaves[2], leaves[3]]
    if expected.requires_grad:
        grads = torch.autograd.grad(expected.sum(), wanted, allow_unused=True)
    else:
        grads = (None, None, None)
    got = finish_grad(stats, opts, spec)
    torch.testing.assert_close(got.loss, expected.detach(), rtol=1e-12, atol=1e-12)
    for name, leaf, mine, theirs in zip(("ce_num", "inter", "pred"), wanted, got[1:], grads):
        # None: no gradient (a term with weight 0), the same as zeros
        mine_t = torch.zeros_like(leaf) if mine is None else torch.as_tensor(mine, dtype=leaf.dtype)
        mine_t = mine_t.expand_as(leaf)
        theirs_t = torch.zeros_like(leaf) if theirs is None else theirs
        torch.testing.assert_close(mine_t, theirs_t, rtol=1e-12, atol=1e-12, msg=name)


# --------------------------------------------------------------------------------------------
# 4. torch.compile: dynamic shapes and batch sizes


def _batch(b: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    zl, zu, zt = (torch.randn(b, 3, 6, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    return zl, torch.randint(0, 3, (b, 6, 7), generator=gen), zu, zt


def _bidirectional_step(zl: Any, y: Any, zu: Any, zt: Any, step: int) -> torch.Tensor:
    return bidirectional_loss(zl, y, zu, zt, step=step, total_steps=10)  # type: ignore[return-value]


def _check_compiled(compiled: Any, b: int, step: int) -> None:
    zl, y, zu, zt = _batch(b, seed=b)
    got_in = [zl.clone().requires_grad_(), zu.clone().requires_grad_()]
    want_in = [zl.clone().requires_grad_(), zu.clone().requires_grad_()]
    got = compiled(got_in[0], y, got_in[1], zt, step)
    want = _bidirectional_step(want_in[0], y, want_in[1], zt, step)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, w in zip(torch.autograd.grad(got, got_in), torch.autograd.grad(want, want_in)):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12)


def test_compile_with_dynamic_shapes_traces_and_equals_eager() -> None:
    """dynamic=True makes the numbers symbolic too: the option checks must not read them."""
    torch._dynamo.reset()
    compiled = torch.compile(_bidirectional_step, fullgraph=True, dynamic=True, backend="aot_eager")
    region = torch.compile(region_ce_dice_loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for b in (2, 3, 5):
        _check_compiled(compiled, b, step=b)
        z, y = _batch(b, seed=b)[:2]
        torch.testing.assert_close(region(z, y), region_ce_dice_loss(z, y), rtol=1e-10, atol=0)


def test_compile_keeps_one_graph_for_every_batch_size() -> None:
    """The last batch of an epoch is smaller: new batch sizes (and steps) must not recompile
    beyond the first dynamic graph (the ninth distinct size used to be a hard failure)."""
    torch._dynamo.reset()
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        graphs.append(1)
        return gm.forward

    compiled = torch.compile(_bidirectional_step, fullgraph=True, backend=counting)
    for i, b in enumerate(range(1, 12)):
        _check_compiled(compiled, b, step=i)
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 11 batch sizes"


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_compiled_training_step_recipe() -> None:
    """The sharp-edges recipe, followed as written: compile the whole training step (student
    and teacher forward, ``bidirectional_loss`` with a Python-int step, backward, optimiser
    step) once, mark the batch dim dynamic on the first batch, then train 50 steps and feed 10
    distinct batch sizes: no error, equal to eager, and at most 2 graphs in all."""
    torch._dynamo.reset()
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        graphs.append(1)
        return gm.forward

    torch.manual_seed(0)
    student, teacher = _TinyNet().double(), _TinyNet().double()
    twin = copy.deepcopy(student)  # trained eagerly, side by side

    def losses(net: torch.nn.Module, xl: Any, y: Any, xu: Any, step: int) -> torch.Tensor:
        with torch.no_grad():
            zt = teacher(xu)
        return bidirectional_loss(  # type: ignore[return-value]
            net(xl), y, net(xu), zt, step=step, total_steps=40
        )

    compiled = torch.compile(losses, fullgraph=True, backend=counting)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    sizes = [4] * 50 + list(range(2, 12))  # 50 steps, then 10 batch sizes (a short last batch)
    for step, b in enumerate(sizes):
        xl, xu = (torch.randn(b, 1, 8, 9, generator=gen, dtype=torch.float64) for _ in range(2))
        y = torch.randint(0, 3, (b, 8, 9), generator=gen)
        if step == 0:  # the recipe: one line before the first compiled call
            for t in (xl, y, xu):
                torch._dynamo.mark_dynamic(t, 0)
        for net, optimiser, fn in ((student, opt, compiled), (twin, opt_twin, losses)):
            optimiser.zero_grad()
            loss = fn(net, xl, y, xu, step)
            loss.backward()
            optimiser.step()
        for a, w in zip(student.parameters(), twin.parameters()):
            torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12)
    assert len(graphs) <= 2, f"{len(graphs)} graphs for {len(sizes)} steps"


# --------------------------------------------------------------------------------------------
# 5. torch.func: the default path runs the reference engine inside the transforms


def test_torch_func_grad_and_vmap_of_the_default_path() -> None:
    z, y, zu, zt = _batch(3, seed=9)
    grad = torch.func.grad(lambda a: region_ce_dice_loss(a, y))(z)
    leaf = z.clone().requires_grad_()
    region_ce_dice_loss(leaf, y, impl="reference").backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-14)
    per_sample = torch.func.vmap(lambda a, t: region_ce_dice_loss(a[None], t[None]))(z, y)
    expected = torch.stack([region_ce_dice_loss(z[i : i + 1], y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(per_sample, expected, rtol=1e-12, atol=0)
    jac = torch.func.jacrev(lambda a: region_ce_dice_loss(a, y, reduction="none"))(z)
    leaf = z.clone().requires_grad_()
    per = region_ce_dice_loss(leaf, y, reduction="none", impl="reference")
    for i in range(3):
        (row,) = torch.autograd.grad(per[i], leaf, retain_graph=True)
        torch.testing.assert_close(jac[i], row, rtol=1e-12, atol=1e-14)
    grad = torch.func.grad(lambda a: _bidirectional_step(a, y, zu, zt, step=4))(z)
    leaf = z.clone().requires_grad_()
    bidirectional_loss(leaf, y, zu, zt, step=4, total_steps=10, impl="reference").backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-14)


def test_compile_with_map_thresholds_equals_eager() -> None:
    """Ratio and batch-relative thresholds take the whole map (and on CPU a float16 weight):
    that path must trace with fullgraph=True too."""
    torch._dynamo.reset()
    zl, y, zu, zt = _batch(3, seed=31)
    options = dict(
        high_threshold=ratio_schedule(0.25),
        low_threshold=relative_threshold(1.2, per_sample=False),
        total_steps=10,
    )

    def step_fn(a: Any, b: Any) -> torch.Tensor:
        return bidirectional_loss(a, y, b, zt, step=3, **options)  # type: ignore[return-value]

    compiled = torch.compile(step_fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(zl, zu), step_fn(zl, zu), rtol=1e-10, atol=1e-12)
