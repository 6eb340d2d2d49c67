"""Published causal Wan students -> CausalWanPipeline folders.

Reads a checkpoint in one of the layouts causal-video projects publish and writes a folder that
`CausalWanPipeline.from_pretrained` loads, with the student's sampling recipe in its config:

- Self-Forcing / CausVid `.pt` files: a dict holding `generator` (and `generator_ema`, `critic`), each a
  state dict whose keys are `model.` + the original Wan names (`blocks.0.self_attn.q.weight`, ...);
- NVIDIA FastGen Wan students: diffusers `WanTransformer3DModel` names under `transformer.` (or `net.`);
- a plain state dict (.pt / .safetensors) in either naming.

Original Wan names are mapped with diffusers' own single-file converter
(`convert_wan_transformer_to_diffusers`). The transformer config comes from a given config or pipeline
folder, or is read off the tensor shapes (only the head dimension cannot be: every released Wan 2.1 uses
128). Keys are checked strictly: a missing or unexpected key is a ValueError listing them.

Recipes (`RECIPES`): `causvid_4step` is CausVid's warped 4-step sampler ([1000, 750, 500, 250] on its shift-8
table: [1000, 960, 888.9, 727.3]). `causvid_3step` feeds model timesteps [1000, 757, 522] and re-noises at their noise
levels on CausVid's discrete shift-8 table ([1, 0.7568, 0.5217]; built from the recipe's description, with
no reference outputs to check against). `self_forcing` is the released Self-Forcing sampler (3 latent frames per block, model
timesteps [1000, 750, 500, 250] warped by shift 5 -> [1000, 937.5, 833.33, 625], x0 re-noised with fresh
noise, clean context, global attention); its parity with Self-Forcing's own inference code is tested on
a tiny checkpoint in its exact format (tests/fixtures/self_forcing_tiny). Any other recipe is given
field by field.
"""

from __future__ import annotations

import json
import os
import re

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file
from transformers import AutoTokenizer, UMT5EncoderModel

from .pipelines import CausalWanPipeline
from .schedulers import causal_scheduler, shift_times
from .training.nonfinite import check_finite


def warp_timesteps(timesteps, shift: float) -> list[float]:
    """Model timesteps of a shifted flow-matching grid: t -> 1000 * s u / (1 + (s - 1) u), u = t / 1000 (in
    float32, as Self-Forcing's `warp_denoising_step` computes them)."""
    return (1000 * shift_times(torch.tensor(timesteps, dtype=torch.float32) / 1000, shift)).tolist()


def table_sigmas(timesteps, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """Noise levels of model timesteps on a discrete shifted flow-matching table (CausVid's scheduler):
    u_k = 1 - k / N (k < N), sigma_k = s u_k / (1 + (s - 1) u_k), timestep_k = N sigma_k; each timestep takes
    the sigma of the nearest table entry (757 -> 0.7568 and 522 -> 0.5217 at shift 8)."""
    u = torch.linspace(1, 0, num_train_timesteps + 1)[:-1]
    table = shift * u / (1 + (shift - 1) * u)
    return [float(table[(table * num_train_timesteps - t).abs().argmin()]) for t in timesteps]


RECIPE_FIELDS = ("num_frames_per_block", "denoising_timesteps", "context_noise", "local_attn_size", "sink_size",
                 "denoising_sigmas", "sinks_in_window", "block_sizes")
_OPTIONAL_FIELDS = ("denoising_sigmas", "sinks_in_window", "block_sizes")
RECIPES = {
    "self_forcing": dict(num_frames_per_block=3, denoising_timesteps=warp_timesteps([1000, 750, 500, 250], 5.0),
                         context_noise=0, local_attn_size=-1, sink_size=0, sinks_in_window=True),
    # CausVid's warped 4-step sampler: [1000, 750, 500, 250] looked up on its shift-8 table, as Self-Forcing's
    # warp_denoising_step does with shift 5 (-> [1000, 960, 888.9, 727.3]).
    "causvid_4step": dict(num_frames_per_block=3, denoising_timesteps=warp_timesteps([1000, 750, 500, 250], 8.0),
                          context_noise=0, local_attn_size=-1, sink_size=0, sinks_in_window=True),
    # Model timesteps [1000, 757, 522] fed as they are, re-noised at their table noise levels (shift 8).
    "causvid_3step": dict(num_frames_per_block=3, denoising_timesteps=[1000.0, 757.0, 522.0],
                          denoising_sigmas=table_sigmas([1000, 757, 522], 8.0), context_noise=0, local_attn_size=-1,
                          sink_size=0, sinks_in_window=True),
}

_PREFIXES = ("model.", "transformer.", "net.", "module.", "_orig_mod.", "generator.")
# Names only the original Wan code uses (diffusers kept `patch_embedding`, so it tells nothing).
_ORIGINAL_WAN = re.compile(r"^(blocks\.\d+\.(self_attn|cross_attn|modulation)|text_embedding|time_embedding|"
                           r"time_projection|head\.)")


def load_checkpoint_state(path: str, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The generator's state dict from a checkpoint file (`generator_ema` when use_ema)."""
    if not os.path.isfile(path):
        raise ValueError(f"`checkpoint` {path!r} is not a file.")
    if path.endswith(".safetensors"):
        obj = load_file(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickles with code in them, or not a torch file at all
            raise ValueError(f"`checkpoint` {path!r} cannot be read with torch.load(weights_only=True): {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"`checkpoint` {path!r} holds a {type(obj).__name__}, not a state dict.")
    nested = {k: v for k, v in obj.items() if isinstance(v, dict)}
    if nested:
        wanted = "generator_ema" if use_ema else "generator"
        if wanted in nested:
            obj = nested[wanted]
        elif use_ema and "ema" in nested:
            obj = nested["ema"]
        elif use_ema:
            raise ValueError(f"`use_ema`: {path!r} has no EMA weights (its entries: {sorted(nested)}).")
        elif len(nested) == 1 or "state_dict" in nested or "model" in nested:
            obj = nested.get("state_dict", nested.get("model", next(iter(nested.values()))))
        else:
            raise ValueError(f"`checkpoint` {path!r} holds several state dicts {sorted(nested)} and none is named "
                             "'generator' (Self-Forcing / CausVid) or 'model' / 'state_dict'.")
    elif use_ema:
        raise ValueError(f"`use_ema`: {path!r} is a single state dict with no EMA entry.")
    state = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not state:
        raise ValueError(f"`checkpoint` {path!r} holds no tensors.")
    return state


def strip_prefixes(state: dict) -> dict:
    """Remove wrapper prefixes (`model.`, `transformer.`, `net.`, `module.`, `_orig_mod.`) shared by every key."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def to_diffusers_names(state: dict) -> dict:
    """Original Wan names -> diffusers WanTransformer3DModel names (diffusers' converter); diffusers names pass."""
    if any(_ORIGINAL_WAN.match(k) for k in state):
        return convert_wan_transformer_to_diffusers(dict(state))
    return dict(state)


def infer_transformer_config(state: dict, *, attention_head_dim: int = 128) -> dict:
    """WanTransformer3DModel arguments read off a diffusers-named state dict (the head dim is given)."""
    try:
        patch = state["patch_embedding.weight"]  # (inner, in_channels, p_t, p_h, p_w)
        inner = patch.shape[0]
        num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        config = dict(
            patch_size=tuple(patch.shape[2:]), in_channels=patch.shape[1],
            out_channels=state["proj_out.weight"].shape[0] // int(torch.tensor(patch.shape[2:]).prod()),
            num_layers=num_layers, ffn_dim=state["blocks.0.ffn.net.0.proj.weight"].shape[0],
            freq_dim=state["condition_embedder.time_embedder.linear_1.weight"].shape[1],
            text_dim=state["condition_embedder.text_embedder.linear_1.weight"].shape[1],
            cross_attn_norm="blocks.0.norm2.weight" in state,
            qk_norm="rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in state else None,
        )
    except KeyError as err:
        raise ValueError(f"the checkpoint is not a Wan transformer: it has no {err.args[0]!r}.") from None
    if "condition_embedder.image_embedder.ff.net.0.proj.weight" in state:
        raise ValueError("the checkpoint is a Wan image-to-video transformer (image cross-attention), which "
                         "CausalWan does not support.")
    if inner % attention_head_dim:
        raise ValueError(f"`attention_head_dim` {attention_head_dim} does not divide the model width {inner}.")
    config.update(num_attention_heads=inner // attention_head_dim, attention_head_dim=attention_head_dim)
    return config


def _read_config(transformer_config: str | dict) -> dict:
    if isinstance(transformer_config, dict):
        return dict(transformer_config)
    path = transformer_config
    for candidate in (os.path.join(path, "transformer", "config.json"), os.path.join(path, "config.json"), path):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f)
    raise ValueError(f"`transformer_config` {path!r} is neither a config.json nor a folder holding one "
                     "(or a pipeline folder with transformer/config.json).")


def _check_keys(model, state: dict) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "") if keys else "none"
        raise ValueError(f"the checkpoint does not match a WanTransformer3DModel with this config: missing keys: "
                         f"{show(missing)}; unexpected keys: {show(unexpected)}.")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"the checkpoint's shapes do not match the config (checkpoint vs model): {'; '.join(wrong[:8])}.")


def load_causal_transformer(checkpoint: str, *, use_ema: bool = False, transformer_config: str | dict | None = None,
                            attention_head_dim: int = 128, dtype: torch.dtype | None = None) -> WanTransformer3DModel:
    """A stock WanTransformer3DModel holding a published causal student's weights (strict key check)."""
    state = to_diffusers_names(strip_prefixes(load_checkpoint_state(checkpoint, use_ema=use_ema)))
    config = _read_config(transformer_config) if transformer_config is not None else infer_transformer_config(
        state, attention_head_dim=attention_head_dim)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(config)
    _check_keys(model, state)
    model.load_state_dict(state, assign=True, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def resolve_recipe(recipe: str | None = None, **overrides) -> dict:
    """A preset from `RECIPES` (or none) with the given fields replaced; every field must end up set."""
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {sorted(RECIPES)} (or None with every field given), got {recipe!r}.")
    unknown = set(overrides) - set(RECIPE_FIELDS)
    if unknown:
        raise ValueError(f"unknown recipe field(s) {sorted(unknown)}; the fields are {RECIPE_FIELDS}.")
    out = dict(RECIPES[recipe]) if recipe is not None else {}
    out.update({k: v for k, v in overrides.items() if v is not None})
    missing = [f for f in RECIPE_FIELDS if f not in out and f not in _OPTIONAL_FIELDS]
    if missing:
        raise ValueError(f"the recipe lacks {missing}: pick `recipe` from {sorted(RECIPES)} or give them.")
    CausalWanPipeline.check_recipe(**out)
    return out


def convert_causal_checkpoint(checkpoint: str, output_dir: str, *, recipe: str | None = "self_forcing",
                              use_ema: bool = False, transformer_config: str | dict | None = None,
                              attention_head_dim: int = 128, base_pipeline: str | None = None,
                              dtype: torch.dtype | None = None, **recipe_fields) -> CausalWanPipeline:
    """Write `output_dir` as a CausalWanPipeline folder: the checkpoint's generator (its EMA with use_ema) as a
    stock WanTransformer3DModel, the stock FlowMatchEulerDiscreteScheduler that runs the recipe
    (`causal_scheduler`), and the recipe in model_index.json.

    base_pipeline: a WanPipeline folder whose tokenizer, text encoder and VAE are added (so the folder takes
    prompts and decodes to pixels); its transformer config is used unless `transformer_config` is given.
    `output_dir` must not exist or be empty: nothing already there is replaced."""
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise ValueError(f"`output_dir` {output_dir!r} exists and is not empty; give a new folder.")
    settings = resolve_recipe(recipe, **recipe_fields)
    if transformer_config is None and base_pipeline is not None:
        transformer_config = base_pipeline
    transformer = load_causal_transformer(checkpoint, use_ema=use_ema, transformer_config=transformer_config,
                                          attention_head_dim=attention_head_dim, dtype=dtype)
    check_finite(transformer, "the converted transformer")
    extra = {}
    if base_pipeline is not None:
        extra = dict(tokenizer=AutoTokenizer.from_pretrained(base_pipeline, subfolder="tokenizer"),
                     text_encoder=UMT5EncoderModel.from_pretrained(base_pipeline, subfolder="text_encoder"),
                     vae=AutoencoderKLWan.from_pretrained(base_pipeline, subfolder="vae"))
    pipe = CausalWanPipeline(transformer=transformer, scheduler=causal_scheduler(), **extra, **settings)
    pipe.save_pretrained(output_dir)
    return pipe
