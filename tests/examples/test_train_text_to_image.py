"""train_dmd2 on stock text-to-image teachers (tiny SD1.5 eps / v, SDXL, SD3, Flux, guidance-distilled Flux,
Qwen-Image, saved to a temporary folder): the student reloads with stock diffusers (LoRA students with
`load_lora_weights`), and the stock pipeline's samples at the student's step count equal the rollout over
the t_list the script trained on (the saved scheduler is the training recipe)."""

import json
import math
import os
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForText2Image,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers import scheduling_flow_match_euler_discrete, scheduling_lcm, scheduling_tcd
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import load_file
from script_utils import load_script, run_script

from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.denoiser import pack_flux_latents, unpack_flux_latents
from diffusers_fastgen.parametrization import add_noise
from diffusers_fastgen.testing import tiny as T
from diffusers_fastgen.training.teachers import TextToImageTeacher, apply_recipe

VP = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
TEACHERS = {
    "sd": lambda: T.tiny_pipeline("sd", DDPMScheduler(**VP)),
    "sd_v": lambda: T.tiny_pipeline("sd", DDPMScheduler(**VP, prediction_type="v_prediction")),
    "sdxl": lambda: T.tiny_pipeline("sdxl", EulerDiscreteScheduler(**VP)),
    "sd3": lambda: T.tiny_pipeline("sd3", FlowMatchEulerDiscreteScheduler(shift=3.0)),
    "flux": lambda: T.tiny_pipeline("flux", FlowMatchEulerDiscreteScheduler(shift=3.0)),
    "flux_guidance": lambda: T.tiny_pipeline("flux", FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), guidance_embeds=True),
    # Qwen-Image's own scheduler settings (dynamic exponential shift, terminal stretch at 0.02)
    "qwen": lambda: T.tiny_pipeline("qwen", FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, shift_terminal=0.02,
        time_shift_type="exponential")),
}
PROMPTS = ["a red cat", "a blue dog on the horse", "three green apples", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    out = {}
    for name, build in TEACHERS.items():
        build().save_pretrained(root / name)
        out[name] = str(root / name)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out["prompts"] = str(root / "prompts.txt")
    images = root / "images"  # datasets' imagefolder layout: files + metadata.jsonl with the captions
    images.mkdir()
    rng = np.random.default_rng(0)
    with open(images / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(PROMPTS + ["a small digit", "the big one"]):
            Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    out["images"] = str(images)
    return out


def _argv(teachers, name, out, *extra):
    return ["--pretrained_model_name_or_path", teachers[name], "--prompts", teachers["prompts"], "--output_dir", out,
            "--max_train_steps", "2", "--train_batch_size", "2", "--student_update_freq", "2", "--num_student_steps",
            "2", "--resolution", "16", "--report_to", "none", "--validation_steps", "0", "--guidance_scale", "2",
            "--learning_rate", "1e-3", "--ema_schedule", "constant", "--ema_decay", "0", *extra]


def _stock_equals_training_rollout(teacher: TextToImageTeacher, pipe, num_steps: int, *, stochastic: bool = True):
    """The stock pipeline call of the model card vs x0 / re-noise along the trained t_list, with the same noise
    (stochastic: fresh noise per step, replayed; deterministic: the noise the ODE state implies)."""
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, *teacher.latent_shape, generator=g)
    eps = [torch.randn(1, *teacher.latent_shape, generator=g) for _ in range(num_steps)]
    flux = teacher.kind in ("flux", "qwen")  # 2x2-packed latents in the pipeline
    draws = iter(eps)

    def replay(shape, generator=None, device=None, dtype=None):
        e = next(draws)
        e = pack_flux_latents(e) if flux else e
        assert tuple(e.shape) == tuple(shape)
        return e.to(device=device, dtype=dtype)

    pipe.set_progress_bar_config(disable=True)
    with mock.patch.object(scheduling_lcm, "randn_tensor", replay), \
            mock.patch.object(scheduling_flow_match_euler_discrete, "randn_tensor", replay):
        latents = pack_flux_latents(noise) if flux else noise
        out = pipe(PROMPTS[0], latents=latents, height=teacher.resolution, width=teacher.resolution,
                   output_type="latent", **teacher.sampling_kwargs(num_steps)).images
    stock = unpack_flux_latents(out, *teacher.latent_shape[1:]) if flux else out

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    t_list = teacher.student_t_list(scheduler, num_steps)
    den = Denoiser(getattr(pipe, teacher.component), teacher.process, teacher.prediction_type)
    cond = teacher.cond(teacher._encode([PROMPTS[0]]), None, "cpu")
    x = noise
    with torch.no_grad():
        for i in range(num_steps):
            x0 = den(x, t_list[i].expand(1), cond)
            implied = den(x, t_list[i].expand(1), cond, target="eps")
            x = add_noise(teacher.process, x0, eps[i] if stochastic else implied, t_list[i + 1].expand(1)) \
                if i + 1 < num_steps else x0
    torch.testing.assert_close(stock.float(), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["sd", "sd_v", "sdxl"])
def test_meanflow_student_samples_its_jumps_through_the_stock_call(teachers, name, tmp_path):
    """MeanFlow on the RF view of a VP teacher: the saved folder is the teacher's class with a UNet that has
    time_cond_proj_dim and DDIMScheduler (trailing); the stock call with guidance_scale = 1 + 0.01 / N (the card's)
    equals MeanFlow's own sampler z_r = z_t - (t - r) u(z_t, r, t) in RF time, computed independently here."""
    from diffusers_fastgen.models.flow_view import FlowView
    from diffusers_fastgen.models.interval import interval_guidance_scale
    from diffusers_fastgen.parametrization import RectifiedFlow

    out = str(tmp_path / "mf")
    run_script("meanflow", ["--pretrained_model_name_or_path", teachers[name], "--train_data_dir", teachers["images"],
                            "--output_dir", out, "--max_train_steps", "3", "--train_batch_size", "2", "--resolution", "16",
                            "--report_to", "none", "--guidance_scale", "2", "--learning_rate", "1e-2",
                            "--warmup_steps", "0", "--endpoint_fraction", "0.5", "--interval_dim", "8",
                            "--validation_steps", "3"])
    assert os.listdir(os.path.join(out, "samples")) == ["step_000003.png"]
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is DDIMScheduler and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.unet.config.time_cond_proj_dim == 8
    assert pipe.unet.time_embedding.cond_proj.weight.abs().max() > 0  # the interval input was trained
    card = open(os.path.join(out, "README.md")).read()
    assert "num_inference_steps=1, guidance_scale=1.01" in card and "num_inference_steps=2, guidance_scale=1.005" in card
    with torch.no_grad():  # a strong interval input, so that an embedding that is off (formula, scale) shows
        pipe.unet.time_embedding.cond_proj.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    teacher = TextToImageTeacher(out, resolution=16)
    view = FlowView(Denoiser(pipe.unet, teacher.process, teacher.prediction_type, interval="guidance"))
    cond = teacher.cond(teacher._encode([PROMPTS[0]]), None, "cpu")
    abar = pipe.scheduler.alphas_cumprod.double()
    tau = lambda k: float(RectifiedFlow().t_from_noise_ratio(((1 - abar[k]) / abar[k]).sqrt()))  # noqa: E731
    outs = {}
    for steps, times in [(1, [tau(999), 0.0]), (2, [tau(999), tau(499), 0.0])]:
        noise = torch.randn(1, *teacher.latent_shape, generator=torch.Generator().manual_seed(steps))
        stock = pipe(PROMPTS[0], latents=noise, height=16, width=16, output_type="latent", num_inference_steps=steps,
                     guidance_scale=interval_guidance_scale(steps)).images
        z = noise / (abar[999].sqrt() + (1 - abar[999]).sqrt()).float()  # the VP point x_T on the RF path
        with torch.no_grad():
            for t, r in zip(times, times[1:]):
                z = z - (t - r) * view(z, torch.tensor([t]), cond, target="flow", r=torch.tensor([r]))
        torch.testing.assert_close(stock.float(), z, atol=1e-4, rtol=1e-4)
        outs[steps] = stock
        if steps == 1:  # the adversarial term's samples (--adv_weight) are this 1-step sample
            with torch.no_grad():
                jump = load_script("meanflow").one_jump_from_noise(view)(noise, torch.tensor([tau(999)]), cond)
            torch.testing.assert_close(stock.float(), jump, atol=1e-4, rtol=1e-4)
        wrong = pipe(PROMPTS[0], latents=noise, height=16, width=16, output_type="latent", num_inference_steps=steps,
                     guidance_scale=1.0 + 0.5 / steps).images  # another interval: another image
        assert (wrong - stock).abs().max() > 1e-3
    assert (outs[1] - outs[2]).abs().max() > 1e-3


def test_meanflow_with_the_adversarial_term_on_a_vp_teacher(teachers, tmp_path):
    """--adv_weight on MeanFlow through the RF view of an SD teacher (the view carries the student's adapter, which
    the term re-activates before the backward): the heads train and the student reloads as the teacher's class."""
    out = str(tmp_path / "mf_adv")
    run_script("meanflow", ["--pretrained_model_name_or_path", teachers["sd"], "--train_data_dir", teachers["images"],
                            "--output_dir", out, "--max_train_steps", "2", "--train_batch_size", "2", "--resolution", "16",
                            "--report_to", "none", "--guidance_scale", "1", "--learning_rate", "1e-3", "--logging_steps",
                            "1", "--adv_weight", "0.5"])
    last = json.load(open(os.path.join(out, "run_summary.json")))["last_scalars"]
    assert math.isfinite(last["adversarial_loss"]) and last["heads_loss"] > 0
    assert type(DiffusionPipeline.from_pretrained(out).unet).__name__ == "UNet2DConditionModel"


def test_meanflow_needs_a_unet_pipeline_and_real_images(teachers, tmp_path):
    base = ["--output_dir", str(tmp_path / "x"), "--resolution", "16", "--report_to", "none"]
    with pytest.raises(ValueError, match="is a FluxPipeline: MeanFlow students here are UNet students"):
        run_script("meanflow", ["--pretrained_model_name_or_path", teachers["flux"], "--train_data_dir",
                                teachers["images"], *base])
    with pytest.raises(ValueError, match="needs real images"):
        run_script("meanflow", ["--pretrained_model_name_or_path", teachers["sd"], "--prompts", teachers["prompts"], *base])
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("name", list(TEACHERS))
def test_dmd2_full_student_is_the_teachers_pipeline_class_and_samples_its_recipe(teachers, name, tmp_path):
    out = str(tmp_path / "student")
    run_script("dmd2", _argv(teachers, name, out))
    pipe = DiffusionPipeline.from_pretrained(out)  # stock loading, no diffusers_fastgen class in the folder
    teacher = TextToImageTeacher(teachers[name], resolution=16, guidance_scale=2.0)
    assert type(pipe) is type(teacher.pipe)
    assert type(AutoPipelineForText2Image.from_pretrained(out)) is type(pipe)
    expected = LCMScheduler if name.startswith("sd") and name != "sd3" else FlowMatchEulerDiscreteScheduler
    assert type(pipe.scheduler) is expected
    trained, base = getattr(pipe, teacher.component).state_dict(), teacher.model.state_dict()
    assert sum(not torch.equal(trained[k], base[k]) for k in base) > len(base) // 2
    assert "DMD2" in open(os.path.join(out, "README.md")).read()
    teacher = TextToImageTeacher(out, resolution=16, guidance_scale=2.0)  # the student folder, same helpers
    _stock_equals_training_rollout(teacher, pipe, 2)


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "qwen"])
def test_dmd2_lora_student_loads_with_load_lora_weights(teachers, name, tmp_path):
    out = str(tmp_path / "lora")
    run_script("dmd2", _argv(teachers, name, out, "--lora_rank", "4"))
    saved = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    teacher = TextToImageTeacher(teachers[name], resolution=16, guidance_scale=2.0)
    pipe = teacher.pipe
    pipe.load_lora_weights(out)
    recipe = LCMScheduler if teacher.kind in ("sd", "sdxl") else FlowMatchEulerDiscreteScheduler
    pipe.scheduler = recipe.from_pretrained(out, subfolder="scheduler")
    # Every saved tensor is in the model (strictly applied), and training moved the B matrices.
    model = teacher.model
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved)
    assert any(p.abs().max() > 0 for n, p in loaded.items() if "lora_B" in n)
    assert all(isinstance(m, BaseTunerLayer) for n, m in model.named_modules() if n.endswith(".to_q"))
    _stock_equals_training_rollout(teacher, pipe, 2)


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_frozen_teacher_trains_fp32_players_and_saves_one_dtype(teachers, tmp_path, lora):
    """--weight_dtype bf16: the frozen teacher (and text encoders) in bf16, the trained players in fp32; the
    saved folder is fp32 throughout and samples its recipe with stock diffusers."""
    out = str(tmp_path / "bf16")
    run_script("dmd2", _argv(teachers, "sd", out, "--weight_dtype", "bf16", *(["--lora_rank", "4"] if lora else [])))
    if lora:
        saved = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
        assert {v.dtype for v in saved.values()} == {torch.float32}
        return
    pipe = DiffusionPipeline.from_pretrained(out)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.float32}
    _stock_equals_training_rollout(TextToImageTeacher(out, resolution=16), pipe, 2)


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux_guidance", "qwen"])
def test_kd_student_samples_its_deterministic_recipe_with_stock_diffusers(teachers, name, tmp_path):
    """KD on teacher ODE pairs: the student is saved with DDIM (trailing timesteps, VP) or the plain
    flow-matching Euler step (RF): x0, then the noise the ODE state implies."""
    out = str(tmp_path / "kd")
    run_script("kd", ["--pretrained_model_name_or_path", teachers[name], "--prompts", teachers["prompts"],
                      "--output_dir", out, "--max_train_steps", "2", "--train_batch_size", "2", "--num_student_steps", "2",
                      "--teacher_steps", "4", "--num_pairs", "4", "--pairs_batch_size", "2", "--resolution", "16",
                      "--report_to", "none", "--validation_steps", "2", "--teacher_guidance_scale", "2",
                      "--learning_rate", "1e-3"])
    assert os.listdir(os.path.join(out, "samples")) == ["step_000002.png"]  # its deterministic 1-step grid
    pipe = DiffusionPipeline.from_pretrained(out)
    expected = DDIMScheduler if name in ("sd", "sdxl") else FlowMatchEulerDiscreteScheduler
    assert type(pipe.scheduler) is expected and not pipe.scheduler.config.get("stochastic_sampling", False)
    _stock_equals_training_rollout(TextToImageTeacher(out, resolution=16, guidance_scale=2.0), pipe, 2, stochastic=False)


@pytest.mark.parametrize("name,extra", [("sd", []), ("sd3", []), ("flux_guidance", []), ("qwen", []),
                                        ("sd", ["--adv_weight", "0.5", "--adv_num_steps", "2", "--weight_dtype", "bf16"]),
                                        ("sd3", ["--adv_weight", "0.5", "--adv_feature_modules", "transformer_blocks.0"])])
def test_cm_on_real_images_samples_its_recipe_with_stock_diffusers(teachers, name, extra, tmp_path):
    """Consistency distillation from real images (LCM-style for SD): images and captions are encoded once into
    shards; the 1-step student reloads as the teacher's class and its stock call is the trained sampler. With the
    adversarial term (heads on the teacher's features, real latents with their captions) the same holds."""
    out = str(tmp_path / "cm")
    run_script("cm", ["--pretrained_model_name_or_path", teachers[name], "--train_data_dir", teachers["images"],
                      "--output_dir", out, "--max_train_steps", "2", "--train_batch_size", "2", "--resolution", "16",
                      "--report_to", "none", "--guidance_scale", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
                      *extra])
    if extra:
        last = json.load(open(os.path.join(out, "run_summary.json")))["last_scalars"]
        assert math.isfinite(last["adversarial_loss"]) and last["heads_loss"] > 0
    pipe = DiffusionPipeline.from_pretrained(out)
    expected = LCMScheduler if name == "sd" else FlowMatchEulerDiscreteScheduler
    assert type(pipe.scheduler) is expected
    teacher = TextToImageTeacher(out, resolution=16, guidance_scale=2.0)
    for steps in (1, 2):
        _stock_equals_training_rollout(teacher, pipe, steps)


def test_cm_card_samples_tcd_gamma_steps_with_stock_tcdscheduler(teachers, tmp_path):
    """--tcd_gamma 0.5 --tcd_steps 3 on an SD teacher: the weights are those of the run without it, the card's code
    runs as written (1 and 2 steps with the saved LCMScheduler, then stock TCDScheduler on its config), and its
    3-step call is TCD's gamma sampler, checked against an independent rollout: x0 and the implied noise at t_i, a
    DDIM step to s = floor((1 - gamma) t_{i+1}), fresh noise from s to t_{i+1} (the last step ends at x_s, s = 0)."""
    argv = ["--pretrained_model_name_or_path", teachers["sd"], "--train_data_dir", teachers["images"], "--max_train_steps",
            "2", "--train_batch_size", "2", "--resolution", "16", "--report_to", "none", "--learning_rate", "1e-3"]
    out, plain = str(tmp_path / "tcd"), str(tmp_path / "plain")
    run_script("cm", [*argv, "--output_dir", out, "--tcd_gamma", "0.5", "--tcd_steps", "3"])
    run_script("cm", [*argv, "--output_dir", plain])
    assert load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")).keys() and all(
        torch.equal(v, load_file(os.path.join(plain, "unet", "diffusion_pytorch_model.safetensors"))[k])
        for k, v in load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")).items())
    card = open(os.path.join(out, "README.md")).read()
    code = card.split("```python\n")[1].split("```")[0]
    assert code.count("pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)") == 1
    assert code.index("num_inference_steps=2") < code.index("TCDScheduler.from_config") < code.index("eta=0.5")
    scope = {}
    exec(code, scope)  # the card as a user pastes it
    assert type(scope["pipe"].scheduler).__name__ == "TCDScheduler"

    teacher = TextToImageTeacher(out, resolution=16)
    recipe = teacher.tcd_sampling_kwargs(3, 0.5)
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    call = apply_recipe(pipe, recipe)
    assert type(pipe.scheduler).__name__ == "TCDScheduler" and "scheduler" not in call
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, *teacher.latent_shape, generator=g)
    fresh = [torch.randn(1, *teacher.latent_shape, generator=g) for _ in range(2)]
    draws = iter(fresh)
    with mock.patch.object(scheduling_tcd, "randn_tensor", lambda shape, **kw: next(draws)):
        stock = pipe(PROMPTS[0], latents=noise, height=16, width=16, output_type="latent", **call).images
    timesteps = pipe.scheduler.timesteps.tolist()
    assert len(timesteps) == 3 and timesteps[0] == 999
    abar = pipe.scheduler.alphas_cumprod.double()
    cond = teacher.cond(teacher._encode([PROMPTS[0]]), None, "cpu")
    x = noise.double()
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            eps = pipe.unet(x.float(), t, encoder_hidden_states=cond["encoder_hidden_states"]).sample.double()
            x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
            nxt = timesteps[i + 1] if i + 1 < len(timesteps) else 0
            s = int((1 - 0.5) * nxt)
            x_s = abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * eps
            x = x_s if i + 1 == len(timesteps) else ((abar[nxt] / abar[s]).sqrt() * x_s
                                                     + (1 - abar[nxt] / abar[s]).sqrt() * fresh[i].double())
    torch.testing.assert_close(stock.double(), x, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="tcd_gamma` must be in"):
        teacher.tcd_sampling_kwargs(3, float("nan"))


@pytest.mark.parametrize("extra,match", [(["--tcd_gamma", "1.5"], "tcd_gamma` must be in"),
                                         (["--tcd_gamma", "nan"], "tcd_gamma` must be a finite number"),
                                         (["--tcd_gamma", "0.5", "--tcd_steps", "1"], "tcd_steps` must be >= 2"),
                                         (["--tcd_gamma", "0.5", "--teacher_name", "sd3"], "SD1.5 / SDXL teacher")])
def test_cm_tcd_gamma_is_checked_before_any_work(teachers, tmp_path, extra, match):
    name = "sd3" if "--teacher_name" in extra else "sd"
    extra = [e for e in extra if e not in ("--teacher_name", "sd3")]
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        run_script("cm", ["--pretrained_model_name_or_path", teachers[name], "--train_data_dir", teachers["images"],
                          "--output_dir", str(out), "--resolution", "16", *extra])
    assert not out.exists()


@pytest.mark.parametrize("name,feature", [("sd", "mid_block"), ("sd3", "transformer_blocks.0")])
def test_dmd2_gan_branch_on_real_images_with_their_captions(teachers, name, feature, tmp_path):
    """With real images the captions condition the student and the GAN / R1 terms see the real latents;
    a 2-step student from noised real data (backward_simulation false) samples its recipe."""
    out = str(tmp_path / "gan")
    argv = _argv(teachers, name, out, "--train_data_dir", teachers["images"], "--gan_generator_weight", "0.1",
                 "--gan_feature_module", feature, "--r1_weight", "0.1", "--backward_simulation", "false")
    del argv[2:4]  # no prompt file: the captions are the prompts
    run_script("dmd2", argv)
    pipe = DiffusionPipeline.from_pretrained(out)
    _stock_equals_training_rollout(TextToImageTeacher(out, resolution=16, guidance_scale=2.0), pipe, 2)


@pytest.mark.parametrize("script,name,extra", [
    ("ladd", "sd", ["--weight_dtype", "bf16"]),  # a bf16 frozen teacher's features into fp32 heads
    ("ladd", "sd3", ["--feature_modules", "transformer_blocks.0", "--lora_rank", "4"]),
    ("fdistill", "sd", ["--divergence", "js"]), ("fdistill", "flux", ["--gan_feature_module", "transformer_blocks.0"]),
    ("ladd", "qwen", ["--feature_modules", "transformer_blocks.0", "--lora_rank", "4"]),
    ("fdistill", "qwen", ["--gan_feature_module", "transformer_blocks.0", "--divergence", "kl"]),
    ("dmd2", "sd", ["--adv_weight", "0.5", "--lora_rank", "4", "--gradient_checkpointing"]),  # LADD heads beside DMD
])
def test_adversarial_scripts_on_real_images_sample_their_recipe(teachers, script, name, extra, tmp_path):
    """LADD (heads on the teacher's features; also as DMD2's --adv_weight) and f-distill (head on the fake
    score's) on real images with their captions; full students reload as the teacher's class, LoRA ones through
    load_lora_weights."""
    out = str(tmp_path / script)
    run_script(script, ["--pretrained_model_name_or_path", teachers[name], "--train_data_dir", teachers["images"],
                        "--output_dir", out, "--max_train_steps", "2", "--train_batch_size", "2", "--student_update_freq",
                        "2", "--num_student_steps", "2", "--resolution", "16", "--report_to", "none",
                        "--validation_steps", "0", "--learning_rate", "1e-3", *extra])
    teacher = TextToImageTeacher(out if "--lora_rank" not in extra else teachers[name], resolution=16)
    if "--lora_rank" in extra:
        pipe = teacher.pipe
        pipe.load_lora_weights(out)
        recipe = LCMScheduler if teacher.kind in ("sd", "sdxl") else FlowMatchEulerDiscreteScheduler
        pipe.scheduler = recipe.from_pretrained(out, subfolder="scheduler")
    else:
        pipe = DiffusionPipeline.from_pretrained(out)
    card = open(os.path.join(out, "README.md")).read()
    method = dict(ladd="LADD", fdistill="f-distill", dmd2="DMD2")[script]
    assert type(pipe) is type(teacher.pipe) and f"distilled with {method}" in card
    _stock_equals_training_rollout(teacher, pipe, 2)


def test_dmd2_student_frozen_modules_keep_the_teachers_weights(teachers, tmp_path):
    """--student_frozen_modules attn2.to_k attn2.to_v: every cross-attention key / value projection of the saved
    student is the teacher's, bit for bit, while the rest trained; a name matching nothing, or a LoRA run, is refused."""
    out = str(tmp_path / "dmd2")
    run_script("dmd2", _argv(teachers, "sd", out, "--student_frozen_modules", "attn2.to_k", "attn2.to_v"))
    teacher = load_file(os.path.join(teachers["sd"], "unet", "diffusion_pytorch_model.safetensors"))
    student = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    frozen = [k for k in teacher if ".attn2.to_k." in k or ".attn2.to_v." in k]
    assert frozen and all(torch.equal(teacher[k], student[k]) for k in frozen)
    changed = [k for k in teacher if not torch.equal(teacher[k], student[k])]
    assert changed and not set(changed) & set(frozen) and any(".attn2.to_q." in k for k in changed)
    with pytest.raises(ValueError, match=r"`student_frozen_modules` \['attn9'\] match no module"):
        run_script("dmd2", _argv(teachers, "sd", str(tmp_path / "bad"), "--student_frozen_modules", "attn9"))
    with pytest.raises(ValueError, match="student_frozen_modules` is for full fine-tuning"):
        run_script("dmd2", _argv(teachers, "sd", str(tmp_path / "bad2"), "--student_frozen_modules", "attn2.to_k",
                                 "--lora_rank", "4"))


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_dmd2_student_told_an_earlier_time_samples_it_from_pure_noise(teachers, name, tmp_path):
    """--student_times 0.4 0.2 (DMD2's conditioning timestep): the first step gets pure noise but is told t = 0.4;
    the card's stock call (timesteps [400, 200] / sigmas [0.4, 0.2]) samples exactly the trained rollout."""
    out = str(tmp_path / "dmd2")
    run_script("dmd2", _argv(teachers, name, out, "--student_times", "0.4", "0.2"))
    pipe = DiffusionPipeline.from_pretrained(out)
    teacher = TextToImageTeacher(out, resolution=16, guidance_scale=2.0)
    teacher.set_custom_schedule([0.4, 0.2], noise_input=True)
    call = teacher.sampling_kwargs(2)
    assert call.get("timesteps", call.get("sigmas")) == ([400, 200] if name == "sd" else [0.4, 0.2])
    card = open(os.path.join(out, "README.md")).read()
    assert str(call.get("timesteps", call.get("sigmas"))) in card and card.count("num_inference_steps=") == 1
    _stock_equals_training_rollout(teacher, pipe, 2)
    with pytest.raises(ValueError, match="start at 1"):  # without noise_input a schedule must start at pure noise
        teacher.set_custom_schedule([0.4, 0.2])
    if name == "sd":  # a 1-step student told 0.4: its card gives only that call (a 2-step call would start at 999)
        one = str(tmp_path / "one")
        run_script("dmd2", _argv(teachers, name, one, "--num_student_steps", "1", "--student_times", "0.4"))
        card = open(os.path.join(one, "README.md")).read()
        assert "num_inference_steps=1, timesteps=[400]" in card and card.count("num_inference_steps=") == 1


@pytest.mark.parametrize("name", ["sd", "sd3", "qwen"])
def test_scd_on_real_images_samples_its_trigflow_schedule_with_stock_diffusers(teachers, name, tmp_path):
    """sCD through the TrigFlow view of a VP (SD) or RF (SD3) teacher: 1 step from noise, 2 steps through the
    point whose noise ratio is sigma_d tan(intermediate_t), passed to the stock call as timesteps / sigmas."""
    out = str(tmp_path / "scm")
    run_script("scm", ["--pretrained_model_name_or_path", teachers[name], "--train_data_dir", teachers["images"],
                       "--output_dir", out, "--max_train_steps", "2", "--train_batch_size", "2", "--resolution", "16",
                       "--report_to", "none", "--validation_steps", "0", "--learning_rate", "1e-3",
                       "--sigma_d", "0.5", "--intermediate_t", "1.1"])
    pipe = DiffusionPipeline.from_pretrained(out)
    teacher = TextToImageTeacher(out, resolution=16)
    ratio = torch.tensor(0.5 * math.tan(1.1), dtype=torch.float64)
    mid = float(teacher.process.t_from_noise_ratio(ratio))
    if name != "sd":  # RF: the noise ratio r is at t = r / (1 + r), and the saved scheduler does not re-shift it
        assert abs(mid - float(ratio / (1 + ratio))) < 1e-6 and pipe.scheduler.config.shift == 1.0
    teacher.set_custom_schedule([1.0, mid])
    key = "timesteps" if name == "sd" else "sigmas"
    assert str(teacher.sampling_kwargs(2)[key]) in open(os.path.join(out, "README.md")).read()  # the card's 2-step call
    for steps in (1, 2):
        _stock_equals_training_rollout(teacher, pipe, steps)


@pytest.mark.parametrize("name", ["sd", "sd3", "qwen"])
def test_tcm_stage2_from_a_text_to_image_cm_student(teachers, name, tmp_path):
    """TCM stage 2 on a train_cm student of the same teacher (its class is checked); the boundary t' is a time of
    the teacher's own process (VP or RF) and the saved sampler is the stock one."""
    common = ["--pretrained_model_name_or_path", teachers[name], "--train_data_dir", teachers["images"],
              "--max_train_steps", "2", "--train_batch_size", "2", "--resolution", "16", "--report_to", "none",
              "--validation_steps", "0", "--learning_rate", "1e-3"]
    stage1, out = str(tmp_path / "cm"), str(tmp_path / "tcm")
    run_script("cm", [*common, "--output_dir", stage1])
    run_script("tcm", [*common, "--output_dir", out, "--stage1", stage1, "--boundary_fraction", "0.5"])
    pipe = DiffusionPipeline.from_pretrained(out)
    teacher = TextToImageTeacher(out, resolution=16)
    for steps in (1, 2):
        _stock_equals_training_rollout(teacher, pipe, steps)
    with pytest.raises(ValueError, match="holds a DigitsPipeline"):
        from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH

        run_script("tcm", [*common, "--output_dir", str(tmp_path / "bad"), "--stage1", DIGITS_TEACHER_PATH])


def test_real_images_need_a_dataset_with_the_columns(teachers, tmp_path):
    argv = ["--pretrained_model_name_or_path", teachers["sd"], "--output_dir", str(tmp_path / "x"), "--report_to", "none"]
    with pytest.raises(ValueError, match="needs real images"):
        run_script("cm", argv)
    with pytest.raises(ValueError, match="is not a folder"):
        run_script("cm", argv + ["--train_data_dir", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="`image_column` 'picture' is not a column"):
        run_script("cm", argv + ["--train_data_dir", teachers["images"], "--image_column", "picture"])
    with pytest.raises(ValueError, match="`caption_column` 'caption' is not a column"):
        run_script("cm", argv + ["--train_data_dir", teachers["images"], "--caption_column", "caption"])
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("name,extra", [("sd", []), ("sd3", ["--lora_rank", "4"]), ("flux_guidance", []),
                                        ("sdxl", ["--weight_dtype", "bf16"]), ("qwen", ["--weight_dtype", "bf16"])])
def test_validation_grids_do_not_change_training(teachers, name, extra, tmp_path):
    """--validation_steps on the text-to-image path: a grid of the EMA student through the teacher's class with
    precomputed embeddings at every N steps; the trained weights are bit-identical to a run without them."""
    runs = {}
    for every in ("0", "1"):
        out = str(tmp_path / f"v{every}")
        argv = _argv(teachers, name, out, *extra)
        argv[argv.index("--validation_steps") + 1] = every
        run_script("dmd2", argv)
        runs[every] = out
    assert sorted(os.listdir(os.path.join(runs["1"], "samples"))) == ["step_000001.png", "step_000002.png"]
    assert Image.open(os.path.join(runs["1"], "samples", "step_000002.png")).size[1] >= 16
    weights = "pytorch_lora_weights.safetensors" if extra[:1] == ["--lora_rank"] else os.path.join(
        "unet" if name.startswith("sd") and name != "sd3" else "transformer", "diffusion_pytorch_model.safetensors")
    a, b = (load_file(os.path.join(runs[e], weights)) for e in ("0", "1"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["sd", "qwen"])
def test_embedding_cache_gives_the_same_student_bit_for_bit(teachers, name, tmp_path):
    """Qwen-Image's prompts differ in length: every shard (and the negative) is padded to one length."""
    cache = str(tmp_path / "cache")
    run_script("dmd2", _argv(teachers, name, str(tmp_path / "plain"), "--encode_batch_size", "3"))
    run_script("dmd2", _argv(teachers, name, str(tmp_path / "cached"), "--embeddings_cache", cache,
                             "--encode_batch_size", "3"))
    shards = sorted(os.listdir(os.path.join(cache, os.listdir(cache)[0])))
    assert shards == ["negative.safetensors", "shard-00000.safetensors", "shard-00001.safetensors"]
    mtimes = {s: os.path.getmtime(os.path.join(cache, os.listdir(cache)[0], s)) for s in shards}
    run_script("dmd2", _argv(teachers, name, str(tmp_path / "again"), "--embeddings_cache", cache,
                             "--encode_batch_size", "3"))  # reads the shards, writes none
    assert mtimes == {s: os.path.getmtime(os.path.join(cache, os.listdir(cache)[0], s)) for s in shards}
    denoiser = "unet" if name == "sd" else "transformer"
    weights = [load_file(str(tmp_path / d / denoiser / "diffusion_pytorch_model.safetensors"))
               for d in ("plain", "cached", "again")]
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]) and torch.equal(weights[0][k], weights[2][k])


@pytest.mark.parametrize("extra,match", [
    ([], None),  # filled in below: the digits folder is not a text-to-image pipeline
    (["--gan_generator_weight", "0.1"], "real images"),
    (["--weight_dtype", "fp16"], "fp16 needs a GPU"),
    (["--resolution", "6"], "multiple of 4"),
    (["--push_to_hub"], "HF_HUB_OFFLINE"),
    (["--lora_alpha", "8"], "need `lora_rank`"),
    (["--student_times", "0.5"], "student_times` must be 2 decreasing"),
    (["--student_times", "0.5", "nan"], "student_times` must be a finite number"),
    (["--student_times", "0.4", "0.6"], "student_times` must be 2 decreasing"),
    (["--student_times", "1.5", "0.6"], "student_times` must be 2 decreasing"),
    (["--student_times", "0.5", "0.2", "--adv_weight", "0.1", "--train_data_dir", "IMAGES"], "adv_num_steps` must be 2"),
])
def test_bad_text_to_image_arguments_are_named_before_any_work(teachers, tmp_path, extra, match):
    out = str(tmp_path / "bad")
    argv = _argv(teachers, "flux", out, *(teachers["images"] if a == "IMAGES" else a for a in extra))
    if match is None:
        from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH

        argv[1], match = DIGITS_TEACHER_PATH, "DigitsPipeline; supported"
    with pytest.raises(ValueError, match=match):
        run_script("dmd2", argv)
    assert not os.path.exists(out)


def test_lora_target_modules_and_alpha_reach_the_adapters(teachers, tmp_path):
    out = str(tmp_path / "targets")
    run_script("dmd2", _argv(teachers, "sd3", out, "--lora_rank", "4", "--lora_alpha", "2",
                             "--lora_target_modules", "to_q", "to_v"))
    saved = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    kinds = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in saved}
    assert kinds == {"to_q", "to_v"}
    teacher = TextToImageTeacher(teachers["sd3"], resolution=16)
    teacher.pipe.load_lora_weights(out)
    layer = teacher.model.transformer_blocks[0].attn.to_q
    assert layer.scaling[next(iter(layer.scaling))] == 0.5  # alpha / rank
    with pytest.raises(ValueError, match="none of `target_modules`"):
        run_script("dmd2", _argv(teachers, "sd3", str(tmp_path / "none"), "--lora_rank", "4",
                                 "--lora_target_modules", "no_such_layer"))


def test_bad_prompt_files_are_named(teachers, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"caption": "a cat"}\n')
    for prompts, match in ((str(tmp_path / "missing.txt"), "neither a .txt"), (str(empty), "holds no prompt"),
                           (str(jsonl), "caption_column")):
        argv = _argv(teachers, "sd", str(tmp_path / "out"))
        argv[3] = prompts
        with pytest.raises(ValueError, match=match):
            run_script("dmd2", argv)
    argv = _argv(teachers, "sd", str(tmp_path / "out"))
    del argv[2:4]
    with pytest.raises(ValueError, match="needs `prompts`"):
        run_script("dmd2", argv)


def test_prompts_from_a_datasets_folder_read_only_the_caption_column(teachers, tmp_path):
    from diffusers_fastgen.training.teachers import load_prompts

    # an imagefolder dataset (images + metadata.jsonl): the captions, in order, images never needed
    assert sorted(load_prompts(teachers["images"])) == sorted(PROMPTS + ["a small digit", "the big one"])
    folder = tmp_path / "csv_dataset"
    folder.mkdir()
    (folder / "train.csv").write_text("id,caption\n1,a red cat\n2,\n3,three green apples\n")
    assert load_prompts(str(folder), "caption") == ["a red cat", "three green apples"]
    with pytest.raises(ValueError, match="caption_column"):
        load_prompts(str(folder), "text")
    run_script("dmd2", _argv(teachers, "sd", str(tmp_path / "out"))[:3] + [str(folder), "--caption_column", "caption"]
               + _argv(teachers, "sd", str(tmp_path / "out"))[4:])
    assert os.path.isfile(tmp_path / "out" / "model_index.json")


def _denoising_mse(pipe, latents, cond, *, target: str, seed: int = 0) -> float:
    """The stock scheduler's own forward process (add_noise) and target (noise or get_velocity) at fixed
    timesteps and noise: an independent measure of how well `pipe.unet` fits `latents`."""
    g = torch.Generator().manual_seed(seed)
    sched, total = pipe.scheduler, 0.0
    for timestep in (100, 400, 700, 950):
        t = torch.full((latents.shape[0],), timestep, dtype=torch.long)
        noise = torch.randn(latents.shape, generator=g)
        x_t = sched.add_noise(latents, noise, t)
        want = noise if target == "epsilon" else sched.get_velocity(latents, noise, t)
        with torch.no_grad():
            pred = pipe.unet(x_t, t, encoder_hidden_states=cond).sample
        total += (pred - want).square().mean().item()
    return total / 4


@pytest.mark.parametrize("name,target", [("sd", "epsilon"), ("sd_v", "v_prediction")])
def test_sft_fits_the_captioned_images_in_the_teachers_own_target(teachers, name, target, tmp_path):
    """SFT on a stock SD pipeline: the saved folder is the same pipeline class with the teacher's own scheduler,
    and its UNet fits the encoded training latents better than the starting UNet in the scheduler's own target
    (eps or v): training toward the wrong target would make this worse."""
    from diffusers_fastgen.training.image_data import LatentShards

    out = str(tmp_path / "sft")
    run_script("sft", ["--pretrained_model_name_or_path", teachers[name], "--train_data_dir", teachers["images"],
                       "--resolution", "16", "--output_dir", out, "--max_train_steps", "25", "--train_batch_size", "6",
                       "--learning_rate", "2e-3", "--lr_warmup_steps", "0", "--ema_schedule", "constant",
                       "--ema_decay", "0", "--cond_dropout", "0", "--validation_steps", "0", "--checkpointing_steps", "0",
                       "--validation_num_inference_steps", "3", "--report_to", "none"])
    before, after = DiffusionPipeline.from_pretrained(teachers[name]), DiffusionPipeline.from_pretrained(out)
    assert type(after) is type(before) and type(after.scheduler) is type(before.scheduler)
    assert dict(after.scheduler.config) == dict(before.scheduler.config)
    folder = next(os.path.join(out, "latents", d) for d in os.listdir(os.path.join(out, "latents")))
    rows = LatentShards(folder).rows(torch.arange(6))
    latents, cond = rows["latents"], rows["encoder_hidden_states"]
    first, last = (_denoising_mse(p, latents, cond, target=target) for p in (before, after))
    assert last < 0.8 * first, (first, last)
    card = open(os.path.join(out, "README.md")).read()
    assert "fine-tuned with SFT" in card and "num_inference_steps=3" in card
    assert os.path.isfile(os.path.join(out, "samples.png"))


def test_sft_caption_dropout_replaces_whole_rows_by_the_negative_prompt():
    from diffusers_fastgen.training.teachers import drop_prompts

    cond = {"encoder_hidden_states": torch.randn(4000, 3, 2) + 5,
            "added_cond_kwargs": {"text_embeds": torch.randn(4000, 2) + 5, "time_ids": torch.ones(4000, 6)}}
    uncond = {"encoder_hidden_states": torch.zeros(4000, 3, 2),
              "added_cond_kwargs": {"text_embeds": torch.zeros(4000, 2), "time_ids": torch.ones(4000, 6)}}
    assert drop_prompts(cond, uncond, 0.0) is cond
    for seed in range(3):
        out = drop_prompts(cond, uncond, 0.25, generator=torch.Generator().manual_seed(seed))
        dropped = (out["encoder_hidden_states"] == 0).all(dim=(1, 2))
        kept = (out["encoder_hidden_states"] == cond["encoder_hidden_states"]).all(dim=(1, 2))
        assert bool((dropped ^ kept).all())  # whole rows, one or the other
        assert torch.equal((out["added_cond_kwargs"]["text_embeds"] == 0).all(dim=1), dropped)  # nested: same rows
        assert abs(dropped.float().mean().item() - 0.25) < 0.03
    with pytest.raises(ValueError, match="cond_dropout"):
        drop_prompts(cond, uncond, 1.0)


@pytest.mark.parametrize("extra,match", [
    ([], "needs real images"),  # SFT learns from images, not from a prompt file alone
    (["--train_data_dir", "IMAGES", "--init_from", "TEACHER"], "init_from"),
])
def test_sft_text_to_image_arguments_are_named_before_any_work(teachers, tmp_path, extra, match):
    argv = ["--pretrained_model_name_or_path", teachers["sd"], "--output_dir", str(tmp_path / "o"),
            *[teachers["images"] if a == "IMAGES" else teachers["sd"] if a == "TEACHER" else a for a in extra]]
    with pytest.raises(ValueError, match=match):
        run_script("sft", argv)
    assert not os.path.exists(tmp_path / "o")


def test_the_shipped_text_digits_teacher_distils_through_the_real_pipeline_flags(tmp_path):
    """The shipped StableDiffusionPipeline of the digits goes through the same flags as a user's SD1.5: DMD2
    on its prompt file, saved as a stock StableDiffusionPipeline with an LCMScheduler recipe."""
    from diffusers import StableDiffusionPipeline

    from diffusers_fastgen.evaluation.text_digits import TEXT_DIGITS_PROMPTS_PATH, TEXT_DIGITS_TEACHER_PATH

    out = str(tmp_path / "student")
    run_script("dmd2", ["--pretrained_model_name_or_path", TEXT_DIGITS_TEACHER_PATH, "--prompts",
                        TEXT_DIGITS_PROMPTS_PATH, "--resolution", "16", "--output_dir", out, "--max_train_steps", "2",
                        "--train_batch_size", "4", "--student_update_freq", "2", "--guidance_scale", "2",
                        "--report_to", "none", "--validation_steps", "0"])
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is StableDiffusionPipeline and type(pipe.scheduler) is LCMScheduler
    images = pipe(["the handwritten number 3"], num_inference_steps=1, guidance_scale=1.0, height=16, width=16,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and bool(torch.isfinite(images).all())


def test_sft_on_qwen_image_keeps_its_class_scheduler_and_text_mask(teachers, tmp_path):
    out = str(tmp_path / "sft_qwen")
    run_script("sft", ["--pretrained_model_name_or_path", teachers["qwen"], "--train_data_dir", teachers["images"],
                       "--resolution", "16", "--output_dir", out, "--max_train_steps", "2", "--train_batch_size", "2",
                       "--validation_steps", "0", "--checkpointing_steps", "0", "--max_sequence_length", "40",
                       "--validation_num_inference_steps", "3", "--report_to", "none"])
    before, after = DiffusionPipeline.from_pretrained(teachers["qwen"]), DiffusionPipeline.from_pretrained(out)
    assert type(after) is type(before) and dict(after.scheduler.config) == dict(before.scheduler.config)
    trained, base = after.transformer.state_dict(), before.transformer.state_dict()
    assert sum(not torch.equal(trained[k], base[k]) for k in base) > len(base) // 2
    folder = next(os.path.join(out, "latents", d) for d in os.listdir(os.path.join(out, "latents")))
    from diffusers_fastgen.training.image_data import LatentShards

    rows = LatentShards(folder).rows(torch.arange(6))
    assert rows["encoder_hidden_states"].shape[1] == 40  # every caption padded to --max_sequence_length
    lengths = rows["encoder_hidden_states_mask"].sum(1)
    assert lengths.max() < 40 and len(set(lengths.tolist())) > 1  # the padding is masked; captions differ in length
    assert "num_inference_steps=3, true_cfg_scale=1.0, max_sequence_length=40" in open(os.path.join(out, "README.md")).read()
