"""A small Convex Potential Layer network on mnist_5k (Meunier et al. 2022, ICML):
hinge loss, ℓ2 certificates next to empirical attacks at ε ∈ {0.5, 1.0, 1.58}.
Trains in about 2–3 minutes on 2 CPU cores."""

from experiments.configs.base import base_config


def cpl_model(c):
    """The ``model`` keys of the ``cpl`` family (see experiments/families/cpl.py)."""
    c.model.name = "cpl"
    c.model.depth = 2  # convolutional CPLs
    c.model.depth_linear = 2  # dense CPLs
    c.model.conv_channels = 16  # input channels are zero-padded to this
    c.model.conv_inner = 16  # channels of W in x − h Wᵀ ReLU(W x + b)
    c.model.linear_width = 256  # rows of W of the dense CPLs (features padded to it)
    c.model.pool = 4  # 1-Lipschitz sum-pool / window side
    c.model.kernel_size = 3
    c.model.padding = "SAME"
    c.model.last_layer = "truncate"  # truncate | row_normalized
    c.model.eval_power_iters = 100  # in-forward power iterations of the per-epoch test accuracy
    # Evaluation (experiments.evaluate) stores each layer's σ once: a Gram-iteration upper
    # bound (the evaluated, provably 1-Lipschitz network) and power iteration run until σ
    # rises by < converge_rtol per step (the conventional certificate's network).
    c.model.gram_iters = 12
    c.model.converge_rtol = 1e-7
    c.model.converge_max_iters = 5000
    return c


def get_config():
    c = cpl_model(base_config())
    c.train.loss = "hinge"
    c.train.hinge_margin = 0.7
    c.train.epochs = 8
    c.train.batch_size = 100
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 20
    c.train.grad_clip = 0.0
    c.robustness.norm = "l2"
    c.robustness.eps = "0.5,1.0,1.58"
    c.robustness.attacks = "pgd,apgd-ce,square"
    c.robustness.n_examples = 200
    c.robustness.n_iter = 20
    c.robustness.n_queries = 200
    c.robustness.gradients = "autodiff"  # explicit network: a single gradient view
    return c
