"""Test-suite configuration.

Hypothesis runs derandomized by default: every run (CI included) checks the same examples, so a
red build is reproducible and never depends on the draw. ``HYPOTHESIS_PROFILE=explore`` draws
fresh random examples instead (run it locally to search for new failures; hypothesis prints how
to reproduce any it finds).
"""

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from bual_losses.engines import use_engine

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module", params=["chunked", "accelerator"])
def fused_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a module's ``impl="fused"`` calls on each fused engine in turn: the CPU chunked engine
    and the accelerator engine (on CPU tensors, through ``bual_losses.engines.use_engine``), so
    the equivalence, gradcheck, half-precision and compile tests cover both without a GPU.
    Module-scoped: hypothesis tests may use it."""
    with use_engine(request.param):
        yield request.param
