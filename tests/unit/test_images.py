"""Image loaders: the offline faces, MNIST IDX and CIFAR-10 batches written here, and the attack splits."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from imprint.data.images import (check_data_seeds, face_targets, fixed_heldout, load_cifar10_directory,
                                 load_face_images, load_image_splits, load_images, load_mnist_directory,
                                 make_attack_splits, max_heldout, read_idx, vehicle_animal_targets)


def write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_read_idx_round_trips_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.int16, np.int32, np.float32, np.float64):
        arr = (rng.random((3, 4, 5)) * 100).astype(dtype)
        write_idx(tmp_path / "a.idx", arr)
        assert np.array_equal(read_idx(tmp_path / "a.idx"), arr)
    write_idx(tmp_path / "b.idx.gz", arr, gz=True)
    assert np.array_equal(read_idx(tmp_path / "b.idx.gz"), arr)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", np.zeros((4, 2), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="holds 5"):
        read_idx(tmp_path / "short")


def test_mnist_directory_loader(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, gz=True)
    x, y = load_mnist_directory(tmp_path)
    assert x.shape == (7, 28, 28) and x.dtype == np.float32
    assert np.allclose(x, images / 255.0) and np.array_equal(y, labels)
    with pytest.raises(FileNotFoundError, match="test images"):
        load_mnist_directory(tmp_path, split="test")


def test_missing_dataset_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir='.*nowhere'"):
        load_mnist_directory(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data_dir="):
        load_images("cifar10", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_images("mnist")
    with pytest.raises(ValueError, match="dataset='svhn'"):
        load_images("svhn")


def write_cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"tiny", b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return batch


def test_cifar10_directory_loader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    b1 = write_cifar_batch(folder / "data_batch_1", 4, 0)
    b2 = write_cifar_batch(folder / "data_batch_2", 3, 1)
    t = write_cifar_batch(folder / "test_batch", 2, 2)
    x, y = load_cifar10_directory(tmp_path)
    assert x.shape == (7, 3, 32, 32)
    assert np.allclose(x[5], b2[b"data"][1].reshape(3, 32, 32) / 255.0)
    assert y.tolist() == b1[b"labels"] + b2[b"labels"]
    xt, yt = load_cifar10_directory(folder, split="test")
    assert xt.shape == (2, 3, 32, 32) and yt.tolist() == t[b"labels"]


def test_cifar10_loader_refuses_pickles_that_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            import os

            return (os.getcwd, ())

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        load_cifar10_directory(tmp_path)


def test_faces_are_the_lfw_subset_in_unit_range():
    images, labels = load_face_images()
    assert images.shape == (200, 25, 25)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert labels.sum() == 100 and labels[:100].all()
    assert face_targets(torch.tensor([1, 0])).tolist() == [1.0, -1.0]


def test_attack_splits_are_balanced_disjoint_and_centred():
    images = np.random.default_rng(0).random((60, 4, 4)).astype(np.float32)
    labels = np.repeat(np.arange(3), 20)
    splits = make_attack_splits(images, labels, (4, 4), n_train=9, n_heldout=12, seed=0)
    flat = torch.from_numpy(images.reshape(60, -1))

    def rows(x, mean):
        return {int((flat - (r + mean)).abs().sum(1).argmin()) for r in x}

    t, d = splits.target, splits.disjoint
    train_t, train_d, held = rows(t.x_train, t.mean), rows(d.x_train, d.mean), rows(t.x_heldout, t.mean)
    assert len(train_t) == 9 and len(train_d) == 9 and len(held) == 12
    assert not (train_t & train_d) and not (train_t & held) and not (train_d & held)
    assert torch.bincount(t.label_train).tolist() == [3, 3, 3]
    assert torch.bincount(t.label_heldout).tolist() == [4, 4, 4]
    assert torch.allclose(t.x_train.mean(0), torch.zeros(16), atol=1e-6)
    assert torch.allclose(t.x_heldout + t.mean, d.x_heldout + d.mean)


def test_largest_heldout_pool_and_named_splits():
    labels = np.repeat(np.arange(2), 100)
    assert max_heldout(labels, 60) == 2 * (100 - 60)
    with pytest.raises(ValueError, match="n_train=100"):
        max_heldout(labels, 100)
    faces = load_image_splits("faces", 20, None, seed=0)
    assert faces.target.x_train.shape == (20, 625) and faces.target.x_heldout.shape == (160, 625)
    digits = load_image_splits("digits", 20, 40, seed=0, classes=[3, 8])
    assert set(digits.target.label_train.tolist()) == {3, 8}


def test_one_held_out_pool_size_fits_every_training_set_size():
    labels = np.repeat(np.arange(3), [30, 25, 40])
    sizes = [3, 9, 21]
    # n = 21: 7 per class twice leaves 16, 11 and 26 images
    assert fixed_heldout(labels, sizes) == max_heldout(labels, 21) == 33
    assert fixed_heldout(labels, sizes, 34) == 34  # 12, 11, 11 per class still fits
    with pytest.raises(ValueError, match=r"n_heldout=35: .* at most 34"):
        fixed_heldout(labels, sizes, 35)
    with pytest.raises(ValueError, match="n_heldout"):
        fixed_heldout(labels, sizes, 0)
    with pytest.raises(ValueError, match="sizes"):
        fixed_heldout(labels, [], 10)
    with pytest.raises(ValueError, match="sizes"):
        fixed_heldout(labels, [3, 40])  # two sets of 14 of class 1 need 28 of its 25
    images = np.random.default_rng(0).random((len(labels), 2, 2)).astype(np.float32)
    for pool in (fixed_heldout(labels, sizes), 34):
        for n in sizes:
            split = make_attack_splits(images, labels, (2, 2), n, pool, seed=1).target
            assert split.x_heldout.shape[0] == pool and split.x_train.shape[0] == n
    # through the named loader: the same pool at every size of a sweep
    pools = {n: load_image_splits("digits", n, None, seed=0, sizes=[20, 400]).target.x_heldout.shape[0]
             for n in (20, 400)}
    assert pools[20] == pools[400] == max_heldout(load_images("digits")[1], 400)
    assert load_image_splits("digits", 20, None, seed=0).target.x_heldout.shape[0] > pools[20]
    with pytest.raises(ValueError, match="sizes"):
        load_image_splits("digits", 30, None, seed=0, sizes=[20, 400])


def test_data_seeds_are_distinct_non_negative_integers():
    assert check_data_seeds([0, 3, 1]) == [0, 3, 1]
    assert check_data_seeds((7,)) == [7]
    for bad in ([], [1, 1], [0, -1], [0, 1.5], [True], 3, "01"):
        with pytest.raises(ValueError, match="data_seeds"):
            check_data_seeds(bad)


def test_vehicle_animal_targets():
    labels = torch.arange(10)
    expected = [1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0]  # airplane, automobile, ..., ship, truck
    assert vehicle_animal_targets(labels).tolist() == expected
