r"""The OTAD post-training step (Gai, Wang & Zhang, arXiv:2408.00329).

    python -m experiments.otad_fit --workdir runs/otad_mnist_nn

Reads a workdir trained with an ``otad``/``otad_nn`` config and stores the
training-set index (``otad_index.npz``: embeddings x^0_j, features z_j = T(x^0_j),
neighbour-search keys, labels) and, for ``otad_nn``, the neural CIP trained against
CIP-solver targets (``otad_neural_cip.msgpack``), with statistics in
``otad_fit.json``. See :func:`experiments.families.otad.fit`.
"""

from __future__ import annotations


def main(argv):
    from absl import flags

    from experiments.families.otad import fit

    del argv
    fit(flags.FLAGS.workdir, quiet=False)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "a training workdir of an otad / otad_nn config")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
