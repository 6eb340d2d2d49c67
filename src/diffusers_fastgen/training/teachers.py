"""Stock text-to-image pipelines as teachers: SD1.5 (eps / v), SDXL, SD3, Flux and Qwen-Image.

`TextToImageTeacher(path)` loads the pipeline named by the folder's (or Hub repo's) model_index.json and
exposes what a distillation script needs, all read from the teacher itself:

- `model` (the UNet or transformer) with its `process` and native `prediction_type` (from its scheduler);
- `latent_shape` for `--resolution` (the VAE factor and, for Flux / Qwen-Image, the 2x2 packing);
- prompt embeddings through the pipeline's own `encode_prompt` (`embed_prompts`), turned into the
  `Denoiser` conditioning of a batch by `cond`; CFG or, for guidance-distilled Flux, the guidance
  embedding;
- the student's sampling recipe as a stock scheduler (`student_scheduler`): LCMScheduler for VP teachers,
  FlowMatchEulerDiscreteScheduler with stochastic sampling (x0, then fresh noise) for flow-matching ones,
  with the t_list the stock pipeline will sample at (`student_t_list`);
- `save_student`: the teacher's own pipeline class holding the student (or a LoRA file that stock
  `load_lora_weights` applies to the teacher) and a model card.

The digits pipeline is the other teacher kind; the scripts pick one by the folder's pipeline class.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ..parametrization import process_from_scheduler
from ..schedulers import lcm_scheduler, t_list_from_scheduler
from .nonfinite import check_finite

TEXT_TO_IMAGE = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                 "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "QwenImagePipeline": "qwen"}
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512, "qwen": 512}
PACKED = ("flux", "qwen")  # transformers over 2x2-packed latents


def _read_json(path: str, filename: str, *, revision=None, cache_dir=None, argument: str) -> dict:
    """A JSON file of a pipeline folder or Hub repo (ValueError naming `argument` if it cannot be read)."""
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        if not os.path.isfile(file):
            raise ValueError(f"`{argument}` {path!r} is a folder without {filename} (not a diffusers pipeline).")
    else:
        try:
            file = hf_hub_download(path, filename, revision=revision, cache_dir=cache_dir)
        except Exception as err:  # offline, no such repo, no such revision
            raise ValueError(f"`{argument}` {path!r} is not a local folder and its {filename} could not be fetched "
                             f"from the Hub ({type(err).__name__}: {err}).") from None
    with open(file) as f:
        return json.load(f)


def encoder_stamp(path: str) -> list:
    """What a cache of a local pipeline folder's encodings depends on besides the path: (file, size, mtime_ns)
    of every file in its vae / text encoder / tokenizer subfolders, so a teacher rebuilt or replaced at the same
    path gets a new cache folder instead of the old encodings. Empty for a Hub id (its revision is in the key)."""
    if not os.path.isdir(path):
        return []
    stamp = []
    for sub in sorted(os.listdir(path)):
        if sub.startswith(("vae", "text_encoder", "tokenizer")) and os.path.isdir(os.path.join(path, sub)):
            for root, _, files in sorted(os.walk(os.path.join(path, sub))):
                for name in sorted(files):
                    st = os.stat(os.path.join(root, name))
                    stamp.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
    return stamp


def read_pipeline_class(path: str, *, revision: str | None = None, cache_dir: str | None = None,
                        argument: str = "pretrained_model_name_or_path") -> str:
    """`_class_name` of a pipeline folder's or Hub repo's model_index.json (ValueError naming `argument`)."""
    return _read_json(path, "model_index.json", revision=revision, cache_dir=cache_dir,
                      argument=argument).get("_class_name", "?")


def check_text_to_image_teacher(path: str, resolution: int | None, *, revision=None, cache_dir=None) -> str:
    """Before any weights load: the pipeline class is supported and `resolution` fits its VAE factor x patch
    size (both read from the config files). Returns the class name."""
    name = read_pipeline_class(path, revision=revision, cache_dir=cache_dir)
    if name not in TEXT_TO_IMAGE:
        raise ValueError(f"`pretrained_model_name_or_path` {path!r} is a {name}; supported: {sorted(TEXT_TO_IMAGE)} "
                         "(the digits teacher goes through `--teacher`).")
    if resolution is not None:
        kind = TEXT_TO_IMAGE[name]
        vae = _read_json(path, "vae/config.json", revision=revision, cache_dir=cache_dir,
                         argument="pretrained_model_name_or_path")
        factor = 2 ** (len(vae["temperal_downsample"]) if kind == "qwen" else
                       len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        patch = 2 if kind in PACKED else 1
        if kind == "sd3":
            patch = _read_json(path, "transformer/config.json", revision=revision, cache_dir=cache_dir,
                               argument="pretrained_model_name_or_path").get("patch_size", 2)
        if resolution < factor * patch or resolution % (factor * patch):
            raise ValueError(f"`resolution` must be a positive multiple of {factor * patch} (VAE factor {factor} x patch "
                             f"{patch}) for this {name}, got {resolution}.")
    return name


def load_prompts(path: str, caption_column: str = "text", split: str = "train") -> list[str]:
    """Prompts from a .txt (one per line), .jsonl or .csv (`caption_column`) file, or from the
    `caption_column` of a 🤗 datasets dataset (`path` a folder or a Hub name that `datasets.load_dataset`
    opens, streamed; `split`); empty prompts are skipped."""
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext == ".txt":
            with open(path, encoding="utf-8") as f:
                prompts = [line.strip() for line in f]
        elif ext in (".jsonl", ".csv"):
            with open(path, encoding="utf-8", newline="") as f:
                rows = [json.loads(line) for line in f if line.strip()] if ext == ".jsonl" else list(csv.DictReader(f))
            columns = sorted({k for row in rows for k in row})
            if rows and caption_column not in columns:
                raise ValueError(f"`caption_column` {caption_column!r} is not in {path!r}; its columns: {columns}.")
            prompts = [str(row.get(caption_column) or "").strip() for row in rows]
        else:
            raise ValueError(f"`prompts` must be a .txt, .jsonl or .csv file or a datasets name / folder, got {path!r}.")
    else:
        prompts = _dataset_prompts(path, caption_column, split)
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"`prompts` {path!r} holds no prompt.")
    return prompts


def _dataset_prompts(name: str, caption_column: str, split: str) -> list[str]:
    import datasets

    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
        first = next(iter(stream), None)
    except Exception as err:  # no such dataset, offline, no such split
        raise ValueError(f"`prompts` {name!r} is neither a .txt / .jsonl / .csv file nor a dataset that "
                         f"datasets.load_dataset opens ({type(err).__name__}: {err}).") from None
    if first is not None and caption_column not in first:
        raise ValueError(f"`caption_column` {caption_column!r} is not a column of {name!r}; its columns: {sorted(first)}.")
    # only the caption column is read (images, if any, are never decoded)
    return [str(row.get(caption_column) or "").strip() for row in stream.select_columns([caption_column])]


class TextToImageTeacher:
    """A stock text-to-image pipeline as teacher (see the module docstring)."""

    def __init__(self, path: str, *, revision: str | None = None, variant: str | None = None,
                 cache_dir: str | None = None, weight_dtype: str = "fp32", resolution: int | None = None,
                 guidance_scale: float = 1.0, max_sequence_length: int | None = None):
        name = read_pipeline_class(path, revision=revision, cache_dir=cache_dir)
        if name not in TEXT_TO_IMAGE:
            raise ValueError(f"`pretrained_model_name_or_path` {path!r} is a {name}; supported: "
                             f"{sorted(TEXT_TO_IMAGE)} (and DigitsPipeline through `--teacher`).")
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"`weight_dtype` must be one of {sorted(WEIGHT_DTYPES)}, got {weight_dtype!r}.")
        if weight_dtype == "fp16" and not torch.cuda.is_available():
            raise ValueError("`weight_dtype` fp16 needs a GPU (CPU fp16 kernels are missing or slow): use bf16 or fp32.")
        self.path, self.kind, self.class_name = path, TEXT_TO_IMAGE[name], name
        self.load_kwargs = dict(revision=revision, variant=variant, cache_dir=cache_dir)
        self.weight_dtype = WEIGHT_DTYPES[weight_dtype]
        self.pipe = DiffusionPipeline.from_pretrained(path, dtype=self.weight_dtype, **self.load_kwargs)
        self.component = "unet" if self.kind in ("sd", "sdxl") else "transformer"
        self.model = getattr(self.pipe, self.component)
        self.process, self.prediction_type = process_from_scheduler(self.pipe.scheduler)
        self.flux_guidance = self.kind == "flux" and bool(self.model.config.guidance_embeds)
        self.guidance_scale = guidance_scale
        self.custom_times: list[float] | None = None  # set_custom_schedule: the student's own step times
        self.vae_scale_factor = self.pipe.vae_scale_factor
        patch = 2 if self.kind in PACKED else getattr(self.model.config, "patch_size", 1) or 1
        multiple = self.vae_scale_factor * patch
        sample_size = self.model.config.get("sample_size") or 64
        self.resolution = resolution if resolution is not None else int(sample_size) * self.vae_scale_factor
        if self.resolution < multiple or self.resolution % multiple:
            raise ValueError(f"`resolution` must be a positive multiple of {multiple} (VAE factor "
                             f"{self.vae_scale_factor} x patch {patch}) for this {name}, got {self.resolution}.")
        channels = self.model.config.in_channels // (4 if self.kind in PACKED else 1)
        side = self.resolution // self.vae_scale_factor
        self.latent_shape = (channels, side, side)
        default_len = _DEFAULT_MAX_SEQUENCE_LENGTH.get(self.kind)
        if self.kind == "qwen":  # Qwen2.5-VL's context is far longer; prompts are padded to this length
            self.max_sequence_length = max_sequence_length or default_len
        elif default_len is not None:
            t5 = self.pipe.tokenizer_3 if self.kind == "sd3" else self.pipe.tokenizer_2
            limit = getattr(t5, "model_max_length", default_len) or default_len
            self.max_sequence_length = max_sequence_length or min(default_len, limit)
        else:
            self.max_sequence_length = None

    # --- prompts ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipe, device = self.pipe, self.model.device
        if self.kind == "sd":
            embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
            return {"encoder_hidden_states": embeds}
        if self.kind == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "text_embeds": pooled}
        if self.kind == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=self.max_sequence_length)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if self.kind == "qwen":
            # Padded (with a zero mask, which the transformer excludes from attention) to max_sequence_length, so
            # that every batch, shard, the negative prompt and CFG's [cond; uncond] share one text length.
            embeds, mask = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                              max_sequence_length=self.max_sequence_length)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask
            pad = self.max_sequence_length - embeds.shape[1]
            return {"encoder_hidden_states": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
                    "encoder_hidden_states_mask": torch.nn.functional.pad(mask.long(), (0, pad))}
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, device=device, num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def embed_prompts(self, prompts: list[str], *, negative_prompt: str = "", batch_size: int = 16,
                      cache_dir: str | None = None) -> tuple[dict, dict]:
        """({name: (N, ...)} for `prompts}, {name: (1, ...)} for `negative_prompt`), encoded by the pipeline's
        own encode_prompt in batches. cache_dir: kept as safetensors shards under a folder named by a hash
        of the teacher, the prompts and the settings (each shard written atomically; a rerun reads the
        finished shards and encodes only the rest)."""
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        folder = None
        if cache_dir is not None:
            key = json.dumps([self.path, self.class_name, self.load_kwargs, str(self.weight_dtype),
                              self.max_sequence_length, negative_prompt, prompts] + encoder_stamp(self.path))
            folder = os.path.join(cache_dir, "embeddings-" + hashlib.sha1(key.encode()).hexdigest()[:12])
            os.makedirs(folder, exist_ok=True)

        def encoded(name: str, chunk: list[str]) -> dict:
            path = os.path.join(folder, name + ".safetensors") if folder else None
            if path and os.path.isfile(path):
                return load_file(path)
            out = {k: v.detach().cpu().contiguous() for k, v in self._encode(chunk).items()}
            if path:
                save_file(out, path + ".tmp")
                os.replace(path + ".tmp", path)
            return out

        shards = [encoded(f"shard-{i // batch_size:05d}", prompts[i:i + batch_size])
                  for i in range(0, len(prompts), batch_size)]
        embeddings = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
        return embeddings, encoded("negative", [negative_prompt])

    def release_text_encoders(self) -> None:
        """Drop the text encoders and tokenizers from memory (the embeddings are computed)."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)

    def cond(self, embeddings: dict, index: torch.Tensor | None, device) -> dict:
        """Denoiser conditioning for rows `index` of `embeddings` (None: the single row, e.g. the negative)."""
        rows = {k: (v if index is None else v[index]).to(device) for k, v in embeddings.items()}
        b = next(iter(rows.values())).shape[0]
        if self.kind == "sdxl":
            side = self.resolution
            time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=rows["text_embeds"].dtype, device=device)
            return {"encoder_hidden_states": rows["encoder_hidden_states"],
                    "added_cond_kwargs": {"text_embeds": rows["text_embeds"], "time_ids": time_ids.repeat(b, 1)}}
        if self.flux_guidance:
            rows["guidance"] = torch.full((b,), float(self.guidance_scale), device=device)
        return rows

    @property
    def cfg_scale(self) -> float:
        """Guidance applied as CFG in the real score: 1 (none) for guidance-distilled Flux, whose guidance
        embedding carries it."""
        return 1.0 if self.flux_guidance else self.guidance_scale

    def prompt_kwargs(self, embeddings: dict, dtype=None) -> dict:
        """Stock pipeline call arguments carrying precomputed embeddings (the text encoders may be released)."""
        e = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and not k.endswith("_mask") else v)
             for k, v in embeddings.items()}
        if self.kind == "sd":
            return {"prompt_embeds": e["encoder_hidden_states"]}
        if self.kind == "qwen":
            return {"prompt_embeds": e["encoder_hidden_states"], "prompt_embeds_mask": e["encoder_hidden_states_mask"].long()}
        pooled = e["text_embeds"] if self.kind == "sdxl" else e["pooled_projections"]
        return {"prompt_embeds": e["encoder_hidden_states"], "pooled_prompt_embeds": pooled}

    # --- the student's sampling recipe --------------------------------------------------------------
    def student_scheduler(self, shift: float | None = None, *, stochastic: bool = True):
        """The student's sampler as a stock scheduler. stochastic (DMD2, CM): x0, then fresh noise at the next
        time: LCMScheduler (VP; boundary condition made exact) or FlowMatchEulerDiscreteScheduler with
        stochastic_sampling (RF). Deterministic (KD, ODE students): x0, then the noise the ODE implies:
        DDIMScheduler with trailing timesteps (VP) or the plain flow-matching Euler step (RF)."""
        config = {k: v for k, v in self.pipe.scheduler.config.items() if not k.startswith("_")}
        if self.kind in ("sd", "sdxl"):
            if stochastic:
                return lcm_scheduler(self.pipe.scheduler)
            keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
            return DDIMScheduler(**{k: config[k] for k in keys if k in config}, timestep_spacing="trailing",
                                 set_alpha_to_one=True, clip_sample=False, steps_offset=0)
        # A fixed shift (the teacher's resolution shift is the student's choice of t_list), and no terminal stretch
        # (Qwen-Image's shift_terminal 0.02 would put a 2-step student's second step at sigma 0.02).
        config.update(stochastic_sampling=stochastic, use_dynamic_shifting=False, shift_terminal=None)
        if shift is not None:
            config["shift"] = shift
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def set_custom_schedule(self, times: list[float], *, noise_input: bool = False) -> None:
        """Sample the student at these times of the teacher's process (first 1, decreasing; e.g. sCM's TrigFlow
        midpoint mapped onto the teacher's path) whenever it runs len(times) steps: passed to the stock call as
        `timesteps` (VP, rounded to integer timesteps) or `sigmas` (flow matching; the student's scheduler then
        has shift 1 so they are used as given). noise_input: the first time may be below 1 — the first step still
        gets pure noise and is only told that time (DMD2's conditioning timestep, e.g. 399 for its 1-step SDXL);
        the stock schedulers do the same with such a schedule (x0 at the told time, then re-noised)."""
        if (not times or not (times[0] <= 1.0 if noise_input else times[0] == 1.0)
                or any(a <= b for a, b in zip(times, times[1:])) or times[-1] <= 0):
            raise ValueError(f"the custom schedule must start at {'<= ' if noise_input else ''}1 and decrease inside "
                             f"(0, 1], got {times}.")
        if self.kind in ("sd", "sdxl"):
            times = [round(t * 999) / 999 for t in times]
        self.custom_times = list(times)

    def _custom(self, num_steps: int) -> list[float] | None:
        return self.custom_times if self.custom_times is not None and len(self.custom_times) == num_steps else None

    def student_t_list(self, scheduler, num_steps: int) -> torch.Tensor:
        """The continuous times (ending at 0) the stock pipeline samples at with `num_steps` steps."""
        custom = self._custom(num_steps)
        if custom is not None:
            if self.kind in ("sd", "sdxl"):
                scheduler.set_timesteps(timesteps=[round(t * 999) for t in custom])
                return torch.tensor([*(round(t * 999) / 999 for t in custom), 0.0])
            scheduler.set_timesteps(sigmas=custom, mu=0.0)
            return scheduler.sigmas.float().clone()
        if isinstance(scheduler, (LCMScheduler, DDIMScheduler)):  # VP: t = timestep / (T - 1)
            return t_list_from_scheduler(scheduler, num_steps)
        # Flux / QwenImagePipeline pass sigmas = linspace(1, 1/N, N) themselves; SD3 gets them in the call (`sampling_kwargs`),
        # since its default grid ends at sigma 1/1000 (a 2-step schedule would spend its second step at ~0.009).
        scheduler.set_timesteps(sigmas=self._sigmas(num_steps), mu=0.0)
        return scheduler.sigmas.float().clone()

    @staticmethod
    def _sigmas(num_steps: int) -> list[float]:
        return np.linspace(1.0, 1 / num_steps, num_steps).tolist()

    def sampling_kwargs(self, num_steps: int) -> dict:
        """The stock pipeline call that samples the student with its recipe."""
        kwargs = {"num_inference_steps": num_steps}
        custom = self._custom(num_steps)
        if custom is not None:
            kwargs.update({"timesteps": [round(t * 999) for t in custom]} if self.kind in ("sd", "sdxl")
                          else {"sigmas": list(custom)})
        if self.kind == "flux":
            kwargs["guidance_scale"] = float(self.guidance_scale) if self.flux_guidance else 1.0
            kwargs["max_sequence_length"] = self.max_sequence_length
        elif self.kind == "qwen":
            kwargs["true_cfg_scale"] = 1.0  # Qwen-Image's CFG switch (its guidance_scale is for distilled guidance)
            kwargs["max_sequence_length"] = self.max_sequence_length
        else:
            kwargs["guidance_scale"] = 1.0  # no CFG: the teacher's guidance is distilled into the student
            if self.kind == "sd3":
                kwargs["max_sequence_length"] = self.max_sequence_length
                kwargs.setdefault("sigmas", self._sigmas(num_steps))
        return kwargs

    def tcd_sampling_kwargs(self, num_steps: int, gamma: float) -> dict:
        """A VP consistency student's multistep call with stock TCDScheduler (built from the saved LCMScheduler's
        config) at `eta=gamma`: TCD's strategic stochastic sampling (Zheng et al. arXiv:2402.19159, Sec. 4.4) -- each
        step's x0 is taken by a DDIM step to (1 - gamma) x the next timestep and only the rest re-noised (gamma 1:
        LCM's x0-then-fresh-noise; 0: deterministic). The "scheduler" key is the swap the card writes
        (`apply_recipe`)."""
        if self.kind not in ("sd", "sdxl"):
            raise ValueError(f"TCDScheduler samples VP (SD1.5 / SDXL) students; this teacher is {self.kind!r}.")
        if not 0.0 <= gamma <= 1.0:  # NaN fails too
            raise ValueError(f"`tcd_gamma` must be in [0, 1], got {gamma}.")
        return {**self.sampling_kwargs(num_steps), "eta": float(gamma), "scheduler": "TCDScheduler"}

    def guided_sampling_kwargs(self, num_steps: int, guidance_scale: float, negative_prompt: str = "") -> dict:
        """The stock call that samples the teacher's own way (its scheduler, `num_steps`) with this guidance: CFG
        through `guidance_scale` (the embedding for guidance-distilled Flux), or, for Qwen-Image, `true_cfg_scale`
        with the negative prompt."""
        kwargs = {"num_inference_steps": num_steps}
        if self.kind == "qwen":
            kwargs["true_cfg_scale"] = float(guidance_scale)
            if guidance_scale > 1.0:
                kwargs["negative_prompt"] = negative_prompt
            kwargs["max_sequence_length"] = self.max_sequence_length
        else:
            kwargs["guidance_scale"] = float(guidance_scale)
        return kwargs

    # --- output -------------------------------------------------------------------------------------
    def save_student(self, output_dir: str, student, scheduler, *, num_steps: int, method: str,
                     lora_layers: dict | None = None, lora_config: dict | None = None,
                     sampling: dict | list[dict] | None = None) -> DiffusionPipeline:
        """Write the student: full mode, the teacher's pipeline class with `student` as its denoiser and
        `scheduler`; LoRA mode (`lora_layers`, a peft state dict of the student adapter), the teacher's
        `save_lora_weights` file plus `scheduler/`. Both with a model card showing the stock call that samples
        it (`sampling`, default `sampling_kwargs(num_steps)`). Returns the reloaded pipeline (stock
        `DiffusionPipeline.from_pretrained`, and `load_lora_weights` for LoRA)."""
        os.makedirs(output_dir, exist_ok=True)
        cls = type(self.pipe)
        if lora_layers is None:
            check_finite(student, "the student")
            # One dtype in the folder: the fp32 student beside the teacher's other components loaded in fp32 (a
            # user picks the inference dtype with from_pretrained(..., torch_dtype=...)).
            pipe = cls.from_pretrained(self.path, dtype=torch.float32, scheduler=scheduler,
                                       **{self.component: student.float()}, **self.load_kwargs)
            pipe.save_pretrained(output_dir)
        else:
            check_finite(lora_layers, "the student's LoRA weights")
            # The adapter's config (rank, alpha, targets) goes into the file's metadata, so load_lora_weights
            # rebuilds the same scaling (without it, alpha defaults to the rank).
            cls.save_lora_weights(output_dir, **{f"{self.component}_lora_layers": lora_layers,
                                                 f"{self.component}_lora_adapter_metadata": lora_config})
            scheduler.save_pretrained(os.path.join(output_dir, "scheduler"))
        self._write_model_card(output_dir, num_steps=num_steps, method=method, lora=lora_layers is not None,
                               scheduler=scheduler, sampling=sampling)
        if lora_layers is None:
            return DiffusionPipeline.from_pretrained(output_dir)
        pipe = DiffusionPipeline.from_pretrained(self.path, **self.load_kwargs)
        pipe.load_lora_weights(output_dir)
        pipe.scheduler = type(scheduler).from_pretrained(output_dir, subfolder="scheduler")
        return pipe

    def _write_model_card(self, output_dir: str, *, num_steps: int, method: str, lora: bool, scheduler,
                          sampling: dict | list[dict] | None = None) -> None:
        if sampling is not None:
            recipes = list(sampling) if isinstance(sampling, list) else [sampling]
        else:  # a 1-step student also samples at 2 steps, unless it was told a time below 1 (the 2-step call starts at 1)
            told = self.custom_times is not None and self.custom_times[0] < 1
            recipes = [self.sampling_kwargs(n) for n in ((1, 2) if num_steps == 1 and not told else (num_steps,))]
        lines, swaps = [], []  # a recipe naming a stock scheduler is sampled with it, built from the saved one's config
        for kwargs in recipes:
            kwargs = dict(kwargs)
            swap = kwargs.pop("scheduler", None)
            if swaps and swap is None:
                raise ValueError("recipes with a scheduler swap must come after the saved scheduler's ones.")
            if swap is not None and swap not in swaps:
                lines.append(f"pipe.scheduler = {swap}.from_config(pipe.scheduler.config)\n")
                swaps.append(swap)
            lines.append(f'image = pipe("a prompt", {", ".join(f"{k}={v!r}" for k, v in kwargs.items())}).images[0]\n')
        if lora:
            load = (f'pipe = DiffusionPipeline.from_pretrained("{self.path}")\n'
                    f'pipe.load_lora_weights("{output_dir}")\n'
                    f'pipe.scheduler = {type(scheduler).__name__}.from_pretrained("{output_dir}", subfolder="scheduler")')
            imports = ["DiffusionPipeline", type(scheduler).__name__]
        else:
            load = f'pipe = DiffusionPipeline.from_pretrained("{output_dir}")'
            imports = ["DiffusionPipeline"]
        imports = "from diffusers import " + ", ".join(dict.fromkeys(imports + swaps))
        verb = "fine-tuned" if method == "SFT" else "distilled"
        description = (
            f"# {method} student of {self.path}\n\n"
            f"A {num_steps}-step {'LoRA ' if lora else ''}student {verb} with {method} by diffusers_fastgen from "
            f"the {self.class_name} `{self.path}`. Its sampling recipe is the saved "
            f"`{type(scheduler).__name__}`"
            + (f" (after the swap line: stock {' / '.join(swaps)} on its config)" if swaps else "")
            + "; sample it with exactly this call:\n\n"
            f"```python\n{imports}\n\n{load}\n" + "".join(lines) + "```\n")
        # diffusers' training-script card template and tags (load_or_create_model_card would first look the
        # output folder up on the Hub, which fails for a local path or offline).
        card = ModelCard.from_template(card_data=ModelCardData(library_name="diffusers", base_model=self.path),
                                       template_path=MODEL_CARD_TEMPLATE_PATH, model_description=description)
        card = populate_model_card(card, tags=["diffusers", "diffusers_fastgen", method.lower(),
                                               "fine-tuning" if method == "SFT" else "distillation",
                                               "lora" if lora else "full"])
        card.save(os.path.join(output_dir, "README.md"))


def apply_recipe(pipe, recipe: dict) -> dict:
    """The call arguments of a sampling recipe (`TextToImageTeacher.sampling_kwargs` and kin); a recipe naming a
    stock scheduler ("scheduler": "TCDScheduler") first gets it on `pipe`, built from the current one's config --
    what the model card writes before that call."""
    recipe = dict(recipe)
    swap = recipe.pop("scheduler", None)
    if swap is not None:
        pipe.scheduler = getattr(diffusers, swap).from_config(pipe.scheduler.config)
    return recipe


def drop_prompts(cond: dict, uncond: dict, p: float, generator: torch.Generator | None = None) -> dict:
    """CFG training: each row of a batch's conditioning (`TextToImageTeacher.cond`, nested dicts too) replaced by
    the same row of `uncond` (the negative prompt's) with probability p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"`cond_dropout` must be in [0, 1), got {p}.")
    if p == 0.0:
        return cond
    first = next(v for v in cond.values() if torch.is_tensor(v))
    keep = torch.rand(first.shape[0], generator=generator).to(first.device) >= p

    def mix(a, u):
        if torch.is_tensor(a):
            return torch.where(keep.view(-1, *[1] * (a.ndim - 1)), a, u.to(a.dtype))
        return {k: mix(a[k], u[k]) for k in a} if isinstance(a, dict) else a

    return mix(cond, uncond)


class PromptBatches:
    """Random prompt indices per micro-batch, a pure function of (seed, rank, iteration), so a resumed run
    draws what the uninterrupted one would have (`state_at`)."""

    def __init__(self, num_prompts: int, batch_size: int, *, seed: int, rank: int = 0):
        self.num_prompts, self.batch_size, self.seed, self.rank, self.iteration = num_prompts, batch_size, seed, rank, 0

    def state_at(self, iteration: int) -> None:
        self.iteration = iteration

    def __next__(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_033 + self.iteration) % 2**63)
        self.iteration += 1
        return torch.randint(0, self.num_prompts, (self.batch_size,), generator=g)


def lora_state(model, adapter: str = "student") -> dict:
    """The peft state dict of one adapter (the form `save_lora_weights` takes)."""
    return get_peft_model_state_dict(model, adapter_name=adapter)


def lora_config(model, adapter: str = "student") -> dict:
    """The adapter's LoraConfig as a dict (`save_lora_weights`' `*_lora_adapter_metadata`)."""
    return model.peft_config[adapter].to_dict()
