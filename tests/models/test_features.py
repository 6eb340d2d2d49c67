import pytest
import torch

from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.discriminator import TokenHead, head_for_features
from diffusers_fastgen.models.features import forward_with_tap_grad, frozen, run_until_tap, tap_features
from diffusers_fastgen.parametrization import vp_from_betas
from diffusers_fastgen.testing import tiny as T


def test_tap_equals_full_forward_and_stops_early():
    model = T.tiny_unet2d()
    den = Denoiser(model, vp_from_betas(), "epsilon")
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.6]), T.tiny_cond("unet2d", 2)
    calls = []
    handle = model.up_blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        with tap_features(model, "mid_block") as captured:
            den(x, t, cond)
        cut = run_until_tap(den, x, t, cond, "mid_block")
    handle.remove()
    torch.testing.assert_close(cut, captured[0])
    assert len(calls) == 1  # the last up block ran in the full forward only
    assert head_for_features(cut)(cut).shape == (2, 1)
    with pytest.raises(ValueError, match="module_name"):
        run_until_tap(den, x, t, cond, "no_such_block")


def test_token_head_on_transformer_features():
    den = Denoiser(T.tiny_wan_transformer())
    feats = run_until_tap(den, torch.randn(2, 16, 2, 8, 8), torch.tensor([0.5, 0.5]), T.tiny_cond("wan", 2), "blocks.0")
    head = head_for_features(feats)
    assert isinstance(head, TokenHead) and head(feats).shape == (2, 1)


def _unet_case():
    model = T.tiny_unet2d()
    den = Denoiser(model, vp_from_betas(), "epsilon")
    return model, den, torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.6]), T.tiny_cond("unet2d", 2)


def test_forward_with_tap_grad_matches_full_forward_and_cut_gradient():
    """One pass gives the full forward's prediction (no graph) and features whose input gradient equals
    the one through a forward cut at the tap; frozen() keeps weight gradients out and restores flags."""
    model, den, x, t, cond = _unet_case()
    with torch.no_grad():
        full = den(x, t, cond)
    x_ref = x.clone().requires_grad_(True)
    ref = run_until_tap(den, x_ref, t, cond, "mid_block")
    ref.square().sum().backward()
    model.zero_grad(set_to_none=True)

    x_in = x.clone().requires_grad_(True)
    params = list(model.parameters())
    with frozen(params):
        pred, feats = forward_with_tap_grad(den, x_in, t, cond, "mid_block")
    assert pred.grad_fn is None and torch.is_grad_enabled()
    torch.testing.assert_close(pred, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats, ref.detach(), rtol=1e-5, atol=1e-6)
    feats.square().sum().backward()
    torch.testing.assert_close(x_in.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in params) and all(p.requires_grad for p in params)


def test_multi_tap_returns_in_given_order_and_stops_after_last():
    model, den, x, t, cond = _unet_case()
    calls = []
    handle = model.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        with tap_features(model, ["mid_block", "down_blocks.0"]) as captured:
            den(x, t, cond)
        cut = run_until_tap(den, x, t, cond, ["mid_block", "down_blocks.0"])
    handle.remove()
    assert len(calls) == 1  # only the uncut forward reached the up blocks
    assert cut[0].shape == captured[0].shape and cut[1].shape == captured[1].shape
    for a, b in zip(cut, captured):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="at least one"):
        run_until_tap(den, x, t, cond, [])


def test_tap_features_gives_back_grad_mode_on_exit_even_after_an_error():
    """no_grad_after switches grad mode off inside the forward; the block, not the caller, restores it."""
    model, den, x, t, cond = _unet_case()
    with tap_features(model, "mid_block", no_grad_after=True) as captured:
        den(x, t, cond)
        assert not torch.is_grad_enabled()  # the blocks after the tap ran without recording
    assert captured[0] is not None and torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with tap_features(model, "mid_block", no_grad_after=True):
            den(x, t, cond)
            raise RuntimeError("boom")
    assert torch.is_grad_enabled()
    with torch.no_grad(), tap_features(model, "mid_block", no_grad_after=True):
        den(x, t, cond)
    assert torch.is_grad_enabled()


def test_joint_blocks_tap_the_image_stream():
    """SD3 / Flux blocks return (text, image) (SD3's last: (None, image)); the tap takes the image tokens."""
    for model, kind, tokens in ((T.tiny_sd3_transformer(), "sd3", 64), (T.tiny_flux_transformer(), "flux", 16)):
        den = Denoiser(model)
        feats = run_until_tap(den, torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.6]), T.tiny_cond(kind, 2),
                              "transformer_blocks.0")
        assert feats.shape[:2] == (2, tokens)  # 8x8 latents: SD3 patch 1 -> 64, Flux packed 2x2 -> 16 (text: 5)
