"""Test-suite configuration.

Hypothesis runs derandomized by default: every run (CI included) checks the same examples, so a
red build is reproducible and never depends on the draw. ``HYPOTHESIS_PROFILE=explore`` draws
fresh random examples instead (run it locally to search for new failures; hypothesis prints how
to reproduce any it finds).
"""

import os

from hypothesis import settings

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
