import os

import torch
from script_utils import assert_changed, run_script, unet_weights

from diffusers_fastgen.models.digits import digits_unet
from diffusers_fastgen.pipelines import DigitsPipeline


def test_sft_two_steps_trains_saves_and_resumes(tmp_path):
    out = str(tmp_path / "sft")
    argv = ["--output_dir", out, "--train_batch_size", "8", "--block_out_channels", "16", "32",
            "--layers_per_block", "1", "--report_to", "none", "--validation_num_inference_steps", "2",
            "--checkpointing_steps", "1", "--validation_steps", "0", "--seed", "3"]
    run_script("sft", argv + ["--max_train_steps", "2"])
    torch.manual_seed(3)  # the script's seed: it builds the UNet right after seeding
    init = {k: v for k, v in digits_unet((16, 32), 1).state_dict().items()}
    after = unet_weights(out)
    assert_changed(init, after)
    # ... and only a little: 2 Adam steps from this very init (a wrong init would differ by O(1)).
    for k in init:
        assert (after[k] - init[k]).abs().max() < 0.01, k
    pipe = DigitsPipeline.from_pretrained(out)
    assert pipe([1, 2], num_inference_steps=2, output_type="latent").images.shape == (2, 1, 8, 8)
    assert os.path.isfile(os.path.join(out, "samples", "step_000002.png"))
    assert os.path.isfile(os.path.join(out, "train_config.yaml"))
    # Resume: continuing to step 3 from `latest` equals an uninterrupted 3-step run.
    run_script("sft", argv + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    ref = str(tmp_path / "ref")
    run_script("sft", [a if a != out else ref for a in argv] + ["--max_train_steps", "3"])
    resumed, uninterrupted = unet_weights(out), unet_weights(ref)
    for k in resumed:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=0)
