"""2-step smoke runs of the four causal-video scripts on a tiny moving-digits teacher."""

import os

import pytest
import torch
from safetensors.torch import load_file
from script_utils import VIDEO_COMMON as COMMON
from script_utils import assert_changed, file_digest, load_script, run_script

from diffusers_fastgen.evaluation.moving_digits import moving_digits_cond, sample_motion
from diffusers_fastgen.pipelines import CausalWanPipeline


def _weights(folder):
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


def _check_folder(out, num_frames_per_block, steps):
    pipe = CausalWanPipeline.from_pretrained(out)
    assert pipe.config.num_frames_per_block == num_frames_per_block
    assert len(pipe.config.denoising_timesteps) == steps
    g = torch.Generator().manual_seed(0)
    _, v = sample_motion(2, g)
    blocks = list(pipe.stream(prompt_embeds=moving_digits_cond(torch.tensor([3, 7]), v), num_frames=8,
                              height=16, width=16, generator=g))
    assert len(blocks) == 8 // num_frames_per_block and blocks[0].shape == (2, 1, num_frames_per_block, 16, 16)
    assert os.path.isfile(os.path.join(out, "benchmark.md"))


def test_causal_sft_trains_a_teacher_folder(video_teacher):
    pipe = CausalWanPipeline.from_pretrained(video_teacher)
    assert pipe.config.num_frames_per_block == 8 and len(pipe.config.denoising_timesteps) == 2


def test_causal_sft_diffusion_forcing(video_teacher, tmp_path):
    out = str(tmp_path / "csft")
    run_script("causal_sft", ["--output_dir", out, "--init_from", video_teacher, "--num_frames_per_block", "2",
                              "--sample_steps", "2", *COMMON])
    assert_changed(_weights(video_teacher), _weights(out))
    _check_folder(out, 2, 2)


@pytest.mark.parametrize("script,extra", [("causal_kd", ["--num_pairs", "8", "--teacher_steps", "4"]),
                                          ("causvid", ["--student_update_freq", "2"]),
                                          ("self_forcing", ["--student_update_freq", "2"])])
@pytest.mark.parametrize("guidance", ["1.0", "2.0"])
def test_distillation_scripts_two_steps(video_teacher, tmp_path, script, extra, guidance):
    teacher_file = os.path.join(video_teacher, "transformer", "diffusion_pytorch_model.safetensors")
    digest = file_digest(teacher_file)
    out = str(tmp_path / script)
    run_script(script, ["--teacher", video_teacher, "--output_dir", out, "--num_student_steps", "2", "--guidance_scale", guidance,
                        *COMMON, *extra])
    assert file_digest(teacher_file) == digest
    assert_changed(_weights(video_teacher), _weights(out))
    _check_folder(out, 2, 2)


@pytest.mark.parametrize("script", ["self_forcing", "causvid", "causal_kd", "causal_sft"])
def test_lora_students_are_the_teacher_plus_their_adapter(video_teacher, tmp_path, script):
    """--lora_rank: student and fake score are adapters on the frozen teacher; the saved CausalWanPipeline holds
    the teacher with the EMA student adapter merged, and pytorch_lora_weights.safetensors applied to the teacher
    with stock load_lora_adapter gives the same model."""
    from diffusers import WanTransformer3DModel

    out = str(tmp_path / "lora")
    extra = {"causal_kd": ["--num_pairs", "8", "--teacher_steps", "4", "--num_student_steps", "2"],
             "causal_sft": ["--init_from", video_teacher, "--num_frames_per_block", "2", "--sample_steps", "2"]}.get(
        script, ["--student_update_freq", "2", "--num_student_steps", "2"])
    teacher = [] if script == "causal_sft" else ["--teacher", video_teacher]
    run_script(script, [*teacher, "--output_dir", out, "--lora_rank", "4", "--validation_steps", "2", *extra, *COMMON])
    _check_folder(out, 2, 2)
    before, after = _weights(video_teacher), _weights(out)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.rsplit(".", 1)[0].endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_out")) for k in changed)
    assert os.listdir(os.path.join(out, "samples")) == ["step_000002.png"]
    merged = CausalWanPipeline.from_pretrained(out).transformer
    adapted = WanTransformer3DModel.from_pretrained(video_teacher, subfolder="transformer")
    adapted.load_lora_adapter(os.path.join(out, "pytorch_lora_weights.safetensors"), adapter_name="student")
    x, t = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([400.0, 800.0])
    text = moving_digits_cond(torch.tensor([1, 5]), torch.tensor([[1, -1], [-1, 1]]))
    with torch.no_grad():
        a = merged(hidden_states=x, timestep=t, encoder_hidden_states=text).sample
        b = adapted(hidden_states=x, timestep=t, encoder_hidden_states=text).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if script in ("causal_kd", "causal_sft"):
        return
    with pytest.raises(ValueError, match="student_init"):
        run_script(script, ["--teacher", video_teacher, "--student_init", video_teacher, "--lora_rank", "4",
                                    "--output_dir", str(tmp_path / "bad")])


def test_self_forcing_long_rollouts_show_the_teacher_windows_of_its_length(video_teacher, tmp_path):
    """--rollout_frames 16 with a 6-frame window: the student streams 16 frames, the teacher and the fake score see
    8-frame windows of them starting on block boundaries (several draws), and the window goes into the recipe."""
    from accelerate.state import AcceleratorState

    module = load_script("self_forcing")
    seen = []
    real_dmd, real_fake = module.dmd_sample_loss, module.fake_score_sample_loss

    def dmd(x0, *a, **kw):
        seen.append(tuple(x0.shape))
        return real_dmd(x0, *a, **kw)

    def fake(fake_score, x0, cond):
        seen.append(tuple(x0.shape))
        return real_fake(fake_score, x0, cond)

    rollouts = []
    real_rollout = module.self_forcing_rollout

    def rollout(student, noise, *a, **kw):
        rollouts.append(noise.shape[2])
        return real_rollout(student, noise, *a, **kw)

    module.dmd_sample_loss, module.fake_score_sample_loss, module.self_forcing_rollout = dmd, fake, rollout
    out = str(tmp_path / "long")
    AcceleratorState._reset_state(True)
    module.main(["--teacher", video_teacher, "--output_dir", out, "--num_student_steps", "2", "--student_update_freq",
                 "2", "--rollout_frames", "16", "--local_attn_size", "6", *COMMON, "--max_train_steps", "3"])
    AcceleratorState._reset_state(True)
    assert set(rollouts) == {16} and seen and all(shape[2] == 8 for shape in seen)
    config = CausalWanPipeline.from_pretrained(out).config
    assert (config.local_attn_size, config.sink_size) == (6, 0)
    with pytest.raises(ValueError, match="rollout_frames"):
        run_script("self_forcing", ["--teacher", video_teacher, "--rollout_frames", "5", "--output_dir", str(tmp_path / "x")])


def test_self_forcing_window_draws_cover_the_rollout():
    """Block-aligned windows of the teacher's length, every start taken over draws, the same for the same
    (seed, iteration), the whole rollout when it is as long as the window."""
    from diffusers_fastgen.training.causal import rollout_window

    windows = [rollout_window(0, i, 16, 8, 2) for i in range(64)]
    assert {w.start for w in windows} == {0, 2, 4, 6, 8} and all(w.stop - w.start == 8 for w in windows)
    assert rollout_window(0, 5, 16, 8, 2) == windows[5] and rollout_window(0, 5, 8, 8, 2) == slice(0, 8)
    with pytest.raises(ValueError, match="longer than the rollout"):
        rollout_window(0, 0, 6, 8, 2)


@pytest.mark.parametrize("script", ["causal_kd", "causvid", "self_forcing"])
def test_guidance_below_one_is_a_clear_error(video_teacher, script, tmp_path):
    with pytest.raises(ValueError, match="guidance_scale"):
        run_script(script, ["--teacher", video_teacher, "--guidance_scale", "0.5", "--output_dir", str(tmp_path / "o")])


def test_cond_dropout_out_of_range_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cond_dropout"):
        run_script("causal_sft", ["--cond_dropout", "1.0", "--output_dir", str(tmp_path / "o")])


@pytest.mark.parametrize("script", ["causal_kd", "causvid", "self_forcing"])
def test_missing_teacher_is_a_clear_error(script, tmp_path):
    with pytest.raises(ValueError, match="teacher"):
        run_script(script, ["--teacher", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("seed", [0, 3])
def test_causal_kd_also_regresses_from_clean_blocks(seed):
    """CausalKD's path ends in the clean latent: with clean_blocks (the default) some blocks are given as x0
    at t = 0; without, every block is an ODE state at t > 0."""
    step = load_script("causal_kd").causal_kd_step
    seen = {}

    def student(x_t, t, cond):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    states, x0 = torch.randn(16, 4, 1, 8, 4, 4), torch.randn(16, 1, 8, 4, 4)
    t_list = torch.tensor([1.0, 0.75, 0.5, 0.25])
    torch.manual_seed(seed)
    step(student, states, x0, {}, t_list, 2)
    clean = seen["t"] == 0
    assert clean.any()
    frames = clean[:, None, :, None, None].expand_as(x0)
    torch.testing.assert_close(seen["x_t"][frames], x0[frames])
    torch.manual_seed(seed)
    step(student, states, x0, {}, t_list, 2, include_clean=False)
    assert (seen["t"] > 0).all()
