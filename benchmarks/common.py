"""Shared pieces of the benchmarks: models, data, the alternating timer, the machine.

Timing protocol: each side is called once to compile/warm up (JAX's first call is
reported separately as ``compile_s``: trace + XLA compile + first run), then the two
sides are timed alternately ``reps`` times in the same process (jax, torch, jax,
torch, …) so that load changes on the (shared) machine hit both equally; medians
are reported. JAX results are ``block_until_ready``-ed inside the timed region.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deqjax.deq import DEQConfig
from deqjax.models import FastConv, MDEQClassifier
from deqjax.solvers import SolverConfig


def deq_config(iters: int = 12, backward: str = "implicit") -> DEQConfig:
    """The benchmark DEQ: Anderson m=5, exactly ``iters`` forward evaluations (tol 0),
    fixed-point adjoint of exactly ``iters`` steps (tol 0)."""
    return DEQConfig(
        forward=SolverConfig(
            method="anderson",
            max_iter=iters,
            tol=0.0,
            anderson_m=5,
            stop_mode="rel",
            anderson_ridge_mode="absolute",  # torchdeq's lam=1e-4 is absolute
        ),
        backward=backward,
        adjoint_solver="fixed_point",
        adjoint_max_iter=iters,
        adjoint_tol=0.0,
    )


def torchdeq_kwargs(iters: int = 12) -> dict:
    """torchdeq settings matching :func:`deq_config`."""
    return dict(
        core="indexing",
        ift=True,
        f_solver="anderson",
        f_max_iter=iters,
        f_tol=0.0,
        f_stop_mode="rel",
        b_solver="fixed_point_iter",
        b_max_iter=iters,
        b_tol=0.0,
        b_stop_mode="rel",
    )


def mdeq(iters: int = 12, backward: str = "implicit") -> MDEQClassifier:
    return MDEQClassifier(head_kind="gap", deq=deq_config(iters, backward))


class SmallConvNet(nn.Module):
    """conv3×3(1→16) → ReLU → conv3×3/2(16→32) → ReLU → flatten → 100 → ReLU → 10."""

    @nn.compact
    def __call__(self, x):
        # deqjax.models.FastConv: nn.Conv's parameters and values, with the input
        # gradient as a forward conv (2x faster inside the attack's lax.scan on XLA:CPU)
        h = nn.relu(FastConv(16, 3, name="c1")(x))
        h = nn.relu(FastConv(32, 3, strides=2, name="c2")(h))
        h = nn.relu(nn.Dense(100, name="d1")(h.reshape(h.shape[0], -1)))
        return nn.Dense(10, name="d2")(h)


def mnist_like(batch: int, seed: int = 0):
    """Deterministic MNIST-shaped data (B, 28, 28, 1) in [0, 1] with labels.
    Timings do not depend on pixel values; random data keeps the benchmark offline."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (batch, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return x, y


def to_nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def block(out):
    return jax.block_until_ready(out)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    block(out)
    return time.perf_counter() - t, out


def alternate(jax_fn: Callable, torch_fn: Callable | None, reps: int) -> dict:
    """Warm up both, then time them alternately; returns medians and compile time."""
    compile_s, _ = _timed(jax_fn)
    res = {"compile_s": compile_s}
    if torch_fn is not None:
        res["torch_warmup_s"], _ = _timed(torch_fn)
    tj, tt = [], []
    for _ in range(reps):
        tj.append(_timed(jax_fn)[0])
        if torch_fn is not None:
            tt.append(_timed(torch_fn)[0])
    res["deqjax_s"] = statistics.median(tj)
    res["deqjax_all_s"] = tj
    if tt:
        res["torch_s"] = statistics.median(tt)
        res["torch_all_s"] = tt
        res["ratio"] = res["deqjax_s"] / res["torch_s"]
    return res


def steady_state_malloc(mmap_threshold_mb: int = 32) -> bool:
    """Fix glibc malloc's mmap/trim thresholds (32 / 64 MiB) for the whole run.

    By default glibc serves every allocation above a *dynamic* threshold (initially
    128 KiB) with fresh ``mmap`` pages, which are page-faulted and zeroed on each call;
    the threshold only rises after the process first frees such a block. So the same
    op's speed depended on allocation history: torch's conv_a forward (3 MB output)
    took 8.5 ms right after start-up and 6 ms once any large array had been freed
    (measured, same process, same inputs). Fixing the thresholds puts both frameworks
    in the steady state a long training run reaches anyway. Returns whether it was
    applied (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        mb = 1 << 20
        return bool(
            libc.mallopt(m_mmap_threshold, mmap_threshold_mb * mb)
            and libc.mallopt(m_trim_threshold, 2 * mmap_threshold_mb * mb)
        )
    except (OSError, AttributeError):
        return False


def machine(gpu: bool = False) -> dict:
    """Describe the machine (CPU, cores, load average, library versions, device)."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    for mod in ("torchdeq", "torchattacks", "flax", "optax"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod)
        except Exception:  # noqa: BLE001 - optional, version only
            info[mod] = None
    if gpu:
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def torch_device(gpu: bool):
    import torch

    return torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")


def init_mdeq(model, batch: int = 2, seed: int = 0):
    x, _ = mnist_like(batch, seed)
    return model.init(jax.random.PRNGKey(seed), jnp.asarray(x))
