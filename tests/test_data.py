"""Datasets: the embedded mnist_5k, TFDS through data_source (mocked), batching, validation."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from deqjax import data


def test_mnist_5k_split():
    ds = data.mnist_5k()
    assert ds.train_images.shape == (4000, 28, 28, 1) and ds.test_images.shape == (1000, 28, 28, 1)
    assert (
        ds.train_images.dtype == np.float32
        and 0.0 <= ds.train_images.min()
        and ds.train_images.max() <= 1.0
    )
    assert np.all(np.bincount(ds.test_labels) == 100) and np.all(
        np.bincount(ds.train_labels) == 400
    )
    # deterministic, and train/test disjoint
    again = data.mnist_5k()
    np.testing.assert_array_equal(ds.train_labels, again.train_labels)
    flat_tr = {x.tobytes() for x in ds.train_images}
    assert not any(x.tobytes() in flat_tr for x in ds.test_images)
    # parsed once per process, but every call gets its own writable arrays
    ds.train_images[0] += 1.0
    ds.test_labels[:] = -1
    fresh = data.mnist_5k()
    np.testing.assert_array_equal(fresh.train_images[1:], ds.train_images[1:])
    assert not np.array_equal(fresh.train_images[0], ds.train_images[0])
    np.testing.assert_array_equal(fresh.test_labels, again.test_labels)


@pytest.mark.parametrize(
    "name,shape,classes",
    [
        ("mnist", (28, 28, 1), 10),
        ("cifar10", (32, 32, 3), 10),
        ("svhn_cropped", (32, 32, 3), 10),
        ("fashion_mnist", (28, 28, 1), 10),
    ],
)
def test_tfds_data_source_mocked(name, shape, classes):
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_dataset(name)
    assert ds.train_images.shape == (6,) + shape and ds.test_images.shape == (6,) + shape
    assert ds.train_images.dtype == np.float32 and ds.train_images.max() <= 1.0
    assert ds.num_classes == classes
    data.validate_images(ds.train_images)


def test_unprepared_tfds_dataset_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build mnist"):
        data.load_dataset("mnist", data_dir=str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("imagenet_typo")


def test_epoch_batches_deterministic_and_resumable():
    x = np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1) / 20
    y = np.arange(20, dtype=np.int32)
    full = [b[1] for b in data.epoch_batches(x, y, 6, seed=3, epoch=1)]
    assert len(full) == 3 and all(len(b) == 6 for b in full)
    again = [b[1] for b in data.epoch_batches(x, y, 6, seed=3, epoch=1)]
    resumed = [b[1] for b in data.epoch_batches(x, y, 6, seed=3, epoch=1, start_batch=1)]
    other_epoch = [b[1] for b in data.epoch_batches(x, y, 6, seed=3, epoch=2)]
    for a, b in zip(full, again):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(full[1:], resumed):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(full[0], other_epoch[0])
    with pytest.raises(ValueError, match="batch_size"):
        next(data.epoch_batches(x, y, 50, seed=0, epoch=0))


def test_validation_errors():
    good = np.full((2, 4, 4, 1), 0.5, np.float32)
    data.validate_images(good)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.validate_images(good * 255)
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        data.validate_images(bad)
    with pytest.raises(ValueError, match="shape"):
        data.validate_images(good[0])
    with pytest.raises(ValueError, match="float"):
        data.validate_images(good.astype(np.uint8))
    with pytest.raises(ValueError, match="labels"):
        data.validate_labels(np.array([0, 10]), 10)
