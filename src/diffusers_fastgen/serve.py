"""`diffusers-fastgen serve`: a small gradio app over any pipeline folder.

The page has the inputs the pipeline takes (a class label for DigitsPipeline, a prompt otherwise), steps,
seed and guidance, and a Generate button. Images come back as images; a CausalWanPipeline's frames are
streamed into the page block by block as they finish. With `--teacher`, a side-by-side mode runs the teacher
and the student on the same seed and shows both latencies. Sampling is the same call as `generate` (batch of
one, generator seeded with `seed`), so a page's image equals the pipeline's own output for that seed.
"""

from __future__ import annotations

import os
import socket
import time

import gradio as gr
import numpy as np
import torch

from .generate import _decode_video, load_pipeline
from .pipelines import CausalWanPipeline, DigitsPipeline


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def sample(pipe, *, label: int | None = None, prompt: str | None = None, steps: int | None = None, seed: int = 0,
           guidance_scale: float | None = None, **video_kwargs) -> np.ndarray:
    """One image (H, W, C) in [0, 1] for the seed (as `generate` draws it); CausalWanPipeline: use `stream_video`."""
    kwargs = {}
    if steps is not None:
        kwargs["num_inference_steps"] = int(steps)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = float(guidance_scale)
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))  # pipelines that draw from the global generator (SD3 / Flux)
    if isinstance(pipe, DigitsPipeline):
        return pipe([int(label)], generator=g, output_type="np", **kwargs).images[0]
    return pipe(prompt, generator=g, output_type="np", **kwargs).images[0]


def stream_video(pipe: CausalWanPipeline, *, prompt: str, seed: int = 0, guidance_scale: float | None = None,
                 num_frames: int | None = None, height: int = 8, width: int = 8):
    """Yield the frames decoded so far ((F, H, W, C) in [0, 1]) each time a block is finished."""
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    blocks = []
    kwargs = {"guidance_scale": float(guidance_scale)} if guidance_scale is not None else {}
    for block in pipe.stream([prompt], generator=g, num_frames=num_frames, height=height, width=width, **kwargs):
        blocks.append(block)
        yield _decode_video(pipe, torch.cat(blocks, 2))[0]


def _optional(text, cast):
    """'' / None -> None; otherwise `cast(text)`, with a gradio error naming the field's value."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return cast(str(text).strip())
    except ValueError:
        raise gr.Error(f"not a number: {text!r}") from None


def _to_uint8(image: np.ndarray, min_side: int = 256) -> np.ndarray:
    """(H, W, C) in [0, 1] -> uint8 RGB, enlarged by an integer nearest-neighbour factor up to `min_side` pixels
    (an 8x8 digit would be a speck in the page); every output pixel is one of the pipeline's."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] not in (1, 3):
        image = image[..., :1]
    if image.ndim == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, -1)
    k = max(1, min_side // max(image.shape[:2]))
    image = np.repeat(np.repeat(image, k, 0), k, 1)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def build_app(pipe, *, teacher=None, teacher_steps: int | None = 50, teacher_guidance: float | None = None,
              title: str = "diffusers_fastgen") -> gr.Blocks:
    """The gradio Blocks app over `pipe` (and `teacher` side by side when given, at `teacher_steps` and
    `teacher_guidance`). One warm-up sample per pipeline first, so the first click's latency is a real one."""
    digits, video = isinstance(pipe, DigitsPipeline), isinstance(pipe, CausalWanPipeline)
    if not video:
        for model, steps in ((pipe, None), *(((teacher, teacher_steps),) if teacher is not None else ())):
            sample(model, steps=steps, **({"label": 0} if digits else {"prompt": "warm-up"}))
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}")
        with gr.Row():
            if digits:
                condition = gr.Number(label="class label (0-9)", value=3, precision=0, elem_id="condition")
            else:
                condition = gr.Textbox(label="prompt", value="", elem_id="condition")
            # Textboxes, so that "empty" means the pipeline's own recipe (a gr.Number reads empty as 0).
            steps = gr.Textbox(label="steps", placeholder="the pipeline's", value="", elem_id="steps")
            seed = gr.Number(label="seed", value=0, precision=0, elem_id="seed")
            guidance = gr.Textbox(label="guidance scale", placeholder="the pipeline's", value="", elem_id="guidance")
        button = gr.Button("Generate", elem_id="generate")
        if video:
            frames = gr.Gallery(label="frames (streamed block by block)", elem_id="output", columns=8)
            latency = gr.Textbox(label="latency", elem_id="latency")

            def run_video(prompt, seed_value, guidance_value):
                start = time.perf_counter()
                for i, current in enumerate(stream_video(pipe, prompt=prompt, seed=seed_value or 0,
                                                         guidance_scale=_optional(guidance_value, float))):
                    yield [_to_uint8(f) for f in current], f"block {i + 1}: {time.perf_counter() - start:.3f} s"

            button.click(run_video, [condition, seed, guidance], [frames, latency])
            return app
        image = gr.Image(label="student" if teacher is not None else "sample", type="numpy", format="png",
                         elem_id="output", height=300)
        latency = gr.Textbox(label="latency", elem_id="latency")
        if teacher is not None:
            teacher_image = gr.Image(label=f"teacher ({teacher_steps or 'its default'} steps)", type="numpy",
                                     format="png", elem_id="teacher_output", height=300)
            teacher_latency = gr.Textbox(label="teacher latency", elem_id="teacher_latency")

        def run(condition_value, steps_value, seed_value, guidance_value):
            key = {"label": condition_value} if digits else {"prompt": condition_value}
            start = time.perf_counter()
            out = _to_uint8(sample(pipe, steps=_optional(steps_value, int), seed=seed_value or 0,
                                   guidance_scale=_optional(guidance_value, float), **key))
            results = [out, f"{time.perf_counter() - start:.3f} s"]
            if teacher is not None:
                start = time.perf_counter()
                results += [_to_uint8(sample(teacher, steps=teacher_steps, guidance_scale=teacher_guidance,
                                             seed=seed_value or 0, **key)), f"{time.perf_counter() - start:.3f} s"]
            return results

        outputs = [image, latency] + ([teacher_image, teacher_latency] if teacher is not None else [])
        button.click(run, [condition, steps, seed, guidance], outputs)
    return app


def serve(model: str, *, teacher: str | None = None, teacher_steps: int | None = 50, lora: str | None = None,
          host: str = "127.0.0.1", port: int = 7860, quantize: str | None = None, block: bool = True):
    """Load the pipeline(s) and launch the app; ValueError for a port in use (before loading anything)."""
    if not port_is_free(host, port):
        raise ValueError(f"`port` {port} on {host} is in use; pass another --port.")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    pipe = load_pipeline(model, lora=lora, quantize=quantize)
    teacher_pipe = load_pipeline(teacher) if teacher is not None else None
    name = os.path.basename(os.path.normpath(model))
    app = build_app(pipe, teacher=teacher_pipe, teacher_steps=teacher_steps, title=f"diffusers_fastgen: {name}")
    app.queue().launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False,
                       show_error=True, quiet=True)
    return app
