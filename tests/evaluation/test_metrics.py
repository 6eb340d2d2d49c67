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
