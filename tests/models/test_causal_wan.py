import copy

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.causal_wan import CausalWan, block_causal_mask
from diffusers_fastgen.testing.tiny import tiny_cond, tiny_wan_transformer

# Tiny Wan: 16 latent channels, 4x4 latents -> 2x2 = 4 tokens per frame, 8 frames.
B, C, F_, H, W = 2, 16, 8, 4, 4


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, F_, H, W, generator=g)
    timestep = torch.rand(B, F_, generator=g) * 1000  # per-frame (diffusion forcing)
    return x, timestep, tiny_cond("wan", B, seed=seed)["encoder_hidden_states"]


def test_mask_matches_its_definition():
    # 6 frames, 1 token each, blocks of 2; window 4 frames with 1 sink frame.
    m = block_causal_mask(6, 1, 2)
    expected = torch.tensor([[j // 2 <= i // 2 for j in range(6)] for i in range(6)])
    torch.testing.assert_close(m, expected)
    m = block_causal_mask(6, 1, 2, local_attn_size=4, sink_size=1)
    expected = torch.tensor([[j // 2 <= i // 2 and (j >= (i // 2 + 1) * 2 - 4 or j < 1) for j in range(6)]
                             for i in range(6)])
    torch.testing.assert_close(m, expected)
    assert not m[5, 1] and m[5, 0] and m[5, 2]  # frame 1 left the window of block 2; frame 0 is the sink
    assert block_causal_mask(4, 3, 4) is None  # one block: bidirectional


def test_one_block_equals_the_stock_bidirectional_model():
    model = tiny_wan_transformer(num_layers=2)
    x, _, text = _inputs()
    timestep = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ref = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text).sample
        out = CausalWan(model, num_frames_per_block=F_)(x, timestep, text)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_block_causal_output_does_not_see_the_future():
    model = tiny_wan_transformer(num_layers=2)
    causal = CausalWan(model, num_frames_per_block=2)
    x, timestep, text = _inputs()
    x2 = x.clone()
    x2[:, :, 4:] += 1.0  # change blocks 2-3
    with torch.no_grad():
        a, b = causal(x, timestep, text), causal(x2, timestep, text)
    torch.testing.assert_close(a[:, :, :4], b[:, :, :4], atol=1e-6, rtol=1e-6)
    assert (a[:, :, 4:] - b[:, :, 4:]).abs().max() > 1e-2


def test_per_frame_timesteps_equal_a_shared_timestep_when_equal():
    model = tiny_wan_transformer(num_layers=1)
    causal = CausalWan(model, num_frames_per_block=2)
    x, _, text = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(causal(x, torch.full((B, F_), 400.0), text), causal(x, torch.full((B,), 400.0), text),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("local_attn_size,sink_size", [(-1, 0), (4, 0), (4, 1), (6, 2)])
@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_cached_chunks_equal_one_block_causal_pass(frames_per_block, local_attn_size, sink_size):
    """Block-by-block with the KV cache (a rolling window when local_attn_size > 0) == one masked pass."""
    model = tiny_wan_transformer(num_layers=2)
    causal = CausalWan(model, frames_per_block, local_attn_size=local_attn_size, sink_size=sink_size)
    x, timestep, text = _inputs()
    with torch.no_grad():
        full = causal(x, timestep, text)
        cache = causal.new_cache(B, F_, H, W)
        chunks = []
        for start in range(0, F_, frames_per_block):
            sl = slice(start, start + frames_per_block)
            chunks.append(causal(x[:, :, sl], timestep[:, sl], text, kv_cache=cache, update_cache=True))
    torch.testing.assert_close(torch.cat(chunks, 2), full, atol=1e-5, rtol=1e-5)
    if local_attn_size > 0:  # the rolling window really held fewer frames than the video
        assert cache.capacity_frames == sink_size + local_attn_size - frames_per_block < F_
        assert cache.frame_ids.tolist()[:sink_size] == list(range(sink_size))
        assert cache.frame_ids[-1] == F_ - 1


@pytest.mark.parametrize("layout,local_attn_size,sink_size", [((2, 3, 3), -1, 0), ((1, 3, 2), 4, 1), ((2, 1), 3, 0)])
def test_non_uniform_layouts_mask_and_cache(layout, local_attn_size, sink_size):
    """Block sizes whose last one repeats ([1, 2]: an independent first frame, then pairs): the mask follows
    its definition and block-by-block with the cache equals one masked pass."""
    from diffusers_fastgen.models.causal_wan import block_bounds

    bounds = block_bounds(layout, F_)
    block_of = {f: i for i, (a, b) in enumerate(bounds) for f in range(a, b)}
    end_of = {f: b for a, b in bounds for f in range(a, b)}
    m = block_causal_mask(F_, 1, layout, local_attn_size=local_attn_size, sink_size=sink_size)
    expected = torch.tensor([[block_of[j] <= block_of[i] and (local_attn_size < 0 or j >= end_of[i] - local_attn_size
                                                              or j < sink_size) for j in range(F_)] for i in range(F_)])
    torch.testing.assert_close(m, expected)
    model = tiny_wan_transformer(num_layers=2)
    causal = CausalWan(model, layout, local_attn_size=local_attn_size, sink_size=sink_size)
    x, timestep, text = _inputs(2)
    with torch.no_grad():
        full = causal(x, timestep, text)
        cache = causal.new_cache(B, F_, H, W)
        chunks = [causal(x[:, :, a:b], timestep[:, a:b], text, kv_cache=cache, update_cache=True) for a, b in bounds]
    torch.testing.assert_close(torch.cat(chunks, 2), full, atol=1e-5, rtol=1e-5)
    if local_attn_size > 0:
        assert cache.capacity_frames == sink_size + local_attn_size - min(layout)


def test_block_bounds_extend_the_last_size_and_name_a_bad_length():
    from diffusers_fastgen.models.causal_wan import block_bounds

    assert block_bounds((1, 4), 13) == [(0, 1), (1, 5), (5, 9), (9, 13)]
    assert block_bounds((3,), 6) == [(0, 3), (3, 6)]
    with pytest.raises(ValueError, match="block boundary"):
        block_bounds((1, 4), 12)


def test_denoising_steps_read_the_cache_without_writing_it():
    """Several reads at different noise levels, then the write: the cache holds exactly the written block."""
    model = tiny_wan_transformer(num_layers=2)
    causal = CausalWan(model, 2)
    x, timestep, text = _inputs()
    with torch.no_grad():
        full = causal(x[:, :, :4], timestep[:, :4], text)
        cache = causal.new_cache(B, F_, H, W)
        causal(x[:, :, :2], timestep[:, :2], text, kv_cache=cache, update_cache=True)
        for _ in range(3):  # denoising steps on block 1 with other inputs: must not leak into the cache
            causal(torch.randn(B, C, 2, H, W), torch.rand(B) * 1000, text, kv_cache=cache)
        assert cache.frame_ids.tolist() == [0, 1]
        out = causal(x[:, :, 2:4], timestep[:, 2:4], text, kv_cache=cache)
    torch.testing.assert_close(out, full[:, :, 2:4], atol=1e-5, rtol=1e-5)


def test_state_dict_untouched_and_stock_processors_restorable():
    model = tiny_wan_transformer(num_layers=1)
    before = copy.deepcopy(model.state_dict())
    x, _, text = _inputs()
    timestep = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        ref = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text).sample
        causal = CausalWan(model, 2)
        assert model.state_dict().keys() == before.keys()
        causal.remove()
        assert all(isinstance(p, WanAttnProcessor) for p in model.attn_processors.values())
        torch.testing.assert_close(model(hidden_states=x, timestep=timestep, encoder_hidden_states=text).sample, ref)


def test_denoiser_takes_per_frame_time():
    model = tiny_wan_transformer(num_layers=1)
    causal = CausalWan(model, 2)
    x, _, text = _inputs()
    t = torch.rand(B, F_)
    with torch.no_grad():
        flow = causal(x, t * 1000, text)
        x0 = Denoiser(causal)(x, t, {"encoder_hidden_states": text}, target="x0")
    torch.testing.assert_close(x0, x - t[:, None, :, None, None] * flow, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_the_masked_pass():
    model = tiny_wan_transformer(num_layers=1)
    causal = CausalWan(model, 2)
    x, timestep, text = _inputs()
    causal(x, timestep, text)[:, :, :2].square().mean().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0


def test_the_model_called_directly_stays_stock_wan_while_causal_is_installed():
    """One module, two roles (LoRA adapters on one base): calls through CausalWan are block-causal, direct calls
    of the same model run the processors it had before, also right after a causal call with a cache."""
    model = tiny_wan_transformer(num_layers=2)
    x, _, text = _inputs(3)
    timestep = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        stock = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text).sample
        causal = CausalWan(model, 2)
        masked = causal(x, timestep, text)
        cache = causal.new_cache(B, F_, H, W)
        causal(x[:, :, :2], timestep, text, kv_cache=cache, update_cache=True)
        direct = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text).sample
        again = causal(x, timestep, text)
    torch.testing.assert_close(direct, stock, atol=0, rtol=0)
    assert (masked - stock).abs().max() > 1e-3
    torch.testing.assert_close(again, masked, atol=0, rtol=0)


def test_sinks_inside_the_window_is_self_forcings_cache_size():
    """sinks_in_window=True (Self-Forcing / LongLive): a window of L frames holds the S sinks, so L - S recent
    frames are seen (the same as L - S with the sinks outside), and the cache holds L - N context frames."""
    model = tiny_wan_transformer(num_layers=2)
    x, timestep, text = _inputs(1)
    with torch.no_grad():
        inside = CausalWan(model, 2, local_attn_size=6, sink_size=2, sinks_in_window=True)
        a = inside(x, timestep, text)
        cache = inside.new_cache(B, F_, H, W)
        chunks = [inside(x[:, :, i:i + 2], timestep[:, i:i + 2], text, kv_cache=cache, update_cache=True)
                  for i in range(0, F_, 2)]
        inside.remove()
        b = CausalWan(model, 2, local_attn_size=4, sink_size=2)(x, timestep, text)
        c = CausalWan(model, 2, local_attn_size=6, sink_size=2)(x, timestep, text)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.cat(chunks, 2), a, atol=1e-5, rtol=1e-5)
    assert cache.capacity_frames == 6 - 2
    assert (a[:, :, 6:] - c[:, :, 6:]).abs().max() > 1e-3  # block 3 sees frame 2 only with the sinks outside
    torch.testing.assert_close(a[:, :, :6], c[:, :, :6], atol=1e-5, rtol=1e-5)  # earlier blocks: same frames
    with pytest.raises(ValueError, match="sinks_in_window"):
        CausalWan(model, 2, local_attn_size=3, sink_size=2, sinks_in_window=True)


@pytest.mark.parametrize("kwargs,match", [({"num_frames_per_block": 0}, "num_frames_per_block"),
                                          ({"num_frames_per_block": 2, "local_attn_size": 1}, "local_attn_size"),
                                          ({"num_frames_per_block": 1, "sink_size": 1}, "sink_size")])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalWan(tiny_wan_transformer(num_layers=1), **kwargs)
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        CausalWan(torch.nn.Linear(2, 2))


def test_bad_timestep_shape_is_refused():
    causal = CausalWan(tiny_wan_transformer(num_layers=1), 2)
    x, _, text = _inputs()
    with pytest.raises(ValueError, match="timestep"):
        causal(x, torch.zeros(B, F_ - 1), text)
