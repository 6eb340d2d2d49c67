"""2-step smoke runs of train_cm, train_tcm, train_scm and train_meanflow, distilling and from data:
the student changes, the teacher file does not, the output folder reloads with from_pretrained, its
scheduler is the sampler the student was trained for, and it samples at 1 and 2 steps (the distilling sCD and MeanFlow
runs with the adversarial term on)."""

import math
import os

import pytest
import torch
from diffusers import FlowMapEulerDiscreteScheduler
from script_utils import assert_changed, file_digest, load_script, run_script, unet_weights

from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import digits_cond
from diffusers_fastgen.parametrization import process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.sampling import sample_meanflow
from diffusers_fastgen.schedulers import FlowMatchFewStepScheduler, flow_map_scheduler, t_list_from_scheduler

COMMON = ["--train_batch_size", "8", "--learning_rate", "1e-3", "--report_to", "none", "--ema_schedule", "constant",
          "--ema_decay", "0.0", "--max_train_steps", "2", "--eval_num_samples", "20", "--checkpointing_steps", "0"]




@pytest.mark.parametrize("script,extra", [("cm", ["--source", "teacher", "--guidance_scale", "1.5"]),
                                          ("cm", ["--source", "data", "--shift", "2.0"]),
                                          ("scm", ["--source", "teacher", "--guidance_scale", "1.5", "--adv_weight", "0.5",
                                                   "--adv_num_steps", "2"]),
                                          ("scm", ["--source", "data", "--jvp_method", "finite_difference", "--fd_eps",
                                                   "0.2"]),
                                          ("meanflow", ["--source", "teacher", "--guidance_scale", "1.5", "--adv_weight",
                                                        "0.5"]),
                                          ("meanflow", ["--source", "data", "--jvp_method", "finite_difference"])])
def test_two_steps_student_changes_teacher_does_not(tiny_teacher, tmp_path, script, extra):
    teacher_file = os.path.join(tiny_teacher, "unet", "diffusion_pytorch_model.safetensors")
    digest = file_digest(teacher_file)
    out = str(tmp_path / script)
    run_script(script, ["--teacher", tiny_teacher, "--output_dir", out, *COMMON, *extra])
    assert file_digest(teacher_file) == digest
    before = unet_weights(tiny_teacher)
    if script == "meanflow":  # the student has one new tensor (the zero-initialised interval projection)
        after = unet_weights(out)
        assert torch.count_nonzero(after.pop("time_embedding.cond_proj.weight")) > 0
        assert_changed(before, after)
        before = {**before, "time_embedding.cond_proj.weight": torch.zeros(1)}
    else:
        assert_changed(before, unet_weights(out))
    pipe = DigitsPipeline.from_pretrained(out)
    for steps in (1, 2):
        torch.manual_seed(0)
        images = pipe([1, 2], num_inference_steps=steps, output_type="latent").images
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert os.path.isfile(os.path.join(out, "benchmark.md")) and os.path.isfile(os.path.join(out, "train_config.yaml"))
    if script == "meanflow":
        assert isinstance(pipe.scheduler, FlowMapEulerDiscreteScheduler)
        assert pipe.unet.config.time_cond_proj_dim == 64
    elif script == "scm":  # sCM's 2-step midpoint t = 1.1 rad, on the RF path: sigma_d tan t / (1 + sigma_d tan t)
        assert isinstance(pipe.scheduler, FlowMatchFewStepScheduler)
        pipe.scheduler.set_timesteps(2)
        k = 0.75 * math.tan(1.1)
        torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor([1.0, k / (1 + k), 0.0]))
    else:
        assert isinstance(pipe.scheduler, FlowMatchFewStepScheduler)


def test_tcm_two_steps_from_a_stage1_model(tiny_teacher, tmp_path):
    stage1 = str(tmp_path / "cm")
    run_script("cm", ["--teacher", tiny_teacher, "--output_dir", stage1, *COMMON])
    digest = file_digest(os.path.join(stage1, "unet", "diffusion_pytorch_model.safetensors"))
    out = str(tmp_path / "tcm")
    run_script("tcm", ["--stage1", stage1, "--teacher", tiny_teacher, "--output_dir", out, *COMMON,
                       "--t_boundary", "0.3", "--boundary_fraction", "0.5"])
    assert file_digest(os.path.join(stage1, "unet", "diffusion_pytorch_model.safetensors")) == digest
    assert_changed(unet_weights(stage1), unet_weights(out))
    pipe = DigitsPipeline.from_pretrained(out)
    torch.manual_seed(0)
    assert torch.isfinite(pipe([3], num_inference_steps=2, output_type="latent").images).all()


@pytest.mark.parametrize("proposal", ["reflected_log_normal", "log_student_t"])
def test_tcm_pairs_stay_above_t_boundary_and_the_log_t_proposal_is_truncated_there(tiny_teacher, proposal):
    """Stage-2 pairs on the RF digits process and SD1.5's VP schedule, several seeds and steps: every t >= t',
    r < t, a boundary_fraction of t exactly at t'; with log_student_t the other log noise ratios follow the
    Student-t truncated at t' (KS against scipy)."""
    from scipy import stats

    from diffusers_fastgen.parametrization import RectifiedFlow, vp_from_betas
    from diffusers_fastgen.training import parse_args

    module = load_script("tcm")
    args = parse_args(module.TCMArgs, ["--stage1", tiny_teacher, "--teacher", tiny_teacher, "--t_proposal", proposal,
                                       "--t_boundary", "0.4", "--boundary_fraction", "0.25"])
    for process in (RectifiedFlow(), vp_from_betas()):
        tb = torch.tensor(0.4, dtype=torch.float64)
        ratio_b = float(process.sigma(tb) / process.alpha(tb))
        for seed in range(3):
            torch.manual_seed(seed)
            t, r = module.sample_pair(8192, seed * 300, args, process, "cpu")
            assert bool((t >= 0.4 - 1e-5).all()) and bool((r < t).all()) and bool((t <= 1).all())
            at_boundary = (t - 0.4).abs() < 1e-5
            assert abs(float(at_boundary.double().mean()) - 0.25) < 0.03
            if proposal == "log_student_t" and isinstance(process, RectifiedFlow):
                t_free = t[~at_boundary].double()
                z = (torch.log(t_free / (1 - t_free)).numpy() + 1.1) / 2.0  # RF: sigma = t / (1 - t)
                a = stats.t.cdf((math.log(ratio_b) + 1.1) / 2.0, 2.0)
                assert stats.kstest(z, lambda x: (stats.t.cdf(x, 2.0) - a) / (1 - a)).pvalue > 0.01


def test_tcm_needs_a_stage1_model_and_a_midpoint_above_t_boundary(tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="stage1"):
        run_script("tcm", ["--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="`stage1` 'x' is not a folder"):
        run_script("tcm", ["--stage1", "x", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="shift"):
        run_script("tcm", ["--stage1", tiny_teacher, "--output_dir", str(tmp_path), "--t_boundary", "0.6", "--shift", "1.0"])


def test_meanflow_folder_samples_with_the_training_time_sampler(tiny_teacher, tmp_path):
    """The reloaded pipeline's 1- and 2-step outputs equal sampling.sample_meanflow on u_theta(z, r, t)."""
    out = str(tmp_path / "mf")
    run_script("meanflow", ["--teacher", tiny_teacher, "--output_dir", out, *COMMON, "--eval_num_samples", "0"])
    pipe = DigitsPipeline.from_pretrained(out)
    student = Denoiser(pipe.unet, *process_from_scheduler(DigitsPipeline.from_pretrained(tiny_teacher).scheduler))
    labels = torch.tensor([0, 5, 9])
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for steps in (1, 2):
        ours = sample_meanflow(lambda z, r, t: student(z, t, digits_cond(labels), target="flow", r=r), x,
                               t_list_from_scheduler(flow_map_scheduler(), steps))
        theirs = pipe(labels, num_inference_steps=steps, latents=x, output_type="latent").images
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        if steps == 1:  # the adversarial term's samples (--adv_weight) are this 1-step sample
            with torch.no_grad():
                jump = load_script("meanflow").one_jump_from_noise(student)(x, torch.ones(3), digits_cond(labels))
            torch.testing.assert_close(theirs, jump, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("script", ["cm", "scm", "meanflow"])
def test_bad_arguments_name_the_field(script, tmp_path):
    with pytest.raises(ValueError, match="source"):
        run_script(script, ["--output_dir", str(tmp_path), "--source", "teachr"])
    if script == "scm":
        for bad in ("nan", "0", "1.5"):
            with pytest.raises(ValueError, match="fd_eps"):
                run_script(script, ["--output_dir", str(tmp_path), "--fd_eps", bad])


def test_meanflow_adversarial_term_reads_the_one_step_jump(tmp_path):
    with pytest.raises(ValueError, match="adv_num_steps"):
        run_script("meanflow", ["--output_dir", str(tmp_path), "--adv_weight", "0.1", "--adv_num_steps", "2"])
    for bad in ("nan", "-1"):
        with pytest.raises(ValueError, match="adv_weight"):
            run_script("cm", ["--output_dir", str(tmp_path), "--adv_weight", bad])
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="adv_feature_modules.*down_blocks.9"):
        run_script("cm", ["--output_dir", str(tmp_path / "x"), "--adv_weight", "0.1", "--adv_feature_modules",
                          "down_blocks.9"])


@pytest.mark.parametrize("script", ["scm", "meanflow"])
def test_jvp_methods_refuse_mixed_precision(script, tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        run_script(script, ["--output_dir", str(tmp_path), "--mixed_precision", "bf16"])


@pytest.mark.parametrize("script,extra", [("meanflow", []), ("scm", []),
                                          ("cm", ["--num_stages", "1", "--adv_weight", "0.5", "--adv_num_steps", "2"])])
def test_resume_is_bit_identical(tiny_teacher, tmp_path, script, extra):
    """Stopped after 2 steps and resumed with `latest` to 4 == 4 uninterrupted steps (weights, EMA; with the
    adversarial term the heads and their optimizer come back from the checkpoint too). CM with one curriculum stage:
    its gap ratio otherwise depends on max_train_steps, which the test changes between the legs."""
    base = ["--teacher", tiny_teacher, "--train_batch_size", "4", "--learning_rate", "1e-3", "--report_to", "none",
            "--eval_num_samples", "0", "--checkpointing_steps", "2", *extra]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_script(script, [*base, "--output_dir", straight, "--max_train_steps", "4"])
    run_script(script, [*base, "--output_dir", resumed, "--max_train_steps", "2"])
    run_script(script, [*base, "--output_dir", resumed, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    a, b = unet_weights(straight), unet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
