"""Validation sample grids: saved as PNG and logged to the trackers."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (H', W', 3) uint8 grid, `nrow` images per row."""
    if images.ndim != 4:
        raise ValueError(f"`images` must be (B, C, H, W), got shape {tuple(images.shape)}.")
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if c == 1:
        x = x.repeat(1, 3, 1, 1)
    grid = torch.zeros(3, ncol * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i, :3]
    return grid.permute(1, 2, 0).numpy()


def save_image_grid(images: torch.Tensor, path: str, nrow: int | None = None, upscale: int = 1) -> str:
    """Write a PNG grid (nearest-neighbour `upscale` so 8x8 digits are visible)."""
    grid = make_grid(images, nrow=nrow)
    img = Image.fromarray(grid)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)
    return path


def log_image_grid(accelerator, images: torch.Tensor, step: int, tag: str = "validation", nrow: int | None = None):
    """Send the grid to tensorboard / wandb if those trackers are active."""
    grid = make_grid(images, nrow=nrow)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, grid, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(grid)]}, step=step)
