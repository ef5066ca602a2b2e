"""Data parallelism on JAX's own multi-controller runtime (no pmap).

Every process runs the same program (SPMD). One ``jax.sharding.Mesh`` spans all
devices of all processes with axes ``('data', 'model')``; a batch is split along
``'data'`` (``NamedSharding(mesh, P('data'))``) and parameters are replicated, or,
with ``config.parallel.shard_params``, parameters and optimiser state are split along
``'model'`` over their largest divisible dimension (replicated where none divides).
``jax.jit`` then partitions the step (GSPMD): the gradient all-reduce, and the inner
attack of adversarial training, run sharded with no hand-written collectives.

Data: the global batch ``i`` of epoch ``e`` is rows ``perm[i·B:(i+1)·B]`` of the
epoch permutation (:func:`deqjax.data.epoch_permutation`), whatever the number of
hosts; each process reads only the rows its devices hold (:func:`process_rows`) and
:func:`global_batch` assembles the global array with
``jax.make_array_from_process_local_data``.

Multi-host start-up: :func:`maybe_initialize_distributed` calls
``jax.distributed.initialize`` when flags or the environment (SLURM, Cloud TPU pod,
``JAX_COORDINATOR_ADDRESS``) say there are several processes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deqjax import data as data_lib

DATA, MODEL = "data", "model"
log = logging.getLogger("deqjax.parallel")


# --------------------------------------------------------------------------- start-up
def _cluster_environment() -> str | None:
    env = os.environ
    if env.get("DEQJAX_DISTRIBUTED") == "1":  # set by tpu_scripts/launch.sh: let JAX detect the pod
        return "forced"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return "slurm"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """``jax.distributed.initialize`` when asked (explicit arguments) or when the
    environment is a multi-process cluster (SLURM with >1 task, a multi-host Cloud TPU
    slice, ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, or
    ``DEQJAX_DISTRIBUTED=1`` as ``tpu_scripts/launch.sh`` sets);
    JAX's cluster detection fills in what is not given. Returns whether it initialised.
    Call before anything touches a device."""
    if jax.distributed.is_initialized():
        return False
    explicit = (
        coordinator_address is not None or num_processes is not None or process_id is not None
    )
    kind = None if explicit else _cluster_environment()
    if not explicit and kind is None:
        return False
    if kind == "env":
        coordinator_address = os.environ["JAX_COORDINATOR_ADDRESS"]
        num_processes = (
            int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None
        )
        process_id = int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None
    if (
        explicit
        and coordinator_address
        and (num_processes is None or process_id is None)
        and not os.environ.get("SLURM_JOB_ID")
    ):
        raise ValueError(
            "--coordinator_address needs --num_processes and --process_id (or run under "
            "SLURM / a TPU pod, where JAX detects them)"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    log.info(
        "jax.distributed initialised (%s): process %d of %d, %d local / %d global devices",
        kind or "flags",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_main_process() -> bool:
    """Process 0 writes logs, metric files and progress bars."""
    return jax.process_index() == 0


# --------------------------------------------------------------------------- mesh
def make_mesh(model_axis_size: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``('data', 'model')`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    m = int(model_axis_size)
    if m < 1 or len(devices) % m:
        raise ValueError(
            f"parallel.model_axis_size={m} must be >= 1 and divide the {len(devices)} devices"
        )
    # Sorted by (process, id): each process's devices hold a contiguous block of batch
    # rows, and a 'model' group stays inside one process when m divides its device count.
    devices.sort(key=lambda d: (d.process_index, d.id))
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // m, m)
    return Mesh(grid, (DATA, MODEL))


def mesh_from_config(config) -> tuple[Mesh, bool]:
    """``(mesh, shard_params)`` from the optional ``config.parallel`` block
    (``shard_params``: bool, ``model_axis_size``: int; default 1, or every device of
    a process when ``shard_params`` and no size is given)."""
    p = config.get("parallel") or {}
    shard = bool(p.get("shard_params", False))
    size = int(p.get("model_axis_size", 0) or 0) or (jax.local_device_count() if shard else 1)
    if size > jax.device_count():  # e.g. evaluating a sharded run's checkpoint on fewer devices
        log.warning(
            "parallel.model_axis_size=%d > %d devices: using %d",
            size,
            jax.device_count(),
            jax.device_count(),
        )
        size = jax.device_count()
    return make_mesh(size), shard


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_size(mesh: Mesh) -> int:
    return int(mesh.shape[DATA])


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    """Clear error when a global batch cannot be split evenly over the data axis."""
    n = data_size(mesh)
    if batch_size % n:
        raise ValueError(
            f"{name}={batch_size} must be divisible by the {n} data-parallel devices "
            f"(mesh {dict(mesh.shape)}); use e.g. {name}={max(n, batch_size // n * n)}"
        )


def _param_sharding(mesh: Mesh, x) -> NamedSharding:
    m = int(mesh.shape[MODEL])
    shape = np.shape(x)
    if m > 1 and shape:
        dims = [d for d in np.argsort(shape)[::-1] if shape[d] % m == 0 and shape[d] >= m]
        if dims:
            spec = [None] * len(shape)
            spec[int(dims[0])] = MODEL
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def state_shardings(mesh: Mesh, state, shard_params: bool = False):
    """Shardings for a ``common.TrainState``: everything replicated, or params and
    optimiser state split over ``'model'`` (largest divisible dim; replicated fallback)."""
    rep = replicated(mesh)
    if not shard_params:
        return jax.tree.map(lambda _: rep, state)
    shard = lambda tree: jax.tree.map(lambda x: _param_sharding(mesh, x), tree)
    return type(state)(
        params=shard(state.params),
        model_state=jax.tree.map(lambda _: rep, state.model_state),
        opt_state=shard(state.opt_state),
        step=rep,
        key=rep,
    )


def put_state(tree, shardings):
    """Place a host pytree (identical on every process) as global arrays with ``shardings``."""

    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(put, tree, shardings)


# --------------------------------------------------------------------------- data
def process_rows(sharding: NamedSharding, global_batch_size: int) -> tuple[int, int]:
    """``[start, stop)``: the rows of a global batch held by this process's devices."""
    idx = sharding.addressable_devices_indices_map((global_batch_size,))
    spans = sorted(
        {
            (s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
            for s in idx.values()
        }
    )
    start, stop = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
        raise ValueError(
            f"this process's devices hold non-contiguous batch rows {spans}; "
            "use a mesh whose data axis keeps each process's devices together"
        )
    return start, stop


def global_batch(local: Sequence[np.ndarray], sharding: NamedSharding, global_batch_size: int):
    """Host-local rows (from :func:`process_rows`) → global ``jax.Array`` s."""
    return tuple(
        jax.make_array_from_process_local_data(
            sharding, np.asarray(a), (global_batch_size,) + np.shape(a)[1:]
        )
        for a in local
    )


def shard_host_batch(arrays: Sequence[np.ndarray], sharding: NamedSharding):
    """A global batch that every process has in memory → global arrays (each process
    contributes only its own rows)."""
    n = len(arrays[0])
    start, stop = process_rows(sharding, n)
    return global_batch([np.asarray(a)[start:stop] for a in arrays], sharding, n)


def host_epoch_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    rows: tuple[int, int] | None = None,
    with_indices: bool = False,
) -> Iterator[tuple[np.ndarray, ...]]:
    """This process's rows ``rows`` of each global batch of
    :func:`deqjax.data.epoch_batches` (same permutation, drop_last): with
    ``rows=(0, batch_size)`` exactly its batches. ``with_indices``: ``(images,
    labels, dataset indices)``."""
    n = len(images)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples available")
    lo, hi = rows or (0, batch_size)
    perm = data_lib.epoch_permutation(n, seed, epoch)
    for b in range(start_batch, n // batch_size):
        idx = perm[b * batch_size : (b + 1) * batch_size][lo:hi]
        yield (images[idx], labels[idx], idx) if with_indices else (images[idx], labels[idx])


def pad_batch(arrays: Sequence[np.ndarray], size: int):
    """Pad a (last, short) batch to ``size`` rows by repeating its last row; returns
    ``(padded arrays, mask)`` with ``mask`` True on real rows."""
    n = len(arrays[0])
    mask = np.arange(size) < n
    if n == size:
        return list(arrays), mask
    take = np.minimum(np.arange(size), n - 1)
    return [np.asarray(a)[take] for a in arrays], mask


# --------------------------------------------------------------------------- preemption
class PreemptionGuard:
    """SIGTERM → stop at the next step boundary. Single process: a signal handler sets
    a flag. Several processes: JAX's preemption sync point (its distributed runtime
    catches the signal and agrees on one step for all processes), so every process
    saves the same step. Use as a context manager; the previous handler comes back on exit."""

    def __init__(self):
        self.flag = False
        self._previous = None

    def _handler(self, signum, frame):
        self.flag = True

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(int(step)))
            except Exception:  # preemption service not running
                return False
        return self.flag
