"""`diffusers-fastgen` command line: `convert` (published causal Wan students -> CausalWanPipeline folders),
`generate` (sample and time any pipeline folder), `serve` (a web UI) and `quality` (FID against a reference
folder, CLIP score; local weights only). Errors in the arguments or the files print one line and
exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from diffusers.utils.logging import disable_progress_bar

from .conversion import RECIPES, convert_causal_checkpoint
from .evaluation.quality import FEATURES as QUALITY_FEATURES
from .evaluation.quality import check_local_folder, clip_score, fid, image_paths
from .generate import DTYPES as GENERATE_DTYPES
from .generate import check_request, generate, load_pipeline, pipeline_class_name, read_prompts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _comma_list(cast, kind: str):
    """An argparse type: a non-empty list of `cast` values separated by commas (or spaces)."""
    def parse(text: str) -> list:
        try:
            values = [cast(v) for v in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} separated by commas, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of the {kind}")
        return values
    return parse


_timesteps = _comma_list(float, "numbers")
_block_sizes = _comma_list(int, "integers")


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
    convert.add_argument("--block_sizes", type=_block_sizes, default=None,
                         help="a non-uniform block layout, e.g. '1,4' (an independent first frame, then blocks of 4; "
                              "the last size repeats and must equal --num_frames_per_block)")
    convert.add_argument("--denoising_timesteps", type=_timesteps, default=None,
                         help="per-block model timesteps, decreasing in (0, 1000], e.g. '1000,937.5,833.33,625'")
    convert.add_argument("--denoising_sigmas", type=_timesteps, default=None,
                         help="noise level of each step when it is not timestep / 1000 (decreasing in (0, 1])")
    convert.add_argument("--context_noise", type=int, default=None, help="timestep at which finished blocks are cached")
    convert.add_argument("--local_attn_size", type=int, default=None, help="attention window in frames (-1 = global)")
    convert.add_argument("--sink_size", type=int, default=None, help="sink frames kept with a local window")
    convert.add_argument("--sinks_in_window", choices=["true", "false"], default=None,
                         help="whether --local_attn_size counts the sinks (true: Self-Forcing / LongLive's convention)")
    gen = commands.add_parser(
        "generate", allow_abbrev=False, help="sample a pipeline folder (ours or stock diffusers) and time it",
        description="Sample any pipeline folder or Hub id with its own recipe (or --steps / --guidance_scale), "
                    "write one PNG per image and a grid (GIFs for videos), and print a timing table.")
    gen.add_argument("--model", required=True, help="pipeline folder or Hub id")
    gen.add_argument("--lora", default=None, help="a LoRA student folder: stock load_lora_weights + its scheduler/")
    gen.add_argument("--prompt", nargs="+", default=None, help="one or more prompts")
    gen.add_argument("--prompts_file", default=None, help=".txt (one per line), .jsonl or .csv (column 'text')")
    gen.add_argument("--class_labels", type=int, nargs="+", default=None, help="digits classes (DigitsPipeline)")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    gen.add_argument("--scheduler", default=None,
                     help="override the recipe's scheduler by class name (e.g. EulerDiscreteScheduler), same config")
    gen.add_argument("--guidance_scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    gen.add_argument("--num_images", type=int, default=1, help="samples per prompt / class")
    gen.add_argument("--batch_size", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0, help="batch i uses seed + i")
    gen.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    gen.add_argument("--repeats", type=int, default=3, help="timed passes over all batches (median reported)")
    gen.add_argument("--height", type=int, default=None, help="pixels (latent units for CausalWanPipeline)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--num_frames", type=int, default=None, help="latent frames (CausalWanPipeline)")
    gen.add_argument("--video_format", choices=["gif", "mp4"], default="gif",
                     help="how videos are written (mp4 needs imageio and imageio-ffmpeg)")
    gen.add_argument("--dtype", choices=sorted(GENERATE_DTYPES), default="fp32")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--quantize", choices=["int8"], default=None,
                     help="int8 dynamic quantization of the denoiser's Linear layers (CPU, fp32)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the denoiser (compiled during --warmup; needs a C++ compiler on CPU)")
    gen.add_argument("--channels_last", action="store_true",
                     help="the UNet and VAE in channels-last memory format (convolutional pipelines)")
    gen.add_argument("--output_dir", default="outputs/generate", help="where the images / videos go")
    srv = commands.add_parser(
        "serve", allow_abbrev=False, help="a small web UI (gradio) over a pipeline folder",
        description="Serve a pipeline folder in the browser: prompt or class label, steps, seed, guidance, Generate; "
                    "CausalWanPipeline frames stream in block by block; --teacher adds a side-by-side teacher.")
    srv.add_argument("--model", required=True, help="pipeline folder or Hub id")
    srv.add_argument("--teacher", default=None, help="a second pipeline run side by side on the same seed")
    srv.add_argument("--teacher_steps", type=int, default=50, help="the teacher's steps in the side-by-side mode")
    srv.add_argument("--lora", default=None, help="a LoRA student folder for --model")
    srv.add_argument("--quantize", choices=["int8"], default=None)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=7860)
    qual = commands.add_parser(
        "quality", allow_abbrev=False, help="FID of an image folder against reference images, and CLIP score",
        description="Score a folder of samples (e.g. generate's --output_dir) with weights from local files only: "
                    "Fréchet distance to --reference in Inception (FID), CLIP or DINOv2 features, and the CLIP score "
                    "against the prompts.")
    qual.add_argument("--images", required=True, help="folder of generated images (sorted by name)")
    qual.add_argument("--reference", default=None, help="folder of reference images (FID)")
    qual.add_argument("--features", choices=list(QUALITY_FEATURES), default="inception",
                      help="feature space of the Fréchet distance (inception needs torch-fidelity)")
    qual.add_argument("--feature_weights", default=None,
                      help="FID Inception weights file, or a local CLIP / DINOv2 transformers folder")
    qual.add_argument("--clip_model", default=None, help="local CLIP folder for the CLIP score")
    qual.add_argument("--prompt", nargs="+", default=None, help="prompt(s) of the images (CLIP score)")
    qual.add_argument("--prompts_file", default=None, help="prompts, one per line (CLIP score)")
    qual.add_argument("--image_size", type=int, default=None, help="resize every image first (mixed sizes)")
    qual.add_argument("--batch_size", type=int, default=50)
    return parser


def _quality(args) -> int:
    if args.reference is None and args.clip_model is None:
        raise ValueError("nothing to compute: give `--reference` (FID) and/or `--clip_model` (CLIP score).")
    prompts = read_prompts(args.prompt, args.prompts_file) if args.clip_model else None
    if args.clip_model and not prompts:
        raise ValueError("`--clip_model` needs the images' prompts (`--prompt` or `--prompts_file`).")
    image_paths(args.images, argument="images")  # fid() checks the rest before it reads an image
    if args.clip_model is not None:
        check_local_folder(args.clip_model, "clip_model")
    print("| images | metric | value |")
    print("|---|---|---|")
    if args.reference is not None:
        value = fid(args.images, args.reference, features=args.features, weights=args.feature_weights,
                    batch_size=args.batch_size, image_size=args.image_size)
        name = "FID" if args.features == "inception" else f"FD ({args.features})"
        print(f"| {args.images} | {name} vs {args.reference} | {value:.4f} |")
    if args.clip_model is not None:
        value = clip_score(args.images, prompts, weights=args.clip_model, batch_size=args.batch_size)
        print(f"| {args.images} | CLIP score | {value:.4f} |")
    return 0


def _serve(args) -> int:
    try:
        from .serve import serve  # noqa: PLC0415 (gradio is the optional `serve` extra)
    except ImportError as err:
        raise ValueError(f"`serve` needs gradio: pip install 'diffusers_fastgen[serve]' ({err}).") from None
    pipeline_class_name(args.model)  # a folder that is not a pipeline: before anything starts
    disable_progress_bar()
    serve(args.model, teacher=args.teacher, teacher_steps=args.teacher_steps, lora=args.lora, host=args.host,
          port=args.port, quantize=args.quantize)
    return 0


def _generate(args) -> int:
    prompts = read_prompts(args.prompt, args.prompts_file)
    check_request(pipeline_class_name(args.model), prompts=prompts, class_labels=args.class_labels, steps=args.steps,
                  batch_size=args.batch_size, num_images=args.num_images, warmup=args.warmup, repeats=args.repeats)
    disable_progress_bar()  # diffusers' loading bars would interleave with the table and the error line
    pipe = load_pipeline(args.model, lora=args.lora, dtype=args.dtype, device=args.device, quantize=args.quantize,
                         compile=args.compile, channels_last=args.channels_last, scheduler=args.scheduler)
    out = generate(pipe, prompts=prompts, class_labels=args.class_labels, num_images=args.num_images,
                   batch_size=args.batch_size, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                   warmup=args.warmup, repeats=args.repeats, output_dir=args.output_dir, height=args.height,
                   width=args.width, num_frames=args.num_frames, video_format=args.video_format)
    t = out["timing"]
    unit = "frames" if "videos" in out else "images"
    print(f"| model | batches x size | median s / batch | {unit} / s | peak RSS MB |"
          + (" median s to first block |" if "median_first_block_s" in t else ""))
    print("|---|---|---|---|---|" + ("---|" if "median_first_block_s" in t else ""))
    print(f"| {args.model} | {t['batches']} x {t['batch_size']} | {t['median_batch_s']:.4f} | {t['items_per_s']:.1f} | "
          f"{t['peak_rss_mb']:.0f} |" + (f" {t['median_first_block_s']:.4f} |" if "median_first_block_s" in t else ""))
    kind = "videos" if "videos" in out else "images"
    print(f"wrote {len(out[kind])} {kind} to {args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "serve", "quality"):
        try:
            return {"generate": _generate, "serve": _serve, "quality": _quality}[args.command](args)
        except (ValueError, TypeError, OSError) as err:
            lines = str(err).strip().splitlines() or [""]
            more = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
            print(f"diffusers-fastgen {args.command}: error: {lines[0][:400]}{more}", file=sys.stderr)
            return 2
    try:
        pipe = convert_causal_checkpoint(
            args.checkpoint, args.output_dir, recipe=None if args.recipe == "none" else args.recipe,
            use_ema=args.use_ema, transformer_config=args.transformer_config,
            attention_head_dim=args.attention_head_dim, base_pipeline=args.base_pipeline,
            dtype=DTYPES[args.dtype] if args.dtype else None, num_frames_per_block=args.num_frames_per_block,
            denoising_timesteps=args.denoising_timesteps, denoising_sigmas=args.denoising_sigmas,
            context_noise=args.context_noise,
            local_attn_size=args.local_attn_size, sink_size=args.sink_size,
            sinks_in_window=None if args.sinks_in_window is None else args.sinks_in_window == "true",
            block_sizes=args.block_sizes)
    except (ValueError, TypeError, OSError) as err:
        print(f"diffusers-fastgen convert: error: {err}", file=sys.stderr)
        return 2
    recipe = {k: pipe.config[k] for k in ("num_frames_per_block", "denoising_timesteps", "denoising_sigmas",
                                          "context_noise", "local_attn_size", "sink_size", "sinks_in_window",
                                          "block_sizes")}
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"wrote {args.output_dir}: CausalWanPipeline, transformer {params:,} parameters, recipe {json.dumps(recipe)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
