"""The text-to-image digits benchmark: a stock StableDiffusionPipeline of the embedded digits, and its scorer.

The digits teacher (`DIGITS_TEACHER_PATH`) is our own class-conditional pixel pipeline. This one is what a
user's SD1.5 teacher is, at toy scale, every part a stock diffusers / transformers class: an AutoencoderKL
trained on the digits at 16x16 (nearest-neighbour 2x upscale of the 8x8 digits, grey replicated to RGB, so
`to_digits` inverts `to_pixels` exactly), a CLIPTokenizer with a BPE vocabulary of the prompt words built
here, a frozen CLIPTextModel pretrained CLIP-style on the training captions, a UNet2DConditionModel with
cross-attention, and an SD1.5-like VP scheduler (scaled-linear betas, eps prediction). Prompts name a class
in several phrasings; two phrasings never appear in training and are what the benchmark prompts with
(`HELD_OUT_PHRASINGS`).

`score_text_digits_pipeline` samples any such pipeline folder (a teacher, a full student, or the teacher with
a student LoRA) and scores the decoded images with the digits benchmark's classifier: FD / accuracy /
diversity against the held-out digits, and seconds per 1,000 images including the VAE decode.

Built by `benchmarks/build_text_digits_teacher.py`; shipped at `TEXT_DIGITS_TEACHER_PATH`.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPTokenizer

from .classifier import ASSETS
from .digits_benchmark import DigitsReference
from .digits_data import load_digits_arrays

TEXT_DIGITS_TEACHER_PATH = os.path.join(ASSETS, "text_digits_teacher")  # StableDiffusionPipeline folder
TEXT_DIGITS_PROMPTS_PATH = os.path.join(ASSETS, "text_digits_prompts.txt")  # every training phrasing x class (--prompts)
RESOLUTION = 16  # pixels; the 8x8 digits upscaled 2x
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {n}: the numeral, {w}: the word. Training uses TRAIN_PHRASINGS; the benchmark prompts with the held-out ones.
TRAIN_PHRASINGS = ("a handwritten {w}", "the digit {n}", "{n}", "{w}, written by hand", "the number {w}",
                   "a picture of the digit {w}", "handwritten digit {n}", "an image of the number {n}")
# Never seen verbatim: training phrasings with the numeral and the word swapped. The teacher's contrastively
# pretrained text encoder reads them as their class (docs/results.md; a random one did not: ~82-93 %).
HELD_OUT_PHRASINGS = ("a handwritten {n}", "handwritten digit {w}")
MAX_TOKENS = 16  # the tokenizer's model_max_length (every phrasing fits)


def digit_prompt(label: int, phrasing: str) -> str:
    if not 0 <= int(label) <= 9:
        raise ValueError(f"`label` must be a digit 0..9, got {label}.")
    return phrasing.format(n=int(label), w=NUMBER_WORDS[int(label)])


def to_pixels(digits: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) digits in [-1, 1] -> (N, 3, 16, 16) RGB images in [-1, 1] (nearest 2x upscale)."""
    if digits.ndim != 4 or digits.shape[1:] != (1, 8, 8):
        raise ValueError(f"`digits` must be (N, 1, 8, 8), got {tuple(digits.shape)}.")
    return digits.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).repeat(1, 3, 1, 1)


def to_digits(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, 16, 16) images in [-1, 1] -> (N, 1, 8, 8) digits: the grey mean, 2x2 average pooled (inverts
    `to_pixels`)."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (RESOLUTION, RESOLUTION):
        raise ValueError(f"`images` must be (N, 3, {RESOLUTION}, {RESOLUTION}), got {tuple(images.shape)}.")
    return F.avg_pool2d(images.float().mean(dim=1, keepdim=True), 2)


def write_imagefolder(folder: str) -> int:
    """Every training digit once per training phrasing, as 16x16 PNGs with their captions in datasets'
    imagefolder layout (metadata.jsonl, rows shuffled): the scripts' `--train_data_dir`. Returns the row count.
    Refuses a folder that already holds a metadata.jsonl (nothing is overwritten)."""
    if os.path.exists(os.path.join(folder, "metadata.jsonl")):
        raise ValueError(f"`folder` {folder!r} already holds a metadata.jsonl; pick a new folder.")
    os.makedirs(folder, exist_ok=True)
    images, labels = load_digits_arrays("train")
    pixels = ((to_pixels(torch.from_numpy(images)) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    rows = []
    for i, (image, label) in enumerate(zip(pixels.numpy(), labels)):
        name = f"{i:04d}.png"
        Image.fromarray(image).save(os.path.join(folder, name))
        rows += [{"file_name": name, "text": digit_prompt(label, p)} for p in TRAIN_PHRASINGS]
    order = np.random.default_rng(0).permutation(len(rows))  # phrasings and classes mixed across shards
    with open(os.path.join(folder, "metadata.jsonl.tmp"), "w") as f:
        for j in order:
            f.write(json.dumps(rows[j]) + "\n")
    os.replace(os.path.join(folder, "metadata.jsonl.tmp"), os.path.join(folder, "metadata.jsonl"))
    return len(rows)


# --- the tokenizer --------------------------------------------------------------------------------------
def _prompt_words() -> list[str]:
    words = set()
    for phrasing in TRAIN_PHRASINGS + HELD_OUT_PHRASINGS:
        for label in range(10):
            words.update(digit_prompt(label, phrasing).replace(",", " ").split())
    return sorted(words)


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a CLIP BPE tokenizer whose merges build every prompt word (and numeral) into one
    token, each word's letters joined left to right. Printable ASCII characters outside the words still
    tokenize, one character a token."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in _prompt_words():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            pair = (merged, piece)
            if pair not in merges:
                merges.append(pair)
            merged += piece
            if merged not in vocab:
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def build_clip_tokenizer():
    """A stock CLIPTokenizer over the prompt vocabulary (model_max_length `MAX_TOKENS`, padded with the end token
    like SD1.5's)."""
    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


# --- scoring a pipeline ---------------------------------------------------------------------------------
def benchmark_prompts(num_samples: int, phrasings=HELD_OUT_PHRASINGS) -> tuple[list[str], np.ndarray]:
    """(prompts, labels): balanced classes 0..9, the phrasings (default: the held-out ones) alternating."""
    if not phrasings or any(("{n}" in p) == ("{w}" in p) for p in phrasings):
        raise ValueError(f"`phrasings` must each hold one of {{n}} (numeral) or {{w}} (word), got {phrasings!r}.")
    labels = np.arange(num_samples) % 10
    prompts = [digit_prompt(c, phrasings[(i // 10) % len(phrasings)]) for i, c in enumerate(labels)]
    return prompts, labels


@torch.no_grad()
def sample_text_digits(pipe, num_samples: int, *, seed: int = 0, batch_size: int = 500, phrasings=HELD_OUT_PHRASINGS,
                       **call_kwargs) -> tuple[torch.Tensor, np.ndarray, float]:
    """(digits (N, 1, 8, 8) in [-1, 1], labels, seconds including the VAE decode) from a text-to-image
    pipeline prompted with `phrasings` (default: the held-out ones). `call_kwargs` go to the pipeline call
    (num_inference_steps, guidance_scale, timesteps, ...)."""
    prompts, labels = benchmark_prompts(num_samples, phrasings)
    generator = torch.Generator().manual_seed(seed)
    out, start = [], time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # schedulers that re-noise from the global generator (LCM does use `generator`)
        for lo in range(0, num_samples, batch_size):
            images = pipe(prompts[lo:lo + batch_size], height=RESOLUTION, width=RESOLUTION, generator=generator,
                          output_type="pt", **call_kwargs).images
            out.append(to_digits(images * 2 - 1))
    return torch.cat(out), labels, time.perf_counter() - start


def score_text_digits_pipeline(pipe, reference: DigitsReference | None = None, *, name: str, num_samples: int = 1000,
                               seed: int = 0, repeats: int = 1, phrasings=HELD_OUT_PHRASINGS, **call_kwargs) -> dict:
    """One benchmark row: FD / accuracy / diversity of `num_samples` images (`phrasings`, default the held-out
    ones; classes balanced) and the median seconds per 1,000 images over `repeats` passes, decode included."""
    if num_samples < 10:
        raise ValueError(f"`num_samples` must be >= 10 (one per class), got {num_samples}.")
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}.")
    reference = reference or DigitsReference()
    pipe.set_progress_bar_config(disable=True)
    seconds = []
    for _ in range(repeats):
        digits, labels, s = sample_text_digits(pipe, num_samples, seed=seed, phrasings=phrasings, **call_kwargs)
        seconds.append(s)
    row = {"model": name, "nfe": _nfe(call_kwargs, pipe), **reference.score(digits, labels)}
    row["s_per_1k"] = statistics.median(seconds) * 1000 / num_samples
    return row


def _nfe(call_kwargs: dict, pipe=None) -> int:
    """UNet evaluations per image: steps, twice with CFG (which the stock pipeline skips for a UNet with
    time_cond_proj_dim: there guidance_scale is an input of the UNet, e.g. a MeanFlow student's interval)."""
    steps = len(call_kwargs["timesteps"]) if call_kwargs.get("timesteps") else call_kwargs.get("num_inference_steps", 50)
    embedded = getattr(getattr(getattr(pipe, "unet", None), "config", None), "time_cond_proj_dim", None) is not None
    return int(steps) * (2 if call_kwargs.get("guidance_scale", 1.0) > 1.0 and not embedded else 1)
