import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from diffusers_fastgen.models.causal_wan import CausalWan
from diffusers_fastgen.pipelines import CausalWanPipeline
from diffusers_fastgen.schedulers import FlowMatchFewStepScheduler, causal_scheduler
from diffusers_fastgen.testing.tiny import (
    tiny_t5_text_encoder,
    tiny_tokenizer,
    tiny_wan_transformer,
    tiny_wan_vae,
)

B, C, F_, H, W = 2, 16, 6, 4, 4
STEPS = [1000, 600, 300]


def _pipe(**config):
    config = {"num_frames_per_block": 2, "denoising_timesteps": STEPS, **config}
    return CausalWanPipeline(transformer=tiny_wan_transformer(num_layers=2), scheduler=FlowMatchFewStepScheduler(),
                             **config)


def _text(seed=0):
    return torch.randn(B, 5, 32, generator=torch.Generator().manual_seed(seed))


def _reference_rollout(transformer, noise, text, steps, n, context_noise, seed, layout=None, prefix=None):
    """Independent reference: no cache; each forward recomputes the whole prefix (finished blocks at the
    context timestep, re-noised as the pipeline does) under one block-causal mask. `layout`: explicit block
    sizes covering the video; `prefix`: given clean frames that are the first blocks."""
    layout = layout or [n] * (noise.shape[2] // n)
    causal = CausalWan(transformer, tuple(layout))
    g = torch.Generator().manual_seed(seed)
    sched = FlowMatchFewStepScheduler()
    done, contexts = [], []
    starts = [sum(layout[:i]) for i in range(len(layout))]
    for start, n in zip(starts, layout):
        sched.set_timesteps(timesteps=steps)
        x = noise[:, :, start:start + n]
        if prefix is not None and start + n <= prefix.shape[2]:
            x = prefix[:, :, start:start + n]
        for timestep in sched.timesteps if prefix is None or start + n > prefix.shape[2] else []:
            seq = torch.cat(contexts + [x], 2)
            frame_t = torch.cat([torch.full((B, start), float(context_noise)), timestep.expand(B, n)], 1)
            v = causal(seq, frame_t, text)[:, :, start:]
            x = sched.step(v, timestep, x, generator=g).prev_sample
        done.append(x)
        s = context_noise / 1000
        contexts.append((1 - s) * x + s * torch.randn(x.shape, generator=g) if context_noise else x)
    causal.remove()
    return torch.cat(done, 2)


@pytest.mark.parametrize("context_noise", [0, 100])
def test_cached_generation_equals_recomputing_the_prefix(context_noise):
    pipe = _pipe(context_noise=context_noise)
    noise = torch.randn(B, C, F_, H, W, generator=torch.Generator().manual_seed(1))
    text = _text()
    out = pipe(prompt_embeds=text, latents=noise, height=H, width=W, output_type="latent",
               generator=torch.Generator().manual_seed(2)).frames
    ref_model = tiny_wan_transformer(num_layers=2)
    ref = _reference_rollout(ref_model, noise, text, STEPS, 2, context_noise, seed=2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("context_noise", [0, 100])
def test_a_non_uniform_layout_and_a_clean_prefix(context_noise):
    """block_sizes [1, 2, 1] (then 1s; ends at 1, 3, 4, 5, 6): blocks are streamed with those sizes and the video
    equals the cache-free reference; prefix_latents (the first 3 frames given clean) are yielded unchanged and
    condition the rest exactly as if the pipeline had generated them."""
    pipe = _pipe(context_noise=context_noise, block_sizes=[1, 2, 1], num_frames_per_block=1)
    noise = torch.randn(B, C, F_, H, W, generator=torch.Generator().manual_seed(1))
    text = _text()
    blocks = list(pipe.stream(prompt_embeds=text, latents=noise, height=H, width=W,
                              generator=torch.Generator().manual_seed(2)))
    assert [b.shape[2] for b in blocks] == [1, 2, 1, 1, 1]
    ref = _reference_rollout(tiny_wan_transformer(num_layers=2), noise, text, STEPS, 1, context_noise, seed=2,
                             layout=[1, 2, 1, 1, 1])
    torch.testing.assert_close(torch.cat(blocks, 2), ref, atol=1e-5, rtol=1e-5)
    prefix = torch.randn(B, C, 3, H, W, generator=torch.Generator().manual_seed(5))
    out = pipe(prompt_embeds=text, latents=noise, height=H, width=W, output_type="latent", prefix_latents=prefix,
               generator=torch.Generator().manual_seed(2)).frames
    torch.testing.assert_close(out[:, :, :3], prefix)
    ref = _reference_rollout(tiny_wan_transformer(num_layers=2), noise, text, STEPS, 1, context_noise, seed=2,
                             layout=[1, 2, 1, 1, 1], prefix=prefix)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out[:, :, 3:] - torch.cat(blocks, 2)[:, :, 3:]).abs().max() > 1e-3  # the prefix conditions the rest
    for bad in (torch.randn(B, C, 2, H, W), torch.randn(B, C, 6, H, W), torch.randn(B, 3, 3, H, W)):
        with pytest.raises(ValueError, match="prefix_latents"):  # not on a block end / the whole video / channels
            pipe(prompt_embeds=text, latents=noise, height=H, width=W, prefix_latents=bad)
    with pytest.raises(ValueError, match="block boundary"):
        _pipe(block_sizes=[4, 3], num_frames_per_block=3)(prompt_embeds=text, num_frames=6, height=H, width=W)


def test_separate_noise_levels_feed_the_recipe_timesteps_and_renoise_at_the_sigmas():
    """denoising_sigmas (CausVid's 3-step recipe): the model sees the recipe's timesteps, x0 = x - sigma_i v and
    the re-noising uses sigma_{i+1}; checked against the formulas over a recomputed prefix."""
    steps, sigmas = [1000, 757, 522], [1.0, 0.7568, 0.5217]
    pipe = _pipe(denoising_timesteps=steps, denoising_sigmas=sigmas)
    noise = torch.randn(B, C, F_, H, W, generator=torch.Generator().manual_seed(1))
    text = _text()
    out = pipe(prompt_embeds=text, latents=noise, height=H, width=W, output_type="latent",
               generator=torch.Generator().manual_seed(2)).frames
    causal = CausalWan(tiny_wan_transformer(num_layers=2), 2)
    g = torch.Generator().manual_seed(2)
    done = []
    with torch.no_grad():
        for start in range(0, F_, 2):
            x = noise[:, :, start:start + 2]
            for i, (t, sigma) in enumerate(zip(steps, sigmas)):
                frame_t = torch.cat([torch.zeros(B, start), torch.full((B, 2), float(t))], 1)
                v = causal(torch.cat(done + [x], 2), frame_t, text)[:, :, start:]
                x0 = x - sigma * v
                x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * torch.randn(x.shape, generator=g) if i + 1 < 3 else x0
            done.append(x)
    torch.testing.assert_close(out, torch.cat(done, 2), atol=1e-5, rtol=1e-5)
    default = _pipe(denoising_timesteps=steps)(prompt_embeds=text, latents=noise, height=H, width=W, output_type="latent",
                                               generator=torch.Generator().manual_seed(2)).frames
    assert (default - out).abs().max() > 1e-3  # t / 1000 noise levels give another video


def test_stream_yields_blocks_of_the_video_in_order():
    pipe = _pipe()
    noise = torch.randn(B, C, F_, H, W, generator=torch.Generator().manual_seed(1))
    seen = []
    video = pipe(prompt_embeds=_text(), latents=noise, height=H, width=W, output_type="latent",
                 generator=torch.Generator().manual_seed(0),
                 callback_on_block_end=lambda i, block: seen.append((i, block.clone()))).frames
    assert [i for i, _ in seen] == [0, 1, 2]
    torch.testing.assert_close(torch.cat([b for _, b in seen], 2), video)
    streamed = list(pipe.stream(prompt_embeds=_text(), latents=noise, height=H, width=W,
                                generator=torch.Generator().manual_seed(0)))
    assert len(streamed) == 3 and streamed[0].shape == (B, C, 2, H, W)
    torch.testing.assert_close(torch.cat(streamed, 2), video)


def test_the_registered_transformer_keeps_its_own_processors():
    """The pipeline makes its transformer block-causal only while it generates: after construction,
    a call, a stream stopped after one block, and a call that raises, the transformer runs bidirectionally
    (its output equals a fresh copy's) and has its own processors."""
    pipe = _pipe()
    model = pipe.transformer
    fresh = tiny_wan_transformer(num_layers=2)
    x, t, text = torch.randn(B, C, F_, H, W), torch.full((B,), 500.0), _text()

    def bidirectional():
        assert {type(p).__name__ for p in model.attn_processors.values()} == {"WanAttnProcessor"}
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, text).sample, fresh(x, t, text).sample)

    bidirectional()
    pipe(prompt_embeds=text, num_frames=F_, height=H, width=W, output_type="latent")
    bidirectional()
    stream = pipe.stream(prompt_embeds=text, num_frames=F_, height=H, width=W)
    next(stream)
    assert {type(p).__name__ for p in model.attn_processors.values()} != {"WanAttnProcessor"}  # mid-stream
    stream.close()
    bidirectional()
    with pytest.raises(ValueError, match="latents"):
        pipe(prompt_embeds=text, latents=torch.randn(B + 1, C, F_, H, W), height=H, width=W)
    bidirectional()


def test_causal_wan_remove_restores_the_previous_processors():
    model = tiny_wan_transformer(num_layers=1)
    outer = CausalWan(model, 2)
    before = dict(model.attn_processors)
    with CausalWan(model, 1, local_attn_size=2):
        assert all(model.attn_processors[k] is not v for k, v in before.items())
    assert all(model.attn_processors[k] is v for k, v in before.items())  # nested: the outer one is back
    outer.remove()
    assert {type(p).__name__ for p in model.attn_processors.values()} == {"WanAttnProcessor"}


def test_save_and_reload_round_trip(tmp_path):
    pipe = _pipe(context_noise=50, local_attn_size=4, sink_size=1, sinks_in_window=True)
    pipe.save_pretrained(tmp_path)
    reloaded = CausalWanPipeline.from_pretrained(tmp_path)  # diffusers resolves only its own classes by name
    assert type(reloaded) is CausalWanPipeline
    assert type(reloaded.transformer) is WanTransformer3DModel  # a stock component
    assert (reloaded.config.num_frames_per_block, reloaded.config.denoising_timesteps, reloaded.config.context_noise,
            reloaded.config.local_attn_size, reloaded.config.sink_size, reloaded.config.sinks_in_window) == (
        2, STEPS, 50, 4, 1, True)
    noise = torch.randn(B, C, F_, H, W, generator=torch.Generator().manual_seed(1))
    a, b = (p(prompt_embeds=_text(), latents=noise, height=H, width=W, output_type="latent",
              generator=torch.Generator().manual_seed(3)).frames for p in (pipe, reloaded))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("recipe", [
    {},
    {"context_noise": 100},
    {"denoising_timesteps": [1000, 757, 522], "denoising_sigmas": [1.0, 0.7568, 0.5217]},
    {"block_sizes": [2, 1, 1, 2], "local_attn_size": 4, "sink_size": 1},
    {"denoising_timesteps": [1000.0, 937.5, 833.3333, 625.0]},
])
def test_the_stock_scheduler_samples_exactly_as_ours(recipe):
    """Folders are saved with stock FlowMatchEulerDiscreteScheduler(stochastic_sampling=True): with the same
    generator it gives the very same videos as FlowMatchFewStepScheduler (earlier folders), over several seeds,
    with a clean prefix and with I2V; and a folder saved with it reloads it by class."""
    ours = _pipe(**recipe)
    stock = CausalWanPipeline(transformer=ours.transformer, scheduler=causal_scheduler(), num_frames_per_block=2,
                              **{"denoising_timesteps": STEPS, **recipe})
    text = _text()
    for seed in range(3):
        noise = torch.randn(B, C, F_, H, W, generator=torch.Generator().manual_seed(10 + seed))
        extra = [{}, {"image": noise[:, :, :1] * 0.5}, {"prefix_latents": noise[:, :, :2] * 0.5}][seed]
        a, b = (p(prompt_embeds=text, latents=noise, height=H, width=W, output_type="latent",
                  generator=torch.Generator().manual_seed(seed), **extra).frames for p in (ours, stock))
        assert torch.equal(a, b)
        c = ours(prompt_embeds=text, latents=noise, height=H, width=W, output_type="latent",
                 generator=torch.Generator().manual_seed(seed + 100), **extra).frames
        assert (c - a).abs().max() > 1e-3  # the re-noising draws matter, so equality above is not vacuous


def test_the_saved_scheduler_is_stock_and_others_are_refused(tmp_path):
    stock = CausalWanPipeline(transformer=tiny_wan_transformer(num_layers=1), scheduler=causal_scheduler(),
                              num_frames_per_block=2, denoising_timesteps=STEPS)
    stock.save_pretrained(tmp_path)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")  # stock class, stock call
    assert sched.config.stochastic_sampling and sched.config.shift == 1.0
    assert type(CausalWanPipeline.from_pretrained(tmp_path).scheduler) is FlowMatchEulerDiscreteScheduler
    # Euler (stochastic_sampling=False) steps at the same sigmas: an ODE sampler, x_next = x + (s' - s) v.
    euler = CausalWanPipeline(transformer=stock.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                              num_frames_per_block=2, denoising_timesteps=[1000])
    noise = torch.randn(B, C, 2, H, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), euler.causal_transformer() as causal:
        v = causal(noise, torch.full((B,), 1000.0), _text())
    out = euler(prompt_embeds=_text(), latents=noise, height=H, width=W, output_type="latent").frames
    torch.testing.assert_close(out, noise - v, atol=1e-6, rtol=1e-6)
    for bad, match in [(FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True), "shift"),
                       (FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), "use_karras_sigmas"),
                       (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "use_dynamic_shifting"),
                       (FlowMatchEulerDiscreteScheduler(shift_terminal=0.1), "shift_terminal"),
                       (DDIMScheduler(), "DDIMScheduler")]:
        with pytest.raises(ValueError, match=f"`scheduler`.*{match}"):
            CausalWanPipeline(transformer=stock.transformer, scheduler=bad, num_frames_per_block=2,
                              denoising_timesteps=STEPS)


def test_image_fixes_the_first_frame():
    pipe = _pipe()
    image = torch.randn(B, C, 1, H, W, generator=torch.Generator().manual_seed(4))
    video = pipe(prompt_embeds=_text(), image=image, num_frames=F_, height=H, width=W, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(video[:, :, :1], image)
    assert (video[:, :, 1:2] - image).abs().mean() > 0.1


def test_text_encoder_vae_cfg_path():
    """Stock UMT5 + AutoencoderKLWan components: prompt -> frames in [0, 1]. CFG: with one step,
    x0 = x - sigma (v_u + g (v_c - v_u)) is affine in g, and g = 1 is the plain conditional pass."""
    tok = tiny_tokenizer()
    pipe = CausalWanPipeline(transformer=tiny_wan_transformer(num_layers=1), scheduler=FlowMatchFewStepScheduler(),
                             tokenizer=tok, text_encoder=tiny_t5_text_encoder(tok, umt5=True), vae=tiny_wan_vae(),
                             num_frames_per_block=1, denoising_timesteps=[1000])
    prompts = ["a digit", "a seven"]
    frames = pipe(prompts, num_frames=2, height=H, width=W, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (2, 5, 4 * 8, 4 * 8, 3)  # 2 latent frames -> 1 + 4 video frames
    assert frames.min() >= 0 and frames.max() <= 1
    noise = torch.randn(2, C, 1, H, W, generator=torch.Generator().manual_seed(5))
    out = {g: pipe(prompts, guidance_scale=g, negative_prompt="", latents=noise, height=H, width=W,
                   output_type="latent").frames for g in (1.0, 2.0, 3.0)}
    torch.testing.assert_close(out[3.0] - out[2.0], out[2.0] - out[1.0], atol=1e-5, rtol=1e-4)
    assert (out[2.0] - out[1.0]).abs().max() > 1e-5


@pytest.mark.parametrize("config,match", [({"denoising_timesteps": [250, 500]}, "denoising_timesteps"),
                                          ({"context_noise": 1000}, "context_noise"),
                                          ({"local_attn_size": 1}, "local_attn_size"),
                                          ({"denoising_sigmas": [1.0, 0.5]}, "denoising_sigmas"),
                                          ({"denoising_sigmas": [1.0, 0.7, 0.8]}, "denoising_sigmas"),
                                          ({"num_frames_per_block": 2.5}, "num_frames_per_block"),
                                          ({"local_attn_size": 3, "sink_size": 2, "sinks_in_window": True},
                                           "sinks_in_window"),
                                          ({"sinks_in_window": "yes"}, "sinks_in_window"),
                                          ({"block_sizes": [1, 3]}, "block_sizes"),
                                          ({"block_sizes": [1, 0, 2]}, "num_frames_per_block"),
                                          ({"block_sizes": [1, 4, 2], "local_attn_size": 3}, "local_attn_size")])
def test_bad_config_names_the_setting(config, match):
    with pytest.raises(ValueError, match=match):
        _pipe(**config)


def test_bad_call_names_the_argument():
    pipe = _pipe()
    with pytest.raises(ValueError, match="num_frames"):
        pipe(prompt_embeds=_text(), num_frames=3, height=H, width=W)
    with pytest.raises(ValueError, match="prompt"):
        pipe(height=H, width=W)
    with pytest.raises(ValueError, match="output_type"):
        pipe(prompt_embeds=_text(), height=H, width=W, output_type="pil")
    negative = torch.zeros_like(_text())
    for bad in (float("nan"), float("inf"), -1.0):  # NaN once passed the check and silently switched CFG off
        with pytest.raises(ValueError, match="guidance_scale"):
            pipe(prompt_embeds=_text(), negative_prompt_embeds=negative, height=H, width=W, guidance_scale=bad)
    with pytest.raises(ValueError, match="generator"):
        pipe(prompt_embeds=_text(), height=H, width=W, generator=[torch.Generator()] * 5)
