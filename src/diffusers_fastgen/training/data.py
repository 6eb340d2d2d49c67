"""Training data: the embedded digits set, or a user's images through `datasets`.

The digits are scikit-learn's `load_digits`: 1,797 real 8x8 handwritten digits (values 0..16), kept
at 8x8 and scaled to [-1, 1]. The split is fixed (a seeded permutation): 1,437 train / 360 held-out.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch

from ..evaluation.digits_data import (  # noqa: F401 (re-exported: the scripts' data)
    DIGITS_NUM_HELD_OUT,
    DIGITS_SPLIT_SEED,
    NUM_DIGIT_CLASSES,
    load_digits_arrays,
)


def load_digits_dataset(split: str = "train"):
    """The digits as a `datasets.Dataset` with columns image ((1, 8, 8) floats) and label."""

    images, labels = load_digits_arrays(split)
    return datasets.Dataset.from_dict({"image": images.tolist(), "label": labels.tolist()}).with_format("torch")


def load_image_dataset(dataset_name: str | None = None, train_data_dir: str | None = None, *, resolution: int = 8,
                       channels: int = 1, image_column: str = "image", label_column: str | None = "label"):
    """A user's images (Hub name offline-cached, or an imagefolder) as (images in [-1, 1], labels or None)."""

    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("pass exactly one of `dataset_name` or `train_data_dir`.")
    ds = (datasets.load_dataset(dataset_name, split="train") if dataset_name
          else datasets.load_dataset("imagefolder", data_dir=train_data_dir, split="train"))
    if image_column not in ds.column_names:
        raise ValueError(f"`image_column` {image_column!r} not in dataset columns {ds.column_names}.")
    mode = "L" if channels == 1 else "RGB"
    imgs = np.stack([np.asarray(im.convert(mode).resize((resolution, resolution)), dtype=np.float32)
                     for im in ds[image_column]])
    imgs = imgs.reshape(len(ds), resolution, resolution, channels).transpose(0, 3, 1, 2) / 127.5 - 1.0
    labels = np.asarray(ds[label_column], dtype=np.int64) if label_column and label_column in ds.column_names else None
    return imgs.astype(np.float32), labels


class InfiniteBatches:
    """Endless shuffled mini-batches over in-memory tensors; the order is a function of (seed, epoch),
    so a resumed run can jump to the batch of any step (`state_at(step)`)."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.n = tensors[0].shape[0]
        self.per_epoch = max(1, self.n // (batch_size * world_size))
        self.step = 0

    def state_at(self, step: int) -> None:
        self.step = step

    def __iter__(self):
        return self

    def __next__(self):
        epoch, i = divmod(self.step, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        start = (i * self.world_size + self.rank) * self.batch_size
        idx = perm[start:start + self.batch_size]
        if idx.numel() < self.batch_size:  # tiny datasets: wrap around
            idx = perm[torch.arange(start, start + self.batch_size) % self.n]
        self.step += 1
        return tuple(t[idx] for t in self.tensors)
