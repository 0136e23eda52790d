import gc
import os
import sys

# CPU only: libtpu (a test dependency, for ahead-of-time TPU compiles in a subprocess) must not
# make every test process probe for a TPU. Subprocesses inherit this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests import helpers (tests/hf_models.py) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops jit caches after each test module.

    Every XLA:CPU executable keeps a few memory mappings; the whole suite compiles tens of
    thousands of programs, which otherwise exhausts the kernel's vm.max_map_count (65530) and
    makes a later compilation segfault.
    """
    yield
    jax.clear_caches()
    gc.collect()
