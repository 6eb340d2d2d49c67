"""`diffusers-fastgen` command line: `diffusers-fastgen convert ...` (published causal Wan students ->
CausalWanPipeline folders). Errors in the arguments or the files print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .conversion import RECIPES, convert_causal_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _timesteps(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one timestep")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-fastgen", allow_abbrev=False, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert", allow_abbrev=False,
        help="convert a published causal Wan student (Self-Forcing / CausVid .pt, FastGen, plain state dict) "
             "into a CausalWanPipeline folder",
        description="Convert a causal Wan checkpoint into a CausalWanPipeline folder that "
                    "CausalWanPipeline.from_pretrained loads, with the sampling recipe in its config.")
    convert.add_argument("checkpoint", help=".pt / .pth (read with torch.load(weights_only=True)) or .safetensors")
    convert.add_argument("output_dir", help="a new (or empty) folder; nothing already there is replaced")
    convert.add_argument("--recipe", choices=sorted(RECIPES) + ["none"], default="self_forcing",
                         help="sampling recipe preset (default: self_forcing); 'none' needs every recipe field below "
             "(denoising_sigmas optional)")
    convert.add_argument("--use_ema", action="store_true", help="take the EMA generator (Self-Forcing: generator_ema)")
    convert.add_argument("--base_pipeline", default=None,
                         help="a WanPipeline folder: its transformer config, tokenizer, text encoder and VAE are used")
    convert.add_argument("--transformer_config", default=None,
                         help="a transformer config.json (or folder); default: read off the checkpoint's shapes")
    convert.add_argument("--attention_head_dim", type=int, default=128,
                         help="head dimension when the config is read off the shapes (128 in every Wan 2.1)")
    convert.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as stored)")
    convert.add_argument("--num_frames_per_block", type=int, default=None, help="latent frames per causal block")
    convert.add_argument("--denoising_timesteps", type=_timesteps, default=None,
                         help="per-block model timesteps, decreasing in (0, 1000], e.g. '1000,937.5,833.33,625'")
    convert.add_argument("--denoising_sigmas", type=_timesteps, default=None,
                         help="noise level of each step when it is not timestep / 1000 (decreasing in (0, 1])")
    convert.add_argument("--context_noise", type=int, default=None, help="timestep at which finished blocks are cached")
    convert.add_argument("--local_attn_size", type=int, default=None, help="attention window in frames (-1 = global)")
    convert.add_argument("--sink_size", type=int, default=None, help="sink frames kept with a local window")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pipe = convert_causal_checkpoint(
            args.checkpoint, args.output_dir, recipe=None if args.recipe == "none" else args.recipe,
            use_ema=args.use_ema, transformer_config=args.transformer_config,
            attention_head_dim=args.attention_head_dim, base_pipeline=args.base_pipeline,
            dtype=DTYPES[args.dtype] if args.dtype else None, num_frames_per_block=args.num_frames_per_block,
            denoising_timesteps=args.denoising_timesteps, denoising_sigmas=args.denoising_sigmas,
            context_noise=args.context_noise,
            local_attn_size=args.local_attn_size, sink_size=args.sink_size)
    except (ValueError, TypeError, OSError) as err:
        print(f"diffusers-fastgen convert: error: {err}", file=sys.stderr)
        return 2
    recipe = {k: pipe.config[k] for k in ("num_frames_per_block", "denoising_timesteps", "denoising_sigmas",
                                          "context_noise", "local_attn_size", "sink_size")}
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"wrote {args.output_dir}: CausalWanPipeline, transformer {params:,} parameters, recipe {json.dumps(recipe)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
