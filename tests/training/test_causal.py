import pytest
import torch

from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.causal_wan import CausalWan
from diffusers_fastgen.pipelines import CausalWanPipeline
from diffusers_fastgen.schedulers import FlowMatchFewStepScheduler
from diffusers_fastgen.testing.tiny import tiny_wan_transformer
from diffusers_fastgen.training.causal import (
    block_step_indices,
    diffusion_forcing_inputs,
    self_forcing_rollout,
    shared_exit_index,
)
from diffusers_fastgen.training.video import null_cond, student_t_list, teacher_ode


def test_self_forcing_rollout_is_the_pipeline_sampler():
    """Exit at the last step: the training rollout reproduces CausalWanPipeline's samples exactly."""
    model = tiny_wan_transformer(num_layers=2)
    t_list = student_t_list(3)
    pipe = CausalWanPipeline(transformer=model, scheduler=FlowMatchFewStepScheduler(), num_frames_per_block=2,
                             denoising_timesteps=(t_list * 1000).tolist())
    noise, text = torch.randn(2, 16, 6, 4, 4), torch.randn(2, 5, 32)
    torch.manual_seed(7)
    ref = pipe(prompt_embeds=text, latents=noise, height=4, width=4, output_type="latent").frames
    student = Denoiser(CausalWan(model, 2))
    torch.manual_seed(7)
    with torch.no_grad():
        out = self_forcing_rollout(student, noise, {"encoder_hidden_states": text}, t_list, exit_index=2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_self_forcing_gradient_reaches_only_the_exit_step():
    model = tiny_wan_transformer(num_layers=1)
    student = Denoiser(CausalWan(model, 2))
    x0 = self_forcing_rollout(student, torch.randn(1, 16, 4, 4, 4), {"encoder_hidden_states": torch.randn(1, 5, 32)},
                              student_t_list(2), exit_index=1)
    assert x0.requires_grad
    x0.square().mean().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("exit_index", [0, 1, 2, 3])
def test_self_forcing_every_parameter_gets_a_gradient_at_every_exit_step(exit_index):
    """The no-grad steps before the exit fill the cache's text keys/values; the exit forward must not
    read those detached copies, or attn2.to_k / to_v / norm_k get no gradient (and DDP fails on the
    unused parameters)."""
    torch.manual_seed(exit_index)
    model = tiny_wan_transformer(num_layers=2)
    student = Denoiser(CausalWan(model, 2))
    x0 = self_forcing_rollout(student, torch.randn(2, 16, 4, 4, 4), {"encoder_hidden_states": torch.randn(2, 5, 32)},
                              student_t_list(4), exit_index=exit_index)
    x0.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_cached_text_keys_are_reused_without_gradient_and_equal_the_recomputed_ones():
    model = tiny_wan_transformer(num_layers=1)
    causal = CausalWan(model, 2)
    x, text = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 5, 32)
    cache = causal.new_cache(1, 4, 4, 4)
    with torch.no_grad():
        ref = causal(x, torch.tensor([500.0]), text, kv_cache=cache)
    assert cache.cross[0] is not None
    calls = []
    hook = model.blocks[0].attn2.to_k.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        causal(x, torch.tensor([500.0]), text, kv_cache=cache)
    assert calls == []  # read from the cache
    out = causal(x, torch.tensor([500.0]), text, kv_cache=cache)
    assert calls == [1]  # recomputed with gradient
    hook.remove()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_block_indices_and_diffusion_forcing_inputs():
    torch.manual_seed(0)
    idx = block_step_indices(64, 8, 2, 4)
    assert idx.shape == (64, 8) and torch.equal(idx[:, 0::2], idx[:, 1::2])  # one draw per block
    assert set(idx.unique().tolist()) == {0, 1, 2, 3}
    x0 = torch.randn(64, 1, 8, 4, 4)
    t_list = student_t_list(4)
    for include_clean in (False, True):
        torch.manual_seed(1)
        x_t, t = diffusion_forcing_inputs(x0, t_list, 2, include_clean=include_clean)
        torch.manual_seed(1)  # the same draws, by hand: per-block index, then eps
        points = torch.cat([t_list, torch.zeros(1)]) if include_clean else t_list
        t_ref = points[block_step_indices(64, 8, 2, 4, include_clean=include_clean)]
        eps = torch.randn_like(x0)
        torch.testing.assert_close(t, t_ref)
        tb = t_ref[:, None, :, None, None]
        torch.testing.assert_close(x_t, (1 - tb) * x0 + tb * eps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_blocks_appear_as_in_the_inference_cache(seed):
    """Deviation 1 of the fidelity issue: with include_clean (the default) some blocks are drawn at t = 0 and
    given to the student clean, as CausVid's step list (with 0) does; without it no block ever is."""
    torch.manual_seed(seed)
    x0, t_list = torch.randn(32, 1, 8, 4, 4), student_t_list(4)
    x_t, t = diffusion_forcing_inputs(x0, t_list, 2)
    clean = t == 0  # (B, F)
    assert 0 < clean.float().mean() < 0.4  # about 1 in 5 blocks
    assert torch.equal(clean[:, 0::2], clean[:, 1::2])  # whole blocks
    frames = clean[:, None, :, None, None].expand_as(x0)
    torch.testing.assert_close(x_t[frames], x0[frames])
    torch.manual_seed(seed)
    _, t_old = diffusion_forcing_inputs(x0, t_list, 2, include_clean=False)
    assert (t_old > 0).all()


def test_teacher_ode_with_guidance_follows_the_guided_flow():
    """A linear 'velocity' v(x, t, c) = a x + t c: the guided Euler path is computed by hand."""
    def velocity(x, t, cond, target):
        assert target == "flow"
        c = cond["encoder_hidden_states"].mean((1, 2))[:, None, None, None, None]
        return -0.5 * x + t * c

    torch.manual_seed(0)
    noise = torch.randn(3, 1, 8, 4, 4)
    cond = {"encoder_hidden_states": torch.randn(3, 3, 32) + 1.0}
    uncond = null_cond(cond)
    assert torch.equal(uncond["encoder_hidden_states"], torch.zeros(3, 3, 32))
    grid = torch.tensor([1.0, 0.6, 0.25, 0.0])
    w = 3.0
    x, expected = noise.clone(), [noise]
    c = cond["encoder_hidden_states"].mean((1, 2))[:, None, None, None, None]
    for t, t_next in zip(grid[:-1], grid[1:]):
        v_c, v_u = -0.5 * x + t * c, -0.5 * x  # the null cond's mean is 0
        x = x + (t_next - t) * (v_u + w * (v_c - v_u))
        expected.append(x)
    got = teacher_ode(velocity, noise, cond, grid, uncond=uncond, guidance_scale=w)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    plain = teacher_ode(velocity, noise, cond, grid)  # w = 1: the conditional flow, different from w = 3
    assert (plain[-1] - got[-1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="uncond"):
        teacher_ode(velocity, noise, cond, grid, guidance_scale=2.0)


def test_shared_exit_index_is_a_function_of_seed_and_iteration_and_uniform():
    torch.manual_seed(123)  # the global RNG (different on every DDP rank) must not matter
    a = [shared_exit_index(0, i, 4) for i in range(4000)]
    torch.manual_seed(456)
    assert a == [shared_exit_index(0, i, 4) for i in range(4000)]
    assert a != [shared_exit_index(1, i, 4) for i in range(4000)]
    counts = torch.bincount(torch.tensor(a), minlength=4).float()
    assert counts.shape == (4,) and ((counts - 1000).abs() < 4 * (4000 * 0.25 * 0.75) ** 0.5).all()  # 4 sigma
    with pytest.raises(ValueError, match="num_steps"):
        shared_exit_index(0, 0, 0)
