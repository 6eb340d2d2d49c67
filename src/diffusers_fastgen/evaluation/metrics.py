"""Metrics on classifier features: Fréchet distance, kernel distance (KID), precision / recall, class accuracy,
within-class diversity."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from scipy.spatial.distance import cdist


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fit to (N, D) features (float64)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {a.shape} and {b.shape}.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def kernel_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 (KID, Binkowski et al.
    arXiv:1801.01401): the within-set means leave out the diagonal, so its expectation is 0 for two samples of
    one distribution whatever their sizes (unlike FD, which is biased upwards at small N)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"features must be (N >= 2, D) with equal D, got {a.shape} and {b.shape}.")
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    n, m = len(a), len(b)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


def precision_recall(generated: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. arXiv:1904.06991): each set's manifold is the union of
    balls reaching every point's k-th nearest neighbour in that set; precision = share of generated samples
    inside the real manifold (fidelity), recall = share of real samples inside the generated one (coverage: lost
    diversity shows here)."""
    gen, ref = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    if min(len(gen), len(ref)) <= k:
        raise ValueError(f"need more than k={k} samples per set, got {len(gen)} and {len(ref)}.")

    def radii(x):
        return np.partition(cdist(x, x), k, axis=1)[:, k]  # the k-th smallest; index 0 is the point itself

    def inside(points, manifold, r):
        return float((cdist(points, manifold) <= r[None]).any(1).mean())

    return inside(gen, ref, radii(ref)), inside(ref, gen, radii(gen))


@torch.no_grad()
def classify(classifier, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 128), predicted labels (N,)) for images in [-1, 1]."""
    feats, preds = [], []
    for chunk in images.float().split(batch_size):
        f = classifier.features(chunk.clamp(-1, 1))
        feats.append(f)
        preds.append(classifier.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def within_class_diversity(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the RMS pairwise feature distance, sqrt(E_ij ||f_i - f_j||^2) over all ordered
    pairs of the class (i = j included), computed as sqrt(2 E_i ||f_i - mean||^2)."""
    values = []
    for c in np.unique(labels):
        f = features[labels == c]
        if len(f) > 1:
            values.append(float(np.sqrt(2 * ((f - f.mean(0)) ** 2).sum(1).mean())))
    return float(np.mean(values))


def evaluate_images(classifier, images: torch.Tensor, labels: np.ndarray | torch.Tensor, reference_features: np.ndarray,
                    reference_diversity: float) -> dict:
    """FD to the reference features, accuracy against the requested labels, diversity relative to real."""
    labels = np.asarray(labels)
    feats, preds = classify(classifier, images)
    precision, recall = precision_recall(feats, reference_features)
    return {
        "fd": frechet_distance(feats, reference_features),
        "kid": kernel_distance(feats, reference_features),
        "precision": precision,
        "recall": recall,
        "accuracy": float((preds == labels).mean()),
        "diversity": within_class_diversity(feats, labels) / reference_diversity,
    }
