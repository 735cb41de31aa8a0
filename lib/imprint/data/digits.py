"""The 8x8 handwritten digits of scikit-learn, split into balanced train and held-out sets.

Used by the implicit-bias, reconstruction and self-consuming-diffusion chapters. Pixels are scaled to
[0, 1] and the mean image of the *training* split is subtracted from both splits (the preprocessing of
Haim et al. 2022); ``mean`` restores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from imprint.runtime.checks import require_int


@dataclass(frozen=True)
class ImageSplit:
    """A train / held-out split of flattened images with integer class labels."""

    x_train: Float[Tensor, "n_train d"]
    label_train: Int[Tensor, " n_train"]
    x_heldout: Float[Tensor, "n_heldout d"]
    label_heldout: Int[Tensor, " n_heldout"]
    mean: Float[Tensor, " d"]
    image_shape: tuple[int, ...]

    @property
    def d(self) -> int:
        return self.x_train.shape[1]

    def images(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n *shape"]:
        """Mean added back and reshaped to ``image_shape``: what a person looks at."""
        return (x + self.mean).reshape(-1, *self.image_shape)


def balanced_indices(labels: np.ndarray, classes: Sequence[int], n: int, rng: np.random.Generator,
                     exclude: np.ndarray | None = None, what: str = "n_train") -> np.ndarray:
    """``n`` indices spread evenly over ``classes`` (the first ``n % len(classes)`` classes get one more)."""
    taken = set() if exclude is None else set(exclude.tolist())
    per_class = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    chosen = []
    for c, k in zip(classes, per_class):
        pool = np.array([i for i in np.flatnonzero(labels == c) if i not in taken])
        if k > len(pool):
            raise ValueError(f"{what}={n} asks for {k} images of class {c}, but only {len(pool)} are left")
        chosen.append(rng.permutation(pool)[:k])
    return np.sort(np.concatenate(chosen))


def check_classes(labels: np.ndarray, classes: Sequence[int] | None) -> list[int]:
    """``classes`` (all classes of ``labels`` when None), each checked to occur in ``labels``."""
    all_classes = sorted(np.unique(labels).tolist())
    classes = all_classes if classes is None else list(classes)
    unknown = sorted(set(classes) - set(all_classes))
    if unknown:
        raise ValueError(f"classes={classes} names classes {unknown} that the data does not have "
                         f"(it has {all_classes})")
    return classes


def split_images(images: np.ndarray, labels: np.ndarray, image_shape: tuple[int, ...], n_train: int,
                 n_heldout: int, seed: int, classes: Sequence[int] | None = None) -> ImageSplit:
    """Balanced, disjoint train and held-out splits of ``images`` (any shape, values in [0, 1])."""
    require_int("n_train", n_train, minimum=1)
    require_int("n_heldout", n_heldout, minimum=0)
    classes = check_classes(labels, classes)
    rng = np.random.default_rng(seed)
    train = balanced_indices(labels, classes, n_train, rng, what="n_train")
    heldout = balanced_indices(labels, classes, n_heldout, rng, exclude=train, what="n_heldout")
    flat = torch.as_tensor(images.reshape(len(images), -1), dtype=torch.float32)
    lab = torch.as_tensor(labels, dtype=torch.int64)
    mean = flat[train].mean(0)
    return ImageSplit(flat[train] - mean, lab[train], flat[heldout] - mean, lab[heldout], mean,
                      tuple(image_shape))


def load_digit_split(n_train: int, n_heldout: int, seed: int,
                     classes: Sequence[int] | None = None) -> ImageSplit:
    """Balanced, disjoint splits of ``sklearn.datasets.load_digits`` (1797 images, 8x8, 0..16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return split_images(digits.images / 16.0, digits.target, (8, 8), n_train, n_heldout, seed, classes)


def even_odd_targets(labels: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Binary targets of the even-vs-odd task: +1 for an even digit, -1 for an odd one."""
    return torch.where(labels % 2 == 0, 1.0, -1.0)
