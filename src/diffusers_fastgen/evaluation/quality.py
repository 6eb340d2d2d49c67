"""Quality of a real model's samples: FID against a folder of reference images, and CLIP score.

Weights come from local files only, so nothing is downloaded. The Fréchet distance runs on torchmetrics'
`FrechetInceptionDistance`; the CLIP score calls transformers' CLIPModel directly (torchmetrics' CLIPScore
reads `get_image_features` as a tensor, which transformers 5 no longer returns).

- FID with the standard Inception features: `features="inception"`, `weights=` the FID Inception file
  (torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`); needs torch-fidelity (and so torchvision).
- Fréchet distance in CLIP or DINOv2 image features (`features="clip"` / `"dinov2"`, `weights=` a local
  transformers folder): Stein et al. 2023 (arXiv:2306.04675) found DINOv2 features rank models closer to
  human judgement than Inception's; it is also the path for machines without torchvision.
- CLIP score (Hessel et al. 2021, arXiv:2104.08718, w = 100 as torchmetrics): 100 · max(cos(image, text), 0)
  averaged over images, with a local CLIP folder; prompts longer than CLIP's context are truncated.

Images are read from folders (png / jpg / jpeg / webp / bmp, sorted by name) in batches, never all at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor, CLIPVisionModelWithProjection

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FEATURES = ("inception", "clip", "dinov2")


def image_paths(folder: str, *, argument: str = "folder") -> list[str]:
    """The image files of `folder`, sorted by name; ValueError naming `argument` when there are none."""
    if not os.path.isdir(folder):
        raise ValueError(f"`{argument}` {folder!r} is not a folder.")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f"`{argument}` {folder!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
    return paths


def image_batches(paths: list[str], batch_size: int, size: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of the images at `paths` (RGB; resized to size x size with bicubic
    filtering when `size` is given, else every image must have the first one's size)."""
    for start in range(0, len(paths), batch_size):
        arrays = []
        for path in paths[start:start + batch_size]:
            image = Image.open(path).convert("RGB")
            if size is not None:
                image = image.resize((size, size), Image.BICUBIC)
            arrays.append(np.asarray(image))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)} in one folder; pass `image_size`.")
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class TransformersImageFeatures(torch.nn.Module):
    """Image features of a local transformers folder, for torchmetrics' FID: CLIP's projected image
    embedding (`clip`) or DINOv2's class token after the final layer norm (`dinov2`). Takes uint8
    (B, 3, H, W); the folder's own image processor resizes and normalises."""

    def __init__(self, folder: str, kind: str):
        super().__init__()
        check_local_folder(folder, "weights")
        self.kind = kind
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        if kind == "clip":  # a full CLIP folder, or a vision tower with its projection (an SD image_encoder)
            full = AutoConfig.from_pretrained(folder, local_files_only=True).model_type == "clip"
            self.model = (CLIPModel if full else CLIPVisionModelWithProjection).from_pretrained(
                folder, local_files_only=True)
            self.num_features = self.model.config.projection_dim
        else:
            self.model = AutoModel.from_pretrained(folder, local_files_only=True)
            self.num_features = self.model.config.hidden_size
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.model.dtype)
        if isinstance(self.model, CLIPModel):
            return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output).float()
        out = self.model(pixel_values=pixels)
        return (out.image_embeds if self.kind == "clip" else out.pooler_output).float()


def check_local_folder(path: str | None, argument: str) -> None:
    if path is None or not os.path.isdir(path):
        raise ValueError(f"`{argument}` must be a local model folder, got {path!r} (nothing is downloaded).")


def feature_extractor(features: str | torch.nn.Module, weights: str | None):
    """The `feature` argument for torchmetrics' FrechetInceptionDistance, checked before any image is read."""
    if isinstance(features, torch.nn.Module):
        return features
    if features not in FEATURES:
        raise ValueError(f"`features` must be one of {FEATURES} or a torch module, got {features!r}.")
    if features == "inception":
        if weights is None or not os.path.isfile(weights):
            raise ValueError(f"`weights` must be the FID Inception weights file (torch-fidelity's "
                             f"weights-inception-2015-12-05-6726825d.pth) for features='inception', got {weights!r}.")
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ValueError("features='inception' needs torch-fidelity (pip install torch-fidelity), which this "
                             "environment lacks; features='dinov2' or 'clip' run with transformers alone.")
        return 2048
    return TransformersImageFeatures(weights, features)


def fid(images: str, reference: str, *, features: str | torch.nn.Module = "inception", weights: str | None = None,
        batch_size: int = 50, image_size: int | None = None) -> float:
    """Fréchet distance between the image folders `images` and `reference` in the chosen features
    (see the module docstring); `image_size` resizes every image first (needed only when a folder mixes sizes)."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    generated, real = image_paths(images, argument="images"), image_paths(reference, argument="reference")
    if min(len(generated), len(real)) < 2:
        raise ValueError(f"FID needs at least 2 images per folder; `images` has {len(generated)}, "
                         f"`reference` {len(real)}.")
    extractor = feature_extractor(features, weights)
    kwargs = {"feature_extractor_weights_path": weights} if extractor == 2048 else {}
    metric = FrechetInceptionDistance(feature=extractor, **kwargs)
    for paths, is_real in ((real, True), (generated, False)):
        for batch in image_batches(paths, batch_size, image_size):
            metric.update(batch, real=is_real)
    return float(metric.compute())


def clip_score(images: str, prompts: list[str], *, weights: str, batch_size: int = 50) -> float:
    """Mean CLIP score of the images in `images` (sorted by name) against their prompts: one prompt per
    image, or each prompt for k consecutive images (`diffusers-fastgen generate --num_images k` order)."""
    check_local_folder(weights, "weights")
    paths = image_paths(images, argument="images")
    if not prompts or len(paths) % len(prompts):
        raise ValueError(f"`prompts`: {len(prompts)} prompt(s) for {len(paths)} images; give one per image or "
                         "one per group of equally many consecutive images.")
    per_prompt = len(paths) // len(prompts)
    texts = [p for p in prompts for _ in range(per_prompt)]
    model = CLIPModel.from_pretrained(weights, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(weights, local_files_only=True)
    max_length = model.config.text_config.max_position_embeddings
    total = 0.0
    for start, batch in zip(range(0, len(paths), batch_size), image_batches(paths, batch_size)):
        inputs = processor(text=texts[start:start + len(batch)], images=list(batch), return_tensors="pt",
                           padding=True, truncation=True, max_length=max_length)
        with torch.no_grad():
            out = model(**inputs)
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        total += (100 * cosine).clamp_min(0).sum().item()
    return total / len(paths)
