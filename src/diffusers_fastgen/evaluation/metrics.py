"""Metrics on classifier features: Fréchet distance, class accuracy, within-class diversity."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


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
    return {
        "fd": frechet_distance(feats, reference_features),
        "accuracy": float((preds == labels).mean()),
        "diversity": within_class_diversity(feats, labels) / reference_diversity,
    }
