import math

import numpy as np
import pytest
import torch

from diffusers_fastgen.evaluation import frechet_distance, load_digits_classifier, within_class_diversity
from diffusers_fastgen.evaluation.digits_benchmark import DigitsReference
from diffusers_fastgen.training.data import load_digits_arrays


def test_frechet_distance_closed_form():
    rng = np.random.RandomState(0)
    a = rng.randn(20000, 4)
    b = rng.randn(20000, 4) * 2.0 + np.array([1.0, 0.0, -1.0, 0.5])
    # Gaussians N(0, I) and N(m, 4I): ||m||^2 + tr(I + 4I - 2 * 2I) = ||m||^2 + 4.
    assert frechet_distance(a, b) == pytest.approx(2.25 + 4.0, abs=0.1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="features"):
        frechet_distance(a, b[:, :3])


def test_diversity_closed_form():
    f = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 12.0]])
    labels = np.array([0, 0, 1, 1])
    # Two points 2 apart: ordered pairs (incl. i = j) have squared distances 0, 4, 4, 0 -> RMS sqrt(2).
    assert within_class_diversity(f, labels) == pytest.approx(math.sqrt(2.0))


def test_shipped_classifier_accuracy():
    x, y = load_digits_arrays("held_out")
    with torch.no_grad():
        acc = (load_digits_classifier()(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert acc >= 0.97


def test_metric_separates_real_from_noise():
    ref = DigitsReference()
    real, noise = ref.reference_rows()
    assert real["accuracy"] > 0.97 and abs(real["diversity"] - 1.0) < 0.15
    assert noise["fd"] > 20 * real["fd"]
    # Right digits with the wrong requested labels: same FD, accuracy collapses.
    x, y = load_digits_arrays("train")
    shuffled = ref.score(torch.from_numpy(x), (y + 1) % 10)
    assert shuffled["fd"] == pytest.approx(real["fd"]) and shuffled["accuracy"] < 0.05


def test_kernel_distance_is_the_unbiased_mmd_and_centred_on_zero():
    """Against a brute-force double loop on a small set, and unbiased: over many draws of two samples of one
    distribution its mean is 0 within noise, where FD's is clearly positive (the small-sample bias KID avoids)."""
    from diffusers_fastgen.evaluation.metrics import kernel_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5

    def k(x, y):
        return (float(x @ y) / 3 + 1) ** 3

    within_a = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    within_b = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    across = sum(k(x, y) for x in a for y in b) / 35
    assert kernel_distance(a, b) == pytest.approx(within_a + within_b - 2 * across, rel=1e-12)
    kids, fds = [], []
    for _ in range(200):
        x, y = rng.normal(size=(60, 4)), rng.normal(size=(40, 4))
        kids.append(kernel_distance(x, y))
        fds.append(frechet_distance(x, y))
    assert abs(np.mean(kids)) < 4 * np.std(kids) / math.sqrt(200)
    assert np.mean(fds) > 10 * np.std(fds) / math.sqrt(200)
    shifted = [kernel_distance(rng.normal(size=(60, 4)), rng.normal(size=(40, 4)) + 1.0) for _ in range(20)]
    assert min(shifted) > 0


def test_precision_recall_on_points_by_hand():
    """1-D, k = 1: the real manifold is balls of radius 1 around 0, 1, 2, 3 and of radius 7 around 10 (its nearest
    neighbour is 3); the generated one balls of radius 0.5 around 0, 0.5 and radius 5 around 5.5 (from 0.5)."""
    from diffusers_fastgen.evaluation.metrics import precision_recall

    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    gen = np.array([[0.0], [0.5], [5.5]])
    precision, recall = precision_recall(gen, real, k=1)
    assert precision == pytest.approx(1.0)  # 0 and 0.5 are inside real balls; 5.5 is within 7 of 10
    # real points inside the generated manifold: 0 (ball of 0), 1, 2, 3, 10 (within 5 of 5.5: 1 to 10.5)
    assert recall == pytest.approx(1.0)
    precision, recall = precision_recall(np.array([[0.0], [0.1], [0.2]]), real, k=1)
    assert precision == pytest.approx(1.0) and recall == pytest.approx(1 / 5)  # a collapsed generator: low recall
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(gen, real, k=3)
