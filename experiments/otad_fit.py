r"""The OTAD post-training step (Gai, Wang & Zhang, arXiv:2408.00329).

    python -m experiments.otad_fit --workdir runs/otad_mnist_nn

Reads a workdir trained with an ``otad``/``otad_nn`` config and stores the
training-set index (``otad_index.npz``: embeddings x^0_j, features z_j = T(x^0_j),
neighbour-search keys, labels) and, for ``otad_nn``, the neural CIP trained against
CIP-solver targets (``otad_neural_cip.msgpack``), with statistics in
``otad_fit.json``; :func:`experiments.families.otad.load_fit` reads them back.
"""

from __future__ import annotations

import io
import json
import os
import time

import flax
import numpy as np

from experiments import cli, common
from experiments.families.otad import (
    CIP_FILE,
    FIT_FILE,
    INDEX_FILE,
    OTADFit,
    check_otad_config,
    compute_index,
    fit_neural_cip,
)
from experiments.workdir import load_run


def fit(workdir: str, *, quiet: bool = True) -> dict:
    """The post-training step of an ``otad``/``otad_nn`` workdir: index (+ neural CIP).

    Writes ``otad_index.npz``, ``otad_neural_cip.msgpack`` (``otad_nn`` only) and
    ``otad_fit.json`` (statistics) into ``workdir`` (local or ``gs://``); returns the
    statistics."""
    config, spec, state, ds, _ = load_run(workdir)
    check_otad_config(config)
    o, t0 = config.otad, time.time()
    n = int(o.index_size) or len(ds.train_images)
    images, labels = ds.train_images[:n], ds.train_labels[:n]
    x0, z, keys = compute_index(
        spec.module, state.params, images, o.neighbours, int(o.fit_batch_size)
    )
    buf = io.BytesIO()
    np.savez(buf, x0=x0, z=z, keys=keys, labels=labels)
    common.write_bytes(os.path.join(workdir, INDEX_FILE), buf.getvalue())
    stats = {
        "index_size": n,
        "embedding_dim": int(x0.shape[1]),
        "neighbours": o.neighbours,
        "mean_transport_displacement": float(np.mean(np.linalg.norm(z - x0, axis=1))),
        "index_seconds": time.time() - t0,
    }
    if config.model.name == "otad_nn":
        t1 = time.time()
        cip_params, s = fit_neural_cip(
            spec.module, state.params, OTADFit(x0, z, keys, labels), images, o, int(config.seed)
        )
        common.write_bytes(os.path.join(workdir, CIP_FILE), flax.serialization.to_bytes(cip_params))
        stats.update(s, cip_seconds=time.time() - t1)
    common.write_text(os.path.join(workdir, FIT_FILE), json.dumps(stats, indent=2))
    if not quiet:
        print(json.dumps(stats, indent=2), flush=True)
    return stats


def main(argv):
    del argv
    fit(cli.flag("workdir"), quiet=False)


if __name__ == "__main__":
    cli.run_workdir(main, "a training workdir of an otad / otad_nn config")
