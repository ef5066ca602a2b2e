"""deq_mnist_pgdat in the setting of the DEQ-robustness papers (Yang et al. 2022,
2023): Broyden with a fixed budget of 8 forward and 7 backward (adjoint) steps — the
misaligned budgets under which the implicit gradient and the forward solve disagree —
and PGD adversarial training whose inner attack differentiates the model exactly as the
weight update does (the implicit gradient). The evaluation forward is the trained one
(8 Broyden steps). Sized for a CPU: ε = 0.3, 7 steps of 0.05, 3 epochs (~10 min here).

    python -m experiments.train --config experiments/configs/deq_mnist_pgdat_authors.py \\
        --workdir runs/deq_mnist_pgdat_authors
    python -m experiments.obfuscation --workdir runs/deq_mnist_pgdat_authors
"""

from experiments.configs.deq_mnist_pgdat import get_config as pgdat_config


def get_config():
    c = pgdat_config()
    c.train.epochs = 3
    c.deq.update(
        solver="broyden",
        max_iter=8,
        eval_max_iter=8,
        tol=0.0,  # fixed budgets, as the authors ran them
        adjoint_solver="broyden",
        adjoint_max_iter=7,
        adjoint_tol=0.0,
    )
    c.adv.attack_gradient = "implicit"
    c.robustness.after_training = False  # the obfuscation sweep is the experiment
    return c
