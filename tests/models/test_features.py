import pytest
import torch

from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.discriminator import TokenHead, head_for_features
from diffusers_fastgen.models.features import run_until_tap, tap_features
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
