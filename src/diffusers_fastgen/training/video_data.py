"""Real videos for a stock Wan teacher: a captioned video folder encoded once into latent + embedding shards.

The folder (`--train_data_dir`) follows 🤗 datasets' folder layout: a `metadata.jsonl` (or `metadata.csv`)
whose rows name a `file_name` — a GIF, an MP4 / WebM / MOV / AVI / MKV file (read through diffusers'
`load_video`, which needs `imageio` and `imageio-ffmpeg`), or a sub-folder of frame images in name order —
and its caption (`--caption_column`). Each video's first `num_frames` frames are resized on the shorter side
and center-cropped to `height` x `width`, encoded by the teacher's Wan VAE as (z - latents_mean) / latents_std
(the inverse of CausalWanPipeline's decode; one seeded posterior draw per video), and its caption by the
pipeline's own `encode_prompt`; both go to safetensors shards under a folder named by a hash of everything
that determines them (each shard atomic; a rerun reads the finished ones). `image_data.LatentShards` reads rows.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os

import numpy as np
import torch
from diffusers.utils import load_video
from PIL import Image, ImageSequence
from safetensors.torch import save_file

from .image_data import LatentShards, encode_latents
from .teachers import encoder_stamp

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".gif", ".mp4", ".webm", ".mov", ".avi", ".mkv")


def read_video_folder(folder: str, caption_column: str = "text") -> list[tuple[str, str]]:
    """[(path of a video file or frame folder, caption)] from the folder's metadata; ValueError naming what
    is missing, before any frame is read."""
    if not os.path.isdir(folder):
        raise ValueError(f"`train_data_dir` {folder!r} is not a folder.")
    jsonl, csv_path = os.path.join(folder, "metadata.jsonl"), os.path.join(folder, "metadata.csv")
    if os.path.isfile(jsonl):
        with open(jsonl, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif os.path.isfile(csv_path):
        with open(csv_path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"`train_data_dir` {folder!r} has no metadata.jsonl or metadata.csv (rows of file_name and "
                         "caption).")
    if not rows:
        raise ValueError(f"`train_data_dir` {folder!r}: its metadata lists no video.")
    columns = sorted({k for row in rows for k in row})
    for column, argument in (("file_name", "file_name"), (caption_column, "caption_column")):
        if column not in columns:
            raise ValueError(f"`{argument}` {column!r} is not a column of {folder!r}'s metadata; its columns: {columns}.")
    out = []
    for row in rows:
        path = os.path.join(folder, row["file_name"])
        is_frames = os.path.isdir(path)
        if not is_frames and not (os.path.isfile(path) and path.lower().endswith(VIDEO_EXTENSIONS)):
            raise ValueError(f"`train_data_dir`: {row['file_name']!r} is neither a frame folder nor a video file "
                             f"({', '.join(VIDEO_EXTENSIONS)}).")
        out.append((path, str(row.get(caption_column) or "")))
    return out


def read_frames(path: str) -> list[Image.Image]:
    """The frames of a GIF, a video file (diffusers' load_video) or a folder of images, as RGB images."""
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        return [Image.open(os.path.join(path, n)).convert("RGB") for n in names]
    if path.lower().endswith(".gif"):
        with Image.open(path) as gif:
            return [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]
    try:
        return load_video(path)
    except ImportError as err:
        raise ValueError(f"reading {path!r} needs imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg): "
                         f"{err}") from None


def video_to_tensor(frames: list[Image.Image], num_frames: int, height: int, width: int, *, name: str = "video"):
    """The first `num_frames` frames, resized on the shorter side to cover height x width and center-cropped,
    as (3, num_frames, height, width) in [-1, 1]."""
    if len(frames) < num_frames:
        raise ValueError(f"{name} has {len(frames)} frames; `num_frames` is {num_frames}.")
    out = []
    for frame in frames[:num_frames]:
        scale = max(height / frame.height, width / frame.width)
        size = (max(width, round(frame.width * scale)), max(height, round(frame.height * scale)))
        frame = frame.resize(size, Image.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        out.append(np.asarray(frame.crop((left, top, left + width, top + height)), dtype=np.float32))
    return torch.from_numpy(np.stack(out)).permute(3, 0, 1, 2) / 127.5 - 1.0


def encode_video_dataset(teacher, *, train_data_dir: str, caption_column: str = "text", out_dir: str,
                         shard_size: int = 8, seed: int = 0) -> str:
    """Encode the video folder with `teacher` (a `WanTeacher`, still holding its VAE and UMT5) into shards
    under `out_dir/video-latents-<hash>/`; returns that folder (rows: "latents" (C, f, h, w) and
    "encoder_hidden_states")."""
    videos = read_video_folder(train_data_dir, caption_column)
    stamps = [(p, os.path.getmtime(p)) for p, _ in videos]
    key = json.dumps([teacher.path, teacher.class_name, teacher.load_kwargs, str(teacher.weight_dtype),
                      teacher.num_frames, teacher.height, teacher.width, teacher.max_sequence_length,
                      os.path.abspath(train_data_dir), caption_column, stamps, shard_size, seed] + encoder_stamp(teacher.path))
    folder = os.path.join(out_dir, "video-latents-" + hashlib.sha1(key.encode()).hexdigest()[:12])
    done = os.path.join(folder, "complete.json")
    if os.path.isfile(done):
        return folder
    os.makedirs(folder, exist_ok=True)
    num_shards = 0
    for shard, start in enumerate(range(0, len(videos), shard_size)):
        path = os.path.join(folder, f"shard-{shard:05d}.safetensors")
        num_shards += 1
        if os.path.isfile(path):  # a finished shard from an interrupted run is kept
            continue
        rows = videos[start:start + shard_size]
        pixels = torch.stack([video_to_tensor(read_frames(p), teacher.num_frames, teacher.height, teacher.width,
                                              name=repr(os.path.relpath(p, train_data_dir))) for p, _ in rows])
        g = torch.Generator().manual_seed(seed * 100_003 + shard)
        tensors = {"latents": encode_latents(teacher.pipe.vae, pixels, g)}
        tensors.update({k: v.detach().float().cpu().contiguous() for k, v in teacher._encode([c for _, c in rows]).items()})
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
    with open(done + ".tmp", "w") as f:
        json.dump({"num_samples": len(videos), "num_shards": num_shards,
                   "first_captions": [c for _, c in videos[:16]]}, f)
    os.replace(done + ".tmp", done)
    return folder


def video_shards(teacher, accelerator, *, train_data_dir: str, caption_column: str, out_dir: str,
                 seed: int) -> LatentShards:
    """The encoded shards of a video folder (the main process encodes; the others wait, then read)."""
    kwargs = dict(train_data_dir=train_data_dir, caption_column=caption_column, out_dir=out_dir, seed=seed)
    if accelerator.is_main_process:
        encode_video_dataset(teacher, **kwargs)
    accelerator.wait_for_everyone()
    return LatentShards(encode_video_dataset(teacher, **kwargs))
