import pytest
from script_utils import VIDEO_COMMON, VIDEO_TINY, run_script


@pytest.fixture
def tiny_teacher(tmp_path_factory):
    """A small digits teacher pipeline folder made by 2 SFT steps (as the SFT smoke run does)."""
    out = tmp_path_factory.mktemp("teacher")
    run_script("sft", ["--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "8",
                       "--block_out_channels", "16", "32", "--layers_per_block", "1", "--report_to", "none",
                       "--validation_num_inference_steps", "2", "--checkpointing_steps", "0", "--validation_steps", "0"])
    return str(out)


@pytest.fixture(scope="session")
def video_teacher(tmp_path_factory):
    """A tiny bidirectional moving-digits teacher (2 SFT steps, one block spanning the video), trained with
    cond_dropout so that guidance has an unconditional branch to use."""
    out = str(tmp_path_factory.mktemp("video_teacher"))
    run_script("causal_sft", ["--output_dir", out, "--num_frames_per_block", "8", "--sample_steps", "2",
                              "--checkpointing_steps", "0", "--cond_dropout", "0.5", *VIDEO_TINY, *VIDEO_COMMON[:-2],
                              "--eval_num_videos", "0"])
    return out
