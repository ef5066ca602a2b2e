import gc
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles thousands of small XLA:CPU programs and runs each a few times, so
# compile time dominates: LLVM's backend optimisation is skipped. Measured, whole suite on
# 2 cores (Intel Xeon): 29.6 min with it, 36.9 min without; the few tests that run
# sizeable models get slower (the obfuscation test 65 -> 106 s, alone). Appended, so a
# user's own XLA_FLAGS still apply; subprocess tests inherit it through the environment.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()


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
