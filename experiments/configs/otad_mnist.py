"""OTAD on mnist_5k (Gai, Wang & Zhang, arXiv:2408.00329): an OT-regularised
ResNet, then at test time the convex-integration (CIP) solver on the K = 10
nearest training points (l = 0, L = 2, relaxed upward when the LP is infeasible).

    python -m experiments.train --config experiments/configs/otad_mnist.py --workdir runs/otad_mnist
    python -m experiments.otad_evaluate --workdir runs/otad_mnist   # fits the index first

Choices (docs/methods/otad.md):
* neighbours are searched in the network's embedding space x^0 (``otad.neighbours =
  "embedding"``; ``"input"`` = raw pixels): the CIP's guarantees
  ``|g(x) - z_j| <= L |x - x_j|`` are stated in x^0, so the nearest points in x^0
  make that bound tightest, and x^0 is also where g interpolates T;
* ``otad.form = "envelope"``: the Taylor-Hendrickx-Glineur lower extension, which
  provably interpolates T on the neighbours and is L-Lipschitz; ``"authors"`` is the
  formula as written in the paper, which guarantees neither (see deqjax/otad/cip.py).
Trains in about a minute on 2 CPU cores.
"""

from experiments.configs.base import base_config


def otad_block(c):
    """The ``model`` and ``otad`` keys of the OTAD family (experiments/families/otad.py)."""
    c.model.name = "otad"
    c.model.width = 16  # channels of x^0 = E(image): d = 7 * 7 * width
    c.model.num_blocks = 4  # residual blocks r_k of the flow T
    c.model.block = "conv"  # conv | dense
    c.model.hidden = 64  # hidden width of dense blocks
    c.model.zero_init_residual = False
    c.model.image_shape = (28, 28, 1)
    c.otad = dict(
        transport_weight=0.1,  # lambda of CE + lambda * sum_k |x^{k+1} - x^k|^2
        k=10,
        l=0.0,
        L=2.0,  # neighbours, strong convexity, smoothness
        form="envelope",  # envelope | authors
        n_relax=5,
        factor=2.0,  # L relaxation: L * factor**r, r = 0..n_relax
        maxiter=200,  # FISTA iterations of the dual QP (then exact active-set polish)
        neighbours="embedding",  # embedding (x^0) | input (pixels)
        index_size=0,  # training points in the index (0 = all)
        fit_batch_size=500,
        # neural CIP (model otad_nn): MSE on CIP-solver targets
        cip_hidden=64,
        cip_steps=1500,
        cip_batch_size=128,
        cip_learning_rate=3e-3,
        cip_noise=0.3,
        cip_noisy_copies=1,
        # the evaluation (experiments/otad_evaluate.py): robustness.norm/eps first,
        # then also_norm/also_eps ('' = skip); the attacked views of each OTAD model
        # are robustness.protocols (autodiff, bpda, transfer) around the network
        also_norm="l2",
        also_eps="1.0,2.0",
    )
    return c


def get_config():
    c = otad_block(base_config())
    c.train.epochs = 4
    c.train.batch_size = 64
    c.train.learning_rate = 3e-3
    c.robustness.after_training = False  # run experiments.otad_evaluate instead
    c.robustness.norm = "linf"
    c.robustness.eps = "0.1,0.2,0.3"
    c.robustness.attacks = "pgd,apgd-ce,square"
    c.robustness.n_examples = 100
    c.robustness.n_iter = 20
    c.robustness.n_queries = 200
    c.robustness.gradients = "autodiff"
    return c
