"""The causal-video scripts on a stock WanPipeline teacher (tiny, saved to a temporary folder): prompts
through WanPipeline.encode_prompt, latent shapes from the VAE factors, the per-block schedule on the teacher's
shift, and a CausalWanPipeline of stock Wan components that conditions the student as it was trained."""

import json
import os

import pytest
import torch
from diffusers import UniPCMultistepScheduler
from script_utils import run_script

from diffusers_fastgen.pipelines import CausalWanPipeline
from diffusers_fastgen.testing import tiny as T
from diffusers_fastgen.training.video_teachers import WanTeacher


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    T.tiny_pipeline("wan", UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                    flow_shift=3.0)).save_pretrained(root / "wan")
    (root / "prompts.txt").write_text("a red cat\na blue dog on the horse\nthree green apples\n")
    return str(root / "wan"), str(root / "prompts.txt")


def _argv(wan, out, *extra):
    return ["--pretrained_model_name_or_path", wan[0], "--prompts", wan[1], "--num_frames", "9", "--height", "32",
            "--width", "32", "--num_frames_per_block", "1", "--num_student_steps", "2", "--output_dir", out,
            "--max_train_steps", "2", "--train_batch_size", "2", "--student_update_freq", "2", "--report_to", "none",
            "--eval_num_videos", "0", "--guidance_scale", "2", "--learning_rate", "1e-3", *extra]


def test_self_forcing_on_a_wan_pipeline(wan, tmp_path):
    out = str(tmp_path / "sf")
    run_script("self_forcing", _argv(wan, out))
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    # Stock Wan components beside the student; the recipe on the teacher's flow_shift 3: t = 3u / (1 + 2u).
    assert index["text_encoder"][1] == "UMT5EncoderModel" and index["vae"][1] == "AutoencoderKLWan"
    assert index["denoising_timesteps"] == [1000.0, 750.0] and index["num_frames_per_block"] == 1
    pipe = CausalWanPipeline.from_pretrained(out)
    teacher = WanTeacher(wan[0], num_frames=9, height=32, width=32)
    assert teacher.latent_shape == (16, 3, 4, 4)  # 9 frames -> 1 + 8/4; 32 px / 8
    trained, base = pipe.transformer.state_dict(), teacher.model.state_dict()
    assert sum(not torch.equal(trained[k], base[k]) for k in base) > len(base) // 2
    # The saved pipeline's own prompt encoding is the conditioning the student was trained on.
    prompts = ["a red cat", "three green apples"]
    torch.testing.assert_close(pipe.encode_prompt(prompts), teacher._encode(prompts)["encoder_hidden_states"])
    video = pipe(prompts[:1], num_frames=3, height=4, width=4, output_type="np").frames
    assert video.shape == (1, 9, 32, 32, 3) and os.path.isfile(os.path.join(out, "samples.gif"))


@pytest.mark.parametrize("extra,match", [
    (["--num_frames", "8"], "1 \\+ a multiple of the VAE's temporal factor 4"),
    (["--height", "20"], "multiple of 16"),
    (["--num_frames_per_block", "2"], "does not divide the 3 latent frames"),
])
def test_bad_video_arguments_are_named(wan, tmp_path, extra, match):
    argv = _argv(wan, str(tmp_path / "bad"))
    for i in range(0, len(extra), 2):
        argv[argv.index(extra[i]) + 1] = extra[i + 1]
    with pytest.raises(ValueError, match=match):
        run_script("self_forcing", argv)
    assert not os.path.exists(tmp_path / "bad")  # before any work


def test_a_non_wan_pipeline_is_refused(wan, tmp_path):
    from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH

    argv = _argv(wan, str(tmp_path / "x"))
    argv[1] = DIGITS_TEACHER_PATH
    with pytest.raises(ValueError, match="is a DigitsPipeline; the causal-video scripts take"):
        run_script("self_forcing", argv)
    assert not os.path.exists(tmp_path / "x")


def test_causal_kd_pairs_sit_on_the_students_shifted_schedule(wan, tmp_path):
    """The teacher ODE pairs: states at the warped t_list ([1, 0.75] on shift 3) from the stored noise, reached by
    teacher_steps / K guided Euler steps per interval (recomputed here with the CFG formula by hand)."""
    from safetensors.torch import load_file

    from diffusers_fastgen.models import Denoiser

    out = str(tmp_path / "ckd")
    argv = _argv(wan, out, "--teacher_steps", "4", "--num_pairs", "3", "--pair_batch_size", "3")
    i = argv.index("--student_update_freq")  # not a CausalKD flag
    del argv[i:i + 2]
    run_script("causal_kd", argv)
    pairs = load_file(os.path.join(out, "ode_pairs.safetensors"))
    noise = torch.randn(3, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1234))
    torch.testing.assert_close(pairs["states"][:, 0], noise)
    teacher = WanTeacher(wan[0], num_frames=9, height=32, width=32)
    emb, neg = teacher.embed_prompts(["a red cat", "a blue dog on the horse", "three green apples"])
    den = Denoiser(teacher.model)
    x = noise
    with torch.no_grad():
        for t, t_next in zip(torch.linspace(1.0, 0.75, 3)[:-1], torch.linspace(1.0, 0.75, 3)[1:]):
            c = den(x, t, {"encoder_hidden_states": emb["encoder_hidden_states"]}, target="flow")
            u = den(x, t, {"encoder_hidden_states": neg["encoder_hidden_states"].expand(3, -1, -1)}, target="flow")
            x = x + (t_next - t) * (u + 2.0 * (c - u))
    torch.testing.assert_close(pairs["states"][:, 1], x, atol=1e-5, rtol=1e-5)
    assert CausalWanPipeline.from_pretrained(out).config.denoising_timesteps == [1000.0, 750.0]
