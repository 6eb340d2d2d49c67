"""`diffusers-fastgen generate`: the images it writes are the pipeline's own outputs for the seeds; videos
stream block by block; bad input is one line and exit status 2."""

import os

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from diffusers_fastgen.cli import main
from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.evaluation.moving_digits import MOVING_DIGITS_TEACHER_PATH
from diffusers_fastgen.generate import load_pipeline, to_channels_last
from diffusers_fastgen.models.digits import digits_unet
from diffusers_fastgen.pipelines import CausalWanPipeline, DigitsPipeline
from diffusers_fastgen.schedulers import FlowMatchFewStepScheduler, causal_scheduler, flow_map_scheduler
from diffusers_fastgen.testing import tiny as T


def _png(path):
    return np.asarray(Image.open(path), dtype=np.float32) / 255


def test_digits_images_are_the_pipelines_own_for_each_seed(tmp_path, capsys):
    out = str(tmp_path / "gen")
    assert main(["generate", "--model", DIGITS_TEACHER_PATH, "--class_labels", "3", "7", "--num_images", "2",
                 "--batch_size", "2", "--steps", "4", "--seed", "5", "--repeats", "2", "--output_dir", out]) == 0
    table = capsys.readouterr().out
    assert "| 2 x 2 |" in table and "images / s" in table
    pipe = DigitsPipeline.from_pretrained(DIGITS_TEACHER_PATH)
    pipe.set_progress_bar_config(disable=True)
    for b, labels in enumerate(([3, 3], [7, 7])):  # batch b uses seed + b
        ref = pipe(labels, num_inference_steps=4, generator=torch.Generator().manual_seed(5 + b), output_type="np").images
        for j in range(2):
            expected = np.round(np.clip(ref[j, ..., 0], 0, 1) * 255) / 255
            np.testing.assert_allclose(_png(os.path.join(out, f"image_{2 * b + j:03d}.png")), expected, atol=1e-6)
    assert os.path.isfile(os.path.join(out, "grid.png"))


def test_stock_pipeline_folder_with_its_steps(tmp_path):
    model = str(tmp_path / "sd")
    T.tiny_pipeline("sd", DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)).save_pretrained(model)
    out = str(tmp_path / "gen")
    assert main(["generate", "--model", model, "--prompt", "a red cat", "--steps", "3", "--height", "16", "--width",
                 "16", "--guidance_scale", "1", "--seed", "1", "--output_dir", out]) == 0
    pipe = DigitsPipeline  # noqa: F841 (keep the import list honest)
    from diffusers import DiffusionPipeline

    ref = DiffusionPipeline.from_pretrained(model)
    ref.set_progress_bar_config(disable=True)
    torch.manual_seed(1)
    image = ref("a red cat", num_inference_steps=3, height=16, width=16, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(1), output_type="np").images[0]
    np.testing.assert_allclose(_png(os.path.join(out, "image_000.png")), np.round(image * 255) / 255, atol=1e-6)


def test_causal_video_streams_blocks_to_disk(tmp_path, capsys):
    model = str(tmp_path / "causal")
    CausalWanPipeline(transformer=T.tiny_wan_transformer(num_layers=1), scheduler=FlowMatchFewStepScheduler(),
                      tokenizer=T.tiny_tokenizer(model_max_length=8),
                      text_encoder=T.tiny_t5_text_encoder(T.tiny_tokenizer(model_max_length=8), umt5=True),
                      num_frames_per_block=1, denoising_timesteps=[1000, 500]).save_pretrained(model)
    out = str(tmp_path / "gen")
    assert main(["generate", "--model", model, "--prompt", "a red cat", "--num_frames", "3", "--height", "4",
                 "--width", "4", "--repeats", "1", "--output_dir", out]) == 0
    assert "first block" in capsys.readouterr().out
    blocks = [torch.load(os.path.join(out, f"batch000_block{i:03d}.pt"), weights_only=True) for i in range(3)]
    pipe = CausalWanPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    ref = pipe(["a red cat"], num_frames=3, height=4, width=4, generator=torch.Generator().manual_seed(0),
               output_type="latent").frames
    torch.testing.assert_close(torch.cat(blocks, 2), ref)
    assert os.path.isfile(os.path.join(out, "video_000.gif"))
    mp4 = str(tmp_path / "mp4")
    assert main(["generate", "--model", model, "--prompt", "a red cat", "--num_frames", "3", "--height", "4",
                 "--width", "4", "--repeats", "1", "--output_dir", mp4, "--video_format", "mp4"]) == 0
    from diffusers.utils import load_video

    frames = load_video(os.path.join(mp4, "video_000.mp4"))  # 3 latent frames, no VAE: 3 frames of 4x4 pixels
    assert len(frames) == 3


@pytest.mark.parametrize("argv,match", [
    (["--model", "NOT_A_FOLDER_XYZ/none", "--prompt", "x"], "model"),
    (["--model", DIGITS_TEACHER_PATH, "--class_labels", "1", "--steps", "0"], "`steps` must be >= 1"),
    (["--model", DIGITS_TEACHER_PATH], "needs `class_labels`"),
    (["--model", DIGITS_TEACHER_PATH, "--class_labels", "1", "--lora", "NOPE"], "`lora`"),
    (["--model", DIGITS_TEACHER_PATH, "--class_labels", "1", "--scheduler", "NotAScheduler"], "`scheduler`"),
    (["--model", MOVING_DIGITS_TEACHER_PATH, "--prompt", "x", "--steps", "4"], "samples its recipe"),
])
def test_bad_input_is_one_line_and_status_2(argv, match, capsys, tmp_path):
    assert main(["generate", *argv, "--output_dir", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_folder_that_is_not_a_pipeline_and_an_empty_prompt_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "without model_index.json" in capsys.readouterr().err
    assert main(["generate", "--model", DIGITS_TEACHER_PATH, "--prompts_file", str(tmp_path / "empty.txt")]) == 2
    assert "holds no prompt" in capsys.readouterr().err


def test_int8_quantization_replaces_every_linear_and_stays_close(tmp_path):
    eager = load_pipeline(DIGITS_TEACHER_PATH)
    linears = sum(isinstance(m, torch.nn.Linear) for m in eager.unet.modules())
    q = load_pipeline(DIGITS_TEACHER_PATH, quantize="int8")
    assert linears > 0 and sum(isinstance(m, torch.nn.Linear) for m in q.unet.modules()) == 0
    a = eager(list(range(10)), num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    b = q(list(range(10)), num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert 0 < (a - b).abs().max() < 0.1  # quantized (not identical), and close
    with pytest.raises(ValueError, match="CPU in fp32"):
        load_pipeline(DIGITS_TEACHER_PATH, quantize="int8", dtype="bf16")


def test_compiled_denoiser_agrees_with_eager_within_1e_4(tmp_path):
    """--compile wraps the denoiser in torch.compile (inductor on CPU); a small digits UNet keeps the compile short."""
    folder = str(tmp_path / "small")
    DigitsPipeline(unet=digits_unet((16, 16), 1), scheduler=flow_map_scheduler()).save_pretrained(folder)
    labels = [0, 3, 7, 9]
    outs = []
    for compile_ in (False, True):
        pipe = load_pipeline(folder, compile=compile_)
        assert compile_ == (type(pipe.unet).__name__ == "OptimizedModule")
        outs.append(pipe(labels, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images)
    assert (outs[0] - outs[1]).abs().max() < 1e-4


def test_int8_on_a_causal_wan_student_keeps_the_time_embedder_fp32(tmp_path):
    """Wan reads its time embedder's dtype off a parameter: quantizing those Linear layers broke sampling."""
    model = str(tmp_path / "causal")
    CausalWanPipeline(transformer=T.tiny_wan_transformer(num_layers=1), scheduler=FlowMatchFewStepScheduler(),
                      num_frames_per_block=1, denoising_timesteps=[1000, 500]).save_pretrained(model)
    cond = torch.randn(2, 5, T.tiny_wan_transformer(num_layers=1).config.text_dim, generator=torch.Generator().manual_seed(0))
    outs = []
    for quantize in (None, "int8"):
        pipe = load_pipeline(model, quantize=quantize)
        outs.append(pipe(prompt_embeds=cond, num_frames=2, height=4, width=4, output_type="latent",
                         generator=torch.Generator().manual_seed(0)).frames)
    kept = [n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert kept and all("time_embedder" in n for n in kept)
    assert 0 < (outs[0] - outs[1]).abs().max() < 0.1


def test_channels_last_agrees_with_the_default_layout(tmp_path):
    outs = []
    for channels_last in (False, True):
        pipe = load_pipeline(DIGITS_TEACHER_PATH, channels_last=channels_last)
        weight = next(m.weight for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1
                      and m.kernel_size == (3, 3))
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        outs.append(pipe([1, 4, 8], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                         output_type="latent").images)
    assert (outs[0] - outs[1]).abs().max() < 1e-4
    wan = CausalWanPipeline(transformer=T.tiny_wan_transformer(num_layers=1), scheduler=FlowMatchFewStepScheduler(),
                            num_frames_per_block=1, denoising_timesteps=[1000])
    with pytest.raises(ValueError, match="channels_last"):
        to_channels_last(wan)


def test_a_scheduler_override_that_would_move_a_causal_recipe_is_refused(tmp_path):
    model = str(tmp_path / "causal")
    CausalWanPipeline(transformer=T.tiny_wan_transformer(num_layers=1), scheduler=causal_scheduler(),
                      num_frames_per_block=1, denoising_timesteps=[1000, 500]).save_pretrained(model)
    assert type(load_pipeline(model, scheduler="FlowMatchFewStepScheduler").scheduler) is FlowMatchFewStepScheduler
    for name in ("DDIMScheduler", "EulerDiscreteScheduler"):
        with pytest.raises(ValueError, match="`scheduler` must be FlowMatchEulerDiscreteScheduler"):
            load_pipeline(model, scheduler=name)


def test_scheduler_override_is_the_named_class_on_the_same_config(tmp_path):
    """--scheduler swaps the recipe's scheduler for another class built from its config: the images are that
    scheduler's, not the recipe's."""
    out = str(tmp_path / "gen")
    assert main(["generate", "--model", DIGITS_TEACHER_PATH, "--class_labels", "3", "--steps", "3", "--scheduler",
                 "FlowMatchFewStepScheduler", "--repeats", "1", "--output_dir", out]) == 0
    pipe = DigitsPipeline.from_pretrained(DIGITS_TEACHER_PATH)
    pipe.set_progress_bar_config(disable=True)
    recipe = pipe([3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    pipe.scheduler = FlowMatchFewStepScheduler.from_config(pipe.scheduler.config)
    swapped = pipe([3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    png = _png(os.path.join(out, "image_000.png"))
    np.testing.assert_allclose(png, np.round(np.clip(swapped[..., 0], 0, 1) * 255) / 255, atol=1e-6)
    assert np.abs(png - np.round(np.clip(recipe[..., 0], 0, 1) * 255) / 255).max() > 0.05
