"""Published causal checkpoints -> CausalWanPipeline folders.

Parity: tests/fixtures/self_forcing_tiny holds a tiny random checkpoint in Self-Forcing's exact format with
the latents Self-Forcing's own inference code made from stored inputs (its README); the converted folder
must reproduce them. The re-noising draws are replayed in the order Self-Forcing consumed them."""

import os
from unittest import mock

import diffusers.schedulers.scheduling_flow_match_euler_discrete as stock_euler
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_fastgen.cli import main as cli_main
from diffusers_fastgen.conversion import (
    convert_causal_checkpoint,
    infer_transformer_config,
    load_causal_transformer,
    strip_prefixes,
    table_sigmas,
    to_diffusers_names,
    warp_timesteps,
)
from diffusers_fastgen.pipelines import CausalWanPipeline
from diffusers_fastgen.testing.tiny import tiny_wan_transformer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "self_forcing_tiny")
CKPT = os.path.join(FIXTURE, "self_forcing_tiny.pt")


def _run_like_self_forcing(folder):
    """The folder's pipeline on the fixture's inputs, replaying Self-Forcing's re-noising draws;
    returns latents in Self-Forcing's (B, F, C, H, W) layout."""
    inputs = load_file(os.path.join(FIXTURE, "inputs.safetensors"))
    draws = iter([inputs["renoise_noise"][b, i].permute(0, 2, 1, 3, 4) for b in range(2) for i in range(3)])
    used = []

    def replay(shape, generator=None, device=None, dtype=None):
        draw = next(draws)
        assert tuple(draw.shape) == tuple(shape)
        used.append(1)
        return draw.to(device=device, dtype=dtype)

    pipe = CausalWanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    # The converter writes the stock scheduler; its x0-then-fresh-noise step makes the draws.
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.stochastic_sampling
    with mock.patch.object(stock_euler, "randn_tensor", replay):
        video = pipe(prompt_embeds=inputs["prompt_embeds"], latents=inputs["noise"].permute(0, 2, 1, 3, 4),
                     height=8, width=12, output_type="latent").frames
    assert len(used) == 6  # every stored draw consumed, none invented
    return pipe, video.permute(0, 2, 1, 3, 4)


def test_self_forcing_checkpoint_reproduces_self_forcings_own_outputs(tmp_path):
    expected = load_file(os.path.join(FIXTURE, "expected.safetensors"))
    out = str(tmp_path / "sf")
    convert_causal_checkpoint(CKPT, out, recipe="self_forcing", use_ema=True, attention_head_dim=16)
    pipe, latents = _run_like_self_forcing(out)
    assert pipe.config.denoising_timesteps == expected["timesteps"].tolist()
    torch.testing.assert_close(latents, expected["latents"], atol=1e-4, rtol=1e-4)
    # The raw transformer output of block 0 at t = 1000 (no cache: the block sees only itself).
    inputs = load_file(os.path.join(FIXTURE, "inputs.safetensors"))
    with torch.no_grad(), pipe.causal_transformer() as causal:
        flow = causal(inputs["noise"][:, :3].permute(0, 2, 1, 3, 4), torch.full((2,), 1000.0), inputs["prompt_embeds"])
    torch.testing.assert_close(flow.permute(0, 2, 1, 3, 4), expected["flow_pred.block0.step0"], atol=1e-4, rtol=1e-4)


def test_the_parity_test_can_fail(tmp_path):
    """Negative control: the non-EMA generator is a different model, far outside the tolerance."""
    expected = load_file(os.path.join(FIXTURE, "expected.safetensors"))
    convert_causal_checkpoint(CKPT, str(tmp_path / "raw"), use_ema=False, attention_head_dim=16)
    _, latents = _run_like_self_forcing(str(tmp_path / "raw"))
    assert (latents - expected["latents"]).abs().max() > 0.1


def test_warped_timesteps_are_self_forcings():
    assert warp_timesteps([1000, 750, 500, 250], 5.0) == load_file(
        os.path.join(FIXTURE, "expected.safetensors"))["timesteps"].tolist()


def test_causvid_recipe_feeds_its_timesteps_at_table_noise_levels(tmp_path):
    """CausVid's 3-step recipe: timesteps [1000, 757, 522] at noise levels 1, 0.7568, 0.5217 (nearest entries of
    the shift-8 table: closed form 8u / (1 + 7u) at u = 1 - k/1000)."""
    sigmas = table_sigmas([1000, 757, 522], 8.0)
    assert [round(x, 4) for x in sigmas] == [1.0, 0.7568, 0.5217]
    u = 1 - 720 / 1000  # the table entry nearest 757: 8 * 0.28 / (1 + 7 * 0.28) = 0.756757
    assert abs(sigmas[1] - 8 * u / (1 + 7 * u)) < 1e-6
    out = str(tmp_path / "causvid")
    convert_causal_checkpoint(CKPT, out, recipe="causvid_3step", attention_head_dim=16)
    config = CausalWanPipeline.from_pretrained(out).config
    assert config.denoising_timesteps == [1000.0, 757.0, 522.0]
    assert [round(x, 4) for x in config.denoising_sigmas] == [1.0, 0.7568, 0.5217]
    out4 = str(tmp_path / "causvid4")  # the warped 4-step sampler: 8u / (1 + 7u) at u = 1, .75, .5, .25
    convert_causal_checkpoint(CKPT, out4, recipe="causvid_4step", attention_head_dim=16)
    config = CausalWanPipeline.from_pretrained(out4).config
    expected = [1000 * 8 * u / (1 + 7 * u) for u in (1, 0.75, 0.5, 0.25)]
    assert config.denoising_timesteps == pytest.approx(expected, abs=1e-3) and config.denoising_sigmas is None


def test_fastgen_and_plain_layouts_load_the_same_weights(tmp_path):
    """A FastGen-style safetensors (diffusers names under `transformer.`) and a plain .pt with original Wan names
    under `module.model.` give the same transformer as the Self-Forcing file."""
    sd = torch.load(CKPT, map_location="cpu", weights_only=True)["generator_ema"]
    diffusers_names = to_diffusers_names(strip_prefixes(sd))
    save_file({"transformer." + k: v.contiguous() for k, v in diffusers_names.items()}, str(tmp_path / "fastgen.safetensors"))
    torch.save({"module." + k: v for k, v in sd.items()}, str(tmp_path / "plain.pt"))
    reference = load_causal_transformer(CKPT, use_ema=True, attention_head_dim=16).state_dict()
    for path in ("fastgen.safetensors", "plain.pt"):
        got = load_causal_transformer(str(tmp_path / path), attention_head_dim=16).state_dict()
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in got)


def test_config_read_off_the_shapes_matches_a_known_model():
    model = tiny_wan_transformer(num_layers=2)
    config = infer_transformer_config(model.state_dict(), attention_head_dim=model.config.attention_head_dim)
    for key, value in config.items():
        expected = model.config[key]
        assert (tuple(expected) if isinstance(expected, (list, tuple)) else expected) == value, key


def test_bad_checkpoints_and_recipes_are_named_before_anything_is_written(tmp_path):
    sd = torch.load(CKPT, map_location="cpu", weights_only=True)["generator_ema"]
    cut = dict(sd)
    cut.pop("model.blocks.1.ffn.2.bias")
    cut["model.blocks.1.extra.weight"] = torch.zeros(1)
    torch.save({"generator": cut}, str(tmp_path / "cut.pt"))
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.ffn\.net\.2\.bias; unexpected keys: blocks\.1\.extra"):
        convert_causal_checkpoint(str(tmp_path / "cut.pt"), out, attention_head_dim=16)
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(ValueError, match="not a Wan transformer"):
        convert_causal_checkpoint(str(tmp_path / "unet.safetensors"), out)
    with pytest.raises(ValueError, match="no EMA weights"):
        convert_causal_checkpoint(str(tmp_path / "cut.pt"), out, use_ema=True)
    with pytest.raises(ValueError, match="attention_head_dim"):
        convert_causal_checkpoint(CKPT, out, attention_head_dim=48)
    with pytest.raises(ValueError, match="denoising_timesteps"):
        convert_causal_checkpoint(CKPT, out, denoising_timesteps=[250, 500])
    with pytest.raises(ValueError, match="local_attn_size"):
        convert_causal_checkpoint(CKPT, out, local_attn_size=2)  # smaller than a block of 3
    with pytest.raises(ValueError, match="lacks"):
        convert_causal_checkpoint(CKPT, out, recipe=None, num_frames_per_block=3)
    assert not os.path.exists(out)
    os.makedirs(out)
    open(os.path.join(out, "notes.txt"), "w").close()
    with pytest.raises(ValueError, match="not empty"):
        convert_causal_checkpoint(CKPT, out, attention_head_dim=16)
    assert os.listdir(out) == ["notes.txt"]


def test_cli_converts_and_reports_errors_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert cli_main(["convert", CKPT, out, "--use_ema", "--attention_head_dim", "16", "--recipe", "none",
                     "--num_frames_per_block", "3", "--denoising_timesteps", "1000,937.5,833.3333,625",
                     "--context_noise", "0", "--local_attn_size", "-1", "--sink_size", "0"]) == 0
    assert "CausalWanPipeline" in capsys.readouterr().out
    assert CausalWanPipeline.from_pretrained(out).config.num_frames_per_block == 3
    layout = str(tmp_path / "layout")  # an independent first frame, then blocks of 3, sinks counted in the window
    assert cli_main(["convert", CKPT, layout, "--use_ema", "--attention_head_dim", "16", "--block_sizes", "1,3",
                     "--local_attn_size", "6", "--sink_size", "1", "--sinks_in_window", "true"]) == 0
    config = CausalWanPipeline.from_pretrained(layout).config
    assert (config.block_sizes, config.local_attn_size, config.sink_size, config.sinks_in_window) == ([1, 3], 6, 1, True)
    assert '"block_sizes": [1, 3]' in capsys.readouterr().out
    assert cli_main(["convert", CKPT, str(tmp_path / "bad_layout"), "--use_ema", "--attention_head_dim", "16",
                     "--block_sizes", "1,4"]) == 2  # the repeating size must be num_frames_per_block (3)
    assert "block_sizes" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad_layout")
    assert cli_main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.endswith("is not a file.\n") and "Traceback" not in err
