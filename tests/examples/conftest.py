import pytest
from script_utils import run_script


@pytest.fixture
def tiny_teacher(tmp_path_factory):
    """A small digits teacher pipeline folder made by 2 SFT steps (as the SFT smoke run does)."""
    out = tmp_path_factory.mktemp("teacher")
    run_script("sft", ["--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "8",
                       "--block_out_channels", "16", "32", "--layers_per_block", "1", "--report_to", "none",
                       "--validation_num_inference_steps", "2", "--checkpointing_steps", "0", "--validation_steps", "0"])
    return str(out)
