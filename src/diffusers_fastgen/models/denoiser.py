"""One adapter over diffusers denoisers: `Denoiser(model, process, prediction_type)(x_t, t, cond, target=...)`.

The adapter knows, per model class, how to call it (argument names, latent packing, layout) and, from
the process, how continuous time t maps to the model's native timestep. It converts the native
output (eps / v / x0 / flow) to the requested parametrization with `parametrization.convert_prediction`.

Latents are always channel-first: (B, C, H, W) for images and (B, C, F, H, W) for video.
`cond` is a dict of conditioning tensors, batched along dim 0:

| model                          | cond keys                                                            |
|--------------------------------|----------------------------------------------------------------------|
| UNet2DModel                    | class_labels (optional)                                              |
| UNet2DConditionModel (SD1.5)   | encoder_hidden_states, class_labels (optional)                       |
| UNet2DConditionModel (SDXL)    | + added_cond_kwargs = {text_embeds, time_ids}                        |
| SD3Transformer2DModel          | encoder_hidden_states, pooled_projections                            |
| FluxTransformer2DModel         | encoder_hidden_states, pooled_projections, guidance (if guidance_embeds) |
| QwenImageTransformer2DModel    | encoder_hidden_states, encoder_hidden_states_mask (optional)        |
| WanTransformer3DModel          | encoder_hidden_states, encoder_hidden_states_image (I2V, optional)   |
| CogVideoXTransformer3DModel    | encoder_hidden_states                                                |
| models.causal_wan.CausalWan    | encoder_hidden_states, kv_cache, frame_offset, update_cache (optional); t may be per-frame (B, F) |

The wrapped model may be peft-adapted, gradient-checkpointed, under autocast, or wrapped by
accelerate/DDP: the call goes through `model(...)` so all of those apply.
"""

from __future__ import annotations

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    WanTransformer3DModel,
)

from ..parametrization import (
    DIFFUSERS_PREDICTION_TYPES,
    PREDICTION_TYPES,
    Process,
    RectifiedFlow,
    convert_prediction,
    process_from_scheduler,
)
from .adapters import use_adapter
from .causal_wan import CausalWan
from .interval import guidance_interval_embedding, interval_embedding
from .unwrap import unwrap_model


def _call_unet2d(model, x, timestep, cond):
    return model(x, timestep, class_labels=cond.get("class_labels")).sample


def _call_unet2d_condition(model, x, timestep, cond):
    return model(x, timestep, encoder_hidden_states=cond.get("encoder_hidden_states"),
                 class_labels=cond.get("class_labels"), added_cond_kwargs=cond.get("added_cond_kwargs"),
                 timestep_cond=cond.get("timestep_cond")).sample


def _call_sd3(model, x, timestep, cond):
    return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                 pooled_projections=cond["pooled_projections"]).sample


def pack_flux_latents(x):
    """(B, C, H, W) -> (B, H/2 * W/2, 4C) 2x2 patches, as FluxPipeline packs them."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux_latents(x, height: int, width: int):
    """(B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    b, _, c4 = x.shape
    x = x.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, c4 // 4, height, width)


def flux_image_ids(height: int, width: int, device, dtype):
    """(H/2 * W/2, 3) position ids: (0, row, col) per packed patch."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def _call_flux(model, x, timestep, cond):
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"Flux latents need even height and width, got {tuple(x.shape[-2:])}.")
    h, w = x.shape[-2:]
    text = cond["encoder_hidden_states"]
    guidance = cond.get("guidance")
    if unwrap_model(model).config.guidance_embeds and guidance is None:
        raise ValueError("this Flux model has guidance_embeds=True: pass cond['guidance'] (B,), e.g. 3.5.")
    out = model(hidden_states=pack_flux_latents(x), timestep=timestep / 1000.0, guidance=guidance,
                encoder_hidden_states=text, pooled_projections=cond["pooled_projections"],
                txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
                img_ids=flux_image_ids(h, w, x.device, x.dtype)).sample
    return unpack_flux_latents(out, h, w)


def _call_qwen_image(model, x, timestep, cond):
    """QwenImagePipeline's call: 2x2-packed latents (the same packing as Flux), t in [0, 1], the text mask
    for padded prompts, and the (frames, rows, cols) of the packed image for its 3-D RoPE."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"Qwen-Image latents need even height and width, got {tuple(x.shape[-2:])}.")
    h, w = x.shape[-2:]
    out = model(hidden_states=pack_flux_latents(x), timestep=timestep / 1000.0,
                encoder_hidden_states=cond["encoder_hidden_states"],
                encoder_hidden_states_mask=cond.get("encoder_hidden_states_mask"),
                img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0]).sample
    return unpack_flux_latents(out, h, w)


def _call_wan(model, x, timestep, cond):
    return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                 encoder_hidden_states_image=cond.get("encoder_hidden_states_image")).sample


def _call_causal_wan(model, x, timestep, cond):
    return model(x, timestep, cond["encoder_hidden_states"], kv_cache=cond.get("kv_cache"),
                 frame_offset=cond.get("frame_offset"), update_cache=cond.get("update_cache", False))


def _call_cogvideox(model, x, timestep, cond):
    out = model(hidden_states=x.transpose(1, 2), timestep=timestep,  # CogVideoX is (B, F, C, H, W)
                encoder_hidden_states=cond["encoder_hidden_states"]).sample
    return out.transpose(1, 2)


# Model class -> (call, default process, default native prediction). Subclasses match through isinstance.
_ARCHITECTURES = (
    (UNet2DConditionModel, _call_unet2d_condition, None, None),
    (UNet2DModel, _call_unet2d, None, None),
    (SD3Transformer2DModel, _call_sd3, RectifiedFlow(), "flow"),
    (FluxTransformer2DModel, _call_flux, RectifiedFlow(), "flow"),
    (QwenImageTransformer2DModel, _call_qwen_image, RectifiedFlow(), "flow"),
    (WanTransformer3DModel, _call_wan, RectifiedFlow(), "flow"),
    (CogVideoXTransformer3DModel, _call_cogvideox, None, None),
)


def _architecture(model):
    if isinstance(model, CausalWan):
        return _call_causal_wan, RectifiedFlow(), "flow"
    inner = unwrap_model(model)
    for cls, call, process, prediction in _ARCHITECTURES:
        if isinstance(inner, cls):
            return call, process, prediction
    names = ", ".join(a[0].__name__ for a in _ARCHITECTURES) + ", CausalWan"
    raise TypeError(f"`model` must be one of {names}; got {type(inner).__name__}.")


def compute_dtype(model) -> torch.dtype | None:
    """The dtype a model computes in: that of most of its floating weights outside peft adapters (LoRA weights
    may be kept in fp32 on a bf16 base, and diffusers keeps a few small modules of a bf16 model in fp32, e.g.
    Wan's scale_shift_table and time embedder)."""
    counts: dict[torch.dtype, int] = {}
    for name, p in unwrap_model(model).named_parameters():
        if "lora_" not in name and p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def _cast_floating(value, dtype):
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast_floating(v, dtype) for k, v in value.items()}
    return value


INTERVAL_EMBEDDINGS = {"fourier": interval_embedding, "guidance": guidance_interval_embedding}


class Denoiser:
    """D(x_t, t, cond) over a diffusers model, in any parametrization.

    Args:
        model: the diffusers model (possibly wrapped by DDP/FSDP/compile, possibly with peft adapters).
        process: the forward process the model was trained on (`parametrization.*`). Transformers of
            flow-matching families default to RectifiedFlow; UNets and CogVideoX need it (see
            `Denoiser.from_scheduler`).
        prediction_type: the model's native output: one of x0/eps/v/flow or diffusers' names
            (epsilon, v_prediction, sample).
        adapter: for several peft adapters on one base (LoRA distillation): the adapter this denoiser
            runs, or `training.lora.BASE` for the base with adapters disabled; active for the call only
            (the adapter active before is restored after it). None: run whatever is active.
        interval: how a second time `r` reaches a UNet with time_cond_proj_dim: "fourier" (`interval_embedding`,
            our DigitsPipeline) or "guidance" (`guidance_interval_embedding`, what stock StableDiffusion(XL)Pipeline
            computes from its `guidance_scale`).
    """

    def __init__(self, model, process: Process | None = None, prediction_type: str | None = None, *,
                 adapter: str | None = None, interval: str = "fourier"):
        if interval not in INTERVAL_EMBEDDINGS:
            raise ValueError(f"`interval` must be one of {sorted(INTERVAL_EMBEDDINGS)}, got {interval!r}.")
        self.interval = interval  # how `r` reaches the model: our Fourier features, or the stock guidance embedding
        self.model = model
        self.adapter = adapter  # peft adapter active during each call (training.lora.BASE = adapters off)
        self._call, default_process, default_prediction = _architecture(model)
        self.process = process if process is not None else default_process
        prediction_type = prediction_type if prediction_type is not None else default_prediction
        if self.process is None or prediction_type is None:
            raise ValueError(f"{type(unwrap_model(model)).__name__} has no default process: pass `process` and "
                             "`prediction_type`, or use Denoiser.from_scheduler(model, scheduler).")
        prediction_type = DIFFUSERS_PREDICTION_TYPES.get(prediction_type, prediction_type)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES} (or diffusers' "
                             f"{tuple(DIFFUSERS_PREDICTION_TYPES)}), got {prediction_type!r}.")
        self.prediction_type = prediction_type

    @classmethod
    def from_scheduler(cls, model, scheduler):
        """Process and native prediction from the model's training scheduler (DDPM/DDIM/Euler/LCM -> VP,
        FlowMatch* -> RF)."""
        process, prediction = process_from_scheduler(scheduler)
        return cls(model, process, prediction)

    def native_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return self.process.timestep_from_t(t)

    def _interval_cond(self, t: torch.Tensor, r) -> torch.Tensor:
        inner = unwrap_model(self.model)
        dim = getattr(getattr(inner, "config", None), "time_cond_proj_dim", None)
        if not isinstance(inner, UNet2DConditionModel) or dim is None:
            raise ValueError("`r` needs a UNet2DConditionModel with time_cond_proj_dim set "
                             "(models.interval.add_interval_input); got " + type(inner).__name__ + ".")
        r = torch.as_tensor(r, device=t.device, dtype=t.dtype).expand_as(t)
        embed = INTERVAL_EMBEDDINGS[self.interval]
        return embed(self.native_timestep(t), self.native_timestep(r), dim).to(inner.dtype)

    def __call__(self, x_t: torch.Tensor, t, cond: dict | None = None, *, target: str = "x0", r=None) -> torch.Tensor:
        """Prediction of `target` type at (x_t, t), in x_t's dtype (so fp32 latents under bf16 autocast
        give fp32 predictions; the conversion itself runs in fp32). t: scalar or (B,) continuous time,
        or per-frame (B, F) for a CausalWan (diffusion forcing).

        r: the second time of a flow-map / MeanFlow student (u(x_t, r, t)); needs a UNet2DConditionModel
        made with `models.interval.add_interval_input` (it receives the embedding of the interval)."""
        if target not in PREDICTION_TYPES:
            raise ValueError(f"`target` must be one of {PREDICTION_TYPES}, got {target!r}.")
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if r is not None:
            cond = {**(cond or {}), "timestep_cond": self._interval_cond(t, r)}
        x_in, cond = x_t, cond or {}
        dtype = compute_dtype(self.model)
        if dtype is not None and not torch.is_autocast_enabled(x_t.device.type):
            # A frozen teacher in bf16 beside fp32 students: inputs (latents and the embeddings of the conditioning)
            # in the model's dtype, output back in x_t's. No copy where the dtype already matches.
            x_in, cond = x_t.to(dtype), _cast_floating(cond, dtype)
        with use_adapter(unwrap_model(self.model), self.adapter):  # the previous adapter is active again after
            out = self._call(self.model, x_in, self.native_timestep(t), cond)
        return convert_prediction(self.process, out, x_t, t, self.prediction_type, target).to(x_t.dtype)
