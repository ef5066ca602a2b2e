"""A fully connected monDEQ on mnist_5k (Winston & Kolter 2020) with the provable ℓ2
certificate of Pabbaraju, Winston & Kolter (2021): Peaceman–Rachford splitting
(α = 1), implicit gradients, logits divided by σ₁(W_out)σ₁(U)/m and the hinge loss
(Lipschitz-margin training), ℓ2 attacks and certificates at the radii of cpl_mnist.
See docs/methods/mondeq.md."""

from experiments.configs.base import base_config


def mondeq_model(c):
    """The ``model`` and ``deq`` keys of the ``mondeq`` family (experiments/families/mondeq.py)."""
    c.model.name = "mondeq"
    c.model.kind = "fc"  # fc | conv
    c.model.width = 100  # hidden units (fc) / channels (conv); the authors' SingleFcNet: 100
    c.model.m = 1.0  # I − W ⪰ m·I
    c.model.splitting = "pr"  # pr (any alpha > 0) | fb (alpha < 2m/‖I − W‖²)
    c.model.alpha = 1.0  # the authors' default step
    c.model.kernel_size = 3  # conv only: A, B circular k×k; U k×k, SAME, stride
    c.model.stride = 2
    c.model.pool = 1  # conv head: pool × pool average before W_out
    c.model.normalize = True  # logits / (σ₁(W_out) σ₁(U) / m): Lipschitz-margin training
    # the splitting itself (fixed_point, damping 1) to a relative residual of 1e-4;
    # the implicit backward (auto: a dense solve for <= 128 hidden units)
    c.deq.update(
        solver="fixed_point",
        max_iter=50,
        eval_max_iter=200,
        tol=1e-4,
        stop_mode="rel",
        damping=1.0,
        backward="implicit",
        adjoint_solver="auto",
        adjoint_max_iter=100,
        adjoint_tol=1e-4,
    )
    return c


def get_config():
    c = mondeq_model(base_config())
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
    c.robustness.gradients = "implicit,unroll,phantom"
    return c
