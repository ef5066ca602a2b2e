"""OTAD on CIFAR-10 (Gai, Wang & Zhang, arXiv:2408.00329), for users who have the
TFDS ``cifar10`` data prepared (``tfds build cifar10``; deqjax never downloads).
Neural CIP included (model ``otad_nn``). Exact k-NN over 50k training embeddings is
dense but fine at this size; at larger scale replace it by approximate search (see
deqjax/otad/neighbours.py). Not run here (no CIFAR data on this machine).

    python -m experiments.train --config experiments/configs/otad_cifar10.py \
        --workdir runs/otad_cifar10
    python -m experiments.otad_evaluate --workdir runs/otad_cifar10
"""

from experiments.configs import otad_mnist


def get_config():
    c = otad_mnist.get_config()
    c.dataset = "cifar10"
    c.model.name = "otad_nn"
    c.model.image_shape = (32, 32, 3)
    c.model.width = 32  # x^0 is 8 x 8 x 32 = 2048-dimensional
    c.model.num_blocks = 8
    c.train.epochs = 30
    c.train.batch_size = 128
    c.train.learning_rate = 2e-3
    c.train.weight_decay = 5e-4
    c.otad.cip_steps = 5000
    c.otad.cip_noise = 8 / 255 * 2
    c.robustness.eps = "0.0078431,0.0156863,0.0313725"  # 2/255, 4/255, 8/255
    c.robustness.n_examples = 500
    c.otad.also_eps = "0.25,0.5"
    return c
