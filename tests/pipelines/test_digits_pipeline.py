import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_fastgen.models.digits import NULL_CLASS, digits_unet
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import flow_map_scheduler, flow_match_sde_scheduler


def _pipe(scheduler=None):
    torch.manual_seed(0)
    return DigitsPipeline(unet=digits_unet(block_out_channels=(16, 32), layers_per_block=1),
                          scheduler=scheduler or flow_map_scheduler(shift=2.0))


def _sample(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 2, "output_type": "latent", "generator": torch.Generator().manual_seed(0), **kw}
    return pipe([0, 3, 7, 9], **kw).images


@pytest.mark.parametrize("scheduler", [flow_map_scheduler(shift=2.0), flow_match_sde_scheduler(shift=2.0)])
def test_round_trip(scheduler, tmp_path):
    pipe = _pipe(scheduler)
    before = _sample(pipe, guidance_scale=2.0)
    pipe.save_pretrained(tmp_path)
    again = DigitsPipeline.from_pretrained(tmp_path)
    assert type(again.scheduler) is type(scheduler)
    torch.testing.assert_close(_sample(again, guidance_scale=2.0), before, atol=1e-6, rtol=0)


def test_one_step_matches_closed_form_and_cfg():
    pipe = _pipe()
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        v_c = pipe.unet(noise, torch.full((4,), 1000.0), None, class_labels=labels).sample
        v_u = pipe.unet(noise, torch.full((4,), 1000.0), None, class_labels=torch.full((4,), NULL_CLASS)).sample
    # 1 step from t = 1: x0 = x - v; CFG with w: v_u + w (v_c - v_u).
    out = _sample(pipe, num_inference_steps=1, latents=noise, guidance_scale=3.0)
    torch.testing.assert_close(out, noise - (v_u + 3.0 * (v_c - v_u)), atol=1e-5, rtol=1e-5)
    imgs = _sample(pipe, num_inference_steps=1, latents=noise, output_type="np")
    assert imgs.shape == (4, 8, 8, 1) and imgs.min() >= 0 and imgs.max() <= 1


def test_bad_inputs():
    pipe = _pipe()
    with pytest.raises(ValueError, match="class_labels"):
        pipe([10])
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], output_type="tensor")


@pytest.mark.parametrize("kwargs,match", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": -2}, "num_inference_steps"),
    ({"num_inference_steps": 1.5}, "num_inference_steps"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"guidance_scale": float("inf")}, "guidance_scale"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"class_labels": [1.5, 2.0]}, "class_labels"),
    ({"class_labels": [float("nan")]}, "class_labels"),
    ({"generator": [torch.Generator()]}, "generator"),
    ({"latents": torch.zeros(3, 1, 8, 8)}, "latents"),
])
def test_check_inputs_rejects_before_sampling(kwargs, match):
    """Each of these once returned the input noise, sampled without guidance, truncated the labels or
    ignored the generators; the unet must not even run."""
    pipe = _pipe()
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    kwargs = {"class_labels": [0, 3], **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)
    assert calls == []


def test_integral_float_labels_and_a_generator_per_image_are_accepted():
    pipe = _pipe()
    pipe.set_progress_bar_config(disable=True)
    a = pipe([3.0, 7.0], num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    b = pipe([3, 7], num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    assert pipe([3, 7], num_inference_steps=1, output_type="latent", generator=gens).images.shape == (2, 1, 8, 8)


def test_lora_weights_round_trip_with_load_lora_weights(tmp_path):
    pipe = _pipe()
    base = _sample(pipe)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    adapted = _sample(pipe)
    assert (adapted - base).abs().max() > 1e-3
    DigitsPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    fresh = _pipe()
    fresh.load_lora_weights(tmp_path)
    torch.testing.assert_close(_sample(fresh), adapted, atol=1e-5, rtol=1e-5)
