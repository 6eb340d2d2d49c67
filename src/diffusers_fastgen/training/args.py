"""Config for the training scripts: dataclasses, parsed from the CLI with an optional YAML overlay.

A script declares one `@dataclass <Method>Args` whose fields are either plain values or shared
groups (`RunArgs`, `OptimizerArgs`, ...) composed as fields. Every leaf field becomes one flat CLI flag
`--name` (names are unique across groups). Precedence: dataclass defaults < `--config x.yaml`
(flat keys, or nested by group name) < command line. Unknown keys fail, and every `__post_init__`
validates its values with a message naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import torch
import yaml
from huggingface_hub import constants as hf_constants

from ..ema import EMA_SCHEDULES
from .image_data import check_image_dataset
from .teachers import WEIGHT_DTYPES, _read_json, check_text_to_image_teacher, load_prompts
from .video_data import read_video_folder
from .video_teachers import check_text_to_video_teacher, video_latent_shape

MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "none")


def check_pipeline_folder(path: str | None, expected: str, argument: str) -> None:
    """ValueError, before any work, unless `path` is a saved diffusers pipeline folder of class `expected`
    (read from its model_index.json): a wrong folder names its class rather than a missing file."""
    if path is None:
        return
    if not os.path.isdir(path):
        raise ValueError(f"`{argument}` {path!r} is not a folder; pass a saved {expected} folder.")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"`{argument}` {path!r} has no model_index.json, so it is not a saved diffusers pipeline; "
                         f"pass a {expected} folder.")
    with open(index, encoding="utf-8") as fh:
        found = json.load(fh).get("_class_name")
    if found != expected:
        raise ValueError(f"`{argument}` {path!r} holds a {found}; this script needs a {expected} folder.")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class RunArgs:
    output_dir: str = "outputs/run"  # where checkpoints, logs, samples and the final pipeline go
    seed: int = 0  # global seed (torch, numpy, python) and data order
    max_train_steps: int = 1000  # optimizer steps of the main player
    train_batch_size: int = 32  # per-process batch size
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast dtype
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    checkpointing_steps: int = 500  # save accelerate state every N steps (0 = only at the end)
    checkpoints_total_limit: int | None = 2  # keep at most N checkpoints (None = all)
    resume_from_checkpoint: str | None = None  # a checkpoint path, or "latest"
    validation_steps: int = 500  # write a sample grid every N steps (0 = only at the end)
    logging_steps: int = 10  # log scalars every N steps
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"  # where scalars and sample grids are logged
    max_nonfinite_skips: int = 0  # non-finite loss or gradient: stop the run (0) or skip up to N updates

    def __post_init__(self):
        _check(self.max_train_steps >= 1, f"`max_train_steps` must be >= 1, got {self.max_train_steps}.")
        _check(self.train_batch_size >= 1, f"`train_batch_size` must be >= 1, got {self.train_batch_size}.")
        _check(self.gradient_accumulation_steps >= 1,
               f"`gradient_accumulation_steps` must be >= 1, got {self.gradient_accumulation_steps}.")
        _check(self.mixed_precision in MIXED_PRECISION,
               f"`mixed_precision` must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}.")
        _check(self.report_to in REPORT_TO, f"`report_to` must be one of {REPORT_TO}, got {self.report_to!r}.")
        _check(self.checkpointing_steps >= 0, f"`checkpointing_steps` must be >= 0, got {self.checkpointing_steps}.")
        _check(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
               f"`checkpoints_total_limit` must be >= 1 or None, got {self.checkpoints_total_limit}.")
        _check(self.validation_steps >= 0, f"`validation_steps` must be >= 0, got {self.validation_steps}.")
        _check(self.logging_steps >= 1, f"`logging_steps` must be >= 1, got {self.logging_steps}.")
        _check(self.max_nonfinite_skips >= 0, f"`max_nonfinite_skips` must be >= 0, got {self.max_nonfinite_skips}.")


@dataclass
class OptimizerArgs:
    learning_rate: float = 1e-4  # AdamW learning rate
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "constant_with_warmup"  # diffusers get_scheduler name
    lr_warmup_steps: int = 0  # linear warm-up steps (optimizer steps)

    def __post_init__(self):
        _check(self.learning_rate > 0, f"`learning_rate` must be > 0, got {self.learning_rate}.")
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
               f"`adam_beta1`/`adam_beta2` must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}.")
        _check(self.max_grad_norm >= 0, f"`max_grad_norm` must be >= 0, got {self.max_grad_norm}.")
        _check(self.lr_warmup_steps >= 0, f"`lr_warmup_steps` must be >= 0, got {self.lr_warmup_steps}.")
        allowed = typing.get_args(typing.get_type_hints(OptimizerArgs)["lr_scheduler"])
        _check(self.lr_scheduler in allowed, f"`lr_scheduler` must be one of {list(allowed)}, got {self.lr_scheduler!r}.")


@dataclass
class EMAArgs:
    ema_schedule: Literal["constant", "halflife", "power"] = "constant"  # EMA decay schedule (power: EDM2)
    ema_decay: float = 0.999  # decay for the constant schedule
    ema_halflife_kimg: float = 0.5  # half-life in thousands of images (halflife schedule)
    ema_gamma: float = 6.94  # exponent of the power schedule
    ema_start_iter: int = 0  # copy weights (no averaging) up to this step

    def __post_init__(self):
        _check(self.ema_schedule in EMA_SCHEDULES,
               f"`ema_schedule` must be one of {EMA_SCHEDULES}, got {self.ema_schedule!r}.")
        _check(0 <= self.ema_decay < 1, f"`ema_decay` must be in [0, 1), got {self.ema_decay}.")
        _check(self.ema_halflife_kimg > 0, f"`ema_halflife_kimg` must be > 0, got {self.ema_halflife_kimg}.")
        _check(self.ema_gamma > 0, f"`ema_gamma` must be > 0, got {self.ema_gamma}.")
        _check(self.ema_start_iter >= 0, f"`ema_start_iter` must be >= 0, got {self.ema_start_iter}.")


@dataclass
class LoRAArgs:
    lora_rank: int = 0  # > 0: the trained players are LoRA adapters on the frozen teacher (0 = full fine-tuning)
    lora_alpha: float | None = None  # LoRA scaling numerator (default: lora_rank, i.e. scale 1)
    lora_target_modules: list[str] | None = None  # module names (suffixes) that get adapters (default: attention + convs)

    def __post_init__(self):
        _check(self.lora_rank >= 0, f"`lora_rank` must be >= 0 (0 = full fine-tuning), got {self.lora_rank}.")
        _check(self.lora_alpha is None or self.lora_alpha > 0, f"`lora_alpha` must be > 0, got {self.lora_alpha}.")
        _check(bool(self.lora_rank) or (self.lora_alpha is None and not self.lora_target_modules),
               "`lora_alpha` / `lora_target_modules` need `lora_rank` > 0.")


@dataclass
class AdversarialArgs:
    """An adversarial term beside a consistency or DMD loss (`training.adversarial`; SANA-Sprint's sCM + LADD hybrid)."""

    adv_weight: float = 0.0  # > 0 adds LADD's generator loss with this weight (digits: CD / MeanFlow 0.1, sCD 0.01)
    adv_feature_modules: list[str] = field(  # the teacher blocks whose features feed one head each
        default_factory=lambda: ["down_blocks.0", "down_blocks.1", "mid_block"])
    adv_head_learning_rate: float = 1e-3  # AdamW learning rate of the heads
    adv_t_mean: float = -1.0  # re-noising s ~ logit-normal(mean, std) before the teacher's features (digits: low noise)
    adv_t_std: float = 1.0
    adv_num_steps: int = 1  # the student's samples for the term: its x0 at the points of its N-step sampler

    def __post_init__(self):
        _check(math.isfinite(self.adv_weight) and self.adv_weight >= 0,
               f"`adv_weight` must be finite and >= 0 (0 = off), got {self.adv_weight}.")
        _check(bool(self.adv_feature_modules), "`adv_feature_modules` must name at least one teacher block.")
        _check(self.adv_head_learning_rate > 0, f"`adv_head_learning_rate` must be > 0, got {self.adv_head_learning_rate}.")
        _check(math.isfinite(self.adv_t_mean), f"`adv_t_mean` must be finite, got {self.adv_t_mean}.")
        _check(self.adv_t_std > 0, f"`adv_t_std` must be > 0, got {self.adv_t_std}.")
        _check(self.adv_num_steps >= 1, f"`adv_num_steps` must be >= 1, got {self.adv_num_steps}.")


@dataclass
class PipelineSourceArgs:
    """Where a stock pipeline teacher and its prompts come from (shared by the image and video groups)."""

    revision: str | None = None  # Hub revision of that pipeline
    variant: str | None = None  # weight variant to load (e.g. fp16)
    cache_dir: str | None = None  # Hub download cache
    prompts: str | None = None  # .txt (one per line), .jsonl / .csv, or a datasets name / folder (--caption_column)
    caption_column: str = "text"  # the prompt column of a .jsonl / .csv prompts file
    negative_prompt: str = ""  # the unconditional branch of CFG


@dataclass
class TextToImageArgs(PipelineSourceArgs):
    pretrained_model_name_or_path: str | None = None  # SD 1.x/2.x, SDXL, SD3, Flux or Qwen-Image teacher (folder or Hub id)
    resolution: int | None = None  # image side in pixels (default: the model's sample size x the VAE factor)
    weight_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # dtype of the frozen teacher, VAE and text encoders
    max_sequence_length: int | None = None  # text tokens (SD3 / Flux T5: the pipeline's default; Qwen-Image: padded, 512)
    embeddings_cache: str | None = None  # keep prompt embeddings here (safetensors shards, reused by later runs)
    encode_batch_size: int = 16  # prompts per text-encoder batch
    train_data_dir: str | None = None  # real images: a folder in datasets' imagefolder layout (captions in metadata.jsonl)
    dataset_name: str | None = None  # real images: a datasets name or path (instead of train_data_dir)
    dataset_split: str = "train"  # split of dataset_name / train_data_dir
    image_column: str = "image"  # the image column of the dataset
    center_crop: bool = True  # center (true) or random (false) square crop after resizing the shorter side
    random_flip: bool = False  # flip half of the images horizontally
    max_train_samples: int | None = None  # encode at most this many images (default: the whole dataset)
    latents_cache: str | None = None  # where the encoded latents + caption embeddings go (default: <output_dir>/latents)
    push_to_hub: bool = False  # upload the output folder (pipeline or LoRA, model card) to the Hub at the end
    hub_model_id: str | None = None  # the Hub repo to push to (default: the output folder's name)

    def __post_init__(self):
        if self.pretrained_model_name_or_path is None:
            for name in ("prompts", "train_data_dir", "dataset_name"):
                _check(getattr(self, name) is None, f"`{name}` needs `pretrained_model_name_or_path` (a text-to-image teacher).")
            _check(not self.push_to_hub, "`push_to_hub` is available with `pretrained_model_name_or_path` only.")
            return
        _check(not (self.push_to_hub and hf_constants.HF_HUB_OFFLINE),
               "`push_to_hub` needs the Hub, but HF_HUB_OFFLINE is set: unset it, or drop --push_to_hub and upload "
               "the output folder later with `huggingface-cli upload`.")
        if self.prompts is not None:
            load_prompts(self.prompts, self.caption_column)  # missing, empty or without the column: ValueError now
        _check(self.train_data_dir is None or self.dataset_name is None,
               "pass one of `train_data_dir` and `dataset_name`, not both.")
        if self.train_data_dir is not None or self.dataset_name is not None:
            check_image_dataset(self.train_data_dir, self.dataset_name, image_column=self.image_column,
                                caption_column=self.caption_column, split=self.dataset_split, cache_dir=self.cache_dir)
        _check(self.max_train_samples is None or self.max_train_samples >= 1,
               f"`max_train_samples` must be >= 1, got {self.max_train_samples}.")
        _check(self.weight_dtype in WEIGHT_DTYPES,
               f"`weight_dtype` must be one of {sorted(WEIGHT_DTYPES)}, got {self.weight_dtype!r}.")
        _check(self.weight_dtype != "fp16" or torch.cuda.is_available(),
               "`weight_dtype` fp16 needs a GPU (CPU fp16 kernels are missing or slow): use bf16 or fp32.")
        _check(self.resolution is None or self.resolution >= 1, f"`resolution` must be >= 1, got {self.resolution}.")
        _check(self.encode_batch_size >= 1, f"`encode_batch_size` must be >= 1, got {self.encode_batch_size}.")
        _check(self.max_sequence_length is None or self.max_sequence_length >= 1,
               f"`max_sequence_length` must be >= 1, got {self.max_sequence_length}.")
        check_text_to_image_teacher(self.pretrained_model_name_or_path, self.resolution, revision=self.revision,
                                    cache_dir=self.cache_dir)

    @property
    def has_images(self) -> bool:
        return self.train_data_dir is not None or self.dataset_name is not None

    def require(self, *, prompts: bool = False, images: bool = False, prompts_or_images: bool = False) -> None:
        """A script's needs on the text-to-image path: a prompt file and/or real images (with captions)."""
        if self.pretrained_model_name_or_path is None:
            return
        _check(not prompts_or_images or self.prompts is not None or self.has_images,
               "`pretrained_model_name_or_path` needs `prompts` (a .txt/.jsonl/.csv file) or real images with captions "
               "(`train_data_dir` / `dataset_name`).")
        _check(not prompts or self.prompts is not None,
               "`pretrained_model_name_or_path` needs `prompts` (a .txt/.jsonl/.csv file) for this script.")
        _check(not images or self.train_data_dir is not None or self.dataset_name is not None,
               "this script needs real images with `pretrained_model_name_or_path`: pass `train_data_dir` or `dataset_name`.")


@dataclass
class TextToVideoArgs(PipelineSourceArgs):
    pretrained_model_name_or_path: str | None = None  # a stock WanPipeline (folder or Hub id) as teacher; replaces --teacher
    num_frames: int = 81  # video frames in pixels (1 + a multiple of the VAE's temporal factor)
    height: int = 480  # video height in pixels
    width: int = 832  # video width in pixels
    shift: float | None = None  # student schedule shift (default: the teacher scheduler's flow_shift)
    weight_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # dtype of the frozen teacher, VAE and text encoder
    max_sequence_length: int | None = None  # UMT5 tokens, zero-padded (default 512: what the pipelines feed)
    embeddings_cache: str | None = None  # keep prompt embeddings here (safetensors shards, reused by later runs)
    encode_batch_size: int = 8  # prompts per text-encoder batch
    train_data_dir: str | None = None  # real videos: a folder with metadata.jsonl (file_name: GIF / MP4 / frame folder)
    latents_cache: str | None = None  # where the encoded videos go (default: <output_dir>/latents)

    def __post_init__(self):
        if self.pretrained_model_name_or_path is None:
            _check(self.prompts is None and self.train_data_dir is None,
                   "`prompts` / `train_data_dir` need `pretrained_model_name_or_path` (a WanPipeline teacher).")
            return
        _check(self.prompts is not None or self.train_data_dir is not None,
               "`pretrained_model_name_or_path` needs `prompts` (a .txt/.jsonl/.csv file) or `train_data_dir` (captioned "
               "videos).")
        if self.prompts is not None:
            load_prompts(self.prompts, self.caption_column)
        if self.train_data_dir is not None:
            read_video_folder(self.train_data_dir, self.caption_column)
        _check(self.weight_dtype in WEIGHT_DTYPES,
               f"`weight_dtype` must be one of {sorted(WEIGHT_DTYPES)}, got {self.weight_dtype!r}.")
        _check(self.weight_dtype != "fp16" or torch.cuda.is_available(),
               "`weight_dtype` fp16 needs a GPU (CPU fp16 kernels are missing or slow): use bf16 or fp32.")
        _check(self.shift is None or self.shift > 0, f"`shift` must be > 0, got {self.shift}.")
        _check(self.encode_batch_size >= 1, f"`encode_batch_size` must be >= 1, got {self.encode_batch_size}.")
        check_text_to_video_teacher(self.pretrained_model_name_or_path, num_frames=self.num_frames, height=self.height,
                                    width=self.width, revision=self.revision, cache_dir=self.cache_dir)
        vae = _read_json(self.pretrained_model_name_or_path, "vae/config.json", revision=self.revision,
                         cache_dir=self.cache_dir, argument="pretrained_model_name_or_path")
        downsample = vae.get("temperal_downsample", [False, True, True])  # (sic: diffusers' key)
        temporal = vae.get("scale_factor_temporal") or 2 ** sum(bool(x) for x in downsample)
        spatial = vae.get("scale_factor_spatial") or 2 ** len(downsample)
        self._latent_frames = video_latent_shape(self.num_frames, self.height, self.width, temporal=temporal,
                                                 spatial=spatial)[1]

    def check_block(self, num_frames_per_block: int) -> None:
        """ValueError unless blocks of `num_frames_per_block` latent frames tile the video."""
        frames = getattr(self, "_latent_frames", None)
        _check(frames is None or frames % num_frames_per_block == 0,
               f"`num_frames_per_block` {num_frames_per_block} does not divide the {frames} latent frames of "
               f"{self.num_frames} frames.")


# ------------------------------------------------------------------------------------------------
# Flattening, CLI and YAML.
# ------------------------------------------------------------------------------------------------


def _leaf_fields(cls) -> dict[str, tuple[tuple[str, ...], object, dataclasses.Field]]:
    """name -> (path of group attributes, type, field) over nested dataclasses."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            for name, (path, sub_tp, sub_f) in _leaf_fields(tp).items():
                if name in out:
                    raise TypeError(f"field name {name!r} appears twice in {cls.__name__}")
                out[name] = ((f.name,) + path, sub_tp, sub_f)
        else:
            if f.name in out:
                raise TypeError(f"field name {f.name!r} appears twice in {cls.__name__}")
            out[f.name] = ((), tp, f)
    return out


def _base_type(tp):
    """(scalar type, is_list, optional) of an annotation like `int | None`, `list[float]` or
    `Literal["a", "b"]` (kept as the Literal: its values are the allowed choices)."""
    optional = False
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        optional = len(non_none) < len(args)
        tp = non_none[0]
    if typing.get_origin(tp) in (list, tuple):
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _choices(tp) -> tuple | None:
    scalar, _, _ = _base_type(tp)
    return typing.get_args(scalar) if typing.get_origin(scalar) is typing.Literal else None


def _convert(name: str, value, tp):
    scalar, is_list, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if not optional:
            raise ValueError(f"`{name}` cannot be None.")
        return None
    if is_list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{name}` must be a list, got {value!r}.")
        return [_convert(name, v, scalar) for v in value]
    if typing.get_origin(scalar) is typing.Literal:
        allowed = typing.get_args(scalar)
        if value not in allowed:
            raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")
        return value
    if scalar is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes"):
            return True
        if str(value).lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"`{name}` must be true or false, got {value!r}.")
    try:
        if scalar is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        out = scalar(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be of type {scalar.__name__}, got {value!r}.") from None
    if scalar is float and not math.isfinite(out):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return out


def _flatten_yaml(data: dict, leaves: dict) -> dict:
    flat = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict) and key not in leaves:  # a group written nested
            flat.update(_flatten_yaml(value, leaves))
        else:
            flat[key] = value
    return flat


def build(cls, values: dict):
    """Instantiate `cls` (nested groups included) from flat {leaf name: value}; unknown keys fail."""
    leaves = _leaf_fields(cls)
    unknown = sorted(set(values) - set(leaves))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed keys are {sorted(leaves)}.")

    def make(c, default=None):
        """Build `c`; a group field starts from its own default (a script's default_factory may
        change a shared group's defaults, e.g. a larger batch size)."""
        hints = typing.get_type_hints(c)
        kwargs = {}
        for f in dataclasses.fields(c):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                sub_default = None
                if default is not None:
                    sub_default = getattr(default, f.name)
                elif f.default_factory is not dataclasses.MISSING:
                    sub_default = f.default_factory()
                kwargs[f.name] = make(tp, sub_default)
            elif f.name in values:
                kwargs[f.name] = _convert(f.name, values[f.name], tp)
        if default is not None:
            return dataclasses.replace(default, **kwargs)  # re-runs __post_init__ validation
        return c(**kwargs)

    return make(cls)


def _field_comments(cls) -> dict[str, str]:
    """{field name: its trailing `# comment`} over `cls` and its groups: the comments are the help text."""

    out = {}
    groups = (cls, *(typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)
                     if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])))
    for c in (base for group in groups for base in group.__mro__ if dataclasses.is_dataclass(base)):
        try:
            source = inspect.getsource(c)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = re.match(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
            if m:
                out.setdefault(m.group(1), m.group(2).strip())
    return out


_NEGATIVE_NUMBER = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--learning_rate -1e-4` -> `--learning_rate=-1e-4`: argparse takes a value that starts with '-'
    and is not a plain number for an option and reports a missing value."""
    out, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--") and "=" not in argv[i] and i + 1 < len(argv) and _NEGATIVE_NUMBER.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def build_parser(cls) -> argparse.ArgumentParser:
    """The script's parser: one flag per leaf field, help = the field's comment and the script's own
    default (its group defaults included), choices for Literal fields, no abbreviations (`--lr` must not
    silently mean `--lr_warmup_steps`), bare boolean flags (`--gradient_checkpointing` = true)."""
    leaves = _leaf_fields(cls)
    try:
        defaults = to_flat_dict(build(cls, {}))
    except ValueError:  # a default that only validates on some machines (e.g. a teacher folder): field defaults
        defaults = {}
    comments = _field_comments(cls)
    parser = argparse.ArgumentParser(description=(cls.__doc__ or cls.__name__).strip().splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file of flat (or group-nested) keys; CLI wins")
    for name, (_, tp, f) in leaves.items():
        scalar, is_list, _ = _base_type(tp)
        default = defaults.get(name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        choices = _choices(tp)
        text = comments.get(name, "")
        text = f"{text} (default: {default})" if text else f"(default: {default})"
        kwargs = {"nargs": "+" if is_list else ("?" if scalar is bool else None), "help": text.replace("%", "%%")}
        if scalar is bool:
            kwargs["const"] = "true"
            kwargs["metavar"] = "{true,false}"
        if choices:  # shown, and checked by build() with a ValueError naming the field
            kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, **kwargs)
    return parser


def parse_args(cls, argv: list[str] | None = None):
    """CLI (+ optional --config YAML) -> validated `cls` instance."""

    leaves = _leaf_fields(cls)
    parser = build_parser(cls)
    parsed = vars(parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv))))
    config_path = parsed.pop("config")
    values = {}
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise ValueError(f"`--config` file {config_path!r} does not exist.")
        with open(config_path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"`--config` file {config_path!r} must hold a mapping of keys to values, got a "
                             f"{type(data).__name__}.")
        values.update(_flatten_yaml(data, leaves))
    values.update(parsed)
    return build(cls, values)


def to_flat_dict(args) -> dict:
    """{leaf name: value} of a (nested) args dataclass, JSON-serialisable."""
    out = {}
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value))
        else:
            out[f.name] = value
    return out


def save_config(args, path: str) -> None:
    """Write the effective config beside the output (YAML, loadable with --config)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(json.loads(json.dumps(to_flat_dict(args))), fh, sort_keys=False)


__all__ = [
    "check_pipeline_folder",
    "RunArgs",
    "OptimizerArgs",
    "EMAArgs",
    "parse_args",
    "build",
    "save_config",
    "to_flat_dict",
    "field",
]
