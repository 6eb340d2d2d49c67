"""`diffusers-fastgen generate`: sample any pipeline folder (ours or a stock diffusers one) with timing.

`load_pipeline` picks the class from model_index.json (DigitsPipeline and CausalWanPipeline are ours, the
rest go through `DiffusionPipeline.from_pretrained`), applies a LoRA folder with stock `load_lora_weights`
(and its `scheduler/` recipe when it has one). `generate` runs `warmup` untimed batches, then `repeats`
timed passes over all batches, and returns the outputs with a timing summary: median latency per batch,
images (or frames) per second, peak RSS; for CausalWanPipeline it writes every block to disk as soon as it
is finished and reports the time to the first block.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_gif, export_to_video
from PIL import Image

from . import schedulers as fastgen_schedulers
from .pipelines import CausalWanPipeline, DigitsPipeline
from .training.accelerate_setup import peak_rss_mb
from .training.teachers import load_prompts

OURS = {"DigitsPipeline": DigitsPipeline, "CausalWanPipeline": CausalWanPipeline}
# Submodules left in fp32 by `quantize_int8`: diffusers' Wan reads its time embedder's dtype off its first
# parameter, which a dynamically quantized Linear no longer has (and the embedder is a negligible cost).
INT8_KEEP_FP32 = ("time_embedder",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pipeline_class_name(model: str) -> str | None:
    """The `_class_name` of a local pipeline folder (None for a Hub id); ValueError for a non-pipeline folder."""
    index = os.path.join(model, "model_index.json")
    if os.path.isdir(model) and not os.path.isfile(index):
        raise ValueError(f"`model` {model!r} is a folder without model_index.json (not a diffusers pipeline).")
    return json.load(open(index)).get("_class_name") if os.path.isfile(index) else None


def check_request(class_name: str | None, *, prompts, class_labels, steps, batch_size: int = 1, num_images: int = 1,
                  warmup: int = 0, repeats: int = 1) -> None:
    """ValueError, before the pipeline loads, for a request it could not serve."""
    if batch_size < 1 or num_images < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"need batch_size >= 1, num_images >= 1, warmup >= 0, repeats >= 1; got {batch_size}, "
                         f"{num_images}, {warmup}, {repeats}.")
    if steps is not None and steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    if steps is not None and class_name == "CausalWanPipeline":
        raise ValueError("`steps`: a CausalWanPipeline samples its recipe (denoising_timesteps in model_index.json); "
                         "convert it with another recipe to change the steps.")
    if class_name == "DigitsPipeline":
        if not class_labels or any(not 0 <= c <= 9 for c in class_labels):
            raise ValueError("a DigitsPipeline needs `class_labels` (0-9).")
    elif not prompts:
        raise ValueError(f"a {class_name or 'text-conditioned pipeline'} needs a prompt (`prompt` or `prompts_file`).")


def quantize_int8(module: torch.nn.Module) -> int:
    """Int8 dynamic quantization of every nn.Linear of `module`, in place (weights int8 per tensor, activations
    quantized on the fly; torch's own CPU backend, fbgemm / qnnpack). Returns how many layers were replaced;
    ValueError when the backend is missing or there is no Linear layer."""
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("fbgemm", "x86", "qnnpack")):
        raise ValueError(f"`quantize` int8 needs torch's quantized CPU backend, which this build lacks ({engines}).")
    names = {name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)
             and not any(part in INT8_KEEP_FP32 for part in name.split("."))}
    if not names:
        raise ValueError(f"`quantize` int8: {type(module).__name__} has no Linear layer to quantize.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization's migration notice
        warnings.simplefilter("ignore", UserWarning)
        torch.ao.quantization.quantize_dynamic(module, names, dtype=torch.qint8, inplace=True)
    return len(names)


def to_channels_last(pipe) -> list[str]:
    """Put the pipeline's convolutional parts (a UNet denoiser, the VAE) in channels-last memory format, in
    place; returns their names. ValueError for a pipeline that has neither (a transformer denoiser without a
    VAE: channels-last is a layout for 4-D convolution inputs)."""
    names = [n for n in ("unet", "vae") if isinstance(getattr(pipe, n, None), torch.nn.Module)
             and any(isinstance(m, torch.nn.Conv2d) for m in getattr(pipe, n).modules())]
    if not names:
        raise ValueError(f"`channels_last`: {type(pipe).__name__} has no UNet or 2-D VAE to convert.")
    for name in names:
        getattr(pipe, name).to(memory_format=torch.channels_last)
    return names


def scheduler_class(name: str):
    """A scheduler class by name: diffusers' (`EulerDiscreteScheduler`, `LCMScheduler`, ...) or ours
    (`FlowMatchFewStepScheduler`); ValueError naming `scheduler` otherwise."""
    cls = getattr(diffusers, name, None) or getattr(fastgen_schedulers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"`scheduler` {name!r} is not a diffusers scheduler class (e.g. EulerDiscreteScheduler, "
                         "LCMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchFewStepScheduler).")
    return cls


def load_pipeline(model: str, *, lora: str | None = None, dtype: str = "fp32", device: str = "cpu",
                  quantize: str | None = None, compile: bool = False, channels_last: bool = False,
                  scheduler: str | None = None):
    """The pipeline of a folder (or Hub id); ValueError naming `model` / `lora` when they do not fit.
    quantize='int8': the denoiser's Linear layers in int8 (`quantize_int8`, CPU, fp32 only).
    compile: the denoiser wrapped in torch.compile (inductor; compiled on the first call, so keep --warmup).
    channels_last: the UNet and VAE in channels-last memory format (`to_channels_last`).
    scheduler: replace the recipe's scheduler by this class, built from the pipeline's scheduler config."""
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if quantize not in (None, "int8"):
        raise ValueError(f"`quantize` must be None or 'int8', got {quantize!r}.")
    if quantize and (dtype != "fp32" or device != "cpu"):
        raise ValueError("`quantize` int8 runs on the CPU in fp32 (torch's dynamic quantization).")
    override = scheduler_class(scheduler) if scheduler is not None else None
    name = pipeline_class_name(model)
    try:
        pipe = OURS[name].from_pretrained(model) if name in OURS else DiffusionPipeline.from_pretrained(
            model, dtype=DTYPES[dtype])
    except OSError as err:
        raise ValueError(f"`model` {model!r} could not be loaded as a pipeline: {err}") from None
    if name in OURS and dtype != "fp32":
        pipe = pipe.to(dtype=DTYPES[dtype])
    if lora is not None:
        if not hasattr(pipe, "load_lora_weights"):
            raise ValueError(f"`lora`: {type(pipe).__name__} does not load LoRA weights.")
        try:
            pipe.load_lora_weights(lora)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"`lora` {lora!r} does not fit {type(pipe).__name__}: {err}") from None
        sched = os.path.join(lora, "scheduler", "scheduler_config.json")
        if os.path.isfile(sched):  # the LoRA student's sampling recipe
            cls = getattr(diffusers, json.load(open(sched))["_class_name"])
            pipe.scheduler = cls.from_pretrained(lora, subfolder="scheduler")
    if override is not None:
        pipe.scheduler = override.from_config(pipe.scheduler.config)
        if isinstance(pipe, CausalWanPipeline):  # its recipe's sigmas must reach the model unchanged
            fastgen_schedulers.check_causal_scheduler(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    if quantize == "int8":
        quantize_int8(getattr(pipe, "unet", None) or pipe.transformer)
    pipe = pipe.to(device)
    if channels_last:
        to_channels_last(pipe)
    if compile:
        name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        setattr(pipe, name, torch.compile(getattr(pipe, name)))
    return pipe


def _batches(items: list, batch_size: int) -> list[list]:
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def _to_pil(array) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] not in (1, 3):  # latents of a pipeline without a VAE: channel 0
        array = array[..., :1]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))


def generate(pipe, *, prompts: list[str] | None = None, class_labels: list[int] | None = None, num_images: int = 1,
             batch_size: int = 1, steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
             warmup: int = 1, repeats: int = 1, output_dir: str | None = None, height: int | None = None,
             width: int | None = None, num_frames: int | None = None, video_format: str = "gif") -> dict:
    """Sample `num_images` per prompt (or class label); returns {"images" | "videos": [...], "timing": {...}}.
    Videos are written as GIF or MP4 (`video_format`; MP4 through diffusers' export_to_video, which needs
    imageio and imageio-ffmpeg)."""
    if video_format not in ("gif", "mp4"):
        raise ValueError(f"`video_format` must be 'gif' or 'mp4', got {video_format!r}.")
    check_request(type(pipe).__name__, prompts=prompts, class_labels=class_labels, steps=steps, batch_size=batch_size,
                  num_images=num_images, warmup=warmup, repeats=repeats)
    digits, video = isinstance(pipe, DigitsPipeline), isinstance(pipe, CausalWanPipeline)
    items = [x for x in (class_labels if digits else prompts) for _ in range(num_images)]
    kwargs = {}
    if steps is not None and not video:
        kwargs["num_inference_steps"] = steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if video:
        kwargs.update(num_frames=num_frames, height=height or 8, width=width or 8)
    elif height is not None or width is not None:
        kwargs.update(height=height, width=width)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)

    def run(batch, index, timed):
        g = torch.Generator().manual_seed(seed + index)
        torch.manual_seed(seed + index)  # pipelines that draw from the global generator (SD3 / Flux / Wan)
        if digits:
            return pipe(batch, generator=g, output_type="np", **kwargs).images, None
        if video:  # stream: each block to disk as it is finished
            start, first = time.perf_counter(), None
            blocks = []
            for i, block in enumerate(pipe.stream(batch, generator=g, **kwargs)):
                blocks.append(block)
                if first is None:
                    first = time.perf_counter() - start
                if output_dir and timed:
                    torch.save(block.cpu(), os.path.join(output_dir, f"batch{index:03d}_block{i:03d}.pt"))
            return _decode_video(pipe, torch.cat(blocks, 2)), first
        return pipe(batch, generator=g, output_type="np", **kwargs).images, None

    batches = _batches(items, batch_size)
    for i in range(warmup):
        run(batches[i % len(batches)], 10_000 + i, False)
    latencies, firsts, outputs = [], [], []
    for r in range(repeats):
        outputs = []
        for b, batch in enumerate(batches):
            start = time.perf_counter()
            out, first = run(batch, b, r == repeats - 1)
            latencies.append(time.perf_counter() - start)
            if first is not None:
                firsts.append(first)
            outputs.extend(list(out))
    per_item = (outputs[0].shape[0] if video else 1)
    timing = {"batches": len(batches), "batch_size": batch_size, "median_batch_s": statistics.median(latencies),
              "items_per_s": len(items) * repeats * per_item / sum(latencies),
              "peak_rss_mb": peak_rss_mb()}
    if firsts:
        timing["median_first_block_s"] = statistics.median(firsts)
    if output_dir:
        for i, out in enumerate(outputs):
            if video:
                path = os.path.join(output_dir, f"video_{i:03d}.{video_format}")
                if video_format == "gif":
                    export_to_gif([_to_pil(f) for f in out], path)
                else:
                    export_to_video([np.asarray(_to_pil(f).convert("RGB")) / 255.0 for f in out], path, fps=8)
            else:
                _to_pil(out).save(os.path.join(output_dir, f"image_{i:03d}.png"))
        if not video:
            _grid([_to_pil(o) for o in outputs]).save(os.path.join(output_dir, "grid.png"))
    return {"videos" if video else "images": outputs, "timing": timing}


def _decode_video(pipe, latents: torch.Tensor) -> np.ndarray:
    """(B, C, F, h, w) latents -> (B, F, H, W, 3) frames in [0, 1], as CausalWanPipeline's output_type='np'."""
    video = latents
    if pipe.vae is not None:
        mean, std = pipe._latent_norm(video)
        with torch.no_grad():
            video = pipe.vae.decode((video * std + mean).to(pipe.vae.dtype)).sample.float()
    video = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    return video.permute(0, 1, 3, 4, 2).cpu().numpy()


def _grid(images: list[Image.Image]) -> Image.Image:
    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[str] | None:
    if prompt and prompts_file:
        raise ValueError("pass one of `prompt` and `prompts_file`.")
    if prompts_file is not None:
        return load_prompts(prompts_file)
    return list(prompt) if prompt else None
