"""OTAD-NN on mnist_5k (Gai, Wang & Zhang, arXiv:2408.00329): as otad_mnist, plus a
neural CIP trained (MSE) on CIP-solver targets, which is differentiable end to end and
therefore attacked white-box as well as with BPDA. One workdir reports the plain
ResNet, OTAD (CIP solver) and OTAD-NN on the same trained network.

    python -m experiments.train --config experiments/configs/otad_mnist_nn.py \
        --workdir runs/otad_mnist_nn
    python -m experiments.otad_evaluate --workdir runs/otad_mnist_nn
"""

from experiments.configs import otad_mnist


def get_config():
    c = otad_mnist.get_config()
    c.model.name = "otad_nn"
    return c
