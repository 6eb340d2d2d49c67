import numpy as np
import pytest
import torch

from diffusers_fastgen.training.data import InfiniteBatches, load_digits_arrays, load_digits_dataset


def test_digits_split_fixed_and_scaled():
    x_tr, y_tr = load_digits_arrays("train")
    x_ho, y_ho = load_digits_arrays("held_out")
    assert x_tr.shape == (1437, 1, 8, 8) and x_ho.shape == (360, 1, 8, 8)
    assert x_tr.min() == -1.0 and x_tr.max() == 1.0
    assert set(np.unique(y_ho)) == set(range(10))
    all_x, _ = load_digits_arrays("all")
    # Disjoint and exhaustive: every image is in exactly one split.
    keys = lambda a: {r.tobytes() for r in a}  # noqa: E731
    assert len(keys(x_tr) & keys(x_ho)) <= 5  # a few duplicate digits exist in the raw data
    assert len(x_tr) + len(x_ho) == len(all_x)
    np.testing.assert_array_equal(load_digits_arrays("train")[0], x_tr)
    ds = load_digits_dataset("held_out")
    assert len(ds) == 360 and tuple(ds[0]["image"].shape) == (1, 8, 8)
    with pytest.raises(ValueError, match="split"):
        load_digits_arrays("test")


def test_infinite_batches_deterministic_and_resumable():
    x = torch.arange(50).float()
    a = InfiniteBatches(x, batch_size=8, seed=3)
    seq = [next(a)[0] for _ in range(13)]
    b = InfiniteBatches(x, batch_size=8, seed=3)
    b.state_at(9)
    torch.testing.assert_close(next(b)[0], seq[9])
    # Within an epoch no sample repeats; two ranks see disjoint halves.
    epoch = torch.cat(seq[:6])
    assert epoch.unique().numel() == 48
    r0, r1 = InfiniteBatches(x, batch_size=5, rank=0, world_size=2), InfiniteBatches(x, batch_size=5, rank=1, world_size=2)
    assert not set(next(r0)[0].tolist()) & set(next(r1)[0].tolist())
