"""Tiny stock pipelines with student schedulers: sample, save_pretrained, reload with stock
DiffusionPipeline.from_pretrained, identical images at a fixed seed."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from diffusers_fastgen.schedulers import (
    FlowMatchFewStepScheduler,
    flow_map_scheduler,
    flow_match_sde_scheduler,
    lcm_scheduler,
)
from diffusers_fastgen.testing import tiny as T


def _scheduler(kind):
    if kind == "sd":
        return lcm_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    if kind == "wan":
        return flow_map_scheduler(shift=5.0)
    return flow_match_sde_scheduler(shift=3.0)


def _sample(pipe, kind, steps=2):
    kw = dict(prompt="a photo of a cat", num_inference_steps=steps, output_type="np",
              generator=torch.Generator().manual_seed(0), height=16, width=16)
    if kind == "wan":
        kw.update(num_frames=5, guidance_scale=1.0)
    elif kind == "flux":
        kw.update(guidance_scale=0.0, max_sequence_length=8)
    elif kind == "sd3":
        kw.update(guidance_scale=1.0, max_sequence_length=8)
    else:
        kw.update(guidance_scale=1.0)
    torch.manual_seed(0)  # SD3/Flux/Wan do not pass `generator` to scheduler.step (see FlowMatchFewStepScheduler)
    out = pipe(**kw)
    return np.asarray(out.frames if kind == "wan" else out.images)


@pytest.mark.parametrize("kind", ["sd", "sd3", "flux", "wan"])
def test_round_trip_identical_samples(kind, tmp_path):
    pipe = T.tiny_pipeline(kind, _scheduler(kind))
    pipe.set_progress_bar_config(disable=True)
    before = _sample(pipe, kind)
    assert np.isfinite(before).all() and before.std() > 0
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is type(pipe)
    assert type(reloaded.scheduler) is type(pipe.scheduler)
    if isinstance(pipe.scheduler, FlowMatchFewStepScheduler):
        assert index["scheduler"][0].startswith("diffusers_fastgen") and index["scheduler"][1] == "FlowMatchFewStepScheduler"
    after = _sample(reloaded, kind)
    # Equal up to float rounding (seen: <= 2.4e-7 on [0, 1] images).
    np.testing.assert_allclose(after, before, atol=1e-6, rtol=0)
    # The recipe travels in scheduler_config.json: the reloaded schedule is the trained one.
    reloaded.scheduler.set_timesteps(2)
    pipe.scheduler.set_timesteps(2)
    torch.testing.assert_close(reloaded.scheduler.timesteps.float(), pipe.scheduler.timesteps.float())


def test_different_step_counts_differ():
    pipe = T.tiny_pipeline("sd3", _scheduler("sd3"))
    pipe.set_progress_bar_config(disable=True)
    assert np.abs(_sample(pipe, "sd3", 1) - _sample(pipe, "sd3", 2)).max() > 1e-4
