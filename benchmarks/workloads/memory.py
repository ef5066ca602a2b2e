"""Peak memory of a DEQ forward+backward: implicit vs unrolled backward.

Each configuration runs in a fresh subprocess (``python -m
benchmarks.workloads.memory FRAMEWORK BACKWARD ITERS BATCH``), so allocator caches
of one configuration never hide another's peak. Inside, the program is compiled (JAX,
ahead of time), then the gradient of the mean cross-entropy w.r.t. the parameters
is computed once while a thread samples the resident set size
(``/proc/self/statm``, every 0.5 ms); the reported ``peak_delta_mb`` is the highest
sample minus the RSS just before that run (the first execution: a second one would
reuse resident pages). (``ru_maxrss`` alone is not used: XLA's compile peak would
mask the run's.) For JAX the compiled program's own buffer plan is also reported:
``xla_temp_mb`` = ``compiled.memory_analysis().temp_size_in_bytes``, exact and
load-independent. The implicit backward stores only ``z*`` (Bai et al. 2019), so its
memory must stay flat in the iteration count; the unrolled one grows linearly.
torch "unroll" is :func:`benchmarks.torch_models.anderson_unrolled` under autograd.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _peak_during(fn) -> float:
    """MB of RSS above the pre-run level at the sampled peak while ``fn`` runs."""
    base, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn()
    stop.set()
    t.join()
    return max(peak[0], _rss()) - base


def _data(batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return (
        rng.uniform(0, 1, (batch, 28, 28, 1)).astype(np.float32),
        rng.integers(0, 10, batch).astype(np.int32),
    )


def _measure(framework: str, backward: str, iters: int, batch: int) -> dict:
    x, y = _data(batch)
    out = {"framework": framework, "backward": backward, "iters": iters, "batch": batch}
    if framework == "deqjax":
        import jax
        import jax.numpy as jnp
        import optax

        from benchmarks import common

        model = common.mdeq(iters, backward)
        params = common.init_mdeq(model)
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        loss = lambda p: jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xj)[0], yj)
        )
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        try:
            out["xla_temp_mb"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
        except Exception:  # noqa: BLE001 - not every backend reports it
            out["xla_temp_mb"] = None
        fn = lambda: jax.block_until_ready(compiled(params))
    else:  # torch only: no jax import; memory does not depend on the weights' values
        import numpy as np
        import torch

        from benchmarks.torch_models import TorchMDEQ

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        kw = dict(
            core="indexing",
            ift=True,
            f_solver="anderson",
            f_max_iter=iters,
            f_tol=0.0,
            b_solver="fixed_point_iter",
            b_max_iter=iters,
            b_tol=0.0,
        )
        tm = TorchMDEQ(deq_kwargs=kw, unroll_iters=iters if backward == "unroll" else 0).train()
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        yt = torch.from_numpy(y).long()

        def fn():
            torch.nn.functional.cross_entropy(tm(xt), yt).backward()

    # First execution after compilation: a second one would reuse pages the first
    # left resident and under-report.
    out["peak_delta_mb"] = _peak_during(fn) / 2**20
    return out


def run_config(framework: str, backward: str, iters: int, batch: int, timeout: int = 300) -> dict:
    """Measure one configuration in a fresh subprocess; returns its JSON record."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.workloads.memory",
        framework,
        backward,
        str(iters),
        str(batch),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    if proc.returncode != 0:
        return {
            "framework": framework,
            "backward": backward,
            "iters": iters,
            "batch": batch,
            "error": proc.stderr[-2000:],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    fw, bw, it, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(_measure(fw, bw, it, bs)))
