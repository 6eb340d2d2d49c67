"""A stock WanPipeline as the teacher of the causal-video scripts (Self-Forcing, CausalKD).

`WanTeacher(path, num_frames=..., height=..., width=...)` loads the pipeline named by model_index.json and
gives the scripts what they need, read from the teacher itself: the transformer (rectified flow, flow
prediction, as Wan is trained), latent shapes from the VAE's temporal and spatial factors, prompt
embeddings through the pipeline's own `encode_prompt` (optionally kept as safetensors shards; the UMT5
encoder is then released: it is larger than the 1.3 B student), the student's per-block schedule on the
teacher's shift (Self-Forcing's [1000, 750, 500, 250] warped by 5 is [1000, 937.5, 833.3, 625]), and
`save_student`: a CausalWanPipeline folder of stock Wan components (the teacher's tokenizer, UMT5 and
VAE beside the student) with the recipe in its config.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline
from diffusers.utils import export_to_gif
from PIL import Image
from transformers import AutoTokenizer, UMT5EncoderModel

from ..parametrization import RectifiedFlow
from ..pipelines import CausalWanPipeline
from ..schedulers import causal_scheduler, shift_times
from .nonfinite import check_finite
from .teachers import WEIGHT_DTYPES, TextToImageTeacher, load_prompts, read_pipeline_class
from .video_data import read_video_folder

TEXT_TO_VIDEO = {"WanPipeline": "wan"}


def check_text_to_video_teacher(path: str, *, num_frames: int, height: int, width: int, revision=None,
                                cache_dir=None) -> str:
    """Before any weights load: a WanPipeline, and a frame count / size its VAE and patch size can produce."""
    name = read_pipeline_class(path, revision=revision, cache_dir=cache_dir)
    if name not in TEXT_TO_VIDEO:
        raise ValueError(f"`pretrained_model_name_or_path` {path!r} is a {name}; the causal-video scripts take "
                         f"{sorted(TEXT_TO_VIDEO)} (or the moving-digits teacher through `--teacher`).")
    return name


def video_latent_shape(num_frames: int, height: int, width: int, *, temporal: int, spatial: int,
                       patch: tuple[int, int] = (2, 2), channels: int = 16) -> tuple[int, int, int, int]:
    """(C, latent frames, h, w): Wan's VAE keeps frame 0 and compresses the rest `temporal`-fold, and divides
    height / width by `spatial`; the transformer patches h / w by `patch`."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"`num_frames` must be 1 + a multiple of the VAE's temporal factor {temporal} "
                         f"(e.g. {1 + temporal}, {1 + 4 * temporal}, 81), got {num_frames}.")
    for argument, value, p in (("height", height, patch[0]), ("width", width, patch[1])):
        if value < spatial * p or value % (spatial * p):
            raise ValueError(f"`{argument}` must be a positive multiple of {spatial * p} (VAE factor {spatial} x patch "
                             f"{p}), got {value}.")
    return channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial


class WanTeacher(TextToImageTeacher):
    """A stock WanPipeline as teacher (see the module docstring)."""

    def __init__(self, path: str, *, num_frames: int, height: int, width: int, revision: str | None = None,
                 variant: str | None = None, cache_dir: str | None = None, weight_dtype: str = "fp32",
                 guidance_scale: float = 1.0, max_sequence_length: int | None = None):
        name = check_text_to_video_teacher(path, num_frames=num_frames, height=height, width=width,
                                           revision=revision, cache_dir=cache_dir)
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"`weight_dtype` must be one of {sorted(WEIGHT_DTYPES)}, got {weight_dtype!r}.")
        self.path, self.kind, self.class_name = path, "wan", name
        self.load_kwargs = dict(revision=revision, variant=variant, cache_dir=cache_dir)
        self.weight_dtype = WEIGHT_DTYPES[weight_dtype]
        self.pipe = DiffusionPipeline.from_pretrained(path, dtype=self.weight_dtype, **self.load_kwargs)
        self.component, self.model = "transformer", self.pipe.transformer
        self.process, self.prediction_type = RectifiedFlow(), "flow"  # Wan: flow matching, flow prediction
        self.flux_guidance, self.guidance_scale, self.custom_times = False, guidance_scale, None
        config = self.pipe.scheduler.config
        self.shift = float(config.get("flow_shift") or config.get("shift") or 1.0)
        _, p_h, p_w = self.model.config.patch_size
        self.num_frames, self.height, self.width = num_frames, height, width
        self.latent_shape = video_latent_shape(num_frames, height, width, temporal=self.pipe.vae_scale_factor_temporal,
                                               spatial=self.pipe.vae_scale_factor_spatial, patch=(p_h, p_w),
                                               channels=self.model.config.in_channels)
        # 512 UMT5 tokens, zero-padded: what WanPipeline and CausalWanPipeline feed by default, so the saved
        # student is sampled with the text conditioning it was trained on.
        self.max_sequence_length = max_sequence_length or 512
        self.resolution = None

    @classmethod
    def from_args(cls, video, *, guidance_scale: float = 1.0):
        """(teacher, prompts, embeddings (N, ...), negative (1, ...)) from a script's `TextToVideoArgs`: the
        prompts embedded once (or read from `embeddings_cache`), then UMT5 released."""
        teacher = cls(video.pretrained_model_name_or_path, num_frames=video.num_frames, height=video.height,
                      width=video.width, revision=video.revision, variant=video.variant, cache_dir=video.cache_dir,
                      weight_dtype=video.weight_dtype, guidance_scale=guidance_scale,
                      max_sequence_length=video.max_sequence_length)
        if video.prompts is not None:
            prompts = load_prompts(video.prompts, video.caption_column)
        else:  # the captions of the video folder serve as the prompts
            prompts = [c for _, c in read_video_folder(video.train_data_dir, video.caption_column) if c] or [""]
        embeddings, negative = teacher.embed_prompts(prompts, negative_prompt=video.negative_prompt,
                                                     batch_size=video.encode_batch_size, cache_dir=video.embeddings_cache)
        teacher.release_text_encoders()
        return teacher, prompts, embeddings, negative

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=self.model.device)
        return {"encoder_hidden_states": embeds}

    def cond(self, embeddings: dict, index, device) -> dict:
        return {k: (v if index is None else v[index]).to(device) for k, v in embeddings.items()}

    def student_t_list(self, num_steps: int, shift: float | None = None) -> torch.Tensor:
        """The per-block schedule t_i = warp(1 - i/K) on the teacher's shift (float32, as Self-Forcing warps)."""
        u = 1.0 - torch.arange(num_steps, dtype=torch.float32) / num_steps
        return shift_times(u, self.shift if shift is None else shift)

    def save_student(self, output_dir: str, student, *, num_frames_per_block: int, denoising_timesteps,
                     context_noise: int = 0, prompts=("",), scheduler=None, local_attn_size: int = -1,
                     sink_size: int = 0) -> CausalWanPipeline:
        """A CausalWanPipeline folder: the student (fp32) with the teacher's tokenizer, UMT5 and VAE, the
        recipe in its config (`scheduler`: default `causal_scheduler()`, x0 then fresh noise); reloaded,
        it streams a sample of the first prompt to samples.gif."""
        check_finite(student, "the video student")
        load = dict(self.load_kwargs)
        pipe = CausalWanPipeline(
            transformer=student.float(), scheduler=scheduler or causal_scheduler(),
            tokenizer=AutoTokenizer.from_pretrained(self.path, subfolder="tokenizer", revision=load["revision"],
                                                    cache_dir=load["cache_dir"]),
            text_encoder=UMT5EncoderModel.from_pretrained(self.path, subfolder="text_encoder", **load),
            vae=AutoencoderKLWan.from_pretrained(self.path, subfolder="vae", **load),
            num_frames_per_block=num_frames_per_block, denoising_timesteps=list(denoising_timesteps),
            context_noise=context_noise, local_attn_size=local_attn_size, sink_size=sink_size)
        pipe.save_pretrained(output_dir)
        pipe = CausalWanPipeline.from_pretrained(output_dir)
        pipe.set_progress_bar_config(disable=True)
        _, frames, h, w = self.latent_shape
        video = pipe(list(prompts[:1]), num_frames=frames, height=h, width=w, output_type="np",
                     generator=torch.Generator().manual_seed(0)).frames[0]  # (F, H, W, 3) in [0, 1]
        export_to_gif([Image.fromarray((f * 255).round().astype(np.uint8)) for f in video],
                      os.path.join(output_dir, "samples.gif"))
        return pipe

