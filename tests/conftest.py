import gc
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax  # noqa: E402
import pytest  # noqa: E402

# Full runs under pytest-xdist died of segmentation faults / aborts inside XLA's compile
# in tests that pass alone: each worker accumulates thousands of compiled executables,
# whose memory mappings approach the kernel's vm.max_map_count (65530 here). So no
# persistent compilation cache, the compiled executables are released after every test
# module, and .ci/run raises the limit.


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def x64():
    """Run a test in float64 and restore the previous setting afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)
