"""Real images for text-to-image teachers: a streamed dataset encoded once into latent + embedding shards.

`encode_image_dataset` streams an image-caption dataset (`--train_data_dir`, a folder in 🤗 datasets'
imagefolder layout with captions in metadata.jsonl / .csv, or `--dataset_name`, any `datasets.load_dataset`
name or path), resizes and crops each image to `--resolution` (`--center_crop`, `--random_flip`),
encodes it with the teacher's VAE ((z - shift_factor) * scaling_factor, or per channel with latents_mean / std
for Qwen-Image; one seeded posterior draw per image) and its caption with the pipeline's own encode_prompt,
and writes both to safetensors shards under
a folder named by a hash of everything that determines them (each shard written atomically; a rerun reads
the finished shards). Only one shard of pixels is in memory at a time. `LatentShards` then reads rows
of the shards by index without loading them whole.
"""

from __future__ import annotations

import hashlib
import json
import os

import datasets
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from .teachers import PromptBatches, TextToImageTeacher, encoder_stamp, load_prompts


def _load_stream(train_data_dir: str | None, dataset_name: str | None, *, split: str = "train",
                 cache_dir: str | None = None):
    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("pass exactly one of `train_data_dir` (an image folder) and `dataset_name`.")
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"`train_data_dir` {train_data_dir!r} is not a folder.")
        return datasets.load_dataset("imagefolder", data_dir=train_data_dir, split=split, streaming=True)
    try:
        return datasets.load_dataset(dataset_name, split=split, streaming=True, cache_dir=cache_dir)
    except Exception as err:  # no such dataset, offline, no such split
        raise ValueError(f"`dataset_name` {dataset_name!r} could not be opened ({type(err).__name__}: {err}).") from None


def check_image_dataset(train_data_dir: str | None, dataset_name: str | None, *, image_column: str = "image",
                        caption_column: str = "text", split: str = "train", cache_dir: str | None = None) -> None:
    """ValueError, before any work, unless the dataset opens and has both columns (read off its first row)."""
    stream = _load_stream(train_data_dir, dataset_name, split=split, cache_dir=cache_dir)
    try:
        first = next(iter(stream))
    except StopIteration:
        raise ValueError(f"the dataset {train_data_dir or dataset_name!r} holds no rows.") from None
    for argument, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in first:
            raise ValueError(f"`{argument}` {column!r} is not a column of {train_data_dir or dataset_name!r}; its "
                             f"columns: {sorted(first)}.")


def preprocess_image(image: Image.Image, resolution: int, *, center_crop: bool, flip: bool, rng: np.random.Generator):
    """PIL image -> (3, resolution, resolution) float tensor in [-1, 1]: shorter side resized to `resolution`
    (bicubic), then a center or random square crop, then an optional horizontal flip."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels in [-1, 1] -> model latents, z drawn from the posterior: (z - shift_factor) * scaling_factor
    (AutoencoderKL, images (B, 3, H, W)), or per channel (z - latents_mean) / latents_std for the video VAEs of
    Wan and Qwen-Image (the inverse of their pipelines' decode): videos (B, 3, F, H, W) -> (B, C, f, h, w), and an
    image (B, 3, H, W) as one frame -> (B, C, h, w)."""
    per_channel = getattr(vae.config, "latents_mean", None) is not None
    image = pixels.ndim == 4
    x = pixels.to(vae.device, vae.dtype)
    dist = vae.encode(x[:, :, None] if per_channel and image else x).latent_dist
    z = dist.sample(generator=generator).float()
    if per_channel:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=z.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=z.device).view(shape)
        z = (z - mean) / std
        return (z[:, :, 0] if image else z).cpu().contiguous()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).cpu().contiguous()


def encode_image_dataset(teacher, *, train_data_dir: str | None = None, dataset_name: str | None = None,
                         image_column: str = "image", caption_column: str = "text", split: str = "train",
                         cache_dir: str | None = None, center_crop: bool = True, random_flip: bool = False,
                         max_train_samples: int | None = None, shard_size: int = 64, out_dir: str, seed: int = 0) -> str:
    """Encode the dataset with `teacher` (a `TextToImageTeacher`, still holding its VAE and text encoders)
    into shards under `out_dir/latents-<hash>/`; returns that folder."""
    key = json.dumps([teacher.path, teacher.class_name, teacher.load_kwargs, str(teacher.weight_dtype),
                      teacher.resolution, teacher.max_sequence_length, train_data_dir and os.path.abspath(train_data_dir),
                      dataset_name, split, image_column, caption_column, center_crop, random_flip, max_train_samples,
                      shard_size, seed] + encoder_stamp(teacher.path))
    folder = os.path.join(out_dir, "latents-" + hashlib.sha1(key.encode()).hexdigest()[:12])
    done = os.path.join(folder, "complete.json")
    if os.path.isfile(done):
        return folder
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    stream = _load_stream(train_data_dir, dataset_name, split=split, cache_dir=cache_dir)
    count, shard, pixels, captions, first_captions = 0, 0, [], [], []

    def flush():
        nonlocal shard, pixels, captions
        path = os.path.join(folder, f"shard-{shard:05d}.safetensors")
        if not os.path.isfile(path):  # a finished shard from an interrupted run is kept
            g = torch.Generator().manual_seed(seed * 100_003 + shard)
            tensors = {"latents": encode_latents(teacher.pipe.vae, torch.stack(pixels), g)}
            tensors.update({k: v.detach().float().cpu().contiguous() for k, v in teacher._encode(captions).items()})
            save_file(tensors, path + ".tmp")
            os.replace(path + ".tmp", path)
        shard, pixels, captions = shard + 1, [], []

    for row in stream:
        if max_train_samples is not None and count >= max_train_samples:
            break
        flip = random_flip and bool(rng.integers(0, 2))
        pixels.append(preprocess_image(row[image_column], teacher.resolution, center_crop=center_crop, flip=flip, rng=rng))
        captions.append(str(row.get(caption_column) or ""))
        if len(first_captions) < 16:
            first_captions.append(captions[-1])
        count += 1
        if len(pixels) == shard_size:
            flush()
    if pixels:
        flush()
    if count == 0:
        raise ValueError(f"the dataset {train_data_dir or dataset_name!r} gave no images.")
    with open(done + ".tmp", "w") as f:
        json.dump({"num_samples": count, "num_shards": shard, "first_captions": first_captions}, f)
    os.replace(done + ".tmp", done)
    return folder


class LatentShards:
    """Rows of the encoded shards by global index: {"latents": (B, C, h, w), embedding name: (B, ...)}; only
    the requested rows are read (safetensors slices)."""

    def __init__(self, folder: str):
        with open(os.path.join(folder, "complete.json")) as f:
            info = json.load(f)
        self.paths = [os.path.join(folder, f"shard-{i:05d}.safetensors") for i in range(info["num_shards"])]
        self.sizes = []
        for path in self.paths:
            with safe_open(path, "pt") as f:
                self.sizes.append(f.get_slice("latents").get_shape()[0])
        self.offsets = np.cumsum([0] + self.sizes)
        self.num_samples = int(self.offsets[-1])
        self.first_captions = info.get("first_captions", [])  # the first rows' captions (sample grids)

    def __len__(self) -> int:
        return self.num_samples

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        index = [int(i) for i in index]
        if any(not 0 <= i < self.num_samples for i in index):
            raise IndexError(f"row index out of range [0, {self.num_samples}).")
        shards = np.searchsorted(self.offsets, index, side="right") - 1
        out: dict[str, list] = {}
        for shard in sorted(set(shards.tolist())):  # each shard opened once per batch
            with safe_open(self.paths[shard], "pt") as f:
                for k in f.keys():
                    sliced = f.get_slice(k)
                    out.setdefault(k, [None] * len(index))
                    for j, (i, s) in enumerate(zip(index, shards)):
                        if s == shard:
                            local = i - int(self.offsets[shard])
                            out[k][j] = sliced[local:local + 1]
        return {k: torch.cat(v) for k, v in out.items()}


class TextToImageData:
    """The text-to-image path of a script, from its `TextToImageArgs`: the teacher, and per micro-batch
    (real x0 or None, cond, uncond) drawn by index (a pure function of seed, rank and iteration, so a resumed
    run draws what the uninterrupted one would have).

    With real images (`train_data_dir` / `dataset_name`) the rows come from the encoded shards: latents and
    their captions' embeddings. Without, from the prompt file's embeddings (`embeddings_cache`). Either way
    the text encoders are released afterwards (the VAE too when nothing needs it)."""

    def __init__(self, text, accelerator, run, *, guidance_scale: float = 1.0):
        self.teacher = TextToImageTeacher(
            text.pretrained_model_name_or_path, revision=text.revision, variant=text.variant, cache_dir=text.cache_dir,
            weight_dtype=text.weight_dtype, resolution=text.resolution, guidance_scale=guidance_scale,
            max_sequence_length=text.max_sequence_length)
        self.shards = self.embeddings = None
        self.prompts = [""]
        if text.train_data_dir is not None or text.dataset_name is not None:
            kwargs = dict(train_data_dir=text.train_data_dir, dataset_name=text.dataset_name,
                          image_column=text.image_column, caption_column=text.caption_column, split=text.dataset_split,
                          cache_dir=text.cache_dir, center_crop=text.center_crop, random_flip=text.random_flip,
                          max_train_samples=text.max_train_samples, seed=run.seed,
                          out_dir=text.latents_cache or os.path.join(run.output_dir, "latents"))
            if accelerator.is_main_process:  # one process encodes; the others then find the finished folder
                encode_image_dataset(self.teacher, **kwargs)
            accelerator.wait_for_everyone()
            self.shards = LatentShards(encode_image_dataset(self.teacher, **kwargs))
            count = len(self.shards)
            self.prompts = self.shards.first_captions or self.prompts
        if text.prompts is not None:
            self.prompts = load_prompts(text.prompts, text.caption_column)
        if self.shards is None:  # the negative prompt comes with the prompts' embeddings (and their cache)
            self.embeddings, self.negative = self.teacher.embed_prompts(
                self.prompts, negative_prompt=text.negative_prompt, batch_size=text.encode_batch_size,
                cache_dir=text.embeddings_cache)
            count = len(self.prompts)
        else:
            self.negative = {k: v.detach().cpu() for k, v in self.teacher._encode([text.negative_prompt]).items()}
        self.teacher.release_text_encoders()
        self.batches = PromptBatches(count, run.train_batch_size, seed=run.seed, rank=accelerator.process_index)

    def state_at(self, iteration: int) -> None:
        self.batches.state_at(iteration)

    def validation_embeddings(self, n: int = 4) -> dict:
        """Embeddings of the first `n` prompts (or captions) for validation grids."""
        if self.shards is not None:
            rows = self.shards.rows(torch.arange(min(n, len(self.shards))))
            rows.pop("latents")
            return rows
        return {k: v[:n] for k, v in self.embeddings.items()}

    def next(self, device):
        """(real x0 (B, C, h, w) or None, cond, uncond) of the next micro-batch."""
        index = next(self.batches)
        if self.shards is not None:
            rows = self.shards.rows(index)
            x0 = rows.pop("latents").to(device)
            cond = self.teacher.cond(rows, None, device)
        else:
            x0, cond = None, self.teacher.cond(self.embeddings, index, device)
        return x0, cond, self.teacher.cond(self.negative, torch.zeros_like(index), device)
