"""The digits classifier shipped with the package: features for Fréchet distance, labels for accuracy."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from torch import nn

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
CLASSIFIER_PATH = os.path.join(ASSETS, "digits_classifier.safetensors")
DIGITS_TEACHER_PATH = os.path.join(ASSETS, "digits_teacher")  # DigitsPipeline folder of the shipped teacher


class DigitsClassifier(nn.Module):
    """8x8 CNN: 3 conv layers -> 128-d penultimate features -> 10 logits."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # (B, 64, 4, 4)
            nn.Conv2d(64, 128, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 128)
        )
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digits_classifier(path: str = CLASSIFIER_PATH) -> DigitsClassifier:

    if not os.path.isfile(path):
        raise FileNotFoundError(f"digits classifier weights not found at {path}; run "
                                "`python benchmarks/train_digits_classifier.py`.")
    model = DigitsClassifier()
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)
