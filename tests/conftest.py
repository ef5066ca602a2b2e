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

# Many tests compile the same programs: every train()/evaluate() call traces fresh
# closures, so JAX's in-memory cache misses while the HLO is identical. A persistent
# compilation cache shared by this run's processes (the controller makes it before the
# xdist workers and subprocess tests start, which inherit it through the environment)
# compiles each program once per run; it is new for every run and removed at exit, so a
# run never reads another's executables. Measured (whole suite, 2 cores, AMD EPYC), with
# the references of the composition matrix and of the warm-start/train tests jitted once
# in the same change: 22.0 -> 14.4 min (worker time 42 -> 27.5 min), then 12.6 min (16.4
# in .ci/run from a fresh clone, same machine) with one redundant and one
# margin-of-one-example test out; one module alone (test_evaluate) 127 -> 93 s.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="deqjax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)


import jax  # noqa: E402
import pytest  # noqa: E402

# Full runs under pytest-xdist died of segmentation faults / aborts inside XLA's compile
# in tests that pass alone: each worker accumulates thousands of compiled executables,
# whose memory mappings approach the kernel's vm.max_map_count (65530 here). So the
# compiled executables are released from memory after every test module (the persistent
# cache above keeps them on disk only), and .ci/run raises the limit.


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
