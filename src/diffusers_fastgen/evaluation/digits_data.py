"""The embedded digits set: scikit-learn's `load_digits`, 1,797 real 8x8 handwritten digits (values
0..16), kept at 8x8 and scaled to [-1, 1], with a fixed split (a seeded permutation): 1,437 train /
360 held-out. The benchmark's reference and the scripts' training data both come from here."""

from __future__ import annotations

import numpy as np

DIGITS_SPLIT_SEED = 0
DIGITS_NUM_HELD_OUT = 360
NUM_DIGIT_CLASSES = 10


def load_digits_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 1, 8, 8) float32 in [-1, 1], labels (N,) int64) for split 'train' / 'held_out' / 'all'."""
    from sklearn.datasets import load_digits

    if split not in ("train", "held_out", "all"):
        raise ValueError(f"`split` must be 'train', 'held_out' or 'all', got {split!r}.")
    data = load_digits()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 -> [-1, 1]
    labels = data.target.astype(np.int64)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
    held, train = order[:DIGITS_NUM_HELD_OUT], order[DIGITS_NUM_HELD_OUT:]
    idx = {"train": train, "held_out": held, "all": np.arange(len(labels))}[split]
    return images[idx], labels[idx]
