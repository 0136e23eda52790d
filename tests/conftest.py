import gc
import os
import sys

import jax
import pytest

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
