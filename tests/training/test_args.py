from dataclasses import dataclass, field

import pytest

from diffusers_fastgen.training import OptimizerArgs, RunArgs, parse_args, save_config


@dataclass
class ToyArgs:
    """Toy method."""

    run: RunArgs = field(default_factory=lambda: RunArgs(train_batch_size=128, max_train_steps=5))
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    t_list: list[float] = field(default_factory=lambda: [0.999, 0.833, 0.0])  # student schedule
    guidance_scale: float = 1.0  # teacher CFG

    def __post_init__(self):
        if self.guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {self.guidance_scale}.")


def test_defaults_cli_and_yaml_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.5\nrun:\n  max_train_steps: 7\n  mixed_precision: bf16\nguidance_scale: 2.0\n")
    args = parse_args(ToyArgs, ["--config", str(cfg), "--learning_rate", "0.25", "--t_list", "0.9", "0.5", "0",
                                "--gradient_checkpointing", "true", "--checkpoints_total_limit", "none"])
    assert args.optimizer.learning_rate == 0.25  # CLI beats YAML
    assert args.run.max_train_steps == 7 and args.run.mixed_precision == "bf16"  # YAML beats default
    assert args.guidance_scale == 2.0 and args.t_list == [0.9, 0.5, 0.0]
    assert args.run.gradient_checkpointing is True and args.run.checkpoints_total_limit is None
    defaults = parse_args(ToyArgs, [])
    assert defaults.run.train_batch_size == 128 and defaults.run.max_train_steps == 5  # the script's group defaults
    assert defaults.run.seed == 0 and defaults.optimizer.learning_rate == 1e-4
    # The saved config reloads to the same values.
    save_config(args, str(tmp_path / "out" / "config.yaml"))
    again = parse_args(ToyArgs, ["--config", str(tmp_path / "out" / "config.yaml")])
    assert again == args


@pytest.mark.parametrize("argv,match", [
    (["--mixed_precision", "fp8"], "mixed_precision"),
    (["--learning_rate", "-1"], "learning_rate"),
    (["--max_train_steps", "abc"], "max_train_steps"),
    (["--guidance_scale", "-2"], "guidance_scale"),
    (["--gradient_checkpointing", "maybe"], "gradient_checkpointing"),
])
def test_bad_values_name_the_field(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(ToyArgs, argv)


def test_unknown_yaml_key_and_missing_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rte: 0.1\n")
    with pytest.raises(ValueError, match="learning_rte"):
        parse_args(ToyArgs, ["--config", str(cfg)])
    with pytest.raises(ValueError, match="config"):
        parse_args(ToyArgs, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):  # argparse rejects unknown flags
        parse_args(ToyArgs, ["--learning_rte", "0.1"])
