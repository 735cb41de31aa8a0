"""Small image datasets for the reconstruction chapters (01, 02): offline defaults and users' local files.

The offline defaults are the 8x8 digits of scikit-learn and the 25x25 faces-versus-non-faces subset of
LFW that ships with scikit-image (``skimage.data.lfw_subset``: 100 faces, then 100 non-face patches).
For users with their own copies, MNIST / Fashion-MNIST IDX files (optionally gzipped) and CIFAR-10 python
batches are read from a local directory; nothing is downloaded. CIFAR batches are pickles, so they are
read by an unpickler that accepts only the few numpy and builtin types such a batch contains and refuses
anything else. Every loader returns pixels in [0, 1] and integer labels; ``load_image_splits`` turns them
into the balanced, disjoint target / disjoint-control / held-out splits the attack is evaluated on.
"""

from __future__ import annotations

import gzip
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from imprint.data.digits import ImageSplit, balanced_indices, check_classes
from imprint.runtime.checks import require_choice, require_int, require_path

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
DATASETS = ("digits", "faces", "mnist", "cifar10")


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits: pixels ``[N, 8, 8]`` in [0, 1] and labels 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def load_face_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's LFW subset: pixels ``[200, 25, 25]`` in [0, 1]; label 1 for a face, 0 otherwise."""
    from skimage.data import lfw_subset

    images = np.asarray(lfw_subset(), dtype=np.float32)
    if images.shape != (200, 25, 25):
        raise ValueError(f"skimage.data.lfw_subset() returned shape {images.shape}: expected (200, 25, 25)")
    labels = np.r_[np.ones(100, dtype=np.int64), np.zeros(100, dtype=np.int64)]
    lo, hi = float(images.min()), float(images.max())
    return (images - lo) / (hi - lo) if hi > 1 or lo < 0 else images, labels


def face_targets(labels: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Binary targets of faces versus non-faces: +1 for a face, -1 otherwise."""
    return torch.where(labels == 1, 1.0, -1.0)


CIFAR10_VEHICLES = (0, 1, 8, 9)  # airplane, automobile, ship, truck


def vehicle_animal_targets(labels: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Binary targets of CIFAR-10 vehicles (+1) versus animals (-1), the task of Haim et al. (2022)."""
    vehicles = torch.tensor(CIFAR10_VEHICLES, device=labels.device)
    return torch.where(torch.isin(labels, vehicles), 1.0, -1.0)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX array (the MNIST file format), gzipped or not, as a numpy array of its stored dtype."""
    path = require_path("path", path, kind="file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"path={str(path)!r}: not an IDX file (expected the magic bytes 00 00 <type> <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"path={str(path)!r}: IDX header announces {ndim} dimensions but the file is truncated")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"path={str(path)!r}: IDX header says shape {dims} ({expected} bytes of data), "
                         f"the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(directory: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"data_dir={str(directory)!r} has no {what} file (looked for "
                            f"{', '.join(names)}, optionally .gz)")


def load_mnist_directory(data_dir: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST or Fashion-MNIST from the four IDX files of a local directory: ``[N, 28, 28]`` in [0, 1]."""
    directory = require_path("data_dir", data_dir, kind="directory")
    require_choice("split", split, ["train", "test"])
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(directory, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"],
                            f"{split} images"))
    labels = read_idx(_find(directory, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"],
                            f"{split} labels"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"data_dir={str(directory)!r}: images of shape {images.shape} and labels of shape "
                         f"{labels.shape} do not pair up as [N, H, W] and [N]")
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)


class _BatchUnpickler(pickle.Unpickler):
    """Rebuilds only what a CIFAR python batch holds: dicts, lists, bytes, strings and numpy arrays."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"), ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> dict:
    try:
        batch = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch: {err}") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch: expected a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def load_cifar10_directory(data_dir: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from its python batches (``data_batch_1..5``, ``test_batch``): ``[N, 3, 32, 32]`` in [0, 1]."""
    directory = require_path("data_dir", data_dir, kind="directory")
    require_choice("split", split, ["train", "test"])
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    files = [directory / name for name in names if (directory / name).is_file()]
    if not files:
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} has no CIFAR-10 {split} batch "
                                f"(looked for {', '.join(names)})")
    images, labels = [], []
    for path in files:
        batch = _read_cifar_batch(path)
        if "data" not in batch or "labels" not in batch:
            raise ValueError(f"{str(path)!r} lacks the 'data' or 'labels' entry of a CIFAR-10 batch")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch["labels"]) != len(data):
            raise ValueError(f"{str(path)!r}: data of shape {data.shape} and {len(batch['labels'])} labels "
                             "do not form a CIFAR-10 batch ([N, 3072] and N labels)")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(images).astype(np.float32) / 255.0, np.concatenate(labels)


def load_images(dataset: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Pixels, labels and image shape of ``dataset``: ``digits`` and ``faces`` offline, ``mnist``
    (or Fashion-MNIST) and ``cifar10`` from ``data_dir``."""
    require_choice("dataset", dataset, DATASETS)
    if dataset == "digits":
        images, labels = load_digit_images()
    elif dataset == "faces":
        images, labels = load_face_images()
    elif dataset == "mnist":
        if data_dir is None:
            raise ValueError("dataset='mnist' needs data_dir, the local directory holding the IDX files")
        images, labels = load_mnist_directory(data_dir)
    else:
        if data_dir is None:
            raise ValueError("dataset='cifar10' needs data_dir, the local directory holding the python batches")
        images, labels = load_cifar10_directory(data_dir)
    return images, labels, tuple(images.shape[1:])


@dataclass(frozen=True)
class AttackSplits:
    """The attacked training set, a disjoint training set of the same size for the control network,
    and one held-out pool shared by both (each split is centred on its own training mean)."""

    target: ImageSplit
    disjoint: ImageSplit


def make_attack_splits(images: np.ndarray, labels: np.ndarray, image_shape: Sequence[int], n_train: int,
                       n_heldout: int, seed: int, classes: Sequence[int] | None = None) -> AttackSplits:
    """Balanced, pairwise disjoint index sets: target train, disjoint-control train, held-out pool."""
    require_int("n_train", n_train, minimum=1)
    require_int("n_heldout", n_heldout, minimum=1)
    classes = check_classes(labels, classes)
    rng = np.random.default_rng(seed)
    target = balanced_indices(labels, classes, n_train, rng, what="n_train")
    disjoint = balanced_indices(labels, classes, n_train, rng, exclude=target, what="n_train (disjoint control)")
    heldout = balanced_indices(labels, classes, n_heldout, rng, exclude=np.r_[target, disjoint], what="n_heldout")
    flat = torch.as_tensor(np.asarray(images).reshape(len(images), -1), dtype=torch.float32)
    lab = torch.as_tensor(labels, dtype=torch.int64)

    def split(train_idx: np.ndarray) -> ImageSplit:
        mean = flat[train_idx].mean(0)
        return ImageSplit(flat[train_idx] - mean, lab[train_idx], flat[heldout] - mean, lab[heldout], mean,
                          tuple(image_shape))

    return AttackSplits(split(target), split(disjoint))


def max_heldout(labels: np.ndarray, n_train: int, classes: Sequence[int] | None = None) -> int:
    """The largest balanced held-out pool left after two balanced training sets of ``n_train``."""
    classes = sorted(np.unique(labels).tolist()) if classes is None else list(classes)
    counts = np.array([(labels == c).sum() for c in classes])
    per_class = [n_train // len(classes) + (1 if i < n_train % len(classes) else 0) for i in range(len(classes))]
    left = counts - 2 * np.array(per_class)
    if left.min() < 1:
        raise ValueError(f"n_train={n_train}: two disjoint balanced training sets of this size leave no "
                         f"held-out image of some class (class sizes {counts.tolist()})")
    return int(left.min()) * len(classes)


def fixed_heldout(labels: np.ndarray, sizes: Sequence[int], n_heldout: int | None = None,
                  classes: Sequence[int] | None = None) -> int:
    """One held-out pool size usable at every training-set size of ``sizes``, so the bar stays fixed.

    ``make_attack_splits`` takes a balanced target set of ``n``, a disjoint control set of the same ``n``,
    then the balanced pool from what is left; the largest ``n`` leaves the least, so a pool that fits there
    fits at every size. ``n_heldout=None`` gives :func:`max_heldout` at the largest size; a requested
    ``n_heldout`` is checked against the largest value the classes' counts allow there and returned.
    """
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
        raise ValueError(f"sizes={sizes!r}: expected a non-empty list of training-set sizes")
    sizes = [require_int(f"sizes[{i}]", n, minimum=1) for i, n in enumerate(sizes)]
    labels = np.asarray(labels)
    classes = check_classes(labels, classes)
    largest = max(sizes)
    k = len(classes)
    counts = np.array([(labels == c).sum() for c in classes])
    per_class = np.array([largest // k + (1 if i < largest % k else 0) for i in range(k)])
    left = counts - 2 * per_class
    if left.min() < 1:
        raise ValueError(f"sizes={sizes}: two disjoint balanced training sets of n={largest} leave no held-out "
                         f"image of some class (class sizes {counts.tolist()})")
    if n_heldout is None:
        return max_heldout(labels, largest, classes)
    n_heldout = require_int("n_heldout", n_heldout, minimum=1)

    def fits(m: int) -> bool:
        return all(m // k + (1 if i < m % k else 0) <= left[i] for i in range(k))

    allowed = int(left.min()) * k
    while fits(allowed + 1):
        allowed += 1
    if n_heldout > allowed:
        raise ValueError(f"n_heldout={n_heldout}: at the largest training-set size n={largest} (and its disjoint "
                         f"control of the same size) a balanced held-out pool holds at most {allowed} images; "
                         f"expected n_heldout <= {allowed}")
    return n_heldout


def check_data_seeds(data_seeds) -> list[int]:
    """``data_seeds`` as a list: at least one, distinct, non-negative integers."""
    if isinstance(data_seeds, (str, bytes)) or not isinstance(data_seeds, Sequence) or len(data_seeds) == 0:
        raise ValueError(f"data_seeds={data_seeds!r}: expected a non-empty list of non-negative integers")
    seeds = [require_int(f"data_seeds[{i}]", s, minimum=0) for i, s in enumerate(data_seeds)]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"data_seeds={seeds}: seeds {repeated} appear more than once; expected distinct seeds")
    return seeds


def load_image_splits(dataset: str, n_train: int, n_heldout: int | None, seed: int,
                      classes: Sequence[int] | None = None, data_dir: str | Path | None = None,
                      sizes: Sequence[int] | None = None) -> AttackSplits:
    """:func:`make_attack_splits` of a named dataset; ``n_heldout=None`` takes the largest balanced pool.

    With ``sizes`` (the training-set sizes of a sweep, containing ``n_train``) the pool size is
    :func:`fixed_heldout`'s: the same at every size of the sweep (the largest that fits the largest size
    when ``n_heldout`` is None, else ``n_heldout`` checked to fit it).
    """
    images, labels, shape = load_images(dataset, data_dir)
    if classes is not None:
        keep = np.isin(labels, list(classes))
        images, labels = images[keep], labels[keep]
    if sizes is not None:
        if n_train not in list(sizes):
            raise ValueError(f"sizes={list(sizes)}: expected it to contain n_train={n_train}")
        n_heldout = fixed_heldout(labels, sizes, n_heldout, classes)
    elif n_heldout is None:
        n_heldout = max_heldout(labels, n_train, classes)
    return make_attack_splits(images, labels, shape, n_train, n_heldout, seed, classes)
