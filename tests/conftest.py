import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax  # noqa: E402
import pytest  # noqa: E402

# No persistent compilation cache: with it, two full runs under pytest-xdist each died
# of a segmentation fault inside JAX's cache path (`_compile_and_write_cache`: one in
# the cache write, one in the compile it wraps), in different tests that pass alone.


@pytest.fixture
def x64():
    """Run a test in float64 and restore the previous setting afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)
