"""The adapter against direct model calls written independently, per architecture."""

import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline
from peft import LoraConfig

from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.parametrization import RectifiedFlow, vp_from_betas
from diffusers_fastgen.testing import tiny as T

VP = vp_from_betas()
T_BATCH = torch.tensor([0.3, 0.8])


def _x(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_unet2d_eps_model():
    model = T.tiny_unet2d()
    den = Denoiser(model, VP, "epsilon")
    x, cond = _x((2, 1, 8, 8)), T.tiny_cond("unet2d", 2)
    with torch.no_grad():
        eps = model(x, T_BATCH * 999, class_labels=cond["class_labels"]).sample
        torch.testing.assert_close(den(x, T_BATCH, cond, target="eps"), eps)
        a = VP.alphas_cumprod  # alpha^2 at t*999 by linear interpolation of log(abar)
        log_abar = torch.stack([torch.log(a[299]) + 0.7 * (torch.log(a[300]) - torch.log(a[299])),
                                torch.log(a[799]) + 0.2 * (torch.log(a[800]) - torch.log(a[799]))])
        alpha = torch.exp(0.5 * log_abar).view(2, 1, 1, 1)
        sigma = torch.sqrt(1 - alpha**2)
        torch.testing.assert_close(den(x, T_BATCH, cond, target="x0"), (x - sigma * eps) / alpha, atol=1e-5, rtol=1e-5)


def test_unet2d_condition_sd_and_sdxl():
    for sdxl in (False, True):
        model = T.tiny_unet2d_condition(sdxl=sdxl)
        den = Denoiser(model, VP, "v_prediction")
        x, cond = _x((2, 4, 8, 8)), T.tiny_cond("sdxl" if sdxl else "sd", 2)
        with torch.no_grad():
            v = model(x, T_BATCH * 999, encoder_hidden_states=cond["encoder_hidden_states"],
                      added_cond_kwargs=cond.get("added_cond_kwargs")).sample
            torch.testing.assert_close(den(x, T_BATCH, cond, target="v"), v)


def test_sd3_flow_and_x0():
    model = T.tiny_sd3_transformer()
    den = Denoiser(model)
    assert isinstance(den.process, RectifiedFlow) and den.prediction_type == "flow"
    x, cond = _x((2, 4, 8, 8)), T.tiny_cond("sd3", 2)
    with torch.no_grad():
        v = model(hidden_states=x, timestep=T_BATCH * 1000, **cond).sample
        torch.testing.assert_close(den(x, T_BATCH, cond, target="flow"), v)
        torch.testing.assert_close(den(x, T_BATCH, cond, target="x0"), x - T_BATCH.view(2, 1, 1, 1) * v,
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_flux_packing_matches_flux_pipeline(guidance_embeds):
    model = T.tiny_flux_transformer(guidance_embeds=guidance_embeds)
    den = Denoiser(model)
    x = _x((2, 4, 8, 8))
    cond = T.tiny_cond("flux_guidance" if guidance_embeds else "flux", 2)
    # Reference: FluxPipeline's own packing helpers.
    packed = FluxPipeline._pack_latents(x, 2, 4, 8, 8)
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype)
    with torch.no_grad():
        out = model(hidden_states=packed, timestep=T_BATCH, guidance=cond.get("guidance"),
                    encoder_hidden_states=cond["encoder_hidden_states"], pooled_projections=cond["pooled_projections"],
                    txt_ids=torch.zeros(5, 3), img_ids=img_ids).sample
        ref = FluxPipeline._unpack_latents(out, 8 * 8, 8 * 8, 8)  # height/width in pixels, vae_scale_factor 8
        torch.testing.assert_close(den(x, T_BATCH, cond, target="flow"), ref)
    if guidance_embeds:
        with pytest.raises(ValueError, match="guidance"):
            den(x, T_BATCH, {k: v for k, v in cond.items() if k != "guidance"})


def test_qwen_image_packing_and_mask_match_qwen_image_pipeline():
    """Against QwenImagePipeline's own packing, img_shapes and t / 1000; the second row's padded text tokens
    are masked out, so dropping them gives the same output."""
    model = T.tiny_qwen_image_transformer()
    den = Denoiser(model)
    assert isinstance(den.process, RectifiedFlow) and den.prediction_type == "flow"
    x = _x((2, 4, 8, 8))
    cond = T.tiny_cond("qwen", 2)
    packed = QwenImagePipeline._pack_latents(x, 2, 4, 8, 8)
    with torch.no_grad():
        out = model(hidden_states=packed, timestep=T_BATCH, encoder_hidden_states=cond["encoder_hidden_states"],
                    encoder_hidden_states_mask=cond["encoder_hidden_states_mask"], img_shapes=[[(1, 4, 4)]] * 2).sample
        ref = QwenImagePipeline._unpack_latents(out, 8 * 4, 8 * 4, 4)[:, :, 0]  # pixels, vae_scale_factor 4
        got = den(x, T_BATCH, cond, target="flow")
        torch.testing.assert_close(got, ref)
        short = {k: v[1:, :3] for k, v in cond.items()}
        torch.testing.assert_close(den(x[1:], T_BATCH[1:], short, target="flow"), got[1:], atol=1e-5, rtol=1e-5)
        assert (got[0] - den(x[:1], T_BATCH[:1], {k: v[:1, :3] for k, v in cond.items()})).abs().max() > 1e-4


def test_wan_and_cogvideox_video_layout():
    wan = T.tiny_wan_transformer()
    x, cond = _x((2, 16, 3, 8, 8)), T.tiny_cond("wan", 2)
    with torch.no_grad():
        ref = wan(hidden_states=x, timestep=T_BATCH * 1000, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        torch.testing.assert_close(Denoiser(wan)(x, T_BATCH, cond, target="flow"), ref)
    cog = T.tiny_cogvideox_transformer()
    x = _x((2, 4, 3, 8, 8))
    with torch.no_grad():
        ref = cog(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=T_BATCH * 999,
                  encoder_hidden_states=cond["encoder_hidden_states"]).sample.permute(0, 2, 1, 3, 4)
        torch.testing.assert_close(Denoiser(cog, VP, "v_prediction")(x, T_BATCH, cond, target="v"), ref)


def test_bad_inputs():
    with pytest.raises(ValueError, match="process"):
        Denoiser(T.tiny_unet2d())
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(T.tiny_sd3_transformer(), prediction_type="score")
    with pytest.raises(TypeError, match="model"):
        Denoiser(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="target"):
        Denoiser(T.tiny_sd3_transformer())(_x((1, 4, 8, 8)), 0.5, T.tiny_cond("sd3", 1), target="score")


CASES = {
    "sd": (lambda: T.tiny_unet2d_condition(), (2, 4, 8, 8), dict(process=VP, prediction_type="epsilon"),
           ["to_q", "to_k", "to_v", "to_out.0"]),
    "sd3": (lambda: T.tiny_sd3_transformer(), (2, 4, 8, 8), {}, ["to_q", "to_k", "to_v"]),
    "flux": (lambda: T.tiny_flux_transformer(), (2, 4, 8, 8), {}, ["to_q", "to_k", "to_v"]),
    "qwen": (lambda: T.tiny_qwen_image_transformer(), (2, 4, 8, 8), {}, ["to_q", "to_k", "to_v"]),
    "wan": (lambda: T.tiny_wan_transformer(), (2, 16, 3, 8, 8), {}, ["to_q", "to_k", "to_v"]),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_peft_adapters_bf16_autocast_and_checkpointing(kind):
    build, shape, kw, targets = CASES[kind]
    model = build()
    den = Denoiser(model, **kw)
    x, cond = _x(shape), T.tiny_cond(kind, 2)
    with torch.no_grad():
        base = den(x, T_BATCH, cond)
    # 1. A fresh LoRA (B = 0) leaves the output unchanged; a perturbed one changes it; disabling restores it.
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=True), "student")
    with torch.no_grad():
        torch.testing.assert_close(den(x, T_BATCH, cond), base)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        adapted = den(x, T_BATCH, cond)
        assert (adapted - base).abs().max() > 1e-4
        model.disable_adapters()
        torch.testing.assert_close(den(x, T_BATCH, cond), base)
        model.enable_adapters()
    # 2. bf16 autocast stays close to fp32.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = den(x, T_BATCH, cond)
    assert low.dtype == torch.float32
    assert (low - adapted).abs().max() / adapted.abs().max() < 0.05
    # 3. Gradient checkpointing gives the same LoRA gradients.
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad()
        den(x, T_BATCH, cond).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_adapter_is_active_for_the_call_only():
    """A Denoiser bound to one adapter runs it and leaves the adapter that was active before (or the
    disabled state) as it was, also when the forward raises."""
    from diffusers_fastgen.training.lora import BASE, activate_adapter, active_adapter, add_lora_adapters

    model = add_lora_adapters(T.tiny_unet2d_condition(), ["student", "fake"], rank=2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    x, t, cond = _x((2, 4, 8, 8)), torch.tensor([0.3, 0.6]), T.tiny_cond("sd", 2)
    dens = {n: Denoiser(model, VP, "epsilon", adapter=n) for n in ("student", "fake", BASE)}
    activate_adapter(model, "fake")
    with torch.no_grad():
        outs = {n: d(x, t, cond) for n, d in dens.items()}
        assert active_adapter(model) == "fake"
        activate_adapter(model, "student")
        torch.testing.assert_close(Denoiser(model, VP, "epsilon")(x, t, cond), outs["student"])
        activate_adapter(model, BASE)
        assert active_adapter(model) == BASE
        torch.testing.assert_close(dens["fake"](x, t, cond), outs["fake"])
        assert active_adapter(model) == BASE
        torch.testing.assert_close(Denoiser(model, VP, "epsilon")(x, t, cond), outs[BASE])
        activate_adapter(model, "fake")
        with pytest.raises(RuntimeError):
            dens["student"](x, t, {"encoder_hidden_states": torch.randn(2, 5, 3)})  # raises inside the forward
        assert active_adapter(model) == "fake"
    assert (outs["student"] - outs["fake"]).abs().max() > 1e-4 and (outs["student"] - outs[BASE]).abs().max() > 1e-4
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
