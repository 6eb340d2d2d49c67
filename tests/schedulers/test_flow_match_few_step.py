"""Conformance of our only own scheduler, FlowMatchFewStepScheduler."""

import pytest
import torch

from diffusers_fastgen.schedulers import FlowMatchFewStepScheduler


def test_config_round_trip(tmp_path):
    s = FlowMatchFewStepScheduler(shift=5.0)
    s.save_pretrained(tmp_path)
    loaded = FlowMatchFewStepScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(s.config) == {"num_train_timesteps": 1000, "shift": 5.0,
                                                          "use_flow_sigmas": True}
    loaded.set_timesteps(2)
    torch.testing.assert_close(loaded.sigmas, torch.tensor([1.0, 5 / 6, 0.0]))
    torch.testing.assert_close(loaded.timesteps, torch.tensor([1000.0, 1000 * 5 / 6]))


def test_set_timesteps_explicit_and_errors():
    s = FlowMatchFewStepScheduler()
    s.set_timesteps(sigmas=[0.999, 0.833])
    torch.testing.assert_close(s.sigmas, torch.tensor([0.999, 0.833, 0.0]))
    s.set_timesteps(timesteps=[900.0, 500.0])
    torch.testing.assert_close(s.sigmas, torch.tensor([0.9, 0.5, 0.0]))
    s.set_timesteps(3, mu=0.7)  # pipelines with dynamic shifting pass mu; the trained schedule wins
    torch.testing.assert_close(s.sigmas, torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="decreasing"):
        s.set_timesteps(sigmas=[0.5, 0.7])
    with pytest.raises(ValueError, match="shift"):
        FlowMatchFewStepScheduler(shift=-1.0)


def test_step_closed_form_and_add_noise():
    s = FlowMatchFewStepScheduler(shift=1.0)
    s.set_timesteps(2)  # sigmas [1, 0.5, 0]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = s.step(v, s.timesteps[0], x, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    x0 = x - 1.0 * v
    torch.testing.assert_close(out.pred_original_sample, x0)
    torch.testing.assert_close(out.prev_sample, 0.5 * x0 + 0.5 * noise)
    last = s.step(v, s.timesteps[1], out.prev_sample)
    torch.testing.assert_close(last.prev_sample, out.prev_sample - 0.5 * v)  # final step returns x0
    noised = s.add_noise(x0, noise, torch.tensor([250.0, 750.0]))
    expected = torch.stack([0.75 * x0[0] + 0.25 * noise[0], 0.25 * x0[1] + 0.75 * noise[1]])
    torch.testing.assert_close(noised, expected)
    assert s.scale_model_input(x, 0) is x


@pytest.mark.parametrize("kwargs,match", [({"shift": float("nan")}, "shift"), ({"shift": float("inf")}, "shift"),
                                          ({"shift": 0.0}, "shift"), ({"num_train_timesteps": 0}, "num_train_timesteps"),
                                          ({"num_train_timesteps": 2.5}, "num_train_timesteps")])
def test_bad_config_values_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowMatchFewStepScheduler(**kwargs)


def test_a_misspelt_config_key_is_an_error_but_other_schedulers_keys_are_ignored(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'shift'"):
        FlowMatchFewStepScheduler.from_config({"shfit": 3.0})
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    for other in (FlowMatchEulerDiscreteScheduler(shift=3.0), LCMScheduler()):
        FlowMatchFewStepScheduler.from_config(other.config)
    assert FlowMatchFewStepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config).config.shift == 3.0


def test_step_past_the_end_is_a_clear_error():
    s = FlowMatchFewStepScheduler()
    s.set_timesteps(2)
    x = torch.zeros(1, 1, 2, 2)
    for t in s.timesteps:
        x = s.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="past the end"):
        s.step(x, s.timesteps[-1], x)
