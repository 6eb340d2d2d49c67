import os
from dataclasses import dataclass, field

import pytest

from diffusers_fastgen.training import EMAArgs, OptimizerArgs, RunArgs, parse_args, save_config


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


@dataclass
class SignedArgs:
    """Signed values."""

    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    logit_mean: float = 0.0  # mean of the logit-normal time draw
    t_list: list[float] = field(default_factory=lambda: [1.0])  # a list


def test_negative_numbers_and_bare_boolean_flags():
    args = parse_args(SignedArgs, ["--logit_mean", "-0.8", "--t_list", "1.0", "-0.5"])
    assert args.logit_mean == -0.8 and args.t_list == [1.0, -0.5]
    assert parse_args(SignedArgs, ["--logit_mean", "-1e-4"]).logit_mean == -1e-4
    with pytest.raises(ValueError, match="learning_rate"):  # once an argparse 'expected one argument'
        parse_args(SignedArgs, ["--learning_rate", "-1e-4"])
    assert parse_args(ToyArgs, ["--gradient_checkpointing"]).run.gradient_checkpointing is True
    assert parse_args(ToyArgs, ["--gradient_checkpointing", "false"]).run.gradient_checkpointing is False


def test_no_prefix_matching(capsys):
    with pytest.raises(SystemExit):  # `--lr 5` once set lr_warmup_steps
        parse_args(ToyArgs, ["--lr", "5"])
    assert "unrecognized arguments: --lr" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--learning_rate", "nan"], "learning_rate"),
    (["--guidance_scale", "inf"], "guidance_scale"),
    (["--ema_halflife_kimg", "0"], "ema_halflife_kimg"),
    (["--report_to", "tensorbord"], "report_to"),
    (["--max_nonfinite_skips", "-1"], "max_nonfinite_skips"),
])
def test_non_finite_and_out_of_range_values_name_the_field(argv, match):
    @dataclass
    class WithEMA:
        """With EMA."""

        run: RunArgs = field(default_factory=RunArgs)
        optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
        ema: EMAArgs = field(default_factory=EMAArgs)
        guidance_scale: float = 1.0  # CFG

    with pytest.raises(ValueError, match=match):
        parse_args(WithEMA, argv)


def test_yaml_config_must_be_a_mapping(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("- learning_rate\n- 0.1\n")
    with pytest.raises(ValueError, match="mapping"):
        parse_args(ToyArgs, ["--config", str(cfg)])


def test_help_shows_the_scripts_own_defaults_and_the_field_comments(capsys):
    with pytest.raises(SystemExit):
        parse_args(ToyArgs, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in text and "(default: 5)" in text  # ToyArgs' RunArgs overrides, not RunArgs' 32 / 1000
    assert "(default: 32)" not in text
    assert "teacher CFG (default: 1.0)" in text and "per-process batch size" in text
    assert "{no,fp16,bf16}" in text


def test_script_help():
    """A real script, as a user runs it: its own defaults (not RunArgs') and its Literal choices."""
    script, expected = "fdistill", ["outputs/fdistill", "(default: 128)", "{reverse_kl,kl,js,squared_hellinger,jeffreys}",
                                    "AdamW beta1 (default: 0.0)"]
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, f"{root}/examples/train_{script}/train_{script}.py", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    for e in expected:
        assert e in text
